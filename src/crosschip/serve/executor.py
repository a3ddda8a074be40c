"""The executor seam: runs the model for a batch of sequence chunks and owns the latent cache.

The scheduler, sampling, streaming and the HTTP server only ever talk to an `Executor`, so a
second runtime (ONNX Runtime, `serve/ort_executor.py`) plugs in behind the same few methods.

`TorchExecutor` keeps the absorbed-MLA latents (`c_kv` after its norm, `k_pe` after RoPE) in a
paged pool: fixed-size blocks preallocated once, handed to sequences through per-sequence block
tables, so requests of different lengths share memory without fragmentation. A forward sees
the pool through the model's `LatentCache` protocol (`PagedBatchCache`).
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from crosschip.errors import CrosschipError
from crosschip.serve.pool import pool_blocks


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence: `token_ids` sit at positions `start_pos`, `start_pos + 1`, ..."""

    seq_id: int
    token_ids: list[int]
    start_pos: int


class CacheFullError(CrosschipError):
    """The latent cache has no room for a sequence that was not admitted through `can_allocate`."""


class Executor(Protocol):
    """Runs the model for a batch of sequence chunks and owns the latent cache storage."""

    vocab_size: int
    max_seq_len: int
    cache_bytes_per_token_per_layer: int
    """(kv_lora_rank + qk_rope_head_dim) * dtype size."""

    @property
    def cache_tokens(self) -> int:
        """Tokens the whole latent cache holds: no one sequence can grow past it."""
        ...

    def can_allocate(self, seq_id: int, total_tokens: int, prompt_ids: Sequence[int] = ()) -> bool:
        """Whether the cache can hold sequence `seq_id` grown to `total_tokens` tokens.

        The engine asks this before admitting a sequence (prompt + max_tokens). An executor may
        reserve the room on a True answer (both do), so that later `step` calls of that
        sequence never run out; `release` gives it back. With `prompt_ids`, it may also find
        a cached prefix of that prompt (`computed_tokens` then counts it).
        """
        ...

    def computed_tokens(self, seq_id: int) -> int:
        """Tokens of `seq_id` already in the cache: the first prompt chunk starts there."""
        ...

    def step(self, chunks: list[Chunk], *, all_logits: bool = False) -> Tensor | list[Tensor]:
        """Feed each chunk's tokens, appending their latents to that sequence's cache.

        Returns fp32 CPU logits: of each chunk's last token, one (len(chunks), V) tensor (row i
        is chunk i; one tensor, so a caller can argmax a whole decode batch at once), or with
        `all_logits`, a list of one (T, V) tensor per chunk.
        """
        ...

    def release(self, seq_id: int) -> None:
        """Free that sequence's cache (finish or abort); unknown ids are ignored."""
        ...

    def cache_usage(self) -> dict:
        """{"blocks_total", "blocks_used", "bytes_used", ...}."""
        ...


# --------------------------------------------------------------------------------------------
# Paged latent pool
# --------------------------------------------------------------------------------------------


