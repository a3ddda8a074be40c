"""What one side of a parity check runs: teacher-forced scoring and greedy continuation.

`TorchSide` runs a `Transformer` directly: scoring uses the naive (expanded) attention, the
greedy continuation the absorbed form over a `ContiguousLatentCache`, batched by prompt
length so no row is ever padded. `ExecutorSide` drives any serving `Executor` (ONNX Runtime,
or the torch serving engine) through its `step(chunks)` seam, exactly as the server does.

Greedy outputs are normalised: the generated ids up to (not including) the first stop token,
followed by `STOP` when a stop token ended the sequence. A remote server reports the same
thing as text plus finish_reason, so both compare like for like.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from crosschip.model import ContiguousLatentCache, Transformer

STOP = -1
"""Marks a continuation that ended on a stop token (rather than on the length limit)."""


def finish(generated: list[int], eos_ids: list[int]) -> list[int]:
    """Cut `generated` at its first stop token and mark it with STOP."""
    for i, tok in enumerate(generated):
        if tok in eos_ids:
            return generated[:i] + [STOP]
    return generated


class TorchSide:
    """A Transformer on one torch device."""

    def __init__(self, model: Transformer, device: torch.device):
        self.model = model.eval()
        self.device = device
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def score(self, ids: list[int]) -> Tensor:
        """Logits of every position, (T, V) fp32 on the CPU."""
        x = torch.tensor([ids], device=self.device)
        return self.model(x)[0].float().cpu()

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
        """Greedy continuations, batched over prompts of equal length."""
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_len[len(p)].append(i)
        out: list[list[int]] = [[] for _ in prompts]
        for _, rows in sorted(by_len.items()):
            batch = torch.tensor([prompts[i] for i in rows], device=self.device)  # (B, T)
            for i, gen in zip(rows, self._greedy_batch(batch, max_new_tokens, eos_ids)):
                out[i] = finish(gen, eos_ids)
        return out

    def _greedy_batch(self, batch: Tensor, max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
        B, T = batch.shape
        cache = ContiguousLatentCache(self.model.cfg, B, T + max_new_tokens, dtype=self.dtype, device=self.device)
        positions = torch.arange(T, device=self.device).expand(B, T)
        logits = self.model(batch, positions, cache=cache)[:, -1]  # (B, V)
        generated = torch.empty(B, 0, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        eos = torch.tensor(eos_ids, device=self.device)
        for step in range(max_new_tokens):
            nxt = logits.float().argmax(-1)  # (B,)
            generated = torch.cat([generated, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, eos)
            # .all() forces a host-device sync; once per token is fine for a parity check.
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = torch.full((B, 1), T + step, device=self.device)
            logits = self.model(nxt[:, None], pos, cache=cache)[:, -1]
        return generated.cpu().tolist()


class ExecutorSide:
    """A serving `Executor` (e.g. `OrtExecutor`), driven through `step(chunks)`."""

    def __init__(self, executor: Any, *, max_batch: int = 16):
        self.executor = executor
        self.max_batch = max_batch
        self._next_id = 0

    def _new_id(self) -> int:
        self._next_id += 1
        return 1_000_000 + self._next_id

    def _admit(self, seq_id: int, total: int) -> None:
        from crosschip.errors import CrosschipError

        if not self.executor.can_allocate(seq_id, total):
            raise CrosschipError(
                f"the target executor cannot hold a {total}-token sequence (cache or context too small)"
            )

    def score(self, ids: list[int]) -> Tensor:
        from crosschip.serve.executor import Chunk

        sid = self._new_id()
        self._admit(sid, len(ids))
        try:
            return self.executor.step([Chunk(sid, list(ids), 0)], all_logits=True)[0].float()
        finally:
            self.executor.release(sid)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.max_batch):
            out += self._greedy_wave(prompts[start : start + self.max_batch], max_new_tokens, eos_ids)
        return out

    def _greedy_wave(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
        from crosschip.serve.executor import Chunk

        ids = [self._new_id() for _ in prompts]
        for sid, p in zip(ids, prompts):
            self._admit(sid, len(p) + max_new_tokens)
        try:
            logits = self.executor.step([Chunk(sid, list(p), 0) for sid, p in zip(ids, prompts)])
            generated: list[list[int]] = [[] for _ in prompts]
            active = list(range(len(prompts)))
            for step in range(max_new_tokens):
                for row, lg in zip(active, logits):
                    generated[row].append(int(lg.argmax()))
                active = [r for r in active if generated[r][-1] not in eos_ids]
                if not active or step == max_new_tokens - 1:
                    break
                chunks = [Chunk(ids[r], [generated[r][-1]], len(prompts[r]) + step) for r in active]
                logits = self.executor.step(chunks)
            return [finish(g, eos_ids) for g in generated]
        finally:
            for sid in ids:
                self.executor.release(sid)
