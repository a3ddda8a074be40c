"""Export the absorbed-MLA decode/prefill step to one ONNX graph with an explicit latent cache.

Graph contract (every dim dynamic except the model's widths):

inputs
  input_ids       (B, T)            int64   the new tokens of each row
  positions       (B, T)            int64   their absolute positions (RoPE)
  past_c_kv       (L, P, C)         float   latent pool of P token slots, C = kv_lora_rank
  past_k_pe       (L, P, R)         float   rope-key pool,                 R = qk_rope_head_dim
  past_slots      (B, S)            int64   pool slot of past token s of row b (padding: any slot)
  attention_mask  (B, T, S + T)     bool    True = attend; the first S columns are the past
                                            slots, the last T the new tokens
outputs
  logits          (B, T, V)         float
  present_c_kv    (L, B, T, C)      float   latents of the new tokens only (the caller commits them)
  present_k_pe    (L, B, T, R)      float

A (L, B, S, C) past is the pool reshaped to (L, B*S, C) with past_slots = arange(B*S).view(B, S):
the plain "past in, present out" contract. The slot indirection lets a serving engine keep a
paged pool (fixed-size blocks, per-sequence block tables) bound once through IO binding and
change only small index tensors between steps: the graph gathers exactly the (B, S) past
latents it needs, so per step nothing crosses the host/device boundary but ids, positions,
slots, the mask, the logits and the new latents.

`export_onnx` writes two graphs with this contract, both traced from copies of the model with
export-friendly forwards swapped in from outside (`export_model`), both with the absorbed MLA
folded into plain MatMuls (`folded_mla_weights`) and RoPE as ONNX Runtime's node (`ort_ops`):
`model.onnx` (the model's own MoE: pairs sorted by expert and split into one slice per
expert, right for prefill and large batches) and `model.decode.onnx` for decode batches of a
few rows (an MoE with no data-dependent shapes: ONNX Runtime's fused MoE node for 1-2 tokens
(`ort_moe`), every expert densely above).
Measured on arith-tiny, CPU, 1 thread, trained weights, ms per decode step of `model.onnx`
against `model.decode.onnx` (benchmarks/graph_ab.py): 1.10 against 1.04 at batch 1, 2.78
against 2.63 at batch 8, 3.72 against 3.94 at batch 16; the serving executor picks the
decode graph up to a row count that grows with its threads (`OrtExecutor.decode_rows`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import signal
import threading
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosschip import interrupts
from crosschip.errors import CrosschipError
from crosschip.handoff import trace_cache
from crosschip.model import MLA, MoE, RMSNorm, Transformer, rope_cos_sin

INPUT_NAMES = ["input_ids", "positions", "past_c_kv", "past_k_pe", "past_slots", "attention_mask"]
OUTPUT_NAMES = ["logits", "present_c_kv", "present_k_pe"]


class PoolLatentCache:
    """LatentCache over a (L, P, *) slot pool: gathers each row's past slots, concatenates the new tokens.

    It also carries what the folded MLA needs for RoPE (as vLLM's attention metadata carries
    positions): the new tokens' positions and cos / sin tables over every position.
    """

    def __init__(
        self,
        past_c_kv: Tensor,
        past_k_pe: Tensor,
        past_slots: Tensor,
        mask: Tensor,
        positions: Tensor,
        rope_tables: tuple[Tensor, Tensor],
    ):
        self.past_c_kv, self.past_k_pe, self.past_slots, self.mask = past_c_kv, past_k_pe, past_slots, mask
        self.positions, self.rope_tables = positions, rope_tables
        self.new_c_kv: list[Tensor] = []
        self.new_k_pe: list[Tensor] = []

    def _past(self, pool: Tensor, layer: int) -> Tensor:
        # One gather of exactly the (B, S) slots from the flattened pool; pool[layer] first
        # would copy the layer's whole slab in ONNX Runtime. A row lookup exports as Gather,
        # which copies whole rows; advanced indexing exports as GatherND, element by element.
        L, P, D = pool.shape
        return F.embedding(self.past_slots + layer * P, pool.reshape(L * P, D))  # (B, S, D)

    def update(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.new_c_kv.append(c_kv)
        self.new_k_pe.append(k_pe)
        c_kv_all = torch.cat([self._past(self.past_c_kv, layer).to(c_kv.dtype), c_kv], dim=1)
        k_pe_all = torch.cat([self._past(self.past_k_pe, layer).to(k_pe.dtype), k_pe], dim=1)
        return c_kv_all, k_pe_all, self.mask


class CachedStep(nn.Module):
    """The exported step: model + PoolLatentCache, returning logits and the new latents."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        past_c_kv: Tensor,
        past_k_pe: Tensor,
        past_slots: Tensor,
        attention_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.model.cfg
        tables = rope_cos_sin(torch.arange(cfg.max_position_embeddings), cfg.qk_rope_head_dim, cfg.rope_theta)
        cache = PoolLatentCache(past_c_kv, past_k_pe, past_slots, attention_mask, positions, tables)
        logits = self.model(input_ids, positions=positions, cache=cache)
        return logits.float(), torch.stack(cache.new_c_kv), torch.stack(cache.new_k_pe)