class BlockTables:
    """Which blocks of a paged pool each sequence holds, and which hold a cached prefix.

    The pool is `num_blocks` fixed-size blocks, preallocated once and handed to sequences
    through per-sequence block tables, so requests of different lengths share it without
    fragmenting it. A token's latents live at slot `table[pos // block_size] * block_size +
    pos % block_size`. Block 0 is scratch: padded tokens of a batch write there and it is never
    handed out. Only bookkeeping: each executor owns its storage (`BlockPool`'s tensor, the ORT
    executor's OrtValues).

    Prefix caching (as vLLM's): a block filled with a sequence's tokens, from its prompt or
    generated, is keyed by a hash of those tokens and of every token before them. A later
    sequence whose prompt starts with the same full blocks (a shared system prompt, a chat's
    history with its earlier answers) takes those blocks into its table (counted references;
    nobody writes into a full block again) and computes only the rest. A released block that
    holds a cached prefix stays cached until a fresh block is needed and none is free: then the
    least recently released goes first.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise CrosschipError(f"the latent cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # seq_id -> tokens written
        self.slot_map: dict[int, np.ndarray] = {}  # seq_id -> pool slot of each position it has room for
        self.refs: dict[int, int] = {}  # block -> sequences holding it
        self.cached: dict[bytes, int] = {}  # prefix hash -> the block holding that prefix's last block
        self.block_hash: dict[int, bytes] = {}  # the inverse, for the blocks in `cached`
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest first
        # seq_id -> [key of its last keyed block, blocks keyed, tokens written since]: for the
        # sequences that take part in prefix caching (those reserved with their prompt).
        self.keying: dict[int, list] = {}

    def capacity(self, seq_id: int) -> int:
        return len(self.tables.get(seq_id, ())) * self.block_size

    def reserve(self, seq_id: int, total_tokens: int, prompt: Sequence[int] = ()) -> bool:
        """Give `seq_id` enough blocks for `total_tokens`; False (and no change) if the pool is short.

        On a sequence's first reservation, `prompt` (its prompt ids; empty: no sharing) lets it
        take the cached blocks of its prompt's longest cached prefix, short of the block with
        its last token, which must be computed for the first logits. `lengths[seq_id]` then
        counts those tokens as written."""
        table = self.tables.get(seq_id)
        hashes = self._hashes(prompt) if table is None else []
        shared = []
        for h in hashes[: (len(prompt) - 1) // self.block_size]:
            if h not in self.cached:
                break
            shared.append(self.cached[h])
        held = len(table) if table is not None else len(shared)
        need = math.ceil(total_tokens / self.block_size) - held
        if need <= 0 and table is not None:
            return True
        need = max(need, 0)
        if need > len(self.free) + len(self.evictable) - sum(b in self.evictable for b in shared):
            return False
        for b in shared:
            self.evictable.pop(b, None)
            self.refs[b] = self.refs.get(b, 0) + 1
        if table is None:
            table = self.tables[seq_id] = shared
            self.lengths[seq_id] = len(shared) * self.block_size
            if prompt:
                self.keying[seq_id] = [hashes[len(shared) - 1] if shared else b"", len(shared), []]
        for _ in range(need):
            b = self._take()
            self.refs[b] = 1
            table.append(b)
        # Built once per reservation, so a step slices it instead of recomputing slots.
        blocks = np.asarray(table, dtype=np.int64)[:, None] * self.block_size
        self.slot_map[seq_id] = (blocks + np.arange(self.block_size)).ravel()
        return True

    def written(self, seq_id: int, start: int, token_ids: Sequence[int]) -> None:
        """`seq_id` now has `token_ids` written from position `start`: key each block they fill."""
        self.lengths[seq_id] = start + len(token_ids)
        state = self.keying.get(seq_id)
        if state is None:
            return
        key, filled, tail = state
        tail.extend(token_ids)
        table = self.tables[seq_id]
        while len(tail) >= self.block_size:
            key = _chain(key, tail[: self.block_size])
            del tail[: self.block_size]
            # Two sequences that computed the same prefix at once: the first block keyed stays.
            if key not in self.cached:
                self.cached[key] = table[filled]
                self.block_hash[table[filled]] = key
            filled += 1
        state[0], state[1] = key, filled

    def release(self, seq_id: int) -> None:
        for b in reversed(self.tables.pop(seq_id, [])):
            self.refs[b] -= 1
            if self.refs[b]:
                continue
            del self.refs[b]
            if b in self.block_hash:
                self.evictable[b] = None  # newest last
            else:
                self.free.append(b)
        self.lengths.pop(seq_id, None)
        self.slot_map.pop(seq_id, None)
        self.keying.pop(seq_id, None)

    @property
    def blocks_used(self) -> int:
        """Blocks some sequence holds (cached blocks that none holds are not in use)."""
        return self.num_blocks - 1 - len(self.free) - len(self.evictable)

    def _take(self) -> int:
        if self.free:
            return self.free.pop()
        b, _ = self.evictable.popitem(last=False)  # the cached prefix released longest ago
        del self.cached[self.block_hash.pop(b)]
        return b

    def _hashes(self, prompt: Sequence[int]) -> list[bytes]:
        """Key of each full block of `prompt`, as `written` keys them."""
        keys, key, bs = [], b"", self.block_size
        for i in range(len(prompt) // bs):
            key = _chain(key, prompt[i * bs : (i + 1) * bs])
            keys.append(key)
        return keys


def _chain(key: bytes, block: Sequence[int]) -> bytes:
    """A block's key: a hash of its tokens and of the key of the block before it."""
    return hashlib.sha256(key + np.asarray(block, dtype=np.int64).tobytes()).digest()


