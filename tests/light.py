"""`crosschip ARGS` in a fresh process that also reports which runtimes it imported."""

from __future__ import annotations

import subprocess
import sys

# The runtimes a stage imports only once its command line has passed its checks: a help text or
# a mistyped path is answered at once, not after seconds of importing torch.
RUNTIMES = ("torch", "onnx", "onnxruntime", "transformers", "matplotlib", "fastapi", "uvicorn", "safetensors")
_LIGHT = f"""
import sys
from crosschip.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("imported:", *sorted({{m.split(".")[0] for m in sys.modules}} & set({RUNTIMES!r})), file=sys.stderr)
sys.exit(code)
"""


def cli_light(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`crosschip ARGS` in a fresh process, and the runtimes it imported on the way (its own
    stderr without the report line)."""
    out = subprocess.run(
        [sys.executable, "-c", _LIGHT, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    *rest, last = out.stderr.splitlines() or [""]
    assert last.startswith("imported:"), out.stderr
    out.stderr = "\n".join(rest)
    return out, last.split()[1:]