def decode_moe_forward(moe: MoE, x: Tensor) -> Tensor:
    """MoE for decode batches with no data-dependent shapes (no NonZero, no per-expert loop).

    Installed (on a copy of the model) by `export_model`. A few tokens go through ONNX
    Runtime's fused MoE node (`ort_moe`: only the chosen experts); more tokens run every expert densely
    and weight the unchosen ones by 0 (reads each expert once, topk/n_experts of the FLOPs
    are useful). `torch.cond` becomes an ONNX If on the token count. The expert stacks are
    built from the per-expert parameters inside the graph, so every expert stays in it under
    its own name; ONNX Runtime folds them into constants when it loads the session.
    """
    # Imported here, as in _export_graph: onnxscript and the custom op cost ~1.2 s to import,
    # and serving (open_session, decode_path) imports this module too.
    from crosschip.handoff.ort_ops import routed_experts

    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (N, D)
    weights, indices, _ = moe.gate(x)  # (N, K)
    weights = weights.to(x.dtype)
    out = torch.cond(
        2 * x.shape[0] * moe.topk <= moe.n_experts,  # measured crossover (arith-tiny, CPU): 2-4 tokens
        lambda x, w, i: routed_experts(moe, x, w, i),
        lambda x, w, i: _dense_experts(moe, x, w, i),
        (x, weights, indices),
    )
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out.view(shape)


def _dense_experts(moe: MoE, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
    N, E = x.shape[0], moe.n_experts
    w13 = torch.cat([torch.cat([e.w1.weight, e.w3.weight], dim=0) for e in moe.experts])  # (E * 2I, D)
    w2 = torch.cat([e.w2.weight for e in moe.experts], dim=1)  # (D, E * I)
    dense = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, indices, weights)  # (N, E)
    gate, up = F.linear(x, w13).view(N, E, -1).chunk(2, dim=-1)  # (N, E, I) each
    h = F.silu(gate) * up * dense[..., None]
    return F.linear(h.reshape(N, -1), w2)


def fusable_rms_norm_forward(norm: RMSNorm, x: Tensor) -> Tensor:
    """The model's RMSNorm written as x / sqrt(mean(x^2) + eps) * w: the pattern ONNX Runtime
    fuses into one SimplifiedLayerNormalization node (x * rsqrt(...) exports as 6 nodes it leaves alone)."""
    h = x.float()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * h.to(x.dtype)


