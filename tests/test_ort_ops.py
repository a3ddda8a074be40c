"""ONNX Runtime's contrib nodes against our model (the fused MoE's routing-logit mapping, the
RoPE node's layout): each op's eager function, and the node in a real ORT session."""

from __future__ import annotations

from dataclasses import replace

import onnx
import pytest
import torch

from crosschip.config import model_preset
from crosschip.handoff.onnx_export import open_session
from crosschip.handoff.ort_ops import TRANSLATIONS, ort_rope, routed_experts
from crosschip.model import MoE, apply_rope, rope_cos_sin


class _Routed(torch.nn.Module):
    """The routed part of one MoE layer through `routed_experts`, for export."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        weights, indices, _ = self.moe.gate(x)
        return routed_experts(self.moe, x, weights, indices)


@pytest.fixture
def moe():
    torch.manual_seed(0)
    # Unnormalised, scaled weights: the node's softmax normalises, and the sum must undo it.
    layer = MoE(replace(model_preset("debug"), norm_topk_prob=False, routed_scaling_factor=2.5)).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    layer.gate.bias.normal_(std=0.1)  # selection by biased scores, weights by unbiased ones
    layer.shared_experts = None
    return layer


def test_routed_experts_equal_the_model_moe_in_eager(moe):
    x = torch.randn(7, moe.gate.weight.shape[1])
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        torch.testing.assert_close(routed_experts(moe, x, weights, indices), moe(x), rtol=1e-5, atol=1e-6)


# torch's exporter trips its own pytree deprecation (torch 2.13); nothing of ours.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_the_exported_node_runs_in_onnx_runtime_as_the_model_moe(moe, tmp_path):
    x = torch.randn(5, moe.gate.weight.shape[1])
    path = tmp_path / "moe.onnx"
    with torch.no_grad():
        program = torch.onnx.export(
            _Routed(moe).eval(),
            (x,),
            input_names=["x"],
            dynamic_shapes={"x": {0: torch.export.Dim("n")}},
            dynamo=True,
            custom_translation_table=TRANSLATIONS,
        )
        program.save(str(path))
        expected = moe(x)
    assert [n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"] == ["MoE"]
    (out,) = open_session(path, threads=1).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-6)


class _Rope(torch.nn.Module):
    def __init__(self, tables, num_heads):
        super().__init__()
        self.tables, self.num_heads = tables, num_heads

    def forward(self, x, positions):
        return ort_rope(x, positions, *self.tables, self.num_heads)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize("num_heads", [1, 4])
def test_rope_node_is_the_model_rope_on_deinterleaved_halves(num_heads, tmp_path):
    """`ort_rope` of x's evens-then-odds is `apply_rope` of x, eagerly and as ORT's node."""
    R, B, T, max_pos = 16, 3, 5, 64
    torch.manual_seed(0)
    x = torch.randn(B, T, num_heads, R)
    positions = torch.randint(0, max_pos, (B, T))
    perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
    tables = rope_cos_sin(torch.arange(max_pos), R, 10000.0)
    expected = apply_rope(x, *rope_cos_sin(positions, R, 10000.0)).reshape(B, T, -1)
    halves = x[..., perm].reshape(B, T, -1)
    torch.testing.assert_close(ort_rope(halves, positions, *tables, num_heads), expected)

    path = tmp_path / "rope.onnx"
    dim = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    with torch.no_grad():
        program = torch.onnx.export(
            _Rope(tables, num_heads).eval(),
            (halves, positions),
            input_names=["x", "positions"],
            dynamic_shapes={"x": dim, "positions": dim},
            dynamo=True,
            custom_translation_table=TRANSLATIONS,
        )
        program.save(str(path))
    assert [n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"] == ["RotaryEmbedding"]
    (out,) = open_session(path, threads=1).run(None, {"x": halves.numpy(), "positions": positions.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-6)
