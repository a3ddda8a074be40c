"""The DeepSeek-V3-family model in one file of plain, single-device PyTorch.

Names follow the DeepSeek-V3 paper and its reference code: MLA projections `wq_a`, `wq_b`,
`wkv_a`, `wkv_b`, `wo`; SwiGLU `w1` (gate), `w2` (down), `w3` (up); routing `gate`.
`crosschip.hf` maps these to and from the Hugging Face `DeepseekV3ForCausalLM` layout.

Two attention paths share the weights:
- the *naive* form (training, reference prefill) expands `c_kv` into per-head keys and values;
- the *absorbed* form (decode) caches only `c_kv` (after its norm) and `k_pe` (after RoPE),
  folds `W_UK` into the query and `W_UV` into the output. It runs whenever a `LatentCache`
  is passed in, so serving engines and ONNX export supply their own cache layout.

Nothing here knows about devices, processes or serving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosschip.config import ModelConfig

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The compute precisions by the names configs, flags and reports use."""


class LatentCache(Protocol):
    """Where the absorbed attention keeps the per-token latents of each layer."""

    def update(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store the new tokens' latents `c_kv` (B, T, kv_lora_rank) and `k_pe` (B, T, rope).

        Returns every latent the new queries may attend to, (B, S, kv_lora_rank) and
        (B, S, rope), and a boolean mask (B, T, S) that is True where attention is allowed.
        """
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the per-pair angles, (..., dim/2), for integer `positions` (...)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim.

    x: (B, T, H, rope); cos/sin: (B, T, rope/2). The output keeps the pairs de-interleaved
    (evens then odds), as the HF implementation does; attention only sees q_pe . k_pe, which
    is the same for any permutation applied to both.
    """
    cos = cos[:, :, None, :].to(x.dtype)
    sin = sin[:, :, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLA(nn.Module):
    """Multi-head Latent Attention."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.rope_theta = cfg.rope_theta
        self.softmax_scale = self.qk_head_dim**-0.5
        d = cfg.hidden_size
        if self.q_lora_rank is None:
            self.wq = nn.Linear(d, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, d, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: LatentCache | None,
    ) -> Tensor:
        B, T, _ = x.shape
        # The query's first projection and wkv_a read the same x: one matmul of both.
        wq = self.wq if self.q_lora_rank is None else self.wq_a
        q, kv = F.linear(x, torch.cat([wq.weight, self.wkv_a.weight])).split(
            [wq.out_features, self.wkv_a.out_features], dim=-1
        )
        if self.q_lora_rank is not None:
            q = self.wq_b(self.q_norm(q))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)

        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)  # (B, T, kv_lora_rank)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin)[:, :, 0]  # (B, T, rope), one key shared by all heads

        if cache is None:
            out = self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            c_kv_all, k_pe_all, cache_mask = cache.update(self.layer_id, c_kv, k_pe)
            out = self.attend_absorbed(q_nope, q_pe, c_kv_all, k_pe_all, cache_mask)
        return self.wo(out.reshape(B, T, self.n_heads * self.v_head_dim))

    def attend_naive(self, q_nope: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor, mask: Tensor | None) -> Tensor:
        """Expand c_kv to per-head keys and values; `mask` (B, T, T), additive (`additive_mask`), or
        None for plain causal."""
        B, T, H, _ = q_nope.shape
        kv = self.wkv_b(c_kv).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, qk_head_dim)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, T, H, self.qk_rope_head_dim)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            # In the query's dtype: CUDA's fused kernels refuse a float mask of another dtype.
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None].to(q.dtype), scale=self.softmax_scale)
        return o.transpose(1, 2)  # (B, T, H, v_head_dim)

    def absorb_kv(self) -> tuple[Tensor, Tensor]:
        """W_UK (H, nope, kv_lora_rank) and W_UV (H, v, kv_lora_rank), views of wkv_b."""
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def attend_absorbed(self, q_nope: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor, mask: Tensor | None) -> Tensor:
        """Attention over cached latents: c_kv (B, S, kv_lora_rank), k_pe (B, S, rope)."""
        w_uk, w_uv = self.absorb_kv()
        q_lat = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, kv_lora_rank)
        scores = torch.einsum("bhtc,bsc->bhts", q_lat, c_kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        scores = scores * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(c_kv.dtype)
        o_lat = torch.einsum("bhts,bsc->bhtc", probs, c_kv)
        return torch.einsum("bhtc,hvc->bthv", o_lat, w_uv)  # (B, T, H, v_head_dim)


class SwiGLU(nn.Module):
    """silu(gate) * up, optionally scaled per row, from one (N, 2 x inter) product of w1 and w3.

    A module of its own, without parameters, so that training can compile it as a region
    (`trainer.compile_regions`): eager, the silu and the multiplies, and in the backward their
    gradients and a `cat` of the two halves, are separate passes over the activations;
    compiled, one fused kernel each way."""

    def forward(self, gate_up: Tensor, scale: Tensor | None = None) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up
        return h if scale is None else h * scale


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.act = SwiGLU()

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """`scale` (N, 1), optional: the routing weight of each row. It is applied before w2,
        which is linear, so it costs a multiply over the narrow inter_dim, not over dim."""
        # w1 and w3 read the same x: one matmul of both (measured ~12% off an arith-tiny MoE
        # layer's forward and backward on 2 CPU threads).
        return self.w2(self.act(F.linear(x, torch.cat([self.w1.weight, self.w3.weight])), scale))


class Gate(nn.Module):
    """Sigmoid router with the auxiliary-loss-free bias and group-limited top-k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.route_scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        # The balance bias steers selection only; it is updated by the trainer, not the
        # optimizer, and stays fp32 whatever the model dtype.
        self.register_buffer("bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, D) -> weights (N, topk), expert indices (N, topk), scores (N, n_experts)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores + self.bias
        if self.n_group > 1:
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, keep, True)
            # Masked groups must lose to any real score, including negative biased ones: -inf, not 0.
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        indices = biased.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


def grouped_mm_works(device: torch.device | str, dtype: torch.dtype, backward: bool = True) -> bool:
    """Whether `torch._grouped_mm` runs forward (and `backward`) on this build, device and dtype.

    CPU kernels landed in torch 2.9; CUDA's want bf16 on recent chips, and every kernel wants
    16-byte aligned strides, so the probe uses widths of 16 and groups of 8 rows (one empty).
    Serving asks for the forward only: the backward's explicit gradient imports sympy (0.7 s),
    and `y.sum().backward()` would hand the kernel a stride-0 gradient, which it refuses.
    """
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=backward)
            w = torch.ones(3, 16, 16, device=device, dtype=dtype, requires_grad=backward)
            offs = torch.tensor([8, 8, 16], dtype=torch.int32, device=device)
            y = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
            if not backward:
                return y.shape == (16, 16) and bool(y[:8].eq(16).all()) and bool(y[8:].eq(16).all())
            y.backward(torch.ones_like(y))
            return y.shape == (16, 16) and bool(w.grad[1].eq(0).all()) and bool(w.grad[0].eq(8).all())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_experts_run(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, backward: bool) -> bool:
    """Whether `cfg`'s experts can run as grouped GEMMs in `dtype` here: the kernel works
    (`grouped_mm_works`), and their row strides, the hidden and expert widths, are multiples of
    16 bytes, as every kernel wants (hidden_size 68 in bf16 was a RuntimeError mid-step)."""
    size = torch.empty((), dtype=dtype).element_size()
    aligned = all(width * size % 16 == 0 for width in (cfg.hidden_size, cfg.moe_intermediate_size))
    return aligned and grouped_mm_works(device, dtype, backward)


class MoE(nn.Module):
    """DeepSeekMoE: shared experts plus fine-grained routed experts.

    `forward` sorts the (token, expert) pairs by expert and runs each expert once on its
    contiguous slice: one gather of the inputs, one of the outputs (each token sums its top-k
    rows) and one host sync (the per-expert counts) per layer, whatever the expert count. Only
    the chosen pairs are computed. The outputs are gathered, not scatter-added into the tokens:
    ONNX Runtime's CPU ScatterND with reduction="add" races on duplicate indices when it runs
    on more than one thread (measured on 1.32: sums off by up to 4.3 on random data, and a
    served prompt's logits by up to 0.43 when prefilled beside others).
    It is also what graph capture (ONNX export) traces: the counts become data-dependent sizes
    of one Split, so every expert stays in the graph as a few nodes, with no per-expert NonZero
    (the export feeds that Split the counts tensor whole: `feed_splits_whole_sizes`).

    With `grouped` set (the trainer sets it where `grouped_experts_run`), the experts run as two
    `torch._grouped_mm` calls over their stacked weights instead of a loop over the experts: no
    host sync, and a handful of kernels per layer whatever the expert count. On a GPU the loop
    is launch-bound: measured on an H200 (small-100m, bf16, 16 x 1024 tokens), the training
    step spent 357 ms of host time against 70 ms of device time, ~4,300 kernel launches a step.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(self.n_experts))
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        # In training mode, each expert's rows are padded up to a multiple of this (with zero
        # routing weight), so that kernels cached per matmul shape see few shapes; the trainer
        # sets it from the backend and its compute dtype (`Backend.expert_row_multiple`).
        # Evaluation, serving and export run in eval mode, in their own dtype: no padding.
        self.row_multiple = 1
        self.grouped = False
        self.act = SwiGLU()  # the experts' activation when `grouped`
        # With row padding: give the experts a fixed number of rows (the most any routing can
        # need) rather than the padded total, which is read from the device, a host sync per
        # layer. Set on accelerators, where the host must run ahead of the device; on the CPU
        # the sync is free and the fixed size costs up to n_experts x row_multiple extra rows.
        self.static_rows = False
        # Filled on every forward for the trainer's balance update and load logging.
        self.last_load: Tensor | None = None
        self.last_scores: Tensor | None = None
        self.last_indices: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, indices, scores = self.gate(x)
        flat_expert = indices.flatten()  # (N * topk,)
        M = flat_expert.shape[0]
        # Pairs grouped by expert, in pair order within each (a stable argsort). Written as a
        # top-k over unique keys and a scatter-add count: both export to ONNX (TopK,
        # ScatterElements), where a stable sort and bincount have no translation.
        order = (flat_expert * M + torch.arange(M, device=x.device)).topk(M, largest=False).indices
        load = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        load = load.scatter_add(0, flat_expert, torch.ones_like(flat_expert))
        real_load = load
        tok = order // self.topk
        w = weights.flatten().index_select(0, order)
        rows = torch.arange(M, device=x.device)  # the row of y each sorted pair comes out at
        if self.training and self.row_multiple > 1:
            tok, w, load, rows = self._pad_groups(flat_expert.index_select(0, order), tok, w, load)
        # ...and in pair order (token-major): the inverse of `order`, a scatter of unique indices.
        pair_rows = torch.zeros_like(order).scatter(0, order, rows)
        # index_select, not x[tok]: its backward is an index_add, where advanced indexing's is
        # an accumulating index_put (several times slower on CPU).
        xs = x.index_select(0, tok)
        y = self._grouped_experts(xs, w, load) if self.grouped else self._expert_loop(xs, w, load)
        # Gathered in the experts' dtype and summed in x's: under bf16 autocast that moves half
        # the bytes and skips a cast of every pair row, with the same fp32 sums (2.7-5.3% off
        # the default training step on CPU, bit-identical outputs and gradients).
        out = y.index_select(0, pair_rows).view(-1, self.topk, x.shape[-1]).sum(1, dtype=x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.training:
            self.last_load = real_load
            self.last_scores, self.last_indices = scores.view(*shape[:-1], -1), indices.view(*shape[:-1], -1)
        return out.view(shape)

    def _expert_loop(self, xs: Tensor, w: Tensor, load: Tensor) -> Tensor:
        """Each expert's MLP on its slice of the sorted rows xs, scaled by the routing weights w."""
        counts = load.tolist()  # the one host sync; data-dependent sizes when traced
        if any(isinstance(c, torch.SymInt) for c in counts):  # traced: what the sizes satisfy
            for c in counts:
                torch._check(c >= 0)
            torch._check(sum(counts) == xs.shape[0])
        ws = w.to(xs.dtype)[:, None].split(counts)
        return torch.cat([expert(xe, we) for expert, xe, we in zip(self.experts, xs.split(counts), ws)])

    def _grouped_experts(self, xs: Tensor, w: Tensor, load: Tensor) -> Tensor:
        """`_expert_loop` as two grouped GEMMs over the experts' stacked weights (the same math)."""
        device = xs.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else xs.dtype
        offs = load.cumsum(0).to(torch.int32)  # end row of each expert's group
        # Stacked per forward from the per-expert modules, which keep the HF layout for the
        # checkpoint and the export: a few copies of ~1 MB per layer, and autograd splits the
        # gradient back. (E, 2 * inter, D) and (E, D, inter); grouped_mm takes (in, out) views.
        w13 = torch.cat(
            [torch.stack([e.w1.weight for e in self.experts]), torch.stack([e.w3.weight for e in self.experts])], 1
        )
        w2 = torch.stack([e.w2.weight for e in self.experts])
        gate_up = torch._grouped_mm(xs.to(dtype), w13.to(dtype).transpose(1, 2), offs=offs)
        h = self.act(gate_up, w.to(xs.dtype)[:, None]).to(dtype)  # rounded as MLP.forward rounds it
        return torch._grouped_mm(h, w2.to(dtype).transpose(1, 2), offs=offs)

    def _pad_groups(
        self, expert: Tensor, tok: Tensor, w: Tensor, load: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pad each expert's slice of the sorted pairs to a multiple of `row_multiple` rows.

        expert, tok, w: the sorted pairs' expert, token and routing weight; load: rows per
        expert. Returns the padded tok, w and load, and each pair's padded row. A padding row
        reads token 0 with weight 0 (the expert scales its hidden activation by the weight
        before w2) and no token gathers it: it adds nothing to the output or any gradient.
        """
        m = self.row_multiple
        padded = (load + m - 1) // m * m
        if self.static_rows:
            # As many rows as any routing can need, the slack in the last group: a size known
            # without reading `load` back from the device.
            rows = -(-(tok.shape[0] + self.n_experts * (m - 1)) // m) * m
            padded = torch.cat([padded[:-1], rows - padded[:-1].sum(0, keepdim=True)])
        else:
            rows = int(padded.sum())
        # Each pair moves forward by the padding of the experts before its own.
        shift = (padded.cumsum(0) - padded) - (load.cumsum(0) - load)
        slot = shift.index_select(0, expert) + torch.arange(tok.shape[0], device=tok.device)
        tok = tok.new_zeros(rows).index_copy(0, slot, tok)
        w = w.new_zeros(rows).index_copy(0, slot, w)
        return tok, w, padded, slot


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn: nn.Module = (
            MLP(cfg.hidden_size, cfg.intermediate_size) if layer_id < cfg.first_k_dense_replace else MoE(cfg)
        )

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: LatentCache | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class MTP(nn.Module):
    """Multi-Token Prediction block: from h_i and token i+1, predict token i+2.

    It shares the embedding and output head with the main model (the paper's design); the
    HF layout stores copies of them under the MTP layer, which the adapter writes.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, cfg.num_hidden_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ParamCounts:
    """Parameters as stored in the HF bundle layout."""

    total: int
    active: int

    def __str__(self) -> str:
        return f"total {human_count(self.total)}, active per token {human_count(self.active)}"


def human_count(n: float) -> str:
    """A count as parameter counts are written: 2.57M, 6.65M, 671B, 128,000T."""
    n = float(f"{n:.3g}")  # 3 significant digits first, so that 999.6M reads 1B
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 1000 * scale else f"{n / scale:,.0f}{unit}"
    return f"{n:g}"


def causal_doc_mask(doc_ids: Tensor) -> Tensor:
    """(B, T) document ids of packed sequences -> (B, T, T) causal mask within each document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])


def additive_mask(mask: Tensor) -> Tensor:
    """A boolean attention mask as an additive one: 0 where attention is allowed, -inf elsewhere.

    Built once per forward for every layer. A compiled attention region (`trainer.compile_regions`)
    fuses the mask into its softmax kernel, and inductor's CPU kernel that reads a bool mask
    there ran 2.2x the time of one reading floats (arith-tiny scores, 32 x 4 x 128 x 128 on a
    2-core avx2 CPU: 5.3 against 2.4 ms); one MLA's forward and backward took 0.88x the time
    with this mask, eager unchanged (benchmarks/RESULTS.md, 2026-12-01). Every row keeps its
    diagonal, so no row is all -inf."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


class Transformer(nn.Module):
    """A DeepSeek-V3-family causal language model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # nn.Embedding's own init is a normal_, and normal_ on a meta tensor (count_params,
        # loading a bundle) imports torch._dynamo: ~1.5 s in every such process. So the weight
        # is made here and drawn only when it is real, which keeps seeded inits as they were.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not weight.is_meta:
            weight.normal_()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MTP(cfg) if cfg.num_nextn_predict_layers else None
        self.checkpoint_blocks = False
        """Recompute each block's activations in the backward instead of keeping them
        (`train.activation_checkpoint = "full"`); only where gradients are recorded."""
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.embed.weight.is_meta:  # shapes only: nothing to fill (and see __init__)
            return
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Gate):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                module.bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def hidden(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> Tensor:
        """Final hidden states before the output norm, (B, T, hidden_size).

        positions: (B, T) absolute positions (default 0..T-1). doc_ids: (B, T) ids of packed
        documents; attention stays inside a document (naive path only). cache: use the
        absorbed form and store this call's latents in it.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.qk_rope_head_dim, self.cfg.rope_theta)
        mask = additive_mask(causal_doc_mask(doc_ids)) if doc_ids is not None else None
        h = self.embed(input_ids)
        for layer in self.layers:
            h = self._block(layer, h, cos, sin, mask, cache)
        return h

    def _block(self, block: Block, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache) -> Tensor:
        if self.checkpoint_blocks and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            # Non-reentrant: works under FSDP2 (the recompute gathers the block's shards again)
            # and keeps the RNG state, so the recomputed forward is the same forward.
            return checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
        return block(x, cos, sin, mask, cache)

    def logits(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab_size)."""
        return self.logits(self.hidden(input_ids, positions, doc_ids, cache))

    def mtp_logits(
        self, h: Tensor, input_ids: Tensor, positions: Tensor | None = None, doc_ids: Tensor | None = None
    ) -> Tensor:
        """MTP logits (B, T-1, vocab): position i predicts token i+2 from h_i and token i+1."""
        assert self.mtp is not None, "model has no MTP block"
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        positions = positions[:, : T - 1]
        cos, sin = rope_cos_sin(positions, self.cfg.qk_rope_head_dim, self.cfg.rope_theta)
        mask = None
        if doc_ids is not None:
            # Position i mixes tokens i and i+1, so it belongs to the document of token i+1.
            mask = additive_mask(causal_doc_mask(doc_ids[:, 1:]) & causal_doc_mask(doc_ids[:, :-1]))
        # h_i enters after the final norm, as transformers' and vLLM's DeepSeek-V3 MTP take it.
        h = self.norm(h[:, :-1])
        x = self.mtp.eh_proj(torch.cat([self.mtp.enorm(self.embed(input_ids[:, 1:])), self.mtp.hnorm(h)], dim=-1))
        x = self._block(self.mtp.block, x, cos, sin, mask, None)
        return self.head(self.mtp.norm(x))


class ContiguousLatentCache:
    """A simple preallocated latent cache: one (B, max_len) slab per layer.

    Each call appends T tokens per row at `self.length`; queries see every earlier token.
    The serving engine has its own paged cache; this one is for offline generation and tests.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.c_kv = torch.zeros(cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(cfg.num_hidden_layers, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        T = c_kv.shape[1]
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"latent cache holds {self.max_len} tokens; {end} requested")
        self.c_kv[layer, :, start:end] = c_kv
        self.k_pe[layer, :, start:end] = k_pe
        if layer == len(self.c_kv) - 1:
            self.length = end
        q_pos = torch.arange(start, end, device=c_kv.device)
        k_pos = torch.arange(end, device=c_kv.device)
        mask = (k_pos[None, :] <= q_pos[:, None]).expand(c_kv.shape[0], T, end)
        return self.c_kv[layer, :, :end], self.k_pe[layer, :, :end], mask


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Total and per-token active parameters, counted on the meta device (no memory used).

    Counted as the HF bundle stores them: with MTP, its copies of the embedding and head
    count too (the published 685B of DeepSeek-V3 includes them). Active parameters are the
    ones a token computes with: the embedding is a lookup, not compute, so it is left out,
    as in the published active counts.
    Only the dense layers and one MoE layer are built, and that layer with the fewest routed
    experts its routing allows: every later layer is a copy of it, and every further expert
    adds the same parameters (its MLP and its router row). A 671B preset counts in well under
    a second, and a mistyped expert count (10^9) is counted, not built expert by expert.
    """
    built = min(cfg.num_hidden_layers, cfg.first_k_dense_replace + 1)
    # The fewest experts that cfg's routing groups and top-k allow (ModelConfig.validate).
    experts = cfg.n_group * max(2 if cfg.n_group > 1 else 1, -(-cfg.num_experts_per_tok // cfg.topk_group))
    with torch.device("meta"):
        model = Transformer(replace(cfg, num_hidden_layers=built, n_routed_experts=experts))
    copies = cfg.num_hidden_layers - built  # MoE layers like model.layers[-1]
    total = _n_params(model) + copies * _n_params(model.layers[-1])
    inactive = 0
    moes = model.moe_layers()
    if moes:
        per_expert = _n_params(moes[0].experts[0])
        per_router_row = moes[0].gate.weight[0].numel()
        layers = len(moes) + copies
        total += layers * (cfg.n_routed_experts - experts) * (per_expert + per_router_row)
        inactive = layers * (cfg.n_routed_experts - moes[0].topk) * per_expert
    if model.mtp is not None:
        total += model.embed.weight.numel() + model.head.weight.numel()
    return ParamCounts(total=total, active=total - inactive - model.embed.weight.numel())
