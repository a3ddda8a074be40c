"""Training on any torch backend: trainer, checkpoints, health guard, faults, torchrun/FSDP2.

`crosschip train` is `crosschip.train.command`; the loop is `crosschip.train.trainer.Trainer`.
"""
