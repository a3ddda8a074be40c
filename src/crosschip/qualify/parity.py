"""Model parity: the debug model's logits and gradients on the target vs the reference.

Both sides are compared with the fp64 CPU result of the same model and inputs, and judged
like single ops (bands, cosine rule, error ratio to the reference's error), with one
difference: a whole model in bf16 routes some tokens to other experts than fp64 does (the
router scores of a fresh model are near ties), so some expert gradients miss the cosine rule
on any backend. Such an error is excused when the reference shows the same error in the same
dtype (ratio <= 2): it is a limit of the dtype, not of the target.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosschip.qualify.metrics import RATIO_GOOD, error_stats, judge

if TYPE_CHECKING:
    from torch import Tensor


def load_parity(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def compare_parity(
    dtype: str, x: dict[str, Tensor], ref: dict[str, Tensor] | None, gold: dict[str, Tensor]
) -> dict[str, Any]:
    """Judge the logits and every gradient of `x` (run in `dtype`); the worst gradient stands for all."""

    def judged(key: str) -> dict[str, Any]:
        ref_stats = error_stats(ref[key], gold[key]) if ref is not None and key in ref else None
        verdict = judge(dtype, error_stats(x[key], gold[key]), ref_stats)
        if not verdict["ok"] and verdict["finite"] and verdict["ratio"] is not None and verdict["ratio"] <= RATIO_GOOD:
            why = f"{verdict['why']}, as on the reference ({verdict['ratio']:.2f}x its error): a {dtype} limit"
            verdict = {**verdict, "ok": True, "why": why, "excused": True}
        return verdict

    logits = judged("logits")
    grads = {k.removeprefix("grad."): judged(k) for k in gold if k.startswith("grad.") and k in x}
    missing = [k.removeprefix("grad.") for k in gold if k.startswith("grad.") and k not in x]
    failed = {k: g for k, g in grads.items() if not g["ok"]}
    worst_name = min(grads, key=lambda k: (grads[k]["ok"], grads[k]["cosine"])) if grads else None
    backward_ok = not failed and not missing and bool(grads)
    return {
        "dtype": dtype,
        "forward_ok": logits["ok"],
        "backward_ok": backward_ok,
        "logits": logits,
        "worst_grad": {"param": worst_name, **grads[worst_name]} if worst_name else None,
        "failed_grads": sorted(failed),
        "missing_grads": missing,
    }


def parity_why(p: dict[str, Any], backward: bool) -> str:
    """One line citing the measurement: logits (and worst gradient) error and cosine."""
    lg = p["logits"]
    text = f"logits rel err {lg['rel_err']:.1e}, cosine {lg['cosine']:.5f} ({lg['why']})"
    if backward and p["worst_grad"]:
        wg = p["worst_grad"]
        text += f"; worst grad {wg['param']} rel err {wg['rel_err']:.1e}, cosine {wg['cosine']:.5f} ({wg['why']})"
        if p["failed_grads"]:
            text += f"; {len(p['failed_grads'])} gradients fail"
    return text
