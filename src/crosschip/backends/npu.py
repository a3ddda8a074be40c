"""Huawei Ascend through torch_npu; hccl collectives.

torch_npu registers the `npu` device type with torch.accelerator when imported. It refuses
to start next to another active accelerator, so it is imported only when this backend is
asked for, in a process that serves this backend alone. Untested here: no Ascend hardware.
"""

from __future__ import annotations

from crosschip.backends.accelerator import TorchAccelerator


class NPUBackend(TorchAccelerator):
    def __init__(self):
        super().__init__("npu", "hccl")

    def import_runtime(self) -> None:
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise ImportError("torch_npu is not installed (pip install 'crosschip[ascend]')") from None

    def device_name(self) -> str:
        import torch

        if not self.is_available():
            return "npu (absent)"
        return torch.npu.get_device_name()  # registered by torch_npu
