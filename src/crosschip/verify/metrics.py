"""Parity metrics between a reference side and a target side on the same prompts.

Distribution metrics are per position of the teacher-forced (scored) texts: position t's
logits predict token t+1. A remote target returns only its top-K log-probabilities per
position; then KL is taken over that top-K support plus one bucket for the rest of the
vocabulary (a lower bound on the full KL), and the tensor metrics over the top-K log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from crosschip.data.arith import check
from crosschip.verify.bisect import tensor_errors
from crosschip.verify.prompts import PromptSet
from crosschip.verify.sides import STOP


@dataclass
class SideResult:
    """What one side produced. Exactly one of `logits` / `topk` is set per scored prompt."""

    greedy: list[list[int]]
    logits: list[Tensor] | None = None
    """(T, V) fp32 per scored prompt."""
    topk: list[tuple[Tensor, Tensor, Tensor]] | None = None
    """(ids (T, K) int64, log-probs (T, K), exact-id mask (T, K) bool) per scored prompt (remote targets)."""
    token_logprobs: list[Tensor] | None = None
    """(T-1,) log p(token t+1 | ..t) per scored prompt; derived from `logits` when absent."""
    info: dict[str, Any] = field(default_factory=dict)

    def next_token_logprobs(self, i: int, ids: list[int]) -> Tensor:
        if self.token_logprobs is not None:
            return self.token_logprobs[i].double()
        lp = self.logits[i][:-1].double().log_softmax(-1)
        return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def kl_full(ref: Tensor, tgt: Tensor) -> Tensor:
    """KL(ref || tgt) per position, (T,), from logits (T, V); computed in fp64."""
    lp, lq = ref.double().log_softmax(-1), tgt.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def kl_topk(ref: Tensor, ids: Tensor, lq: Tensor, keep: Tensor | None = None) -> Tensor:
    """KL(ref || tgt) per position over the target's top-K ids and one bucket for the rest of
    the vocabulary: a lower bound on the full KL (merging outcomes never raises it), with no
    renormalisation. Renormalised on the top-K alone, log-probs all shifted by log 2 (half the
    mass moved off the top-K) or lifted above 0 scored KL 0.

    keep (T, K) bool: entries of the support to use (the others fall into the rest, on both sides).
    """
    keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep
    lp = ref.double().log_softmax(-1).gather(1, ids).masked_fill(~keep, -torch.inf)
    lq = lq.double().masked_fill(~keep, -torch.inf)
    tiny = 1e-300  # the rest of a peaked reference can round to 0; 0 * log 0 counts 0
    p_rest = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - lq.exp().sum(-1)).clamp_min(tiny)
    terms = torch.where(keep, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(tiny).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (terms + rest).clamp_min(0.0)


def match_length(ref: list[int], tgt: list[int]) -> int:
    """Index of the first differing token (the shared length when one is a prefix of the other)."""
    for i, (a, b) in enumerate(zip(ref, tgt)):
        if a != b:
            return i
    return min(len(ref), len(tgt))


def completion_text(tokenizer: Any, generated: list[int]) -> str:
    return tokenizer.decode([t for t in generated if t != STOP])


def distribution_metrics(
    prompts: PromptSet, ref: SideResult, tgt: SideResult, canonical: tuple[Tensor, Tensor] | None = None
) -> dict[str, Any]:
    """KL (mean, max), top-1 agreement and tensor metrics over every scored position.

    canonical: ((V,) id -> canonical id, (V,) string shared by several ids), when the
    target's ids were mapped back from token strings. Positions whose reference top-1 has a
    shared string are left out of the top-1 agreement: the target cannot name that token.
    """
    kls, agree, ref_rows, tgt_rows = [], [], [], []
    for i, _ in enumerate(prompts.scored):
        r = ref.logits[i]
        if tgt.topk is None:
            t = tgt.logits[i]
            kls.append(kl_full(r, t))
            agree.append(r.argmax(-1) == t.argmax(-1))
            ref_rows.append(r.flatten())
            tgt_rows.append(t.flatten())
        else:
            ids, lq, keep = tgt.topk[i]
            r = r[: ids.shape[0]]  # a server may not return the row after the last prompt token
            kls.append(kl_topk(r, ids, lq, keep))
            top_ref, top_tgt = r.argmax(-1), ids.gather(1, lq.argmax(-1, keepdim=True))[:, 0]
            if canonical is not None:
                canon, shared = canonical
                top_ref, top_tgt = canon[top_ref][~shared[top_ref]], top_tgt[~shared[top_ref]]
            agree.append(top_ref == top_tgt)
            ref_rows.append(r.double().log_softmax(-1).gather(1, ids)[keep])
            tgt_rows.append(lq.double()[keep])
    kl = torch.cat(kls)
    worst = int(kl.argmax())
    tensor = tensor_errors(torch.cat(ref_rows), torch.cat(tgt_rows))
    return {
        "positions": int(kl.numel()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "kl_max_at": _locate(prompts, worst),
        "top1": float(torch.cat(agree).float().mean()),
        "top1_positions": int(torch.cat(agree).numel()),
        "kl_support": "full vocabulary" if tgt.topk is None else f"target top-{tgt.topk[0][0].shape[1]} and the rest",
        "tensor_on": "logits" if tgt.topk is None else "top-K log-probabilities",
        **{k: v for k, v in tensor.items() if k != "rel_l2"},
    }


def _locate(prompts: PromptSet, flat: int) -> dict[str, int | str]:
    for i, p in enumerate(prompts.scored):
        if flat < len(p.ids):
            return {"prompt": i, "position": flat, "kind": p.kind}
        flat -= len(p.ids)
    return {}


def perplexity(prompts: PromptSet, side: SideResult, kind: str) -> float | None:
    """exp(mean next-token NLL) over the scored prompts of one kind."""
    nll, n = 0.0, 0
    for i, p in enumerate(prompts.scored):
        if p.kind == kind and len(p.ids) > 1:
            lp = side.next_token_logprobs(i, p.ids)
            nll -= float(lp.sum())
            n += lp.numel()
    return math.exp(nll / n) if n else None


def greedy_metrics(
    prompts: PromptSet, ref: SideResult, tgt: SideResult, tokenizer: Any, canonical: tuple[Tensor, Tensor] | None = None
) -> dict[str, Any]:
    """Match lengths of the greedy continuations and the task accuracy of each side."""
    canon = (
        (lambda seq: [t if t == STOP else int(canonical[0][t]) for t in seq])
        if canonical is not None
        else (lambda s: s)
    )
    lengths, identical, first_diff = [], 0, None
    for i, (r, t) in enumerate(zip(ref.greedy, tgt.greedy)):
        r = canon(r)
        m = match_length(r, t)
        lengths.append(m)
        if r == t:
            identical += 1
        elif first_diff is None:
            first_diff = {
                "prompt": i,
                "at": m,
                "reference": completion_text(tokenizer, r),
                "target": completion_text(tokenizer, t),
            }
    problems = [(i, p.as_problem()) for i, p in enumerate(prompts.greedy) if p.kind == "arith"]
    acc = lambda side: (  # None: no problems (a corpus model's prompts): nothing to check
        sum(check(prob, completion_text(tokenizer, side.greedy[i])) for i, prob in problems) / len(problems)
        if problems
        else None
    )
    return {
        "greedy_prompts": len(lengths),
        "greedy_identical": identical / len(lengths),
        "match_length_mean": sum(lengths) / len(lengths),
        "match_length_min": min(lengths),
        "max_new_tokens": prompts.max_new_tokens,
        "first_divergence": first_diff,
        "accuracy_reference": acc(ref),
        "accuracy_target": acc(tgt),
        "accuracy_problems": len(problems),
    }


def all_metrics(prompts: PromptSet, ref: SideResult, tgt: SideResult, tokenizer: Any) -> dict[str, Any]:
    canonical: tuple[Tensor, Tensor] | None = None
    if tgt.info.get("token_ids") == "canonical":
        from crosschip.verify.remote import canonical_ids

        canonical = canonical_ids(tokenizer)
    return {
        **distribution_metrics(prompts, ref, tgt, canonical),
        "ppl_reference": perplexity(prompts, ref, "corpus"),
        "ppl_target": perplexity(prompts, tgt, "corpus"),
        "ppl_arith_reference": perplexity(prompts, ref, "arith"),
        "ppl_arith_target": perplexity(prompts, tgt, "arith"),
        **greedy_metrics(prompts, ref, tgt, tokenizer, canonical),
    }
