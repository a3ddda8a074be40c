"""The serving engine: scheduler and step loop over an `Executor`.

Continuous batching: sequences join and leave the running batch between steps. Each step
feeds every decoding sequence one token (one batched forward) plus up to `prefill_chunk`
prompt tokens of sequences still prefilling, so a long prompt never stalls running decodes.
A sequence is admitted only when the executor can hold its whole length (prompt +
max_tokens), so a running sequence never runs out of cache and nothing is preempted.

`Engine.generate` is the offline API; `AsyncEngine` runs the step loop in a background thread
for the HTTP server (submit / stream / abort).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import torch

from crosschip.errors import CrosschipError, first_line
from crosschip.serve.executor import Chunk, Executor
from crosschip.serve.sampling import (
    InvalidParameter,
    SamplingParams,
    TokenLogprob,
    check_token_ids,
    find_stop,
    make_generator,
    request_bias,
    sample,
    stream_safe_end,
    token_logprob,
)


class QueueFull(CrosschipError):
    """More requests are waiting than `max_queue`; the server answers 503 + Retry-After."""


class NotAdmitting(CrosschipError):
    """The engine is draining (SIGTERM) and takes no new requests."""


@dataclass
class Output:
    """One finished choice of a request."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended it (None: EOS or the length limit)."""


@dataclass
class Delta:
    """What one step added to one choice: new tokens, the text now safe to send, logprobs."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    ttft_s: float | None = None
    """Set on a choice's first delta: seconds from arrival to its first token."""
    error: str | None = None
    """Set on the last delta of a choice the engine could not finish because a step failed."""


def merge_deltas(deltas: list[Delta]) -> Delta:
    """One choice's consecutive deltas as one (a non-streaming response, or a stream whose reader fell behind)."""
    first = deltas[0]
    if len(deltas) == 1:
        return first
    return Delta(
        index=first.index,
        token_ids=[t for d in deltas for t in d.token_ids],
        text="".join(d.text for d in deltas),
        logprobs=None if first.logprobs is None else [lp for d in deltas for lp in (d.logprobs or [])],
        finish_reason=deltas[-1].finish_reason,
        stop_reason=deltas[-1].stop_reason,
        prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None),
        ttft_s=next((d.ttft_s for d in deltas if d.ttft_s is not None), None),
        error=deltas[-1].error,
    )


def coalesce(batches: list[list[Delta]]) -> list[Delta]:
    """Deltas handed out over several steps, merged into one per choice (in first-seen order)."""
    if len(batches) == 1:
        return batches[0]
    per_choice: dict[int, list[Delta]] = {}
    for deltas in batches:
        for d in deltas:
            per_choice.setdefault(d.index, []).append(d)
    return [merge_deltas(ds) for ds in per_choice.values()]


@dataclass
class Sequence:
    """One choice of a request as the scheduler tracks it."""

    seq_id: int
    request: Request
    index: int
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    computed: int = 0  # tokens already in the executor's cache
    counts: torch.Tensor | None = None  # (V,) generated-token counts, only with penalties
    text: str = ""  # decoded so far (incrementally, when streaming or watching stop strings)
    prefix_offset: int = 0  # incremental detokenization window, as in vLLM
    read_offset: int = 0
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """What stopped it: a stop token id, or a stop string (then `text` is already cut before
    it); None for EOS, the length limit, or still running (vLLM's `stop_reason`)."""

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival: float
    on_delta: object = None  # callable(list[Delta]) from the engine thread, or None (offline)
    stream: bool = True  # False: one delta per choice, when it finishes
    sequences: list[Sequence] = field(default_factory=list)
    first_token_time: float | None = None
    error: str | None = None
    """Why the engine failed this request (a step raised), for its last deltas."""
    bias: torch.Tensor | None = None
    """(V,) `request_bias` of its params, added to every step's logits (None: nothing to add)."""
    early_bias: torch.Tensor | None = None
    """`bias` that also bans the stop ids, for the steps before `min_tokens` are out."""
    in_prompt: torch.Tensor | None = None
    """(V,) bool: the prompt's tokens, only with a repetition penalty."""
    eos_ids: frozenset[int] = frozenset()
    """Ids that end a choice as EOS does (stop_reason None; `ignore_eos` ignores them)."""

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


