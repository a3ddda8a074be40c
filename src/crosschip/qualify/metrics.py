"""Error metrics and the numerics bands every comparison in qualify is judged by.

Bands follow PyTorch `assert_close` defaults (rtol per dtype) and the CANN/msprobe rules:
an output fails when cosine < 0.99 while max-abs-err > 1e-3, or when cosine < 0.9. A target
is also judged by its error relative to a trusted reference's error against the same fp64
result: a ratio <= 2 is good.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the judging is plain Python: the qualify orchestrator imports no torch
    from torch import Tensor

BANDS: dict[str, float] = {"fp32": 1.3e-6, "bf16": 1.6e-2, "fp16": 1e-3}
"""Largest relative (normwise) error vs fp64 that is in band for each compute dtype."""
RATIO_GOOD = 2.0
"""err(target) / err(reference) at or below this is good."""
COSINE_FAIL, COSINE_WARN, MAX_ABS_WARN = 0.9, 0.99, 1e-3


def error_stats(out: Tensor, ref: Tensor) -> dict[str, Any]:
    """Errors of `out` against the fp64 `ref` (same shape): max-abs, normwise relative, cosine."""
    import torch

    out64 = out.detach().to("cpu", torch.float64).flatten()
    ref64 = ref.detach().to("cpu", torch.float64).flatten()
    finite = bool(torch.isfinite(out64).all())
    if not finite:
        return {"finite": False, "max_abs": math.inf, "rel_err": math.inf, "cosine": 0.0}
    diff = out64 - ref64
    ref_norm = float(ref64.norm())
    out_norm = float(out64.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    if ref_norm > 0 and out_norm > 0:
        cosine = float(out64 @ ref64) / (out_norm * ref_norm)
    else:
        cosine = 1.0 if out_norm == ref_norm else 0.0
    return {
        "finite": True,
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_err": rel,
        "cosine": cosine,
    }


def cosine_rule_fails(stats: dict[str, Any]) -> bool:
    """The msprobe rule: cosine < 0.99 with max-abs-err > 1e-3, or cosine < 0.9."""
    return stats["cosine"] < COSINE_FAIL or (stats["cosine"] < COSINE_WARN and stats["max_abs"] > MAX_ABS_WARN)


def error_ratio(err: float, ref_err: float, dtype: str) -> float:
    """err / ref_err with a floor far below the band, so two negligible errors compare as ~1."""
    floor = BANDS[dtype] * 1e-3
    return (err + floor) / (ref_err + floor)


def judge(dtype: str, stats: dict[str, Any], ref_stats: dict[str, Any] | None) -> dict[str, Any]:
    """Judge one output in `dtype` against fp64, and against the reference's error when known.

    Fails on non-finite output or the cosine rule. Otherwise it passes when the relative
    error is in the dtype's band, or when it is out of band but no worse than 2x the
    reference's error (the reference is out of band too, so the op itself is the limit).
    """
    band = BANDS[dtype]
    ratio = None
    if ref_stats is not None and ref_stats.get("finite") and stats.get("finite"):
        ratio = error_ratio(stats["rel_err"], ref_stats["rel_err"], dtype)
    verdict: dict[str, Any] = {"dtype": dtype, "band": band, "ratio": ratio, **stats}
    if not stats["finite"]:
        return {**verdict, "ok": False, "why": "non-finite output"}
    if cosine_rule_fails(stats):
        why = f"cosine {stats['cosine']:.4f} with max-abs-err {stats['max_abs']:.2e}"
        return {**verdict, "ok": False, "why": why}
    in_band = stats["rel_err"] <= band
    ratio_ok = ratio is not None and ratio <= RATIO_GOOD
    if in_band or ratio_ok:
        why = "in band" if in_band else f"out of band but {ratio:.2f}x the reference's error"
        if in_band and ratio is not None and not ratio_ok:
            why += f" ({ratio:.1f}x the reference's error)"
        return {**verdict, "ok": True, "why": why}
    ratio_text = f", {ratio:.1f}x the reference's error" if ratio is not None else ", no reference error to compare"
    return {**verdict, "ok": False, "why": f"rel err {stats['rel_err']:.2e} > {dtype} band {band:.1e}{ratio_text}"}


def refusal(emulated_refused: frozenset[str] | set[str], dtype: str, spec: str, emulation: str | None) -> str | None:
    """The error an emulated chip raises for a dtype it lacks, or None."""
    if dtype in emulated_refused:
        return f"{spec} refuses {dtype} (emulation: {emulation})"
    return None