class BlockPool(BlockTables):
    """Block tables over torch storage: one tensor (layers, num_blocks * block_size,
    kv_lora_rank + rope), c_kv and k_pe side by side, so one gather reads both."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__(num_blocks, block_size)
        self.kv_lora_rank = kv_lora_rank
        self.latent = torch.zeros(
            num_layers, num_blocks * block_size, kv_lora_rank + rope_dim, dtype=dtype, device=device
        )

    def block_bytes(self) -> int:
        return self.latent[:, : self.block_size].numel() * self.latent.element_size()


class PagedBatchCache:
    """The model's `LatentCache` over a `BlockPool` for one forward of a padded batch.

    write_slots (B, T): where each new token's latents go (padding -> scratch slot 0).
    read_slots (B, S): the slots of positions 0..S-1 of each row. mask (B, T, S): True where
    a query may attend (its own sequence, not after itself).
    """

    def __init__(self, pool: BlockPool, write_slots: Tensor, read_slots: Tensor, mask: Tensor):
        self.pool = pool
        self.write_slots = write_slots.flatten()
        self.read_slots = read_slots
        self.mask = mask

    def update(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        seen, mask = self.update_latent(layer, torch.cat([c_kv, k_pe], dim=-1))
        C = self.pool.kv_lora_rank
        return seen[..., :C], seen[..., C:], mask

    def update_latent(self, layer: int, new: Tensor) -> tuple[Tensor, Tensor]:
        """`update` with c_kv and k_pe side by side: new (B, T, C + R) -> past latents (B, S, C + R), mask."""
        latent = self.pool.latent[layer]  # (slots, C + R)
        latent.index_copy_(0, self.write_slots, new.reshape(-1, latent.shape[-1]).to(latent.dtype))
        return latent[self.read_slots], self.mask  # (B, S, C + R)


def build_batch(pool: BlockPool, chunks: list[Chunk], device: torch.device) -> tuple[Tensor, Tensor, PagedBatchCache]:
    """Pad `chunks` into (B, T) input ids and positions plus the cache view for one forward.

    A handful of tensor ops whatever the batch size: the per-row work is list building only.
    """
    lens = [len(c.token_ids) for c in chunks]
    T = max(lens)
    ends = [c.start_pos + n for c, n in zip(chunks, lens)]
    S = max(ends)
    bs = pool.block_size
    n_blocks = -(-S // bs)
    input_ids = torch.tensor([c.token_ids + [0] * (T - n) for c, n in zip(chunks, lens)])
    tables = torch.tensor([(t := pool.tables[c.seq_id][:n_blocks]) + [0] * (n_blocks - len(t)) for c in chunks])
    start = torch.tensor([c.start_pos for c in chunks])[:, None]  # (B, 1)
    end = torch.tensor(ends)[:, None]
    t_idx = torch.arange(T)
    # Padded queries act as the row's last real token (no empty softmax rows) but write to scratch.
    positions = torch.minimum(start + t_idx, end - 1)  # (B, T)
    k_pos = torch.arange(S)
    read = tables[:, k_pos // bs] * bs + k_pos % bs  # (B, S) slot of every position
    write = torch.where(t_idx < torch.tensor(lens)[:, None], read.gather(1, positions), 0)
    mask = (k_pos <= positions[:, :, None]) & (k_pos < end[:, :, None])  # (B, T, S)
    cache = PagedBatchCache(pool, write.to(device), read.to(device), mask.to(device))
    return input_ids.to(device), positions.to(device), cache


def run_in_groups(chunks: list[Chunk], run, all_logits: bool) -> Tensor | list[Tensor]:
    """Run a step's chunks as few batched forwards: every single-token decode together, and
    prefill pieces of similar length padded together (one run per chunk made TTFT at 32
    concurrent requests ~4x transformers'). `run(batch, all_logits)` returns what
    `Executor.step` does for `batch`; the groups' results are put back in chunk order."""
    decodes = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
    groups = [decodes] if decodes else []
    groups += prefill_groups([(i, len(c.token_ids)) for i, c in enumerate(chunks) if len(c.token_ids) > 1])
    if len(groups) == 1 and groups[0] == list(range(len(chunks))):
        return run(chunks, all_logits)  # one forward in chunk order (every decode-only step)
    results = [run([chunks[i] for i in group], all_logits) for group in groups]
    if all_logits:
        out: list[Tensor | None] = [None] * len(chunks)
        for group, rows in zip(groups, results):
            for i, row in zip(group, rows):
                out[i] = row
        return out  # type: ignore[return-value]
    last = torch.empty(len(chunks), results[0].shape[-1], dtype=results[0].dtype)
    for group, rows in zip(groups, results):
        last[group] = rows
    return last


def prefill_groups(lengths: list[tuple[int, int]], max_waste: float = 0.25) -> list[list[int]]:
    """Group prefill chunks (index, length) into padded forwards wasting at most `max_waste` of a group."""
    groups: list[list[int]] = []
    group: list[int] = []
    real = longest = 0
    for i, n in sorted(lengths, key=lambda x: -x[1]):
        longest = longest or n
        if group and (len(group) + 1) * longest * (1 - max_waste) > real + n:
            groups.append(group)
            group, real, longest = [], 0, n
        group.append(i)
        real += n
    if group:
        groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------
# The executors
# --------------------------------------------------------------------------------------------


class PagedExecutor(abc.ABC):
    """What both executors share: admission, the checks on each chunk, the step's grouping and
    the cache accounting, over `self.blocks`. A subclass sets `cfg`, `blocks`, `max_seq_len` and
    `cache_bytes_per_token_per_layer`, and runs one padded batch in `_run(batch, all_logits)`."""

    cfg: Any
    blocks: BlockTables
    max_seq_len: int
    cache_bytes_per_token_per_layer: int

    @property
    def cache_tokens(self) -> int:
        return (self.blocks.num_blocks - 1) * self.blocks.block_size  # block 0 is scratch

    def can_allocate(self, seq_id: int, total_tokens: int, prompt_ids: Sequence[int] = ()) -> bool:
        return total_tokens <= self.max_seq_len and self.blocks.reserve(seq_id, total_tokens, prompt_ids)

    def computed_tokens(self, seq_id: int) -> int:
        return self.blocks.lengths.get(seq_id, 0)

    def step(self, chunks: list[Chunk], *, all_logits: bool = False) -> Tensor | list[Tensor]:
        for c in chunks:
            self._ensure_room(c)
        out = run_in_groups(chunks, self._run, all_logits)
        for c in chunks:
            self.blocks.written(c.seq_id, c.start_pos, c.token_ids)
        return out

    def release(self, seq_id: int) -> None:
        self.blocks.release(seq_id)

    def cache_usage(self) -> dict:
        b = self.blocks
        block_bytes = b.block_size * self.cfg.num_hidden_layers * self.cache_bytes_per_token_per_layer
        return {
            "blocks_total": b.num_blocks - 1,
            "blocks_used": b.blocks_used,
            "block_size": b.block_size,
            "bytes_used": b.blocks_used * block_bytes,
            "bytes_total": (b.num_blocks - 1) * block_bytes,
            "bytes_per_token_per_layer": self.cache_bytes_per_token_per_layer,
            "sequences": len(b.tables),
        }

    def _ensure_room(self, c: Chunk) -> None:
        end = c.start_pos + len(c.token_ids)
        if end > self.max_seq_len:
            raise CacheFullError(f"sequence {c.seq_id} reaches {end} tokens; the model's context is {self.max_seq_len}")
        written = self.blocks.lengths.get(c.seq_id, 0)
        if c.start_pos != written:
            raise CrosschipError(f"sequence {c.seq_id}: chunk starts at {c.start_pos} but {written} tokens are cached")
        if end > self.blocks.capacity(c.seq_id) and not self.blocks.reserve(c.seq_id, end):
            raise CacheFullError(f"the latent cache is full: no room for sequence {c.seq_id} at {end} tokens")

    @abc.abstractmethod
    def _run(self, batch: list[Chunk], all_logits: bool) -> Tensor | list[Tensor]:
        """Logits of one padded batch: each chunk's last row, or all its rows with `all_logits`."""


class TorchExecutor(PagedExecutor):
    """Runs a `Transformer` with the absorbed MLA path over a paged latent pool.

    Chunks of one token (decodes) run together as one (B, 1) forward; longer chunks (prefill
    pieces) run in padded forwards of similar lengths, so a long prompt never pads the decode batch.
    The forward is `serve.compile.DecodeForward` (the model's weights in fewer, larger ops:
    fused absorbed MLA, grouped-matmul MoE), optionally under torch.compile; it reads the pool
    through `PagedBatchCache`, which also serves the model's own `cache=` path.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: Any = None,
        *,
        max_batch: int = 32,
        block_size: int = 16,
        num_blocks: int = 0,
        compile: bool = False,
    ):
        cfg = model.cfg
        self.model = model.eval()
        self.backend = backend
        self.cfg = cfg
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = cfg.max_position_embeddings
        self.cache_bytes_per_token_per_layer = cfg.latent_dim * param.element_size()
        self.blocks = BlockPool(
            cfg.num_hidden_layers,
            pool_blocks(
                num_blocks,
                block_size,
                max_batch,
                self.max_seq_len,
                token_bytes=cfg.num_hidden_layers * self.cache_bytes_per_token_per_layer,
                device_type=self.device.type,
            ),
            block_size,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
            self.dtype,
            self.device,
        )
        from crosschip.serve.compile import DecodeForward, compile_forward

        self.forward = DecodeForward(self.model)
        if compile:
            self.forward = compile_forward(self.forward)

    @torch.inference_mode()
    def _run(self, batch: list[Chunk], all_logits: bool) -> Tensor | list[Tensor]:
        input_ids, positions, cache = build_batch(self.blocks, batch, self.device)
        if all_logits:
            logits = self.forward(input_ids, positions, cache).float().cpu()  # (B, T, V)
            return [logits[b, : len(c.token_ids)] for b, c in enumerate(batch)]
        # Only each row's last token goes through the head: (B, 1, V).
        last = None if input_ids.shape[1] == 1 else torch.tensor([len(c.token_ids) - 1 for c in batch])
        logits = self.forward(input_ids, positions, cache, last)[:, 0]
        if logits.dtype != torch.float32 or logits.device.type != "cpu":
            logits = logits.float().cpu()
        return logits


def make_executor(bundle_dir: str | Path, backend_spec: str, **opts: Any) -> Executor:
    """The executor for `backend_spec`: torch:* -> TorchExecutor, ort:* -> OrtExecutor.

    opts: max_batch, block_size, num_blocks, compile, dtype (torch), and whatever the ORT
    executor accepts.
    """
    from crosschip.backends import get_backend

    backend = get_backend(backend_spec).require()
    if backend.runtime == "ort":
        from crosschip.serve.ort_executor import OrtExecutor

        return OrtExecutor(bundle_dir, backend, **opts)
    # The hand-off's loader reads every precision policy's bundle (int8 is dequantized) and
    # verifies checksums.
    from crosschip.handoff.precision import load_for_serving

    model, _ = load_for_serving(bundle_dir, backend, dtype=opts.pop("dtype", None))
    opts.pop("threads", None)  # an ORT option; torch threads are set by the caller
    return TorchExecutor(model, backend, **opts)
