"""torch accelerators reached through the device-generic `torch.accelerator` API."""

from __future__ import annotations

from crosschip.backends.base import Backend


class TorchAccelerator(Backend):
    """A torch device type behind `torch.accelerator` (cuda, npu, xpu, mps)."""

    def __init__(self, device_type: str, dist_backend: str | None):
        super().__init__(
            spec=f"torch:{device_type}", runtime="torch", device_type=device_type, dist_backend=dist_backend
        )

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
