"""ONNX Runtime contrib ops that the exported graphs use, as torch custom ops.

Each op's eager body computes the kernel's function (it runs only while tracing and in
tests); `TRANSLATIONS` maps it to the contrib node for `torch.onnx.export`, with a
hand-written onnx `OpSchema`, because onnx does not know the com.microsoft ops.

`ort_moe` -> `com.microsoft.MoE`: the routed experts of a few decode tokens.
ORT's CPU kernel (interleaved SwiGLU, `swiglu_fusion=1`) selects the top-k of a softmax over
its `router_probs` input and weights each chosen expert by that softmax. DeepSeek's router
selects by biased sigmoid scores and weights by the unbiased ones, so the node is fed routing
*logits* built from our own choice: log(weight) at the chosen experts, -inf elsewhere. Their
softmax is weight / sum(weights) at exactly the chosen experts; multiplying the node's output
by sum(weights) restores the weights as they are (normalised or not, with the route scale).
Measured on arith-tiny, CPU, 1 thread, trained weights, the decode graph's batch-1 step: 0.74 ms
with gathered expert weights, 0.61 ms with this node (with a script that created the new
graph's session second and fed fixed ids, which favours it by up to ~9%; see
benchmarks/graph_ab.py). From 4 tokens the dense form is faster (graph_ab.py: the node alone
measured 1.145x the decode graph's time at 4 rows), so only the few-token branch uses it.

`ort_rope` -> `com.microsoft.RotaryEmbedding`: RoPE on de-interleaved halves, one node where
the written-out form is a split, four products, a sum, a difference and a concat. Measured on
the same decode graph with benchmarks/graph_ab.py: 0.942x the written-out form's step time at
batch 1, 0.955x at batch 8.
"""

from __future__ import annotations

import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from torch import Tensor

from crosschip.model import MoE


@torch.library.custom_op("crosschip::ort_moe", mutates_args=())
def ort_moe(x: Tensor, logits: Tensor, fc1: Tensor, fc2: Tensor, k: int) -> Tensor:
    """What the kernel computes. x (N, D); logits (N, E); fc1 (E, 2I, D) with gate and up rows
    interleaved; fc2 (E, D, I)."""
    weights, chosen = logits.float().softmax(-1).topk(k, dim=-1)  # (N, k)
    h = torch.einsum("nd,nkod->nko", x, fc1[chosen])  # (N, k, 2I)
    y = torch.einsum("nki,nkdi->nkd", F.silu(h[..., 0::2]) * h[..., 1::2], fc2[chosen])
    return (weights[..., None].to(x.dtype) * y).sum(1)


@ort_moe.register_fake
def _(x: Tensor, logits: Tensor, fc1: Tensor, fc2: Tensor, k: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("crosschip::ort_rope", mutates_args=())
def ort_rope(x: Tensor, positions: Tensor, cos_table: Tensor, sin_table: Tensor, num_heads: int) -> Tensor:
    """What the kernel computes (interleaved=0). x (B, T, num_heads * R), each head's R values
    as halves [x1 | x2]; positions (B, T); cos_table, sin_table (max_positions, R / 2).
    Returns [x1 cos - x2 sin | x2 cos + x1 sin] per head."""
    B, T, _ = x.shape
    cos, sin = cos_table[positions][:, :, None], sin_table[positions][:, :, None]  # (B, T, 1, R/2)
    x1, x2 = x.reshape(B, T, num_heads, -1).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).reshape(B, T, -1)


@ort_rope.register_fake
def _(x: Tensor, positions: Tensor, cos_table: Tensor, sin_table: Tensor, num_heads: int) -> Tensor:
    return torch.empty_like(x)


def routed_experts(moe: MoE, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
    """sum_k weights[:, k] * expert_{indices[:, k]}(x) through `ort_moe`. The stacks are built
    from the per-expert parameters in the graph (every expert keeps its own name); ONNX Runtime
    folds them into constants when it loads the session."""
    logits = torch.full((x.shape[0], moe.n_experts), float("-inf"), dtype=x.dtype, device=x.device)
    logits = logits.scatter(1, indices, weights.log())
    fc1 = torch.stack([torch.stack([e.w1.weight, e.w3.weight], dim=1).flatten(0, 1) for e in moe.experts])
    fc2 = torch.stack([e.w2.weight for e in moe.experts])
    return ort_moe(x, logits, fc1, fc2, moe.topk) * weights.sum(-1, keepdim=True)


def _param(name: str, optional: bool = False, type_str: str = "T") -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, param_option=option)


_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


# The part of ORT's contrib schema that we emit (onnx itself does not know the op).
_SCHEMA = OpSchema(
    "MoE",
    "com.microsoft",
    1,
    inputs=[
        _param("input"),
        _param("router_probs"),
        _param("fc1_experts_weights"),
        _param("fc1_experts_bias", optional=True),
        _param("fc2_experts_weights"),
    ],  # fmt: skip
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", _FLOATS, "")],
    attributes=[
        OpSchema.Attribute(name, kind, "")
        for name, kind in (
            ("k", OpSchema.AttrType.INT),
            ("activation_type", OpSchema.AttrType.STRING),
            ("swiglu_fusion", OpSchema.AttrType.INT),
            ("normalize_routing_weights", OpSchema.AttrType.INT),
            ("activation_alpha", OpSchema.AttrType.FLOAT),
            ("activation_beta", OpSchema.AttrType.FLOAT),
        )
    ],
)
_MOE = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", _SCHEMA)


def _ort_moe_to_onnx(x, logits, fc1, fc2, k: int):
    # alpha 1 and beta 0 make the kernel's SwiGLU silu(gate) * up (its defaults are other values).
    return _MOE(x, logits, fc1, None, fc2, k=k, activation_type="swiglu", swiglu_fusion=1,
                normalize_routing_weights=0, activation_alpha=1.0, activation_beta=0.0)  # fmt: skip


_ROPE_SCHEMA = OpSchema(
    "RotaryEmbedding",
    "com.microsoft",
    1,
    inputs=[_param("input"), _param("position_ids", type_str="M"), _param("cos_cache"), _param("sin_cache")],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", _FLOATS, ""), ("M", ["tensor(int64)"], "")],
    attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("interleaved", "num_heads")],
)
_ROPE = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "RotaryEmbedding", _ROPE_SCHEMA)


def _ort_rope_to_onnx(x, positions, cos_table, sin_table, num_heads: int):
    return _ROPE(x, positions, cos_table, sin_table, interleaved=0, num_heads=num_heads)


TRANSLATIONS = {
    torch.ops.crosschip.ort_moe.default: _ort_moe_to_onnx,
    torch.ops.crosschip.ort_rope.default: _ort_rope_to_onnx,
}
"""`custom_translation_table` for `torch.onnx.export`."""
