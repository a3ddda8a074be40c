"""The serving forward, built from outside the model (the model itself is not modified).

`DecodeForward` runs the model's own weights through fewer, larger ops than the reference
modules, for every step of the engine (chunked prefill and decode alike):
- `AbsorbedMLA`: the absorbed attention over the caller's `LatentCache`, with the two
  projections of the normed input fused into one matmul, both RoPE halves rotated together,
  W_UK / W_UV pre-arranged per head, and one score matmul over side-by-side [c_kv, k_pe].
- `GroupedExperts`: MoE dispatch by sort + `torch._grouped_mm` (about 15 ops per layer
  whatever the expert count; the reference loops over every expert, chosen or not), or, for
  a handful of tokens, a loop over only the chosen experts.
- RMSNorm as one fused `F.rms_norm`.
These keep stacked/concatenated copies of the attention input and expert weights (for the
tiny CPU models here that is a few MB; a large deployment would free the originals).

`compile_forward` wraps it in `torch.compile` (`crosschip serve --compile`), falling back to
eager if compiling fails. Measured on the 2-core CPU (torch 2.13, arith-tiny, fp32, 1 thread,
machine shared): the grouped MoE cannot be traced (it runs eager between graphs); with the
recompile limit raised, warm-up took 123 s and the result was still slower than eager (144 vs
283 tokens per CPU-second at batch 1, 846 vs 1518 at 8, 2493 vs 3512 at 32; same greedy
tokens). So it is off by default; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from crosschip.model import MLA, MoE, RMSNorm, Transformer, apply_rope, rope_cos_sin


def has_grouped_mm() -> bool:
    """torch._grouped_mm on this build and device type (CPU support landed in torch 2.9)."""
    try:
        x = torch.ones(2, 8)
        return torch._grouped_mm(x, torch.ones(2, 8, 4), offs=torch.tensor([1, 2], dtype=torch.int32)).shape == (2, 4)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class GroupedExperts:
    """The routed experts of one MoE layer as stacked weights for `torch._grouped_mm`.

    w13 (E, D, 2 * moe_inter): gate and up projections side by side; w2 (E, moe_inter, D).
    """

    def __init__(self, moe: MoE):
        self.moe = moe
        self.topk = moe.topk
        self.n_experts = moe.n_experts
        # Contiguous (E, in, out) copies: grouped_mm wants the reduction dim second.
        self.w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight], dim=0).t() for e in moe.experts]).contiguous()
        self.w2 = torch.stack([e.w2.weight.t() for e in moe.experts]).contiguous()
        self.inter = moe.experts[0].w1.weight.shape[0]

    @torch.compiler.disable  # data-dependent grouping: inductor cannot trace grouped_mm on CPU; runs eager
    def __call__(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, indices, _ = self.moe.gate(x)
        if x.shape[0] * self.topk <= self.n_experts:
            return self.few_tokens(x, weights, indices).view(shape)
        flat = indices.flatten()  # (N * topk,)
        order = flat.argsort(stable=True)  # (token, expert) pairs grouped by expert
        offs = torch.bincount(flat, minlength=self.n_experts).cumsum(0).to(torch.int32)
        tok = order // self.topk
        xs = x[tok]  # (N * topk, D)
        gate_up = torch._grouped_mm(xs, self.w13, offs=offs)  # (N * topk, 2 * inter)
        h = F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
        y = torch._grouped_mm(h, self.w2, offs=offs) * weights.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, tok, y)
        if self.moe.shared_experts is not None:
            out = out + self.moe.shared_experts(x)
        return out.view(shape)

    def few_tokens(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Decode of a handful of tokens: visit only the chosen experts (grouped_mm walks all of them)."""
        out = self.moe.shared_experts(x) if self.moe.shared_experts is not None else torch.zeros_like(x)
        w = weights.to(x.dtype)
        for t, experts in enumerate(indices.tolist()):  # .tolist() syncs; free on CPU, small elsewhere
            row = x[t : t + 1]
            for k, e in enumerate(experts):
                gate_up = row @ self.w13[e]
                h = F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
                out[t : t + 1] += (h @ self.w2[e]) * w[t, k]
        return out


def rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """The model's RMSNorm as one fused op (the module spends 8 small ops on it)."""
    return F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.eps).to(x.dtype)


