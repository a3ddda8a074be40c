"""The serving forward, built from outside the model (the model itself is not modified).

`DecodeForward` runs the model's own weights through fewer, larger ops than the reference
modules, for every step of the engine (chunked prefill and decode alike):
- `AbsorbedMLA`: the absorbed attention over the caller's `LatentCache` with W_UK and the
  softmax scale folded into the query projection, W_UV folded into `wo`, the projections of
  the normed input in one matmul, RoPE from a per-position table on pre-permuted rows, and one
  score matmul over side-by-side [c_kv, k_pe] (~20 ops a layer instead of ~50);
- `RoutedExperts`: for a handful of tokens, a loop over only the chosen experts (the shared
  expert rides along as one more); for more, sort + `torch._grouped_mm` (about 15 ops per
  layer whatever the expert count; the reference loops over every expert, chosen or not);
- RMSNorm as one `F.rms_norm`; the head only on the rows whose logits are wanted.
These keep folded/stacked copies of the attention and expert weights (for the tiny CPU models
here a few MB; a large deployment would free the originals).

`compile_forward` wraps it in `torch.compile` (`crosschip serve --compile`), falling back to
eager if compiling fails. On the 2-core CPU (torch 2.13, arith-tiny, fp32, 1 thread) it is
slower than eager, so it is off by default. The grouped MoE cannot be traced (it runs eager
between graphs), and the few-token loop recompiles per expert id until dynamo's limit.
Through the server (`benchmarks/serve_throughput.py --on torch:cpu [--compile]`, 2026-12-01):
compiled 133 / 602 / 1652 tokens per CPU-second at 1 / 8 / 32 concurrent requests, eager
221 / 1004 / 2354; the few-token loop kept out of the graph (`torch.compiler.disable`) was
slower still (90 / 569 / 1393). See benchmarks/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from crosschip.errors import first_line
from crosschip.model import MLA, MoE, RMSNorm, Transformer, grouped_experts_run, rope_cos_sin


class RoutedExperts:
    """The routed (and shared) experts of one MoE layer, dispatched by batch size.

    w13 (E, D, 2 * moe_inter): gate and up projections side by side; w2 (E, moe_inter, D).
    A shared expert of the same width is stacked as expert E, always chosen with weight 1.
    - a handful of tokens: visit only the chosen experts (about 5 ops each, no weight copies;
      gathering the chosen experts' weights for one bmm measured 2.5x slower on CPU: the
      gather copies ~0.4 MB per expert);
    - more tokens: sort the (token, expert) pairs by expert and run `torch._grouped_mm`
      (about 15 ops per layer whatever the expert count), or the model's own loop.
    """

    def __init__(self, moe: MoE, grouped: bool):
        self.moe = moe
        self.topk = moe.topk
        self.n_experts = moe.n_experts
        self.grouped = grouped
        self.inter = moe.experts[0].w1.weight.shape[0]
        shared = moe.shared_experts
        experts = list(moe.experts)
        # The shared expert rides along as one more expert when it has the routed experts' width.
        self.shared_stacked = shared is not None and shared.w1.weight.shape[0] == self.inter
        if self.shared_stacked:
            experts.append(shared)
        # Contiguous (E, in, out) copies: grouped_mm and `row @ w13[e]` want the reduction dim second.
        self.w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight], dim=0).t() for e in experts]).contiguous()
        self.w2 = torch.stack([e.w2.weight.t() for e in experts]).contiguous()
        # Per-expert views, so the few-token loop spends no op on indexing the stack.
        self.w13_e, self.w2_e = list(self.w13.unbind(0)), list(self.w2.unbind(0))

    def __call__(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        # On an H200 too, the few-token loop (with its host sync) beat the grouped GEMM at 1, 2
        # and 4 tokens: 12.05 vs 12.36, 12.85 vs 13.03 and 16.74 vs 18.95 ms a decode step.
        if x.shape[0] * self.topk > self.n_experts:
            return self.many_tokens(x).view(shape)
        weights, indices, _ = self.moe.gate(x)
        return self.few_tokens(x, weights, indices).view(shape)

    def few_tokens(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Decode of a handful of tokens: only the chosen experts, accumulated with addmm."""
        moe = self.moe
        if self.shared_stacked:
            out = self.expert(x, self.n_experts)
        elif moe.shared_experts is not None:
            out = moe.shared_experts(x)
        else:
            out = torch.zeros_like(x)
        # .tolist() syncs with the device; free on CPU, and the loop needs host ints anyway.
        for t, (experts, ws) in enumerate(zip(indices.tolist(), weights.tolist())):
            # Each row sliced here, not split once before the loop: under torch.compile the
            # loop runs in a frame resumed after .tolist()'s graph break, and views of one
            # tensor handed to it as separate inputs, updated in place, fail AOT autograd with
            # dynamic shapes (its synthetic base needs a static storage size).
            row, dst = x[t : t + 1], out[t : t + 1]
            for e, w in zip(experts, ws):
                gate, up = (row @ self.w13_e[e]).chunk(2, dim=-1)  # (1, inter) each
                dst.addmm_(F.silu(gate) * up, self.w2_e[e], alpha=w)
        return out

    def expert(self, x: Tensor, e: int) -> Tensor:
        gate, up = (x @ self.w13_e[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w2_e[e]

    def many_tokens(self, x: Tensor) -> Tensor:
        if not self.grouped:
            return self.moe(x)
        return self.grouped_mm(x)

    def grouped_mm(self, x: Tensor) -> Tensor:
        weights, indices, _ = self.moe.gate(x)
        E = self.n_experts
        flat = indices.flatten()  # (N * topk,)
        order = flat.argsort(stable=True)  # (token, expert) pairs grouped by expert
        # Counted with a scatter, not bincount, which reads its input's max back to the host.
        load = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = load.cumsum(0).to(torch.int32)
        tok = order // self.topk
        xs = x[tok]  # (N * topk, D)
        gate_up = torch._grouped_mm(xs, self.w13[:E], offs=offs)  # (N * topk, 2 * inter)
        h = F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
        y = torch._grouped_mm(h, self.w2[:E], offs=offs)  # (N * topk, D), sorted pairs
        # Each token gathers its top-k rows and takes their weighted sum in one bmm: a fixed
        # order of addition (an index_add's atomics on a GPU add in whatever order they land).
        pair_rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=x.device))
        out = torch.bmm(weights.to(x.dtype)[:, None], y[pair_rows].view(-1, self.topk, x.shape[-1]))[:, 0]
        if self.shared_stacked:
            out = out + self.expert(x, E)
        elif self.moe.shared_experts is not None:
            out = out + self.moe.shared_experts(x)
        return out