def folded_mla_weights(attn: MLA) -> tuple[Tensor, Tensor, Tensor]:
    """The absorbed MLA's weights folded: query (H * (C + R), q_in), kv (C + R, D), output (D, H * C).

    W_UK and the softmax scale fold into the query projection, whose rows are every head's
    q_lat (H * C) then every head's q_pe (H * R); W_UV folds into `wo`. The rope rows of both
    projections are permuted to evens-then-odds, so RoPE rotates halves (`ort_rope`). The
    latents it stores are the model's (c_kv after its norm, k_pe as `apply_rope` returns it).
    The products are computed from the parameters inside the graph, not stored: the graph
    keeps the model's own (rounded) weights, which a precision policy stores exactly, and
    ONNX Runtime folds the products in fp32 when it loads the session (under the int8 policy
    too, once `session_options` lets it fold the DequantizeLinear nodes).
    """
    H, nope, R, C, v = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank, attn.v_head_dim
    perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
    w_uk, w_uv = attn.absorb_kv()  # (H, nope, C), (H, v, C)
    w_q = (attn.wq.weight if attn.q_lora_rank is None else attn.wq_b.weight).view(H, nope + R, -1)
    w_q_lat = torch.einsum("hnc,hni->hci", w_uk, w_q[:, :nope])  # (H, C, q_in)
    w_q = torch.cat([w_q_lat.flatten(0, 1), w_q[:, nope:][:, perm].flatten(0, 1)]) * attn.softmax_scale
    w_kv = attn.wkv_a.weight
    w_o = torch.einsum("dhv,hvc->dhc", attn.wo.weight.view(-1, H, v), w_uv)
    return w_q, torch.cat([w_kv[:C], w_kv[C:][perm]]), w_o.reshape(w_o.shape[0], H * C)


