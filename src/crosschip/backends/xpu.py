"""Intel GPUs through torch's xpu device type; xccl collectives."""

from __future__ import annotations

from crosschip.backends.accelerator import TorchAccelerator


class XPUBackend(TorchAccelerator):
    def __init__(self):
        super().__init__("xpu", "xccl")