class FusedMLP:
    """A dense SwiGLU layer with w1 and w3 in one matmul."""

    def __init__(self, mlp: torch.nn.Module):
        self.w13 = torch.cat([mlp.w1.weight, mlp.w3.weight], dim=0)  # (2 * inter, D)
        self.w2 = mlp.w2.weight
        self.inter = mlp.w1.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        gate_up = F.linear(x, self.w13)
        return F.linear(F.silu(gate_up[..., : self.inter]) * gate_up[..., self.inter :], self.w2)


def rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """The model's RMSNorm as one fused op (the module spends 8 small ops on it)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.eps).to(x.dtype)


def rope_halves(dim: int) -> Tensor:
    """Index that puts interleaved pairs (x0, x1), (x2, x3), ... as evens then odds."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on de-interleaved input [x1 | x2] with cos = [c, c], sin = [-s, s]: [x1 c - x2 s | x2 c + x1 s].

    The result equals `model.apply_rope` of the interleaved input (which also returns evens then odds).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class AbsorbedMLA:
    """MLA's absorbed path with its weights folded for serving, reading the caller's `LatentCache`.

    Same math as `MLA.forward` with a cache, in ~20 ops instead of ~50:
    - the input projections that share the normed input run as one matmul;
    - W_UK and the softmax scale fold into the query projection, so it yields per head the
      query in latent space and the (scaled) rope query side by side, (H, C + R);
    - W_UV folds into `wo` (D, H * C), so the attention output in latent space goes straight out;
    - the rope rows of the projections are permuted to evens-then-odds, so RoPE is 3 ops on a
      precomputed per-position table; scores against [c_kv, k_pe] are one matmul.
    Folds are computed in fp32 and stored in the model's dtype.
    """

    def __init__(self, attn: MLA):
        a = attn
        self.attn = a
        self.layer_id = a.layer_id
        H, nope, R, C, v = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank, a.v_head_dim
        self.H, self.R, self.C = H, R, C
        dtype = a.wkv_a.weight.dtype
        perm = rope_halves(R)
        w_uk, w_uv = (w.float() for w in a.absorb_kv())  # (H, nope, C), (H, v, C)
        w_q = (a.wq.weight if a.q_lora_rank is None else a.wq_b.weight).float()
        w_q = w_q.view(H, nope + R, -1)
        w_q_lat = torch.einsum("hnc,hni->hci", w_uk, w_q[:, :nope])  # (H, C, q_in)
        w_q = torch.cat([w_q_lat, w_q[:, nope:][:, perm]], dim=1) * a.softmax_scale  # (H, C + R, q_in)
        self.w_q = w_q.reshape(H * (C + R), -1).to(dtype)
        w_kv = a.wkv_a.weight
        w_kv = torch.cat([w_kv[:C], w_kv[C:][perm]], dim=0)  # (C + R, D)
        self.q_lora = a.q_lora_rank is not None
        # One matmul of the normed input: [q_a (q_lora) | c_kv (C) | k_pe (R)] or [q (H*(C+R)) | c_kv | k_pe].
        self.w_in = torch.cat([a.wq_a.weight if self.q_lora else self.w_q, w_kv], dim=0)
        self.q_width = self.w_in.shape[0] - C - R
        wo = a.wo.weight.float().view(-1, H, v)
        self.w_o = torch.einsum("dhv,hvc->dhc", wo, w_uv).reshape(wo.shape[0], H * C).to(dtype)  # (D, H * C)

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor | None, cache) -> Tensor:
        """x (B, T, D); cos/sin (B, T, R) from the rope table; bias (B, T, 1, S) additive mask or None."""
        a, H, C, R = self.attn, self.H, self.C, self.R
        B, T, _ = x.shape
        q, c_kv, k_pe = F.linear(x, self.w_in).split([self.q_width, C, R], dim=-1)
        if self.q_lora:
            q = F.linear(rms_norm(a.q_norm, q), self.w_q)
        q = q.reshape(B, T, H, C + R)  # a copy only without q_lora (q is then a slice of the fused output)
        q[..., C:] = rotate(q[..., C:], cos[:, :, None], sin[:, :, None])
        new = torch.cat([rms_norm(a.kv_norm, c_kv), rotate(k_pe, cos, sin)], dim=-1)  # (B, T, C + R)
        if hasattr(cache, "update_latent"):  # PagedBatchCache: c_kv and k_pe side by side
            latent, mask = cache.update_latent(self.layer_id, new)  # (B, S, C + R), (B, T, S)
        else:
            c_all, k_all, mask = cache.update(self.layer_id, new[..., :C], new[..., C:])
            latent = torch.cat([c_all, k_all], dim=-1)
        if bias is None:
            bias = attention_bias(mask, x.dtype)
        scores = torch.bmm(q.reshape(B, T * H, C + R), latent.transpose(1, 2)).view(B, T, H, -1)  # (B, T, H, S)
        scores = scores + bias
        if x.dtype == torch.float32:
            probs = scores.softmax(dim=-1)
        else:
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        o_lat = torch.bmm(probs.view(B, T * H, -1), latent[..., :C])  # (B, T*H, C)
        return F.linear(o_lat.view(B, T, H * C), self.w_o)