class AbsorbedMLA:
    """MLA's absorbed path in fewer, larger ops, reading the caller's `LatentCache`.

    Same math as `MLA.forward` with a cache: the query and latent projections that share the
    input run as one matmul, both RoPE halves rotate together, W_UK / W_UV are pre-arranged
    per head for batched matmuls, and the scores against c_kv and k_pe come from one matmul
    over the cache's side-by-side (kv_lora_rank + rope) latents.
    """

    def __init__(self, attn: MLA):
        self.attn = attn
        a = attn
        self.H, self.nope, self.rope, self.C, self.v = (
            a.n_heads,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.kv_lora_rank,
            a.v_head_dim,
        )
        first = a.wq.weight if a.q_lora_rank is None else a.wq_a.weight
        self.q_width = first.shape[0]
        self.w_in = torch.cat([first, a.wkv_a.weight], dim=0)  # (q_width + C + R, D)
        w_uk, w_uv = a.absorb_kv()  # (H, nope, C), (H, v, C)
        self.w_uk = w_uk.contiguous()
        self.w_uv_t = w_uv.transpose(1, 2).contiguous()  # (H, C, v)

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, cache) -> Tensor:
        a = self.attn
        B, T, _ = x.shape
        q, kv = F.linear(x, self.w_in).split([self.q_width, self.C + self.rope], dim=-1)
        if a.q_lora_rank is not None:
            q = a.wq_b(rms_norm(a.q_norm, q))
        q = q.view(B, T, self.H, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c_kv = rms_norm(a.kv_norm, kv[..., : self.C])  # (B, T, C)
        pe = apply_rope(torch.cat([q_pe, kv[..., None, self.C :]], dim=2), cos, sin)  # (B, T, H + 1, R)
        q_pe, k_pe = pe[:, :, : self.H], pe[:, :, self.H]
        if hasattr(cache, "update_latent"):  # PagedBatchCache: c_kv and k_pe already side by side
            latent, mask = cache.update_latent(a.layer_id, c_kv, k_pe)  # (B, S, C + R), (B, T, S)
        else:
            c_all, k_all, mask = cache.update(a.layer_id, c_kv, k_pe)
            latent = torch.cat([c_all, k_all], dim=-1)
        c_all = latent[..., : self.C]
        # (H, B*T, nope) @ (H, nope, C) -> query in latent space, then [q_lat, q_pe] . [c_kv, k_pe].
        q_lat = torch.bmm(q_nope.reshape(B * T, self.H, self.nope).transpose(0, 1), self.w_uk)
        q_lat = q_lat.transpose(0, 1).reshape(B, T * self.H, self.C)
        q_full = torch.cat([q_lat, q_pe.reshape(B, T * self.H, self.rope)], dim=-1) * a.softmax_scale
        scores = torch.bmm(q_full, latent.transpose(1, 2)).view(B, T, self.H, -1)  # (B, T, H, S)
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(c_all.dtype).view(B, T * self.H, -1)
        o_lat = torch.bmm(probs, c_all)  # (B, T*H, C)
        o = torch.bmm(o_lat.view(B * T, self.H, self.C).transpose(0, 1), self.w_uv_t)  # (H, B*T, v)
        return a.wo(o.transpose(0, 1).reshape(B, T, self.H * self.v))


class DecodeForward:
    """`model(input_ids, positions, cache=cache)` -> logits (B, T, V) through the faster pieces above."""

    def __init__(self, model: Transformer):
        self.model = model
        # grouped_mm wants 16-byte aligned strides: hidden and expert widths a multiple of 16 bytes.
        elem = next(model.parameters()).element_size()
        cfg = model.cfg
        grouped = (
            has_grouped_mm() and (cfg.hidden_size * elem) % 16 == 0 and (cfg.moe_intermediate_size * elem) % 16 == 0
        )
        self.attn = [AbsorbedMLA(layer.attn) for layer in model.layers]
        self.ffn: list[Callable[[Tensor], Tensor]] = [
            GroupedExperts(layer.ffn) if grouped and isinstance(layer.ffn, MoE) else layer.ffn for layer in model.layers
        ]

    def __call__(self, input_ids: Tensor, positions: Tensor, cache) -> Tensor:
        m = self.model
        cos, sin = rope_cos_sin(positions, m.cfg.qk_rope_head_dim, m.cfg.rope_theta)
        h = m.embed(input_ids)
        for layer, attn, ffn in zip(m.layers, self.attn, self.ffn):
            h = h + attn(rms_norm(layer.attn_norm, h), cos, sin, cache)
            h = h + ffn(rms_norm(layer.ffn_norm, h))
        return m.head(rms_norm(m.norm, h))


def compile_forward(forward: Callable, *, dynamic: bool = True) -> Callable:
    """`torch.compile(forward)`; falls back to eager (with a warning) if compiling fails at the first call."""
    import torch._dynamo

    # One graph per layer and shape family: the default limit (8) sends most frames back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(forward, dynamic=dynamic)
    state = {"fn": compiled}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # inductor needs a C++ compiler and may reject ops; eager always works
            if state["fn"] is forward:
                raise
            import warnings

            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); serving in eager mode", stacklevel=2)
            state["fn"] = forward
            return forward(*args, **kwargs)

    return call
