"""The one small interface every backend implements.

A backend is a runtime plus a device: `torch:cpu`, `torch:cuda`, `torch:npu`, `ort:cpu`...
Everything device-specific (device strings, the collective backend, synchronisation, the
import that brings a vendor plugin in) lives behind this interface, so nothing outside
`backends/` names a vendor.

Capabilities are *not* declared here: `crosschip probe` measures them by running ops. (Two
hints steer defaults only: `native_bf16`, which asks the hardware, and `expert_row_multiple`.)
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crosschip.errors import CrosschipError


class BackendUnavailable(CrosschipError):
    """The backend is known but cannot run in this process or on this machine."""


@dataclass
class Backend:
    """A place where the model can run.

    spec: the user-facing name (`torch:cuda`); runtime: `torch` or `ort`; device_type: the
    torch device type or the ORT execution-provider family.
    """

    spec: str
    runtime: str
    device_type: str
    dist_backend: str | None = None
    """torch.distributed backend for several processes (gloo, nccl, hccl), None if it has none."""
    emulation: str | None = None
    """Set on emulated targets: what is emulated, named in every output."""
    emulated_faults: list[str] = field(default_factory=list)
    """Fault injections an emulated flaky target applies to training (see train.faults)."""
    emulated_refused_dtypes: frozenset[str] = frozenset()
    """dtypes an emulated target refuses for compute, as a chip without them would."""
    emulated_collective_delay_s: float = 0.0
    """Extra seconds an emulated slow interconnect adds to every collective."""

    # -- runtime ---------------------------------------------------------------------------
    def import_runtime(self) -> None:
        """Import whatever plugin this backend needs (torch_npu for npu); no-op by default."""

    def is_available(self) -> bool:
        raise NotImplementedError

    def why_unavailable(self) -> str:
        return f"{self.spec} is not available on this machine"

    def build_lacks(self) -> str | None:
        """Why the installed runtime cannot have this backend at all, known cheaply: without
        importing torch (a torch built without CUDA has no cuda device), or from onnxruntime's
        light import (a build without the provider); None: only the runtime can tell."""
        return None

    def check_build(self) -> Backend:
        """Fail with a clear error when the installed runtime cannot have this backend at all
        (`build_lacks`): cheap, for checks before a command starts its work."""
        lacks = self.build_lacks()
        if lacks:
            raise BackendUnavailable(f"{self.spec} is not available: {lacks}")
        return self

    def require(self) -> Backend:
        """Import the runtime and fail with a clear error when the backend cannot run here."""
        self.check_build()
        try:
            self.import_runtime()
        except ImportError as e:
            raise BackendUnavailable(f"{self.spec}: {e}") from None
        if not self.is_available():
            raise BackendUnavailable(self.why_unavailable())
        return self

    # -- torch devices ----------------------------------------------------------------------
    def device(self, index: int = 0) -> Any:
        import torch

        return torch.device(self.device_type) if self.device_type == "cpu" else torch.device(self.device_type, index)

    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        """Bind this process to device `index` (one accelerator per process)."""

    def synchronize(self) -> None:
        """Wait for queued work; timing needs it on asynchronous devices."""

    def call_times(self, fn: Callable[[], object], reps: int) -> list[float]:
        """Seconds of each of `reps` calls of `fn`, with queued work waited for around each call
        (an asynchronous device is timed for the work, not the launch)."""
        times = []
        for _ in range(reps):
            self.synchronize()
            t0 = time.perf_counter()
            fn()
            self.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    def prepare_training_process(self) -> None:
        """Process-wide settings a training process on this backend wants; none by default."""

    def memory_bytes(self) -> int | None:
        """Device memory in bytes, None where unknown."""
        return None

    def shares_host_memory(self) -> bool:
        """Whether this host's processes all train in the one memory `memory_bytes` gives (the
        host's RAM), rather than in a device of their own each."""
        return False

    def native_bf16(self) -> bool:
        """Whether bf16 matmuls run on bf16 hardware here (so `train.dtype = auto` takes them)."""
        return True

    def expert_row_multiple(self, dtype: str) -> int:
        """Round each MoE expert's row count up to a multiple of this (see `MoE.row_multiple`)."""
        return 1

    def attention_keeps_scores(self) -> bool:
        """Whether training attention (SDPA with the packed-document mask, q/k wider than v)
        keeps (heads, T, T) scores for the backward, as torch's math path does (the training
        memory estimate counts them). True unless a backend knows its fused kernels run it."""
        return True

    def device_name(self) -> str:
        return platform.processor() or platform.machine()

    def fingerprint(self) -> dict[str, Any]:
        """What produced a result: runtime version and device, recorded in bundles and reports."""
        info: dict[str, Any] = {"backend": self.spec, "device": self.device_name()}
        if self.runtime == "torch":
            import torch

            info["torch"] = torch.__version__
        if self.emulation:
            info["emulation"] = self.emulation
        return info

    def __str__(self) -> str:
        return self.spec + (f" (emulated: {self.emulation})" if self.emulation else "")
