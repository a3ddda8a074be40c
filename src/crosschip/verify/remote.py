"""A remote target: any OpenAI-compatible server that returns logprobs (vLLM, vllm-ascend,
MindIE, `crosschip serve`), driven by the official `openai` client.

- Scoring uses vLLM's prompt-logprob semantics: `/v1/completions` with the prompt as token
  ids, `echo=True`, `logprobs=K`, `max_tokens=1`. Entry t of the returned lists is token t's
  log-probability given the tokens before it (entry 0 is null), with the top-K alternatives;
  the one generated token's entry gives the distribution after the last prompt token. So
  entry t+1 lines up with our logits row t.
- The greedy continuation is `temperature=0` with the same token-id prompts.
- Token ids come back as `token_id:N` strings when the server honours vLLM's
  `return_tokens_as_token_ids` (vLLM and `crosschip serve` do). Otherwise token strings are mapped back through the bundle's
  tokenizer. A byte-level BPE has strings that several ids share (lone UTF-8 continuation
  bytes all decode to U+FFFD), so each string maps to its *canonical* id (the smallest id with
  that string): shared strings are left out of the KL support (a JSON object keeps one value
  per key, so their log-probs are not trustworthy), and top-1 and greedy tokens compare by
  canonical id on both sides. The side's info says how many entries that touched.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from crosschip.errors import CrosschipError
from crosschip.verify.sides import STOP, finish

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
EXTRA = {"return_tokens_as_token_ids": True}


def _client(url: str, api_key: str | None, timeout: float = 120.0) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)


def _explain(url: str, e: Exception) -> CrosschipError:
    import openai

    if isinstance(e, openai.AuthenticationError):
        return CrosschipError(f"{url} refused the API key (401); pass the right one with --api-key")
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return CrosschipError(f"cannot reach {url}: {' '.join(str(cause).split()) or type(cause).__name__}")
    if isinstance(e, openai.APIStatusError):
        return CrosschipError(f"{url} answered {e.status_code}: {' '.join(str(e.message).split())[:300]}")
    return CrosschipError(f"{url}: {type(e).__name__}: {e}")


def not_openai(url: str, what: str, e: Exception) -> CrosschipError:
    return CrosschipError(f"{url} answered {what} with something that is not an OpenAI reply ({type(e).__name__}: {e})")


def check_reachable(url: str, api_key: str | None, model: str | None = None) -> str:
    """The model to ask: `model`, which the server must list, else the one model it lists (of
    several, verify took the first, whatever it was); a clear one-line error when it cannot
    be used."""
    import openai

    if not re.match(r"^https?://", url):
        raise CrosschipError(f"--target-url must start with http:// or https://, got {url!r}")
    try:
        models = _client(url, api_key, timeout=10.0).models.list().data
        ids = [m.id for m in models]
    except openai.OpenAIError as e:
        raise _explain(url, e) from None
    except Exception as e:  # noqa: BLE001 - a body that is not a model list (HTML, other JSON)
        raise not_openai(url, "/models", e) from None
    if not models:
        raise CrosschipError(f"{url} lists no models")
    if model is not None and model not in ids:  # said now, not after the reference side's run
        raise CrosschipError(f"--model-name {model!r} is not served at {url}; it serves {', '.join(map(repr, ids))}")
    if model is None and len(ids) > 1:
        raise CrosschipError(
            f"{url} serves {len(ids)} models ({', '.join(map(repr, ids))}); name one with --model-name"
        )
    return model or ids[0]


def string_table(tokenizer: Any) -> tuple[dict[str, int], set[str]]:
    """Token string -> canonical (smallest) id, and the strings several ids share."""
    by_string: dict[str, int] = {}
    shared: set[str] = set()
    for i, s in enumerate(tokenizer.token_strings(list(range(tokenizer.vocab_size)))):
        if s in by_string:
            shared.add(s)
        else:
            by_string[s] = i
    return by_string, shared


def canonical_ids(tokenizer: Any) -> tuple[Tensor, Tensor]:
    """(V,) each id -> the canonical id of its token string, and (V,) bool: the string is shared."""
    by_string, shared = string_table(tokenizer)
    strings = tokenizer.token_strings(list(range(tokenizer.vocab_size)))
    return torch.tensor([by_string[s] for s in strings]), torch.tensor([s in shared for s in strings])


class RemoteSide:
    def __init__(
        self, url: str, tokenizer: Any, *, api_key: str | None, model: str | None, top_k: int, workers: int = 8
    ):
        self.url = url
        self.tokenizer = tokenizer
        self.client = _client(url, api_key)
        self.model = model or check_reachable(url, api_key)  # a given name: checked by `check_inputs`
        self.top_k = top_k
        self.workers = workers
        self.extra = dict(EXTRA)
        self._by_string: dict[str, int] | None = None
        self._shared: set[str] = set()
        self.mapped_from_strings = 0
        self.ambiguous = 0

    def _call(self, **kw: Any) -> Any:
        import openai

        extra = self.extra  # what this request sends (other threads may clear it meanwhile)
        try:
            return self.client.completions.create(model=self.model, extra_body=extra, **kw)
        except openai.BadRequestError as e:
            # A strict server may refuse vLLM's extra field: ask again without it.
            if extra and "return_tokens_as_token_ids" in str(e.message):
                self.extra = {}
                return self._call(**kw)
            raise _explain(self.url, e) from None
        except openai.OpenAIError as e:
            raise _explain(self.url, e) from None

    # -- token ids ----------------------------------------------------------------------------
    def _is_shared(self, token: str) -> bool:
        """Whether several ids of the tokenizer display as `token` (never for `token_id:N`)."""
        if _TOKEN_ID.match(token):
            return False
        if self._by_string is None:
            self._by_string, self._shared = string_table(self.tokenizer)
        return token in self._shared

    def _id(self, token: str) -> tuple[int, bool]:
        """(id, exact): the canonical id of a token string; exact is False for shared strings."""
        if m := _TOKEN_ID.match(token):
            if int(m[1]) >= self.tokenizer.vocab_size:
                raise CrosschipError(
                    f"{self.url} returned {token}, outside the bundle's vocabulary of {self.tokenizer.vocab_size}"
                )
            return int(m[1]), True
        exact = not self._is_shared(token)
        self.mapped_from_strings += 1
        if token not in self._by_string:
            raise CrosschipError(f"{self.url} returned token {token!r}, which the bundle's tokenizer does not have")
        self.ambiguous += not exact
        return self._by_string[token], exact

    # -- scoring ------------------------------------------------------------------------------
    def score_remote(self, ids: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top-K ids (R, K), their log-probs (R, K), exact-id mask (R, K), next-token log-probs (T-1,)."""
        resp = self._call(prompt=ids, echo=True, logprobs=self.top_k, max_tokens=1, temperature=0.0)
        try:
            return self._scored(ids, resp.choices[0].logprobs)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:  # not an OpenAI completion
            raise not_openai(self.url, "a completion", e) from None

    def _scored(self, ids: list[int], lp: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if lp is None or not lp.top_logprobs:
            raise CrosschipError(f"{self.url} returned no logprobs for an echo=True, logprobs={self.top_k} request")
        T = len(ids)
        tops = lp.top_logprobs[1 : T + 1]
        if len(tops) < T - 1 or lp.token_logprobs is None or len(lp.token_logprobs) < T:
            raise CrosschipError(
                f"{self.url} returned logprobs for {len(tops)} of {T} prompt positions; it must support echo=True with logprobs"
            )
        if missing := [t + 1 for t, row in enumerate(tops[: T - 1]) if not row]:
            # Dropped, every later row lined up with the wrong position (a FAIL blamed on the model).
            raise CrosschipError(f"{self.url} returned no top_logprobs at prompt position {missing[0]}")
        tops = [row for row in tops if row]
        chosen = lp.tokens[1 : T + 1] if lp.tokens else [None] * len(tops)
        token_lp = [float(v) for v in lp.token_logprobs[1:T]]
        self._check_values(tops, chosen, token_lp)
        tops = [self._top_k_of(row, token) for row, token in zip(tops, chosen)]
        k = min(self.top_k, *(len(row) for row, _ in tops))
        by_id = all(_TOKEN_ID.match(tok) for row, _ in tops for tok in row)
        if by_id and k < min(self.top_k, self.tokenizer.vocab_size):
            # A smaller support hides differences: the KL over it is a weaker bound.
            raise CrosschipError(f"{self.url} returned {k} alternatives at a position where {self.top_k} were asked")
        top_ids, top_lp, exact = [], [], []
        for row, doubtful in tops:
            best = sorted(row.items(), key=lambda kv: -kv[1])[:k]
            mapped = [self._id(tok) for tok, _ in best]
            top_ids.append([i for i, _ in mapped])
            exact.append([e and tok != doubtful for (_, e), (tok, _) in zip(mapped, best)])
            top_lp.append([v for _, v in best])
        token_lp = torch.tensor(token_lp, dtype=torch.float64)
        return (
            torch.tensor(top_ids, dtype=torch.long),
            torch.tensor(top_lp, dtype=torch.float64),
            torch.tensor(exact, dtype=torch.bool),
            token_lp,
        )

    def _check_values(self, tops: list[dict[str, float]], chosen: list[str | None], token_lp: list[float]) -> None:
        """Log-probs a distribution can have, and the chosen tokens' as their rows give them. A
        NaN scored KL 0; the chosen tokens' alone make the target's perplexity."""
        logprob = lambda v: math.isfinite(v) and v <= 1e-6
        if not all(map(logprob, token_lp)):
            raise CrosschipError(f"{self.url} returned token_logprobs that are not log-probabilities")
        for t, (row, token) in enumerate(zip(tops, chosen), start=1):
            values = [float(v) for v in row.values()]
            if not all(map(logprob, values)) or sum(map(math.exp, values)) > 1 + 1e-4:
                raise CrosschipError(
                    f"{self.url} returned top_logprobs at prompt position {t} that are not log-probabilities "
                    f"of one distribution: {dict(list(row.items())[:3])}"
                )
            # A string several ids share holds one of their log-probs: it says nothing here.
            if t > len(token_lp) or token not in row or self._is_shared(token):
                continue
            if abs(float(row[token]) - token_lp[t - 1]) > 1e-4 * max(1.0, -token_lp[t - 1]):
                raise CrosschipError(
                    f"{self.url} gives token {token} log-prob {token_lp[t - 1]} at prompt position {t}, and "
                    f"{row[token]} in that position's top_logprobs"
                )

    def _top_k_of(self, row: dict[str, float], chosen: str | None) -> tuple[dict[str, float], str | None]:
        """A position's top-k entries, and the entry that may not belong among them.

        OpenAI's rule (vLLM's too): the chosen token is always in `top_logprobs`, so a position
        holds k + 1 entries when it is not one of the k most likely; that extra entry goes. A
        server naming tokens by string merges the entries of ids that share a string, so a row
        of k or fewer with such a string cannot tell whether its lowest entry, the chosen
        token, is extra: it is returned as doubtful (flagged inexact, not guessed)."""
        if chosen is None or chosen not in row:
            return row, None
        if len(row) > self.top_k:
            return {t: v for t, v in row.items() if t != chosen}, None
        merged = any(self._is_shared(t) for t in row)
        lowest = row[chosen] <= min(row.values())
        return row, chosen if merged and lowest else None

    def _map(self, fn: Any, items: list) -> list:
        """fn over items on the worker threads; the first error cancels what is still queued
        (a server that hung on every request took ceil(N / workers) timeouts to fail)."""
        pool = ThreadPoolExecutor(self.workers)
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def score_all(self, prompts: Any) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, (ids, lp, exact, tok) in enumerate(self._map(self.score_remote, [p.ids for p in prompts.scored])):
            out[f"topk_ids.{i}"], out[f"topk_lp.{i}"], out[f"topk_exact.{i}"], out[f"token_lp.{i}"] = (
                ids,
                lp,
                exact,
                tok,
            )
        return out

    # -- greedy -------------------------------------------------------------------------------
    def _greedy_one(self, ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
        resp = self._call(prompt=ids, max_tokens=max_new_tokens, temperature=0.0, logprobs=1)
        try:
            choice = resp.choices[0]
            tokens, text, reason = choice.logprobs and choice.logprobs.tokens, choice.text, choice.finish_reason
        except (AttributeError, IndexError, TypeError) as e:
            raise not_openai(self.url, "a completion", e) from None
        if tokens is not None:
            generated = [self._id(t)[0] for t in tokens]
            if all(_TOKEN_ID.match(t) for t in tokens) and self.tokenizer.decode(generated) != text:
                # Ids alone cannot show it: a server with another tokenizer passed the gate.
                raise CrosschipError(
                    f"{self.url}'s tokenizer is not the bundle's: it writes ids {generated[:8]} as {text[:40]!r}, the "
                    f"bundle's tokenizer as {self.tokenizer.decode(generated)[:40]!r}"
                )
        else:
            generated = self.tokenizer.encode(text)
        generated = finish(generated, eos_ids)
        if reason == "stop" and (not generated or generated[-1] != STOP):
            generated.append(STOP)
        return generated

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
        return self._map(lambda p: self._greedy_one(p, max_new_tokens, eos_ids), prompts)
