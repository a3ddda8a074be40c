"""torch accelerators reached through the device-generic `torch.accelerator` API."""

from __future__ import annotations

import ast
import importlib.util
import sys
from functools import cache
from pathlib import Path
from typing import Any

from crosschip.backends.base import Backend

# The build facts (torch/version.py) without which a device type cannot exist: ROCm builds
# reuse the cuda device type.
BUILT_WITH = {"cuda": ("cuda", "hip"), "xpu": ("xpu",)}


@cache
def torch_build() -> dict[str, Any]:
    """The literal assignments of the installed torch's version.py (`__version__`, `cuda`,
    `hip`, `xpu`, ...), read without importing torch, which takes seconds; {} when unreadable."""
    try:
        spec = importlib.util.find_spec("torch")  # a top-level package: found, not imported
        folder = Path(next(iter(spec.submodule_search_locations)))
        tree = ast.parse((folder / "version.py").read_text(encoding="utf-8"))
    except (AttributeError, TypeError, StopIteration, OSError, SyntaxError, ValueError):
        return {}
    facts: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                facts[target.id] = ast.literal_eval(value)
            except ValueError:
                pass
    return facts


class TorchAccelerator(Backend):
    """A torch device type behind `torch.accelerator` (cuda, npu, xpu, mps)."""

    def __init__(self, device_type: str, dist_backend: str | None):
        super().__init__(
            spec=f"torch:{device_type}", runtime="torch", device_type=device_type, dist_backend=dist_backend
        )

    def build_lacks(self) -> str | None:
        if self.device_type == "mps" and sys.platform != "darwin":
            return "torch has mps on macOS only"
        keys, build = BUILT_WITH.get(self.device_type, ()), torch_build()
        if keys and all(key in build and build[key] is None for key in keys):
            return f"this torch ({build.get('__version__', 'unknown version')}) is built without {self.device_type}"
        return None

    def _accelerator_type(self) -> str | None:
        import torch

        if not torch.accelerator.is_available():
            return None
        acc = torch.accelerator.current_accelerator()
        return acc.type if acc is not None else None

    def is_available(self) -> bool:
        return self._accelerator_type() == self.device_type

    def why_unavailable(self) -> str:
        found = self._accelerator_type()
        here = f"this process has {found}" if found else "torch finds no accelerator here"
        return f"{self.spec} is not available: {here}"

    def device_count(self) -> int:
        import torch

        return torch.accelerator.device_count() if self.is_available() else 0

    def set_device(self, index: int) -> None:
        import torch

        torch.accelerator.set_device_index(index)

    def synchronize(self) -> None:
        import torch

        torch.accelerator.synchronize()

    def expert_row_multiple(self, dtype: str) -> int:
        # The grouped GEMM of the MoE experts (`MoE.grouped`) wants each expert's group of rows
        # to start 16 bytes apart in the weight gradient, which reduces over those rows (the
        # alignment torchtitan pads its token groups to, for the same kernels).
        return 16 // (4 if dtype == "fp32" else 2)

    def memory_bytes(self) -> int | None:
        import torch

        try:
            return torch.accelerator.get_memory_info()[1]
        except (AttributeError, RuntimeError):
            return None
