"""NVIDIA (and ROCm, which reuses the cuda device type) through torch; nccl collectives."""

from __future__ import annotations

from crosschip.backends.accelerator import TorchAccelerator


class CUDABackend(TorchAccelerator):
    def __init__(self):
        super().__init__("cuda", "nccl")

    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name() if self.is_available() else "cuda (absent)"
