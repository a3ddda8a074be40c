"""Resident memory of a served bundle, measured in a fresh subprocess.

`python -m crosschip.handoff.memory BUNDLE SPEC` builds the executor for SPEC (the way
`crosschip serve` does), runs a short prefill and decode, and prints one JSON line with its RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def measure_serving_rss(
    bundle: str | Path, backend_spec: str, *, threads: int = 1, timeout_s: float = 300
) -> dict[str, Any]:
    """RSS (bytes) of a process serving `bundle` on `backend_spec`: baseline after imports, then
    after loading and a few steps. rss_served_bytes is the difference: what serving added."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "crosschip.handoff.memory", str(bundle), backend_spec]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:  # the child's last line is its exception
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the memory probe exited {done.returncode}: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _executor(bundle: str, spec: str):
    """The executor `crosschip serve` would build; torch loads through `load_for_serving`,
    which also reads int8 bundles (dequantized)."""
    from crosschip.backends import get_backend
    from crosschip.handoff.precision import load_for_serving
    from crosschip.serve.executor import TorchExecutor, make_executor

    backend = get_backend(spec).require()
    if backend.runtime == "ort":
        return make_executor(bundle, spec, max_batch=1)
    model, _ = load_for_serving(bundle, backend)
    return TorchExecutor(model, backend, max_batch=1)


def main(bundle: str, spec: str) -> None:
    import onnxruntime  # noqa: F401  (the baseline includes both runtimes' libraries)
    import torch

    from crosschip.serve.executor import Chunk

    torch.set_num_threads(1)
    base = _rss()
    executor = _executor(bundle, spec)
    loaded = _rss()
    executor.can_allocate(0, 64)
    executor.step([Chunk(0, list(range(1, 17)), 0)])
    for pos in range(16, 32):
        executor.step([Chunk(0, [1], pos)])
    served = _rss()
    result = {
        "backend": spec,
        "rss_baseline_bytes": base,
        "rss_loaded_bytes": loaded,
        "rss_after_decode_bytes": served,
        "rss_served_bytes": served - base,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
