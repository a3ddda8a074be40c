"""Apple GPUs through torch's mps device type; single process only."""

from __future__ import annotations

from crosschip.backends.accelerator import TorchAccelerator


class MPSBackend(TorchAccelerator):
    def __init__(self):
        super().__init__("mps", None)
