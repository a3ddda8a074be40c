"""Exact-answer accuracy on held-out arithmetic problems: batched greedy decoding.

Decoding uses the model's absorbed-MLA path with a `ContiguousLatentCache`. That cache
appends the same number of tokens to every row, so prompts are bucketed by token length:
every bucket prefills together without padding, then decodes one token per step.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from crosschip.data.arith import Problem, check
from crosschip.model import ContiguousLatentCache, Transformer
from crosschip.tokenizer import Tokenizer


@torch.no_grad()
def greedy_generate(
    model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], batch_size: int = 256
) -> list[list[int]]:
    """Greedy completions of token-id prompts (stopping at any of `stop_ids`, which is kept)."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        buckets[len(p)].append(i)
    for _, members in sorted(buckets.items()):
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in rows], device=device)
            for i, tokens in zip(rows, _decode_bucket(model, ids, max_new_tokens, stop_ids)):
                out[i] = tokens
    return out


def _decode_bucket(model: Transformer, ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    B, T = ids.shape
    max_new_tokens = min(max_new_tokens, model.cfg.max_position_embeddings - T)
    dtype = next(model.parameters()).dtype
    cache = ContiguousLatentCache(model.cfg, B, T + max_new_tokens, dtype=dtype, device=ids.device)
    positions = torch.arange(T, device=ids.device).expand(B, T)
    logits = model(ids, positions=positions, cache=cache)[:, -1]  # (B, V)
    stop = torch.tensor(sorted(stop_ids), device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    generated = []
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        generated.append(nxt)
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:  # .all() syncs with the device once a token
            break
        pos = torch.full((B, 1), T + step, device=ids.device)
        logits = model(nxt[:, None], positions=pos, cache=cache)[:, -1]
    tokens = torch.stack(generated, dim=1).tolist()
    result = []
    for row in tokens:
        cut = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[:cut])
    return result


def arith_accuracy(
    model: Transformer, tokenizer: Tokenizer, problems: list[Problem], max_new_tokens: int | None = None
) -> tuple[float, list[str]]:
    """(exact-answer accuracy, generated completions) of greedy decoding, scored by the task checker."""
    was_training = model.training
    model.eval()
    prompts = tokenizer.encode_batch([p.prompt for p in problems], add_bos=True)
    if max_new_tokens is None:
        longest = max(len(c) for c in tokenizer.encode_batch([p.completion for p in problems]))
        max_new_tokens = longest + 4
    outs = greedy_generate(model, prompts, max_new_tokens, {tokenizer.eos_id})
    texts = [tokenizer.decode(o, skip_special=False) for o in outs]
    correct = sum(check(p, t) for p, t in zip(problems, texts))
    model.train(was_training)
    return correct / max(1, len(problems)), texts
