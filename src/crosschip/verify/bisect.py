"""Layer bisection: the first module whose output departs from the reference beyond its band.

Each side records every module's output on the same few prompts with forward hooks (in its
own process, `capture`), and the parent walks the two records in execution order
(`compare`). Upstream errors flow downstream, so the first module out of band is where the
departure starts; everything after it is shown in the table but not blamed.

Bands (DESIGN, from PyTorch `assert_close` and the CANN/msprobe comparison rules):
- msprobe rule: a tensor fails when cosine < 0.99 and max-abs-err > 1e-3, or cosine < 0.9;
- dtype band: the norm-wise relative error ||t - r|| / ||r|| must stay within
  `BAND_GROWTH` x the dtype's rtol (fp32 1.3e-6, bf16 1.6e-2, fp16 1e-3); the factor allows
  for rounding that accumulates through a module's matmuls and through earlier layers;
- router: the chosen expert indices are compared as a set per token; the share of tokens
  whose top-k set changed (top-k flips) must stay within the dtype's `ROUTER_FLIP_BAND`
  (none in fp32; lower precision may flip genuine near-ties).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from crosschip.model import MoE, Transformer

DTYPE_RTOL = {"fp32": 1.3e-6, "bf16": 1.6e-2, "fp16": 1e-3, "int8": 1.6e-2}
"""int8 weight-only dequantizes to the compute dtype; its weights carry ~bf16-sized error."""
BAND_GROWTH = 16.0
ROUTER_FLIP_BAND = {"fp32": 0.0, "bf16": 0.05, "fp16": 0.02, "int8": 0.05}
COS_FAIL, COS_WARN, ABS_WARN = 0.9, 0.99, 1e-3


# --------------------------------------------------------------------------------------------
# Capture (runs inside a side's worker process)
# --------------------------------------------------------------------------------------------


def module_order(model: Transformer) -> Iterator[tuple[str, str, nn.Module]]:
    """(record key, human label, module) in execution order."""
    yield "embed", "embedding", model.embed
    for i, layer in enumerate(model.layers):
        yield f"layers.{i}.attn_norm", f"layer {i} attn_norm", layer.attn_norm
        yield f"layers.{i}.attn", f"layer {i} attention", layer.attn
        yield f"layers.{i}.ffn_norm", f"layer {i} ffn_norm", layer.ffn_norm
        if isinstance(layer.ffn, MoE):
            yield f"layers.{i}.router", f"layer {i} router", layer.ffn.gate
            if layer.ffn.shared_experts is not None:
                yield f"layers.{i}.shared_experts", f"layer {i} shared experts", layer.ffn.shared_experts
            # Routed experts have no single module: their sum is the MoE output minus the
            # shared experts' (derived after capture).
            yield f"layers.{i}.experts", f"layer {i} experts", layer.ffn
        else:
            yield f"layers.{i}.mlp", f"layer {i} mlp", layer.ffn
        yield f"layers.{i}", f"layer {i} output", layer
    yield "norm", "norm", model.norm
    yield "head", "head", model.head


def labels(model: Transformer) -> dict[str, str]:
    return {key: label for key, label, _ in module_order(model)}


@torch.inference_mode()
def capture(model: Transformer, prompts: list[list[int]], device: torch.device) -> dict[str, Tensor]:
    """Every module's output on `prompts`, tokens concatenated: {key: (N_tokens, ...)} fp32.

    The router records `router.indices` (N, top-k), `router.weights` and `router.scores`.
    """
    records: dict[str, list[Tensor]] = {}

    def hook(key: str):
        def save(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if key.endswith(".router"):
                weights, indices, scores = output
                for name, t in (("weights", weights), ("indices", indices), ("scores", scores)):
                    records.setdefault(f"{key}.{name}", []).append(t.detach().reshape(-1, t.shape[-1]).cpu())
                return
            # (1, T, D) -> (T, D)
            records.setdefault(key, []).append(output.detach().reshape(-1, output.shape[-1]).float().cpu())

        return save

    handles = [module.register_forward_hook(hook(key)) for key, _, module in module_order(model)]
    try:
        for ids in prompts:
            model(torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
    out = {key: torch.cat(parts) for key, parts in records.items()}
    for key in [k for k in out if k.endswith(".experts")]:
        shared = key.removesuffix("experts") + "shared_experts"
        if shared in out:
            out[key] = out[key] - out[shared]
    for key in [k for k in out if k.endswith(".router.indices")]:
        out[key] = out[key].long()
    return out


# --------------------------------------------------------------------------------------------
# Compare (runs in the parent)
# --------------------------------------------------------------------------------------------


@dataclass
class ModuleError:
    key: str
    label: str
    cosine: float
    max_abs: float
    max_rel: float
    rel_l2: float
    topk_flips: float | None = None
    """Router only: share of tokens whose chosen expert set differs from the reference."""
    departs: bool = False
    why: str = ""


def tensor_errors(ref: Tensor, tgt: Tensor) -> dict[str, float]:
    """msprobe-style metrics of `tgt` against `ref`: cosine, max abs / rel error, relative L2."""
    r, t = ref.double().flatten(), tgt.double().flatten()
    diff = (t - r).abs()
    nr, nt = r.norm(), t.norm()
    if nr == 0 and nt == 0:
        cosine = 1.0
    else:
        cosine = float((r @ t) / (nr * nt).clamp_min(1e-300))
    return {
        "cosine": cosine,
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        # msprobe's MaxRelativeErr: |t - r| / (|r| + eps).
        "max_rel": float((diff / (r.abs() + 1e-12)).max()) if diff.numel() else 0.0,
        "rel_l2": float((t - r).norm() / nr) if nr > 0 else (0.0 if nt == 0 else math.inf),
    }


def topk_flip_rate(ref_idx: Tensor, tgt_idx: Tensor) -> float:
    """Share of tokens whose chosen expert set changed (order within the top-k ignored)."""
    same = (ref_idx.sort(-1).values == tgt_idx.sort(-1).values).all(-1)
    return float((~same).float().mean())


def judge(err: ModuleError, precision: str) -> ModuleError:
    """Mark whether `err` is beyond its band, and why."""
    band = BAND_GROWTH * DTYPE_RTOL.get(precision, DTYPE_RTOL["fp32"])
    reasons = []
    if err.cosine < COS_FAIL:
        reasons.append(f"cosine {err.cosine:.4f} < {COS_FAIL}")
    elif err.cosine < COS_WARN and err.max_abs > ABS_WARN:
        reasons.append(f"cosine {err.cosine:.4f} < {COS_WARN} and max-abs {err.max_abs:.2e} > {ABS_WARN}")
    if err.rel_l2 > band:
        reasons.append(f"rel-L2 {err.rel_l2:.2e} > {band:.2e} ({precision} band)")
    if err.topk_flips is not None and err.topk_flips > ROUTER_FLIP_BAND.get(precision, 0.0):
        reasons.append(f"top-k flips on {err.topk_flips:.1%} of tokens")
    err.departs, err.why = bool(reasons), "; ".join(reasons)
    return err


def compare(ref: dict[str, Tensor], tgt: dict[str, Tensor], names: dict[str, str], precision: str) -> list[ModuleError]:
    """Per-module errors in execution order (`names` is key -> label, in that order)."""
    rows = []
    for key, label in names.items():
        if key.endswith(".router"):
            errs = tensor_errors(ref[f"{key}.scores"], tgt[f"{key}.scores"])
            flips = topk_flip_rate(ref[f"{key}.indices"], tgt[f"{key}.indices"])
            rows.append(judge(ModuleError(key, label, **errs, topk_flips=flips), precision))
        elif key in ref and key in tgt:
            rows.append(judge(ModuleError(key, label, **tensor_errors(ref[key], tgt[key])), precision))
    return rows


def first_departure(rows: list[ModuleError]) -> ModuleError | None:
    return next((r for r in rows if r.departs), None)


def bisect_report(
    rows: list[ModuleError], precision: str, *, note: str = "", none: str | None = None
) -> dict[str, Any]:
    """The first departure of `rows`; `none` is what to say when there is none (by default, that
    the difference is rounding spread over the model)."""
    first = first_departure(rows)
    none = none or (
        f"no module departs from the reference beyond its {precision} band: the difference is rounding "
        "spread over the whole model, not one faulty module"
    )
    return {
        "first_departure": first.label if first else None,
        "first_departure_key": first.key if first else None,
        "why": first.why if first else none,
        "note": note,
        "table": [asdict(r) for r in rows],
    }


def render_table(report: dict[str, Any], limit: int = 80) -> str:
    """The per-module error table as text, the first departure marked."""
    lines = [f"{'module':<26} {'cosine':>10} {'max abs':>10} {'max rel':>10} {'rel L2':>10} {'top-k flips':>11}  band"]
    for row in report["table"][:limit]:
        flips = "" if row["topk_flips"] is None else f"{row['topk_flips']:.1%}"
        mark = "FAIL" if row["departs"] else "ok"
        if row["key"] == report["first_departure_key"]:
            mark = "FAIL  <- first departure"
        lines.append(
            f"{row['label']:<26} {row['cosine']:>10.6f} {row['max_abs']:>10.2e} {row['max_rel']:>10.2e} "
            f"{row['rel_l2']:>10.2e} {flips:>11}  {mark}"
        )
    return "\n".join(lines)