def check_limits(**limits: int) -> None:
    """Each engine limit (max_batch, max_queue, prefill_chunk) must be at least 1: a 0 would
    admit nothing, or feed no prompt token and never finish a prefill."""
    for name, value in limits.items():
        if value < 1:
            raise CrosschipError(f"{name} must be at least 1, got {value}")


class Engine:
    """Scheduler + step loop over an executor (synchronous; one thread drives `step`)."""

    def __init__(
        self,
        executor: Executor,
        tokenizer,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_chunk: int = 256,
        eos_token_ids: list[int] | None = None,
        prefix_caching: bool = True,
    ):
        """prefix_caching: a prompt whose first full blocks match blocks an earlier sequence
        filled (prompt or generated tokens) reuses their latents (see `BlockTables`); off,
        every prompt is computed whole."""
        check_limits(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_id", None)
            eos_token_ids = [eos] if eos is not None else []
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._aborts: deque[str] = deque()
        self._lock = threading.Lock()
        self.admitting = True
        self.steps = 0
        self.prefix_caching = prefix_caching
        # Prompt tokens looked up in the prefix cache, and those found there instead of computed
        # (vLLM's prefix_cache_queries and prefix_cache_hits: their ratio is the hit rate).
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- requests -------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True)
        return list(prompt)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """The request's max_tokens after checking it fits the context; raises InvalidParameter."""
        if not prompt_ids:
            raise InvalidParameter("prompt", "prompt: must contain at least one token")
        vocab = self.executor.vocab_size
        check_token_ids(prompt_ids, vocab, "prompt")
        check_token_ids(list(params.logit_bias), vocab, "logit_bias")
        check_token_ids(params.allowed_token_ids or [], vocab, "allowed_token_ids")
        check_token_ids(params.stop_token_ids, vocab, "stop_token_ids")
        # A sequence must fit the model's context and, since its room is reserved whole at
        # admission, the whole latent cache too: one that cannot would wait for blocks forever.
        context, cache = self.executor.max_seq_len, self.executor.cache_tokens
        limit = f"the model's context of {context} tokens" if context <= cache else f"the latent cache ({cache} tokens)"
        room = min(context, cache) - len(prompt_ids)
        if room < 1:
            raise InvalidParameter("prompt", f"prompt: {len(prompt_ids)} tokens leave no room in {limit}")
        if params.max_tokens is None:
            # max_tokens is then the room, and min_tokens must fit it as it must fit max_tokens.
            if params.min_tokens > room:
                raise InvalidParameter(
                    "min_tokens",
                    f"min_tokens: must not exceed the {room} tokens the prompt leaves in {limit}, got {params.min_tokens}",
                )
            return room
        if params.max_tokens > room:
            name = params.max_tokens_param
            raise InvalidParameter(
                name, f"{name}: the prompt ({len(prompt_ids)} tokens) plus {name} ({params.max_tokens}) exceeds {limit}"
            )
        return params.max_tokens

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_delta=None,
        stream: bool = True,
        *,
        end_ids: Iterable[int] = (),
    ) -> Request:
        """Queue a request (thread-safe); raises InvalidParameter, QueueFull or NotAdmitting.

        `end_ids`: ids that end this request as EOS does, besides the engine's own (a chat's
        end-of-turn token)."""
        prompt_ids = self.encode(prompt)
        max_tokens = self.check_request(prompt_ids, params)
        request = Request(
            request_id or uuid.uuid4().hex, prompt_ids, params, max_tokens, time.monotonic(), on_delta, stream
        )
        request.eos_ids = frozenset({*self.eos_token_ids, *end_ids})
        vocab = self.executor.vocab_size
        request.bias = request_bias(params, vocab)
        if params.min_tokens:
            stops = {*params.stop_token_ids, *(() if params.ignore_eos else request.eos_ids)}
            request.early_bias = request_bias(params, vocab, stops)
        if params.repetition_penalty != 1.0:
            request.in_prompt = torch.zeros(vocab, dtype=torch.bool)
            request.in_prompt[prompt_ids] = True
        for i in range(params.n):
            request.sequences.append(Sequence(next(self._seq_ids), request, i, make_generator(params.seed, i)))
        with self._lock:
            if not self.admitting:
                raise NotAdmitting("the server is shutting down")
            if len(self.waiting) + params.n > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.requests[request.request_id] = request
            self.waiting.extend(request.sequences)
        return request

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step and free its cache (thread-safe)."""
        with self._lock:
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborts)

    def queue_depth(self) -> int:
        return len(self.waiting)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> None:
        """Apply aborts, admit, run one batched forward, sample, and finish sequences."""
        self._apply_aborts()
        self._admit()
        if not self.running:
            return
        chunks, fed = self._schedule()
        need_all = any(s.request.params.prompt_logprobs is not None and n > 1 for s, n in fed)
        logits = self.executor.step(chunks, all_logits=need_all)
        self.steps += 1
        now = time.monotonic()
        if need_all:
            for (seq, _), rows in zip(fed, logits):
                if seq.request.params.prompt_logprobs is not None and seq.prefilling:
                    self._record_prompt_logprobs(seq, rows)
            logits = torch.stack([rows[-1] for rows in logits])
        greedy_rows, greedy_seqs = [], []
        for i, (seq, n) in enumerate(fed):
            seq.computed += n
            if seq.prefilling:
                continue  # more prompt chunks to come
            if seq.request.max_tokens == 0:  # only the prompt's logprobs were asked for
                seq.finish_reason = "length"
                continue
            if seq.request.params.plain_greedy:
                greedy_rows.append(i)
                greedy_seqs.append(seq)
            else:
                self._append(seq, self._sample_one(seq, logits[i]))
        if greedy_rows:
            # One argmax for the whole batch, in numpy (the logits are a CPU tensor): right
            # after a forward has flushed the caches, torch's dispatch of row views, a stack and
            # an argmax took ~4x numpy's time (280 against 70 us at batch 8, ~10% of a step).
            for seq, tok in zip(greedy_seqs, logits.numpy()[greedy_rows].argmax(-1).tolist()):
                self._append(seq, tok)
        self._emit([seq for seq, _ in fed if len(seq.output_ids) > seq.sent_tokens or seq.finish_reason], now)
        self._retire()

    def _emit(self, seqs: list[Sequence], now: float) -> None:
        """Hand each streaming request the deltas of its choices that moved this step."""
        by_request: dict[str, tuple[Request, list[Delta]]] = {}
        for seq in seqs:
            req = seq.request
            if req.first_token_time is None:
                req.first_token_time = now
            if req.on_delta is None or (not req.stream and seq.finish_reason is None):
                continue
            by_request.setdefault(req.request_id, (req, []))[1].append(self._delta(seq))
        for req, deltas in by_request.values():
            req.on_delta(deltas)

    def _apply_aborts(self) -> None:
        """Drop aborted requests, free their blocks, and end their streams with "abort"."""
        with self._lock:
            ids = set(self._aborts)
            self._aborts.clear()
            if not ids:
                return
            self.waiting = deque(s for s in self.waiting if s.request.request_id not in ids)
        self.running = [s for s in self.running if s.request.request_id not in ids]
        for rid in ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            open_seqs = [s for s in req.sequences if s.finish_reason is None]
            for seq in req.sequences:
                self.executor.release(seq.seq_id)
                seq.finish_reason = seq.finish_reason or "abort"
            if req.on_delta is not None and open_seqs:
                # What each choice generated and has not sent yet (all of it, for a
                # non-streaming request): a drain's timeout ends requests, not their output.
                deltas = [self._delta(s) for s in open_seqs]
                for d in deltas:
                    d.error = req.error
                req.on_delta(deltas)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            total = len(seq.prompt_ids) + seq.request.max_tokens
            # Prompt logprobs need the logits of every prompt token: such a prompt is computed whole.
            share = self.prefix_caching and seq.request.params.prompt_logprobs is None
            if not self.executor.can_allocate(seq.seq_id, total, seq.prompt_ids if share else ()):
                # check_request refused sequences larger than the cache; this guards the queue
                # against ever waiting on blocks that nothing running will free.
                if not self.running:
                    self.abort(seq.request.request_id)
                break  # first come, first served: wait for blocks to free up
            seq.computed = self.executor.computed_tokens(seq.seq_id)
            self.prefix_query_tokens += len(seq.prompt_ids) if share else 0
            self.prefix_hit_tokens += seq.computed
            with self._lock:
                self.waiting.popleft()
            self.running.append(seq)

    def _schedule(self) -> tuple[list[Chunk], list[tuple[Sequence, int]]]:
        """Every decoding sequence gets one token; prefills share `prefill_chunk` tokens."""
        chunks: list[Chunk] = []
        fed: list[tuple[Sequence, int]] = []
        budget = self.prefill_chunk
        for seq in self.running:
            if not seq.prefilling:
                chunks.append(Chunk(seq.seq_id, [seq.output_ids[-1]], seq.total_len - 1))
                fed.append((seq, 1))
            elif budget > 0:
                n = min(budget, len(seq.prompt_ids) - seq.computed)
                chunks.append(Chunk(seq.seq_id, seq.prompt_ids[seq.computed : seq.computed + n], seq.computed))
                fed.append((seq, n))
                budget -= n
        return chunks, fed

    def _record_prompt_logprobs(self, seq: Sequence, rows: torch.Tensor) -> None:
        """rows (T, V): logits after each fed prompt token, predicting the next prompt token."""
        k = seq.request.params.prompt_logprobs or 0
        if seq.computed == 0:
            seq.prompt_logprobs.append(None)  # the first token has no context
        start = seq.computed
        for t in range(rows.shape[0]):
            nxt = start + t + 1
            if nxt < len(seq.prompt_ids):
                seq.prompt_logprobs.append(token_logprob(rows[t], seq.prompt_ids[nxt], k))

    def _sample_one(self, seq: Sequence, logits: torch.Tensor) -> int:
        request = seq.request
        params = request.params
        penalised = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
        if penalised and seq.counts is None:
            seq.counts = torch.zeros(logits.shape[-1])
        bias = request.early_bias if len(seq.output_ids) < params.min_tokens else request.bias
        tok = sample(logits, params, seq.counts, seq.generator, bias, request.in_prompt)
        if params.logprobs is not None:
            seq.logprobs.append(token_logprob(logits, tok, params.logprobs))
        if seq.counts is not None:
            seq.counts[tok] += 1
        return tok

    def _append(self, seq: Sequence, tok: int) -> None:
        params = seq.request.params
        seq.output_ids.append(tok)
        # Before min_tokens are out nothing stops a choice (its stop ids were masked out too).
        may_stop = len(seq.output_ids) >= params.min_tokens
        if may_stop and tok in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif may_stop and tok in seq.request.eos_ids and not params.ignore_eos:
            seq.finish_reason = "stop"  # stop_reason stays None at EOS, as in vLLM
        elif params.stop or (seq.request.stream and seq.request.on_delta is not None):
            before = len(seq.text)
            self._detokenize(seq)
            cut, stop = find_stop(seq.text, params.stop, before) if params.stop and may_stop else (-1, None)
            if cut != -1:
                seq.text = seq.text[:cut]
                seq.finish_reason, seq.stop_reason = "stop", stop
        if seq.finish_reason is None and len(seq.output_ids) >= seq.request.max_tokens:
            seq.finish_reason = "length"

    def _detokenize(self, seq: Sequence) -> None:
        """Append the new token's text to `seq.text`, decoding only a short window of ids.

        Text is committed once it no longer ends in a partial UTF-8 character (U+FFFD).
        """
        ids = seq.output_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset])
        full = self.tokenizer.decode(ids[seq.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)

    def _final_text(self, seq: Sequence) -> str:
        """Decoded output without the stop token or stop string that ended it."""
        if isinstance(seq.stop_reason, str):
            return seq.text
        ids = seq.output_ids
        if seq.finish_reason == "stop" and ids:
            ids = ids[:-1]  # the stop token id or EOS is not part of the text
        return self.tokenizer.decode(ids)

    def _delta(self, seq: Sequence) -> Delta:
        """The new part of a choice since the last delta; text held back near stop strings."""
        req = seq.request
        if seq.finish_reason is not None:
            text = self._final_text(seq)
            end = len(text)
        else:
            text = seq.text
            end = stream_safe_end(text, req.params.stop)
        new_text = text[seq.sent_chars : end] if end > seq.sent_chars else ""
        delta = Delta(
            index=seq.index,
            token_ids=seq.output_ids[seq.sent_tokens :],
            text=new_text,
            logprobs=seq.logprobs[seq.sent_logprobs :] if req.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            prompt_logprobs=seq.prompt_logprobs
            if seq.sent_tokens == 0 and req.params.prompt_logprobs is not None
            else None,
            ttft_s=req.first_token_time - req.arrival if seq.sent_tokens == 0 and req.first_token_time else None,
        )
        seq.sent_chars = max(seq.sent_chars, end)
        seq.sent_tokens = len(seq.output_ids)
        seq.sent_logprobs = len(seq.logprobs)
        return delta

    def _retire(self) -> None:
        done = [s for s in self.running if s.finish_reason is not None]
        for seq in done:
            self.executor.release(seq.seq_id)
            self.running.remove(seq)
        for seq in done:
            if seq.request.finished:
                self.requests.pop(seq.request.request_id, None)

    # -- offline ----------------------------------------------------------------------------
    def output(self, seq: Sequence) -> Output:
        params = seq.request.params
        return Output(
            request_id=seq.request.request_id,
            index=seq.index,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=self._final_text(seq),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=seq.logprobs if params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs if params.prompt_logprobs is not None else None,
        )

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None) -> list[Output]:
        """Run `prompts` to completion; one Output per prompt and choice, in prompt order."""
        params = params or SamplingParams()
        requests = [self.add_request(p, params) for p in prompts]
        while any(not r.finished for r in requests):
            self.step()
        return [self.output(s) for r in requests for s in r.sequences]


# --------------------------------------------------------------------------------------------
# Async front for the server
# --------------------------------------------------------------------------------------------


class AsyncEngine:
    """Runs `Engine.step` in a background thread; asyncio callers submit, stream and abort.

    The deltas of a step reach the event loop in one hand-off after the step, not one per
    request: every `call_soon_threadsafe` writes to the loop's wake-up pipe, a system call
    that lets go of the GIL, and the woken loop then holds it while the engine thread waits
    to go on. Measured on the HTTP server (arith-tiny, ort:cpu, 1 thread, 32 streaming
    requests), the step's Python work outside the forward took 2.4 ms (median) with one
    hand-off per request, 1.2 ms with one per step, 0.75 ms without streaming
    (benchmarks/RESULTS.md, 2026-11-30). A stream whose reader fell behind gets what piled up
    as one delta per choice (as vLLM merges outputs when its consumer lags): fewer, longer
    chunks, never a backlog.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="crosschip-engine", daemon=True)
        self.error: BaseException | None = None
        # (loop, request id, queue, deltas) emitted during the current step; only the engine thread touches it.
        self._outbox: list[tuple[asyncio.AbstractEventLoop, str, asyncio.Queue, list[Delta]]] = []

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # keep serving; the failing requests end with the error
                self.error = e
                reason = first_line(e)
                print(f"crosschip serve: error: an engine step failed ({reason})", file=sys.stderr, flush=True)
                for rid, req in list(self.engine.requests.items()):
                    req.error = reason
                    self._fail(rid)
            finally:
                self._hand_off()

    def _hand_off(self) -> None:
        """Deliver the step's deltas: one wake-up per event loop."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, list[Delta]]]] = {}
        for loop, rid, queue, deltas in outbox:
            per_loop.setdefault(loop, []).append((rid, queue, deltas))
        for loop, items in per_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed: nobody reads these streams any more
                for rid, _, _ in items:
                    self.engine.abort(rid)

    def _fail(self, rid: str) -> None:
        self.engine.abort(rid)  # the abort ends the request's stream with finish_reason "abort"

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        stream: bool = True,
        end_ids: Iterable[int] = (),
    ) -> tuple[Request, AsyncIterator[list[Delta]]]:
        """Queue a request; returns it and an async iterator of its deltas (ends when all choices finish)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Delta]] = asyncio.Queue()

        request_id = request_id or uuid.uuid4().hex

        def on_delta(deltas: list[Delta]) -> None:  # on the engine thread, during a step
            self._outbox.append((loop, request_id, queue, deltas))

        request = self.engine.add_request(prompt, params, request_id, on_delta, stream, end_ids=end_ids)
        self._wake.set()
        return request, self._stream(request, queue)

    async def _stream(self, request: Request, queue: asyncio.Queue) -> AsyncIterator[list[Delta]]:
        open_choices = {s.index for s in request.sequences}
        while open_choices:
            batches = [await queue.get()]
            while not queue.empty():
                batches.append(queue.get_nowait())
            deltas = coalesce(batches)
            for d in deltas:
                if d.finish_reason is not None:
                    open_choices.discard(d.index)
            yield deltas

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()


def _deliver(items: list[tuple[str, asyncio.Queue, list[Delta]]]) -> None:
    for _, queue, deltas in items:
        queue.put_nowait(deltas)
