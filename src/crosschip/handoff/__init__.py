"""The hand-off: a trained checkpoint becomes a bundle for a target (precision policy, int8, ONNX)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from crosschip.errors import CrosschipError, flag

ONNX_FILE = "model.onnx"
"""The general graph of an ONNX Runtime bundle (see `onnx_export`); its decode graph lies beside it."""


def check_target_policy(backend: Any, policy: str, label: Callable[[str], str] = flag) -> None:
    """A precision policy the export target refuses (an emulated chip without bf16), named by
    `label`: `crosschip export`'s flag, or a run config's key. Torch-free, for `crosschip run`'s
    checks before its first stage."""
    if policy in backend.emulated_refused_dtypes:
        raise CrosschipError(f"{backend} refuses {policy}; set {label('dtype')} to fp16, int8 or fp32")