def attention_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T, S) bool, True = attend -> (B, T, 1, S) additive 0 / -inf, shared by every head and layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, :, None]


class DecodeForward:
    """`model(input_ids, positions, cache=cache)` -> logits (B, T, V) through the faster pieces above."""

    def __init__(self, model: Transformer):
        self.model = model
        param, cfg = next(model.parameters()), model.cfg
        grouped = grouped_experts_run(cfg, param.device, param.dtype, backward=False)
        self.attn = [AbsorbedMLA(layer.attn) for layer in model.layers]
        self.ffn: list[Callable[[Tensor], Tensor]] = [
            RoutedExperts(layer.ffn, grouped) if isinstance(layer.ffn, MoE) else FusedMLP(layer.ffn)
            for layer in model.layers
        ]
        # RoPE table over every position, (max_pos, R) each: cos = [c, c], sin = [-s, s] (see `rotate`).
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        cos, sin = rope_cos_sin(
            torch.arange(cfg.max_position_embeddings, device=device), cfg.qk_rope_head_dim, cfg.rope_theta
        )
        self.cos = torch.cat([cos, cos], dim=-1).to(dtype)
        self.sin = torch.cat([-sin, sin], dim=-1).to(dtype)

    def __call__(self, input_ids: Tensor, positions: Tensor, cache, last: Tensor | None = None) -> Tensor:
        """last: (B,) index of the one token per row whose logits are wanted; None = every token."""
        m = self.model
        cos, sin = self.cos[positions], self.sin[positions]  # (B, T, R)
        mask = getattr(cache, "mask", None)
        bias = attention_bias(mask, cos.dtype) if mask is not None else None
        h = F.embedding(input_ids, m.embed.weight)
        for layer, attn, ffn in zip(m.layers, self.attn, self.ffn):
            h = h + attn(rms_norm(layer.attn_norm, h), cos, sin, bias, cache)
            h = h + ffn(rms_norm(layer.ffn_norm, h))
        if last is not None and h.shape[1] > 1:
            h = h[torch.arange(h.shape[0], device=h.device), last][:, None]  # (B, 1, D)
        return F.linear(rms_norm(m.norm, h), m.head.weight)


def compile_forward(forward: Callable, *, dynamic: bool = True, backend: str = "inductor") -> Callable:
    """`torch.compile(forward)`; falls back to eager (with a warning) if compiling fails at the
    first call. `backend`: torch.compile's ("aot_eager" traces the same graphs without
    generating kernels)."""
    import torch._dynamo

    # The experts' data-dependent grouping runs eager between the graphs: inductor cannot trace
    # grouped_mm on CPU. Marked here, not by a decorator on the method, which imported dynamo
    # into every server and verify worker, compiled or not (1.2-1.7 s of CPU at each start).
    for ffn in getattr(forward, "ffn", ()):
        if isinstance(ffn, RoutedExperts):
            ffn.grouped_mm = torch.compiler.disable(ffn.grouped_mm)
    # One graph per layer and shape family: the default limit (8) sends most frames back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(forward, dynamic=dynamic, backend=backend)
    state = {"fn": compiled}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # inductor needs a C++ compiler and may reject ops; eager always works
            if state["fn"] is forward:
                raise
            import warnings

            # One line: dynamo's message goes on with pages of advice.
            warnings.warn(f"torch.compile failed ({first_line(e)}); serving in eager mode", stacklevel=2)
            state["fn"] = forward
            return forward(*args, **kwargs)

    return call