def folded_mla_forward(attn: MLA, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache) -> Tensor:
    """MLA with a PoolLatentCache through `folded_mla_weights`: MatMuls instead of four Einsums
    per layer, RoPE as one node per projection (cos / sin come from the cache's tables)."""
    from crosschip.handoff.ort_ops import ort_rope  # as in _export_graph: onnxscript is slow to import

    B, T, _ = x.shape
    H, R, C = attn.n_heads, attn.qk_rope_head_dim, attn.kv_lora_rank
    w_q, w_kv, w_o = folded_mla_weights(attn)
    q_in = x if attn.q_lora_rank is None else attn.q_norm(attn.wq_a(x))
    q_lat, q_pe = F.linear(q_in, w_q).split([H * C, H * R], dim=-1)
    q_pe = ort_rope(q_pe, cache.positions, *cache.rope_tables, H)  # (B, T, H * R)
    c_kv, k_pe = F.linear(x, w_kv).split([C, R], dim=-1)
    k_pe = ort_rope(k_pe, cache.positions, *cache.rope_tables, 1)
    c_all, k_all, mask = cache.update(attn.layer_id, attn.kv_norm(c_kv), k_pe)
    scores = torch.matmul(q_lat.reshape(B, T * H, C), c_all.transpose(1, 2))
    scores = scores + torch.matmul(q_pe.reshape(B, T * H, R), k_all.transpose(1, 2))  # (B, T*H, S)
    scores = scores.view(B, T, H, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(c_all.dtype).view(B, T * H, -1)
    o_lat = torch.matmul(probs, c_all)  # (B, T*H, C)
    return F.linear(o_lat.view(B, T, H * C), w_o)


def export_model(model: Transformer, *, decode: bool = False) -> Transformer:
    """A copy of `model` with export-friendly forwards swapped in (the model class is untouched):
    fusable RMSNorms, the folded MLA, and with `decode` the MoE layers' `decode_moe_forward`
    (the general graph traces the model's own MoE)."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, RMSNorm):
            module.forward = types.MethodType(fusable_rms_norm_forward, module)
    if decode:
        for moe in copied.moe_layers():
            moe.forward = types.MethodType(decode_moe_forward, moe)
    for layer in copied.layers:
        layer.attn.forward = types.MethodType(folded_mla_forward, layer.attn)
    return copied


def example_inputs(model: Transformer, B: int = 2, T: int = 3, S: int = 4, P: int = 11) -> tuple:
    """Inputs of the traced step. Every dynamic dim is >= 2 and distinct, so export does not specialise it."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    positions = torch.arange(S, S + T).expand(B, T).contiguous()
    past_c_kv = torch.randn(L, P, cfg.kv_lora_rank, generator=g).to(dtype)
    past_k_pe = torch.randn(L, P, cfg.qk_rope_head_dim, generator=g).to(dtype)
    slots = torch.randperm(P, generator=g)[: B * S].view(B, S)
    mask = causal_mask(torch.full((B,), S), T)
    return ids, positions, past_c_kv, past_k_pe, slots, mask


def causal_mask(past_lens: Tensor, T: int, S: int | None = None) -> Tensor:
    """(B, T, S+T) mask for rows whose first `past_lens[b]` of S past columns are real tokens."""
    S = int(past_lens.max()) if S is None else S
    past = torch.arange(S)[None, None, :] < past_lens[:, None, None]  # (B, 1, S)
    new = torch.ones(T, T, dtype=torch.bool).tril()[None]  # (1, T, T)
    B = past_lens.shape[0]
    return torch.cat([past.expand(B, T, S), new.expand(B, T, T)], dim=-1)


def dynamic_shapes() -> dict:
    B, T, S, P, ST = (torch.export.Dim(n) for n in ("batch", "seq", "past", "slots", "past_plus_seq"))
    return {
        "input_ids": {0: B, 1: T},
        "positions": {0: B, 1: T},
        "past_c_kv": {1: P},
        "past_k_pe": {1: P},
        "past_slots": {0: B, 1: S},
        "attention_mask": {0: B, 1: T, 2: ST},
    }


DECODE_SUFFIX = ".decode.onnx"


def decode_path(path: str | Path) -> Path:
    """Where `export_onnx` puts the small-batch decode graph next to `path` (model.onnx -> model.decode.onnx)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".onnx") + DECODE_SUFFIX)


def export_onnx(model: Transformer, path: str | Path, *, policy: str = "fp32", progress=None) -> dict[str, Any]:
    """Export `model` (fp32, eval mode) to `path` as one graph with the contract above.

    Also writes the same step with the shape-static, loop-free MoE to
    `decode_path(path)`: same inputs and outputs, for decode batches of a few tokens, where
    it runs with a fraction of the general graph's nodes.
    The model's weights should already be rounded as `policy` stores them
    (`precision.round_model`); the graphs then store them in the policy's dtype. Weights go
    to external data next to a graph when they pass 1 GiB (`model.onnx.data`).
    progress: optional callable(str) told about each phase. Returns facts for the manifest.
    """
    path = Path(path)
    say = progress or _quiet
    model = model.eval()
    small = decode_path(path)
    # Each trace is one busy Python thread and they share nothing: the decode graph is traced
    # in a second process meanwhile (arith-tiny, 2 CPU cores: ~50 s -> ~40 s per export).
    # Spawned, not forked: a fork would inherit this process's OpenMP and ONNX Runtime threads.
    # A decode graph already in the trace cache takes seconds: no second process for it.
    ctx = torch.multiprocessing.get_context("spawn")
    result, child_end = ctx.Pipe(duplex=False)
    child = None
    # The start is inside the try: a Ctrl-C that lands just after it must still stop the
    # child, which would otherwise trace on alone and write into the folder --resume redoes.
    try:
        if not trace_cache.has(trace_cache.trace_key(model, "decode")):
            child = ctx.Process(target=_export_decode_graph, args=(model, small, policy, child_end), daemon=True)
            try:
                with interrupts.held(), _sigint_ignored():
                    child.start()  # hands the weights over through shared memory
                say(f"small-batch decode graph ({small.name}) in a second process")
            except (OSError, RuntimeError) as e:  # e.g. a /dev/shm too small for the weights (containers)
                child = None
                say(f"no second process ({type(e).__name__}: {e}); {small.name} follows {path.name}")
        child_end.close()
        info = _export_graph(model, path, policy, say)
        from_cache = [path.name] if info.pop("from_cache") else []
        if (
            not _decode_graph_done(child, result, small, say)
            and _export_graph(model, small, policy, say, decode=True)["from_cache"]
        ):
            from_cache.append(small.name)
    finally:
        # On any failure here (or Ctrl-C) the child is stopped, not waited for.
        if child is not None and child.pid is not None:  # pid: None if it never started
            if child.is_alive():
                child.kill()
            child.join()
        result.close()
    return {**info, "decode_file": small.name, "traced_from_cache": from_cache}


def _decode_graph_done(child: Any, result: Any, small: Path, say) -> bool:
    """Whether the second process wrote the decode graph. Raises its error; False when there
    is no child or it died before reporting (killed, or it could not start: under spawn a
    calling script without a __main__ guard re-runs itself), so the caller traces it here."""
    if child is None:
        return False
    say(f"waiting for {small.name}")
    try:
        error = result.recv()
    except EOFError:
        child.join()
        say(f"the second process exited with code {child.exitcode}; tracing {small.name} here")
        return False
    if error is not None:
        raise CrosschipError(f"exporting {small.name} failed: {error}")
    return True


def _quiet(msg: str) -> None:
    pass


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child starts: the child inherits the disposition through fork and
    exec (and Python keeps an inherited SIG_IGN), so a Ctrl-C while it imports (torch: seconds)
    is no KeyboardInterrupt traceback. (A blocked mask is not inherited by a spawned child.)
    The cost: a Ctrl-C in the milliseconds of `Process.start` itself is dropped."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _export_decode_graph(model: Transformer, path: Path, policy: str, conn) -> None:
    """Child process: export the decode graph, send None or the error's text back."""
    # A Ctrl-C reaches the whole process group, and the parent stops this process then; a
    # KeyboardInterrupt here would only add a traceback to the terminal. It started with
    # SIGINT ignored (`_sigint_ignored`), and keeps it so where started otherwise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # torch.fx's progress bar takes tqdm's lock, by default a multiprocessing one; this
        # process ends without unregistering it, and the resource tracker then warns of a
        # leaked semaphore at every export. A thread lock serves one process as well.
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    try:
        _export_graph(model, path, policy, _quiet, decode=True)
        conn.send(None)
    except Exception as e:  # reported by the parent, which owns the user-facing error
        conn.send(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def _export_graph(model: Transformer, path: Path, policy: str, say, *, decode: bool = False) -> dict[str, Any]:
    """Trace (or take from the trace cache) one graph of `model`, then finish it into `path`."""
    step = CachedStep(export_model(model, decode=decode))
    key = trace_cache.trace_key(model, "decode" if decode else "general")
    traced = trace_cache.load(key, step)
    from_cache, unwritable = traced is not None, None
    if from_cache:
        say(f"traced graph from the cache ({trace_cache.cache_dir()})")
    else:
        say("tracing the cached step (torch.export)")
        traced = _trace(step, model)
        interrupts.check()  # torch.onnx.export retries after an interrupted import: Ctrl-C is lost there
        try:
            if trace_cache.store(key, traced, step):
                say("traced graph kept in the cache")
        except trace_cache.Unwritable as e:
            unwritable = str(e)
    return {**_finish_graph(traced, model, path, policy, say), "from_cache": from_cache, "cache_unwritable": unwritable}


def _trace(step: CachedStep, model: Transformer) -> onnx.ModelProto:
    """The step as torch.onnx.export translates it, not yet optimized.

    Returned as a proto without the exporter's stack traces, the form the trace cache keeps: a
    fresh trace and a cached one then enter the optimizer alike (it names the nodes it makes
    from the nodes it finds), so both write the same file."""
    import onnx_ir as ir

    from crosschip.handoff.ort_ops import TRANSLATIONS

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            step,
            example_inputs(model),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_shapes=dynamic_shapes(),
            dynamo=True,
            external_data=False,
            verbose=False,
            # Optimized once, below, with our own folding limits.
            optimize=False,
            custom_translation_table=TRANSLATIONS,
        )
    proto = ir.serde.serialize_model(program.model)
    strip_metadata(proto)
    return proto


# onnxscript's default rewrite rules that never apply to these graphs but cost the most to try.
# SlicesSplit (Slices that tile a tensor along an axis -> one Split) matches pairs of Slice nodes,
# and the MoE's per-expert Slices (bounds computed from the routing, never constant) make it the
# bulk of an export's optimizing: arith-tiny's general graph took 6.5-7.1 s with it and 1.7 s
# without, and both graphs came out the same to the byte (benchmarks/RESULTS.md, 2026-11-30;
# tests/test_handoff.py checks the bytes on its small one-MoE-layer model).
UNUSED_REWRITE_RULES = frozenset({"SlicesSplit"})


def optimize_graph(graph: Any, skip: frozenset[str] = UNUSED_REWRITE_RULES) -> None:
    """onnxscript's optimizer over a traced `graph` (an onnx_ir model, in place), less the rewrite rules `skip`.

    It folds only small constants. The default limits would fold an expert's w1 and w3 (stacked
    by the model's forward) into an anonymous constant; with these the graph keeps every weight
    under its own name, and ONNX Runtime folds the rest when it loads the session."""
    import onnxscript.optimizer

    with _rewrite_rules_without(skip):
        onnxscript.optimizer.optimize(graph, input_size_limit=1024, output_size_limit=1024)


@contextlib.contextmanager
def _rewrite_rules_without(names: frozenset[str]) -> Iterator[None]:
    """onnxscript's default rewrite rules, less `names`, while the block runs.

    `onnxscript.optimizer.optimize` takes no rule list: it reads the module's default rules
    when it runs. If a later onnxscript renames them, the optimizer keeps its full default."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r.name not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _finish_graph(traced: onnx.ModelProto, model: Transformer, path: Path, policy: str, say) -> dict[str, Any]:
    """Optimize the traced graph, store its weights as `policy`, write and check `path`."""
    import onnx_ir as ir

    graph = ir.serde.deserialize_model(traced)
    say("optimizing the graph")
    optimize_graph(graph)
    if feed_splits_whole_sizes(graph):
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(graph)
    proto = ir.serde.serialize_model(graph)
    strip_metadata(proto)
    drop_unused_initializers(proto)
    say(f"storing weights as {policy}")
    stats = store_weights(proto, policy)
    experts = count_expert_weights(proto)
    # Only the main layers run in the step (an MTP block is a training/draft head, not exported).
    expected = 3 * sum(isinstance(layer.ffn, MoE) for layer in model.layers) * model.cfg.n_routed_experts
    if experts != expected:
        raise RuntimeError(
            f"ONNX graph holds {experts} routed-expert weights, expected {expected}: tracing dropped experts"
        )
    say(f"writing {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    big = proto.ByteSize() > 1 << 30
    onnx.save(proto, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)
    say("checking the graph (onnx.checker)")
    onnx.checker.check_model(str(path), full_check=True)  # by path: works with external data too
    return {
        "file": path.name,
        "policy": policy,
        "expert_weights": experts,
        "opset": proto.opset_import[0].version,
        **stats,
    }


# --------------------------------------------------------------------------------------------
# Weight storage per precision policy
# --------------------------------------------------------------------------------------------

# Initializers that keep fp32 whatever the policy: the router (top-k over small score gaps).
KEEP_FP32 = re.compile(r"\.gate\.(weight|bias)$")
ONNX_DTYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


def _weights(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """fp32 initializers of rank >= 2 (matmul and lookup weights, possibly pre-transposed by the optimizer)."""
    return [
        t
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 and not KEEP_FP32.search(t.name)
    ]


def _exact_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int] | None:
    """Find the 2-D view and axis in which `w` is exactly int8 x per-channel scale.

    The graph's weights were rounded through the int8 policy before export, but the optimizer
    may have transposed (head, linears) or split (W_UK / W_UV from wkv_b) them, so the output
    channel can be any leading or trailing group of dims. Returns (q, scale, 2-D shape, axis).
    """
    for k in range(1, w.ndim):
        shape2 = (int(np.prod(w.shape[:k])), int(np.prod(w.shape[k:])))
        w2 = w.reshape(shape2)
        for axis in (0, 1):
            amax = np.abs(w2).max(axis=1 - axis)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            q = w2 / (scale[:, None] if axis == 0 else scale[None, :])
            if np.abs(q - np.round(q)).max() < 1e-3:
                return np.round(q).astype(np.int8), scale, shape2, axis
    return None


def _half_tensor(w: np.ndarray, name: str, policy: str) -> onnx.TensorProto | None:
    """`w` stored as fp16 or bf16, or None when that would not be exact (see `store_weights`)."""
    if policy == "fp16":
        half = w.astype(np.float16)
        return onnx.numpy_helper.from_array(half, name) if np.array_equal(half.astype(np.float32), w) else None
    # bf16 is the top half of fp32: exact when the low half is zero.
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    if (bits & 0xFFFF).any():
        return None
    raw = (bits >> 16).astype(np.uint16).tobytes()
    return onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, w.shape, raw, raw=True)


def feed_splits_whole_sizes(model: Any) -> int:
    """Give each Split its sizes as the tensor they came from, where tracing rebuilt it element
    by element; returns how many Splits changed. `model` is an onnx_ir Model, changed in place.

    The MoE splits its sorted pairs by the per-expert counts (`load.tolist()`). The traced graph
    takes each count out of `load` (Slice, Squeeze, Reshape, Gather) and concatenates them back
    into the Split's sizes: ~5 scalar nodes per expert and layer, a fifth of the general
    graph's nodes, each with ONNX Runtime's per-node cost. The counts are exactly `load` in
    order, so the Split can read `load` itself. On arith-tiny, 1 thread: 1126 -> 883 nodes,
    0.92x per decode step at batch 8 and 0.96x at 32 (benchmarks/graph_ab.py), outputs
    bit-identical.
    """
    changed = 0
    for node in model.graph:
        if node.op_type != "Split" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        concat = node.inputs[1].producer()
        if concat is None or concat.op_type != "Concat":
            continue
        parts = [_element_of(v) for v in concat.inputs]
        if any(p is None for p in parts):
            continue
        sources = {p[0] for p in parts}
        if len(sources) != 1 or [p[1] for p in parts] != list(range(len(parts))):
            continue
        sizes = sources.pop()
        if sizes.dtype != onnx.TensorProto.INT64 or sizes.shape is None or sizes.shape.dims != (len(parts),):
            continue
        node.replace_input_with(1, sizes)
        changed += 1
    return changed


def _element_of(value: Any) -> tuple[Any, int] | None:
    """(T, i) when `value` holds element i of the 1-D tensor T, taken out by a Slice i:i+1
    and then only reshaped; None otherwise."""
    while value is not None and (node := value.producer()) is not None:
        if node.op_type == "Slice":
            starts, ends, axes, steps = [*node.inputs[1:], None, None][:4]
            start = _const_int(starts)
            if start is None or _const_int(ends) != start + 1:
                return None
            if (axes is not None and _const_int(axes) != 0) or (steps is not None and _const_int(steps) != 1):
                return None
            return node.inputs[0], start
        if node.op_type == "Gather" and _const_int(node.inputs[1]) != 0:
            return None
        if node.op_type not in ("Reshape", "Squeeze", "Unsqueeze", "Gather", "Identity"):
            return None
        value = node.inputs[0]
    return None


def _const_int(value: Any) -> int | None:
    """The single integer a constant input holds (absent optional inputs: None)."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return int(array.reshape(-1)[0]) if array.size == 1 else None


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs (If branches, loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from all_nodes(sub)


def strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and docs, subgraphs' too: they are about half the file."""
    for node in all_nodes(model.graph):
        del node.metadata_props[:]
        node.doc_string = ""


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads, in the graph or its subgraphs (the optimizer can
    leave one behind, and ONNX Runtime warns about it on every session load)."""
    used = {i for node in all_nodes(model.graph) for i in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def session_options(threads: int | None = None) -> Any:
    """ORT session options for our graphs.

    An int8 bundle's weights reach the graph through DequantizeLinear nodes on initializers.
    ORT keeps such nodes for its QDQ fusions, and on this graph none applies (ORT 1.32 made no
    MatMulNBits of them): every step dequantized every weight, experts included. A decode
    step of arith-tiny, 1 thread: 6.3 ms at batch 1 against 1.4 ms folded (fp32 bundle 1.5),
    6.6 ms at batch 32 against 4.3 (benchmarks/RESULTS.md, 2026-11-29). With QDQ handling
    off, constant folding decodes them once, when the session loads: int8 on disk and in
    transfer, fp32 weights in memory, the same fp32 values computed (as fp16 and bf16 weights,
    whose Casts ORT folds anyway).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    # Idle intra-op threads sleep instead of spinning: serving steps are short and the CPU is shared.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def open_session(path: str | Path, backend: Any = None, threads: int | None = None) -> Any:
    """An InferenceSession on `backend`'s execution providers (OrtBackend.providers(); CPU by default)."""
    import onnxruntime as ort

    providers = backend.providers() if backend is not None else [("CPUExecutionProvider", {})]
    return ort.InferenceSession(str(path), session_options(threads), providers=providers)


def store_weights(model: onnx.ModelProto, policy: str) -> dict[str, Any]:
    """Rewrite the graph's weight initializers into the policy's storage dtype, in place.

    fp16/bf16: stored in that dtype, with a Cast to fp32 (compute stays fp32 on CPU; the
    values are exactly the rounded ones). int8: int8 + per-channel fp32 scale feeding a
    DequantizeLinear (standard ONNX, runs on every execution provider). Returns counts.
    A weight the policy cannot store exactly stays fp32, so the graph always computes the
    rounded model.
    """
    graph = model.graph
    stats = {"converted": 0, "kept_fp32": 0}
    if policy == "fp32":
        return stats
    nodes, keep = [], []
    for t in _weights(graph):
        w = onnx.numpy_helper.to_array(t)
        name = t.name
        if policy in ONNX_DTYPES:
            stored = _half_tensor(w, name + "_" + policy, policy)
            if stored is None:
                keep.append(name)
                continue
            graph.initializer.append(stored)
            nodes.append(onnx.helper.make_node("Cast", [stored.name], [name], to=onnx.TensorProto.FLOAT))
        else:
            found = _exact_int8(w)
            if found is None:
                keep.append(name)
                continue
            q, scale, shape2, axis = found
            graph.initializer.extend(
                [onnx.numpy_helper.from_array(q, name + "_q"), onnx.numpy_helper.from_array(scale, name + "_scale")]
            )
            flat = name if shape2 == tuple(w.shape) else name + "_2d"
            nodes.append(onnx.helper.make_node("DequantizeLinear", [name + "_q", name + "_scale"], [flat], axis=axis))
            if flat != name:
                graph.initializer.append(
                    onnx.numpy_helper.from_array(np.array(w.shape, dtype=np.int64), name + "_shape")
                )
                nodes.append(onnx.helper.make_node("Reshape", [flat, name + "_shape"], [name]))
        graph.initializer.remove(t)
        stats["converted"] += 1
    stats["kept_fp32"] = len(keep)
    # The decoding nodes go first: ONNX wants a topologically sorted graph.
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    return stats


def count_expert_weights(model: onnx.ModelProto) -> int:
    """Routed-expert weight tensors present in the graph (initializers or decoded initializers)."""
    names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    return sum(bool(re.fullmatch(r".*layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight", n)) for n in names)
