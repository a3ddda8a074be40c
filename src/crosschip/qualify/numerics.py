"""Op numerics: every op the model uses, on a backend in a dtype, against an fp64 CPU result.

Each op has seeded fp64 inputs, the device implementation (the model's own code where it
has one) and an independent fp64 reference written out in plain math. The device sees the
inputs rounded to the dtype under test, and the fp64 reference is computed from those same
rounded inputs, so the error measures the op's compute, not the input rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from crosschip.model import DTYPES, MLP, RMSNorm, apply_rope, rope_cos_sin
from crosschip.qualify.metrics import error_stats


@dataclass(frozen=True)
class Op:
    """One op under test: `make_inputs(gen)` -> fp64 CPU tensors; `run` on the device; fp64 `reference`."""

    name: str
    make_inputs: Callable[[torch.Generator], dict[str, Tensor]]
    run: Callable[[dict[str, Tensor]], Tensor]
    reference: Callable[[dict[str, Tensor]], Tensor]
    float_inputs: tuple[str, ...] = ()
    """Inputs cast to the dtype under test; the others (indices, positions) keep their dtype."""


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# -- matmul ------------------------------------------------------------------------------------
def _matmul_inputs(gen):
    return {"a": _randn(gen, 64, 256), "b": _randn(gen, 256, 96, scale=256**-0.5)}


MATMUL = Op("matmul", _matmul_inputs, lambda t: t["a"] @ t["b"], lambda t: t["a"] @ t["b"], ("a", "b"))


# -- softmax -----------------------------------------------------------------------------------
def _softmax_ref(t):
    x = t["x"]
    e = (x - x.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


SOFTMAX = Op(
    "softmax", lambda g: {"x": _randn(g, 32, 128, scale=3.0)}, lambda t: t["x"].softmax(-1), _softmax_ref, ("x",)
)


# -- RMSNorm -----------------------------------------------------------------------------------
def _rmsnorm_run(t):
    norm = RMSNorm(t["x"].shape[-1], eps=1e-6).to(t["x"].device, t["w"].dtype)
    with torch.no_grad():
        norm.weight.copy_(t["w"])
    return norm(t["x"])


def _rmsnorm_ref(t):
    x = t["x"]
    return t["w"] * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()


RMSNORM = Op(
    "rmsnorm",
    lambda g: {"x": _randn(g, 32, 64, scale=2.0), "w": 1 + _randn(g, 64, scale=0.1)},
    _rmsnorm_run,
    _rmsnorm_ref,
    ("x", "w"),
)


# -- RoPE (interleaved pairs) ------------------------------------------------------------------
ROPE_THETA = 10000.0


def _rope_inputs(gen):
    positions = torch.randint(0, 256, (2, 32), generator=gen)
    return {"x": _randn(gen, 2, 32, 4, 16), "positions": positions}


def _rope_run(t):
    cos, sin = rope_cos_sin(t["positions"], t["x"].shape[-1], ROPE_THETA)
    return apply_rope(t["x"], cos, sin)


def _rope_ref(t):
    x, dim = t["x"], t["x"].shape[-1]
    inv_freq = ROPE_THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = t["positions"].double()[..., None, None] * inv_freq  # (B, T, 1, dim/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], dim=-1)


ROPE = Op("rope", _rope_inputs, _rope_run, _rope_ref, ("x",))


# -- routing: sigmoid, group-limited top-k, gather, scatter ------------------------------------
N_EXPERTS, N_GROUP, TOPK_GROUP, TOPK = 16, 4, 2, 4


def _routing_inputs(gen):
    # Distinct, well-separated scores per row (a shuffled ladder) so the chosen experts are
    # the same in every dtype and the check measures the values, not near-tie flips.
    ladder = torch.linspace(-3.0, 3.0, N_EXPERTS, dtype=torch.float64)
    perm = torch.stack([torch.randperm(N_EXPERTS, generator=gen) for _ in range(64)])
    return {"logits": ladder[perm] + _randn(gen, 64, N_EXPERTS, scale=0.01)}


def route(logits: Tensor) -> Tensor:
    """The model's routing in the logits' dtype: dense (N, E) weights of the chosen experts."""
    scores = logits.sigmoid()
    grouped = scores.view(-1, N_GROUP, N_EXPERTS // N_GROUP)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group)
    keep = group_scores.topk(TOPK_GROUP, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, keep, True)
    masked = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
    indices = masked.topk(TOPK, dim=-1).indices
    weights = scores.gather(1, indices)
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.zeros_like(scores).scatter(1, indices, weights)


def _routing_ref(t):
    return route(t["logits"])  # fp64 on the CPU; the inputs make the selection unambiguous


ROUTING = Op("routing", _routing_inputs, lambda t: route(t["logits"]), _routing_ref, ("logits",))


# -- SwiGLU ------------------------------------------------------------------------------------
def _swiglu_inputs(gen):
    d, f = 64, 128
    return {
        "x": _randn(gen, 32, d),
        "w1": _randn(gen, f, d, scale=d**-0.5),
        "w3": _randn(gen, f, d, scale=d**-0.5),
        "w2": _randn(gen, d, f, scale=f**-0.5),
    }


def _swiglu_run(t):
    mlp = MLP(t["w1"].shape[1], t["w1"].shape[0]).to(t["x"].device, t["x"].dtype)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(mlp, name).weight.copy_(t[name])
    return mlp(t["x"])


def _swiglu_ref(t):
    a = t["x"] @ t["w1"].T
    return ((a / (1 + (-a).exp())) * (t["x"] @ t["w3"].T)) @ t["w2"].T


SWIGLU = Op("swiglu", _swiglu_inputs, _swiglu_run, _swiglu_ref, ("x", "w1", "w2", "w3"))


# -- attention (causal, as the naive MLA path calls it) ----------------------------------------
def _attn_inputs(gen):
    return {name: _randn(gen, 2, 4, 32, 24) for name in ("q", "k", "v")}


def _attn_run(t):
    scale = t["q"].shape[-1] ** -0.5
    return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True, scale=scale)


def _attn_ref(t):
    q, k, v = t["q"], t["k"], t["v"]
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return _softmax_ref({"x": scores}) @ v


ATTENTION = Op("attention", _attn_inputs, _attn_run, _attn_ref, ("q", "k", "v"))

OPS: dict[str, Op] = {op.name: op for op in (MATMUL, SOFTMAX, RMSNORM, ROPE, ROUTING, SWIGLU, ATTENTION)}


def measure_op(op: Op, device: torch.device, dtype: str, seed: int = 0) -> dict[str, Any]:
    """Run `op` on `device` in `dtype` and return its error stats against fp64 (or the error)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = op.make_inputs(gen)
    rounded = {k: (v.to(DTYPES[dtype]).double() if k in op.float_inputs else v) for k, v in inputs.items()}
    on_device = {k: (v.to(device, DTYPES[dtype]) if k in op.float_inputs else v.to(device)) for k, v in rounded.items()}
    try:
        out = op.run(on_device)
    except Exception as e:  # noqa: BLE001 - a missing kernel is a measurement, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return error_stats(out, op.reference(rounded))
