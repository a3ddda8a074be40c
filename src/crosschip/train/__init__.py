"""Training on any torch backend: trainer, checkpoints, health guard, faults, torchrun/FSDP2.

`crosschip train` is `crosschip.train.command`; the loop is `crosschip.train.trainer.Trainer`.
"""

from __future__ import annotations

from pathlib import Path


def step_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint at `step` under a checkpoint root. Torch-free, so that
    `crosschip run` names the checkpoint its export takes without importing the trainer."""
    return Path(root) / f"step_{step:08d}"
