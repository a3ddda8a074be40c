"""Backends: one file each behind one interface (`base.Backend`).

`get_backend("torch:cuda")` returns the backend object without importing any vendor
runtime; call `.require()` in the process that will use it.
"""

from __future__ import annotations

from collections.abc import Callable

from crosschip.backends import emulated
from crosschip.backends.base import Backend, BackendUnavailable
from crosschip.backends.cpu import CPUBackend
from crosschip.backends.cuda import CUDABackend
from crosschip.backends.mps import MPSBackend
from crosschip.backends.npu import NPUBackend
from crosschip.backends.ort import OrtBackend
from crosschip.backends.xpu import XPUBackend
from crosschip.errors import CrosschipError

REGISTRY: dict[str, Callable[[], Backend]] = {
    "torch:cpu": CPUBackend,
    "torch:cuda": CUDABackend,
    "torch:npu": NPUBackend,
    "torch:xpu": XPUBackend,
    "torch:mps": MPSBackend,
    "ort:cpu": lambda: OrtBackend("cpu"),
    "ort:cuda": lambda: OrtBackend("cuda"),
    "ort:cann": lambda: OrtBackend("cann"),
    "emu:fp16-only": emulated.fp16_only,
    "emu:flaky": emulated.flaky,
    "emu:slow-collectives": emulated.slow_collectives,
}

TORCH_ACCELERATORS = ["torch:cuda", "torch:npu", "torch:xpu", "torch:mps"]


def get_backend(spec: str, *, to_train: bool = False) -> Backend:
    """The backend named `spec`; a clear error lists the known names for a typo. `to_train`:
    it must be one that trains (ONNX Runtime's providers serve only)."""
    if spec not in REGISTRY:
        raise CrosschipError(f"unknown backend {spec!r}; known backends: {', '.join(REGISTRY)}")
    backend = REGISTRY[spec]()
    if to_train and backend.runtime != "torch":
        trainable = [name for name, cls in REGISTRY.items() if cls().runtime == "torch"]
        raise CrosschipError(f"{spec} serves but does not train (ONNX Runtime); train on one of {', '.join(trainable)}")
    return backend


__all__ = ["Backend", "BackendUnavailable", "REGISTRY", "TORCH_ACCELERATORS", "get_backend"]
