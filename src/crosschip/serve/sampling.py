"""Sampling parameters and the per-sequence sampler.

Order of the logits processors, as in vLLM: the request's bias first (`logit_bias`,
`allowed_token_ids`, and `min_tokens`' mask on the stop ids: the processors that can change a
greedy choice), then the repetition, frequency and presence penalties, then temperature, then
the top-k, top-p and min-p masks, then a draw from the request's own `torch.Generator` (so a
`seed` reproduces a request whatever else is in the batch). Reported logprobs are those of the
raw model distribution (log_softmax of the logits), as vLLM's default `raw_logprobs`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from crosschip.errors import CrosschipError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value
# As vLLM: a temperature between 0 and this samples at this (a smaller one overflows fp32
# logits to inf, and softmax to NaN).
MIN_TEMPERATURE = 0.01
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


class InvalidParameter(CrosschipError):
    """A sampling parameter out of range; `param` names it as the API reports it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Raise InvalidParameter naming `param` at the first id outside the vocabulary."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidParameter(param, f"{param}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


@dataclass
class SamplingParams:
    """How one request is sampled; names and defaults follow the OpenAI API and vLLM."""

    max_tokens: int | None = 16
    """Tokens to generate at most; None = up to the model's context; 0 (with `echo`) = none:
    only the prompt is computed."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 or 0 = off."""
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    """vLLM's (after CTRL): logits of tokens in the prompt or the output so far are divided by it
    when positive and multiplied when negative; 1 = off."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    """None = no logprobs; k >= 0 = the chosen token's logprob plus the k most likely."""
    prompt_logprobs: int | None = None
    """Like `logprobs`, for the prompt tokens (completions `echo` with `logprobs`)."""
    echo: bool = False
    """The answer starts with the prompt (completions' `echo`): max_tokens may then be 0."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """token id -> added to its logit at every step (OpenAI; -100..100: -100 all but bans a token)."""
    allowed_token_ids: list[int] | None = None
    """Only these tokens may be generated (vLLM's extension); None = any."""
    min_tokens: int = 0
    """Tokens generated before EOS or a stop token id may come and stop strings are looked
    for (vLLM's extension)."""
    max_tokens_param: str = "max_tokens"
    """The request field `max_tokens` came from, as errors name it (chat's `max_completion_tokens`)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, param: str, msg: str) -> None:
            if not cond:
                raise InvalidParameter(param, f"{param}: {msg}")

        # 0 computes the prompt only: completions' echo returns it, with logprobs scored (as
        # lm-evaluation-harness scores a text); OpenAI's legacy API and vLLM allow it.
        floor = 0 if self.echo else 1
        need(
            self.max_tokens is None or self.max_tokens >= floor,
            self.max_tokens_param,
            f"must be >= 1 (0 only with completions' echo), got {self.max_tokens}",
        )
        need(0.0 <= self.temperature <= 2.0, "temperature", f"must be between 0 and 2, got {self.temperature}")
        need(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.top_k >= -1, "top_k", f"must be -1 (off) or >= 0, got {self.top_k}")
        need(0.0 <= self.min_p <= 1.0, "min_p", f"must be between 0 and 1, got {self.min_p}")
        need(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            f"must be between -2 and 2, got {self.presence_penalty}",
        )
        need(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"must be between -2 and 2, got {self.frequency_penalty}",
        )
        need(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be > 0 (1: off), got {self.repetition_penalty}",
        )
        need(self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, "seed", f"must fit in 64 bits, got {self.seed}")
        need(1 <= self.n <= 128, "n", f"must be between 1 and 128 (OpenAI's bound), got {self.n}")
        need(len(self.stop) <= 4 and all(self.stop), "stop", "at most 4 non-empty strings")
        need(
            all(math.isfinite(v) and abs(v) <= MAX_LOGIT_BIAS for v in self.logit_bias.values()),
            "logit_bias",
            f"values must be between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}",
        )
        need(
            self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids", "must not be empty"
        )
        need(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        need(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}",
        )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            need(v is None or 0 <= v <= MAX_LOGPROBS, name, f"must be between 0 and {MAX_LOGPROBS}, got {v}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the row on its own: one batched argmax serves it."""
        return (
            self.greedy
            and not self.presence_penalty
            and not self.frequency_penalty
            and self.repetition_penalty == 1.0
            and self.logprobs is None
            and not self.logit_bias
            and self.allowed_token_ids is None
            and not self.min_tokens
        )


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the `top` most likely (token_id, logprob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def request_bias(params: SamplingParams, vocab_size: int, banned: Collection[int] = ()) -> Tensor | None:
    """(V,) added to a request's logits before the other processors: `logit_bias`, -inf outside
    `allowed_token_ids` and at the `banned` ids (the stop ids while `min_tokens` are not out
    yet). None when it would add nothing. Raises InvalidParameter when it bans every token."""
    if not params.logit_bias and params.allowed_token_ids is None and not banned:
        return None
    bias = torch.zeros(vocab_size)
    if params.allowed_token_ids is not None:
        bias.fill_(float("-inf"))
        bias[params.allowed_token_ids] = 0.0
    for tok, value in params.logit_bias.items():
        bias[tok] += value
    if banned:
        bias[sorted(banned)] = float("-inf")
    if not torch.isfinite(bias).any():
        param = "min_tokens" if banned else "allowed_token_ids"
        raise InvalidParameter(param, f"{param}: leaves no token that may be generated")
    return bias


def apply_repetition_penalty(logits: Tensor, counts: Tensor | None, in_prompt: Tensor | None, penalty: float) -> Tensor:
    """vLLM's repetition penalty over the tokens seen: the generated ones (`counts` > 0) and the
    prompt's (`in_prompt`, (V,) bool)."""
    if penalty == 1.0:
        return logits
    seen = torch.zeros_like(logits, dtype=torch.bool) if counts is None else counts > 0
    if in_prompt is not None:
        seen = seen | in_prompt
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def apply_penalties(logits: Tensor, counts: Tensor | None, presence: float, frequency: float) -> Tensor:
    """OpenAI penalties: logits - frequency * count - presence * (count > 0), over generated tokens."""
    if counts is None or (not presence and not frequency):
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_mask(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties at the k-th kept); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p  # mass before this token already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_mask(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def make_generator(seed: int | None, choice: int = 0) -> torch.Generator:
    """The generator of choice `choice` of a request (a fresh random seed when `seed` is None).

    Choice 0 draws from `seed` itself, so the first of n choices is what n=1 returns. The
    others draw from a seed mixed from (seed, choice): `seed + choice` would hand seed 2's
    first choices to seed 1's later ones, and two requests with nearby seeds would share
    samples."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    elif choice:
        seed = int(np.random.SeedSequence([seed % 2**64, choice]).generate_state(1, np.uint64)[0])
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def sample(
    logits: Tensor,
    params: SamplingParams,
    counts: Tensor | None,
    generator: torch.Generator,
    bias: Tensor | None = None,
    in_prompt: Tensor | None = None,
) -> int:
    """One token id from fp32 logits (V,); `bias` from `request_bias`, `in_prompt` (V,) bool
    the prompt's tokens (for `repetition_penalty`)."""
    x = logits if bias is None else logits + bias
    x = apply_repetition_penalty(x, counts, in_prompt, params.repetition_penalty)
    x = apply_penalties(x, counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return int(x.argmax())
    x = x / max(params.temperature, MIN_TEMPERATURE)
    # An extreme repetition_penalty (1e-300) can still overflow a logit to inf: as the largest
    # finite value it stays the likeliest token instead of turning softmax into NaNs.
    x = x.nan_to_num(nan=float("-inf"), posinf=torch.finfo(x.dtype).max)
    x = top_k_mask(x, params.top_k)
    x = top_p_mask(x, params.top_p)
    x = min_p_mask(x, params.min_p)
    probs = x.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: Tensor, token_id: int, top: int) -> TokenLogprob:
    """The raw-distribution logprob of `token_id` and the `top` most likely tokens."""
    lp = logits.float().log_softmax(dim=-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = lp.topk(top)
        best = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(lp[token_id]), best)


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str | None]:
    """(index in `text`, the string) of the earliest stop string that ends at or after
    `start`; (-1, None) if none. At one index the first of `stops` wins.

    Only text from `start - len(stop) + 1` on is searched, so a stop string split across
    tokens is found on the token that completes it.
    """
    best, found = -1, None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best == -1 or i < best):
            best, found = i, s
    return best, found


def stream_safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent now: hold back a tail that may still grow into a stop
    string, and a trailing replacement char from a UTF-8 sequence split across tokens."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        end -= _partial_stop(text, end, s)
    return end


def _partial_stop(text: str, end: int, stop: str) -> int:
    """The longest k < len(stop) such that text[:end] ends with stop[:k]; 0 if none.

    Only the k whose stop[:k] ends in text's last character are compared (found with rfind):
    trying every k, each with two slices, cost O(len(stop) x len(text)) per streamed delta,
    and long stop strings slowed every request's step (2 ms a call at 2,000 characters)."""
    if not end:
        return 0
    last, k = text[end - 1], min(len(stop) - 1, end)
    while k > 0:
        k = stop.rfind(last, 0, k) + 1  # the next candidate: stop[k - 1] == last
        if k and text.endswith(stop[:k], 0, end):
            return k
        k -= 1
    return 0
