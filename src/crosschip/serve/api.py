"""The OpenAI-compatible HTTP layer (FastAPI) over an `AsyncEngine`.

Every failure is an OpenAI nested error body, never a 500 with a traceback: bad parameters
name themselves (400), a full queue or a draining server is 503 with Retry-After, and a
client that goes away (streaming or not) aborts its request, so its cache blocks are freed
at the next engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import crosschip
from crosschip.serve.engine import AsyncEngine, Delta, NotAdmitting, QueueFull, merge_deltas
from crosschip.serve.metrics import ServeMetrics
from crosschip.serve.protocol import (
    Echo,
    Envelope,
    LogprobFormatter,
    chat_prompt_ids,
    completion_prompts,
    detokenize_ids,
    sampling_params,
    tokenize_response,
    usage,
)
from crosschip.serve.sampling import InvalidParameter, SamplingParams

RETRY_AFTER_S = "1"


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # json.dumps' ASCII escapes: a message may quote what the client sent, and a lone
        # surrogate (valid JSON, not Unicode) has no UTF-8 form for JSONResponse to write.
        return Response(json.dumps(self.body()), self.status, self.headers, media_type="application/json")


# nginx's "client closed request": what /metrics counts for a request whose client hung up
# before its (non-streaming) answer was ready. Nothing is sent; nobody is there to read it.
CLIENT_CLOSED = 499


class ClientGone(Exception):
    """The client disconnected before its answer: while it sent the body, or while its
    non-streaming request ran (which is then aborted)."""


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="service_unavailable", code="overloaded", headers={"Retry-After": RETRY_AFTER_S})


@dataclass
class ServerState:
    """What the server is doing: loading (no engine yet), ready, or draining."""

    model_name: str
    engine: AsyncEngine | None = None
    tokenizer: object = None
    max_model_len: int = 0
    draining: bool = False
    api_key: str | None = None
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    """Unix time the server started: the model card's `created`, as vLLM reports it."""

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def set_engine(self, engine: AsyncEngine, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = engine.engine.executor.max_seq_len
        self.metrics.bind(engine.engine)
        self.engine = engine


# --------------------------------------------------------------------------------------------
# Request plumbing
# --------------------------------------------------------------------------------------------


async def read_json(request: Request) -> dict:
    try:
        raw = await request.body()
    except ClientDisconnect:  # hung up before the whole body came
        raise ClientGone from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_body") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", code="invalid_json"
        ) from None
    except RecursionError:  # the decoder recurses once per nesting level
        raise ApiError(400, "request body is nested too deeply to parse as JSON", code="invalid_json") from None
    except ValueError:  # an integer literal over Python's 4300-digit limit for int()
        raise ApiError(400, "request body holds a number too long to read", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merged(streams: list[AsyncIterator[list[Delta]]], offsets: list[int]) -> AsyncIterator[Delta]:
    """Deltas of several requests as they come; choice index shifted by the request's offset."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator[list[Delta]], offset: int) -> None:
        try:
            async for deltas in stream:
                for d in deltas:
                    d.index += offset
                    await queue.put(d)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s, o)) for s, o in zip(streams, offsets)]
    try:
        left = len(tasks)
        while left:
            d = await queue.get()
            if d is None:
                left -= 1
            else:
                yield d
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class Submitted:
    """The engine requests behind one HTTP request (one per prompt)."""

    request_ids: list[str]
    prompt_ids: list[list[int]]
    deltas: AsyncIterator[Delta]
    n: int


def submit_all(
    state: ServerState, prompts: list[list[int]], params: SamplingParams, stream: bool, end_ids: tuple[int, ...] = ()
) -> Submitted:
    engine = state.engine
    limit = engine.engine.max_queue
    if len(prompts) * params.n > limit:  # never admitted, however long the client waits: not a 503
        param = "n" if len(prompts) == 1 else "prompt"
        raise ApiError(
            400,
            f"{param}: {len(prompts)} prompt(s) x n={params.n} are more sequences than the server queues "
            f"({limit}, --max-queue)",
            param=param,
        )
    ids, prompt_ids, streams = [], [], []
    try:
        for p in prompts:
            req, deltas = engine.submit(p, params, stream=stream, end_ids=end_ids)
            ids.append(req.request_id)
            prompt_ids.append(req.prompt_ids)
            streams.append(deltas)
    except (QueueFull, NotAdmitting) as e:
        for rid in ids:
            engine.abort(rid)
        raise unavailable(str(e)) from None
    except InvalidParameter as e:
        for rid in ids:
            engine.abort(rid)
        raise ApiError(400, str(e), param=e.param) from None
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompt_ids))
    offsets = [i * params.n for i in range(len(prompts))]
    deltas = flat(streams[0]) if len(streams) == 1 else merged(streams, offsets)
    return Submitted(ids, prompt_ids, timed(deltas, state.metrics), params.n)


async def flat(stream: AsyncIterator[list[Delta]]) -> AsyncIterator[Delta]:
    async for deltas in stream:
        for d in deltas:
            yield d


async def timed(deltas: AsyncIterator[Delta], metrics: ServeMetrics) -> AsyncIterator[Delta]:
    """Record TTFT, inter-token and request latency and generated tokens as deltas pass.

    TTFT comes from the engine (arrival to first token), so non-streaming requests, which
    get one delta per choice at the end, report it too; inter-token gaps are streaming-only.
    A choice the engine failed (a step raised) ends the response here as a 500, not as an
    aborted choice with a 200: the client must not take the part it got for the answer.
    """
    start = last = time.monotonic()
    async for d in deltas:
        if d.error is not None:
            raise ApiError(500, f"the engine failed this request: {d.error}", type="internal_error")
        now = time.monotonic()
        if d.ttft_s is not None:
            metrics.ttft.observe(d.ttft_s)
        elif d.token_ids:
            metrics.itl.observe(now - last)
        if d.token_ids:
            metrics.generation_tokens.inc(len(d.token_ids))
            last = now
        yield d
    metrics.e2e.observe(time.monotonic() - start)


async def collect(request: Request, sub: Submitted, state: ServerState) -> list[Delta]:
    """All deltas of a non-streaming request, aborting it if the client disconnects first."""
    per_choice: dict[int, list[Delta]] = {}

    async def gather() -> None:
        async for d in sub.deltas:
            per_choice.setdefault(d.index, []).append(d)

    work = asyncio.create_task(gather())
    gone = asyncio.create_task(wait_for_disconnect(request))
    done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:
        work.cancel()
        for rid in sub.request_ids:
            state.engine.abort(rid)
        raise ClientGone
    gone.cancel()
    work.result()
    return [merge_deltas(per_choice[i]) for i in sorted(per_choice)]


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def guarded_stream(body: AsyncIterator[bytes], sub: Submitted, state: ServerState) -> AsyncIterator[bytes]:
    """Abort the engine requests if the stream ends early (client disconnect cancels it)."""
    finished = False
    try:
        try:
            async for chunk in body:
                yield chunk
        except ApiError as e:  # the status went out with the first chunk: an error event, as vLLM sends
            yield sse(e.body())
            yield sse("[DONE]")
        finished = True
    finally:
        if not finished:
            for rid in sub.request_ids:
                state.engine.abort(rid)


# --------------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app; `state.engine` may be set later (the server answers 503 until then)."""
    app = FastAPI(title="crosschip", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    def endpoint(request: Request) -> str:
        """The metrics label of a request: its route's template (`/v1/models/{model:path}`), never
        the path the client sent: every new path was a Prometheus series kept for good."""
        route = request.scope.get("route")
        return getattr(route, "path", "other")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        state.metrics.requests.labels(endpoint(request), str(e.status)).inc()
        return e.response()

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone):
        # A handled end, not an error: a CancelledError here reached uvicorn, which printed
        # "Exception in ASGI application" and a traceback for every client that hung up.
        state.metrics.requests.labels(endpoint(request), str(CLIENT_CLOSED)).inc()
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), type=kind, headers=e.headers).response()  # 405: Allow

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error").response()

    def check(request: Request, *, admitting: bool = True) -> None:
        """The API key, then a loaded model; `admitting`: also a server not shutting down (the
        model listing still answers while it drains)."""
        # The scheme's case is free (RFC 9110: "bearer" is "Bearer"); the key is compared in
        # constant time, so the time a wrong key takes says nothing about the right one.
        scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        if state.api_key and not (
            scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), state.api_key.encode())
        ):
            raise ApiError(
                401,
                "invalid or missing API key (send Authorization: Bearer KEY)",
                type="authentication_error",
                code="invalid_api_key",
            )
        if state.engine is None:
            raise unavailable("the model is still loading")
        if admitting and state.draining:
            raise unavailable("the server is shutting down")

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidParameter("model", "model: expected a string")
        if model is not None and model != state.model_name:
            raise ApiError(
                404,
                f"model: {model!r} is not served here; this server serves {state.model_name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok"}
        return JSONResponse(
            {"status": "draining" if state.draining else "loading"},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_S},
        )

    # vLLM's probes: /ping (SageMaker's health check) answers as /health, /version the release.
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/version")
    async def version():
        return {"version": crosschip.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "crosschip",
            "max_model_len": state.max_model_len,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        # While loading, 503 like every endpoint: the card's max_model_len is not known yet.
        check(request, admitting=False)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        """`client.models.retrieve(id)`; ids may contain `/` (as HF-style names do)."""
        check(request, admitting=False)
        check_model({"model": model})
        return model_card()

    async def read_request(request: Request, parse: Callable[[dict], Any]) -> tuple[dict, Any]:
        """The checked JSON body of a POST and what `parse` makes of it; a bad parameter is a 400
        naming it."""
        check(request)
        body = await read_json(request)
        try:
            check_model(body)
            # In a worker thread: tokenizing a long prompt takes seconds (0.8 s for 900 KB), in
            # which the event loop would serve nobody else (the tokenizer releases the GIL).
            return body, await asyncio.to_thread(parse, body)
        except InvalidParameter as e:
            raise ApiError(400, str(e), param=e.param) from None

    # vLLM's token-counting endpoints: what a prompt costs against the context, and back.
    @app.post("/tokenize")
    async def tokenize(request: Request):
        _, answer = await read_request(
            request, lambda body: tokenize_response(body, state.tokenizer, state.max_model_len)
        )
        return answer

    @app.post("/detokenize")
    async def detokenize(request: Request):
        _, ids = await read_request(request, lambda body: detokenize_ids(body, len(state.tokenizer)))
        return {"prompt": state.tokenizer.decode(ids, skip_special=False)}  # special tokens shown, as vLLM does

    @app.post("/v1/completions")
    async def completions(request: Request):
        def parse(body: dict):
            return (
                sampling_params(body, chat=False),
                completion_prompts(body, state.tokenizer, state.max_model_len),
                _get_stream(body),
                LogprobFormatter.for_request(body, state.tokenizer),
            )

        body, (params, prompts, stream, lp) = await read_request(request, parse)
        sub = submit_all(state, prompts, params, stream is not None)
        env = Envelope.new("cmpl", "text_completion", state.model_name)
        echo = Echo.of(body)
        if stream is not None:
            out = guarded_stream(_completion_chunks(sub, env, stream, echo, state, lp), sub, state)
            state.metrics.requests.labels("/v1/completions", "200").inc()
            return StreamingResponse(out, media_type="text/event-stream")
        choices = await collect(request, sub, state)
        state.metrics.requests.labels("/v1/completions", "200").inc()
        return env.body(
            choices=[_completion_choice(d, sub, echo, state, lp) for d in choices], usage=_usage(sub, choices)
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        def parse(body: dict):
            return (
                sampling_params(body, chat=True),
                chat_prompt_ids(body, state.tokenizer, state.max_model_len),
                _get_stream(body),
                LogprobFormatter.for_request(body, state.tokenizer),
            )

        _, (params, prompt_ids, stream, lp) = await read_request(request, parse)
        # `<|end|>` closes the assistant's turn: it ends a choice as EOS does (stop_reason null).
        end_id = getattr(state.tokenizer, "end_id", None)
        sub = submit_all(state, [prompt_ids], params, stream is not None, () if end_id is None else (end_id,))
        env = Envelope.new("chatcmpl", "chat.completion", state.model_name)
        if stream is not None:
            env.object = "chat.completion.chunk"
            out = guarded_stream(_chat_chunks(sub, env, stream, lp), sub, state)
            state.metrics.requests.labels("/v1/chat/completions", "200").inc()
            return StreamingResponse(out, media_type="text/event-stream")
        choices = await collect(request, sub, state)
        state.metrics.requests.labels("/v1/chat/completions", "200").inc()
        return env.body(
            choices=[
                {
                    "index": d.index,
                    "message": {"role": "assistant", "content": d.text},
                    "logprobs": lp.chat(d.logprobs) if d.logprobs is not None else None,
                    "finish_reason": d.finish_reason,
                    "stop_reason": d.stop_reason,
                }
                for d in choices
            ],
            usage=_usage(sub, choices),
        )

    return app


def _get_stream(body: dict) -> dict | None:
    """None when not streaming, else the stream options ({} when absent)."""
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidParameter("stream", "stream: expected boolean")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise InvalidParameter("stream_options", "stream_options: expected an object")
    if opts and not stream:
        raise InvalidParameter("stream_options", "stream_options: only allowed when stream is true")
    flags = {}
    for name in ("include_usage", "continuous_usage_stats"):  # the second is vLLM's
        value = (opts or {}).get(name)
        if value is not None and not isinstance(value, bool):
            raise InvalidParameter("stream_options", f"stream_options.{name}: expected boolean")
        flags[name] = bool(value)
    # As in vLLM, usage on every chunk is a form of include_usage, not a request of its own.
    flags["continuous_usage_stats"] &= flags["include_usage"]
    return flags if stream else None


def _chunk_usage(opts: dict, prompt_tokens: int, generated: int) -> dict:
    """A chunk's `usage`: absent without include_usage; null before the usage chunk, as OpenAI
    sends it; with vLLM's continuous_usage_stats, the counts of the chunk's own choice so far
    (its prompt's tokens and its own completion tokens, as vLLM counts them)."""
    if opts["continuous_usage_stats"]:
        return {"usage": usage(prompt_tokens, generated)}
    return {"usage": None} if opts["include_usage"] else {}


def _usage(sub: Submitted, choices: list[Delta]) -> dict:
    return usage(sum(len(p) for p in sub.prompt_ids), sum(len(d.token_ids) for d in choices))


def _completion_choice(
    d: Delta,
    sub: Submitted,
    echo: Echo | None,
    state: ServerState,
    lp: LogprobFormatter,
    before: list[int] = (),
    first: bool = True,
) -> dict:
    """One choice of a completions body, or its `first` chunk or a later one. `before` holds the
    ids of the text this choice has streamed already (logprob `text_offset`s count from the
    start of the whole text, the echoed prompt included)."""
    prompt_ids = sub.prompt_ids[d.index // sub.n]
    text, logprobs = d.text, None
    prompt_text = echo.text(state.tokenizer, prompt_ids) if echo is not None and first else ""
    if d.logprobs is not None:
        entries, ids = list(d.logprobs), [e.token_id for e in d.logprobs]
        if echo is not None and first and d.prompt_logprobs is not None:
            entries, ids = [*d.prompt_logprobs, *entries], [*prompt_ids, *ids]
        logprobs = lp.completion(entries, ids, before, echo, len(prompt_ids))
    return {
        "index": d.index,
        "text": prompt_text + text,
        "logprobs": logprobs,
        "finish_reason": d.finish_reason,
        "stop_reason": d.stop_reason,
    }


async def _completion_chunks(
    sub: Submitted, env: Envelope, opts: dict, echo: Echo | None, state: ServerState, lp: LogprobFormatter
) -> AsyncIterator[bytes]:
    sent: dict[int, list[int]] = {}  # choice -> the ids of its chunks so far (echoed prompt included)
    generated: dict[int, int] = {}  # choice -> its completion tokens so far
    async for d in sub.deltas:
        generated[d.index] = generated.get(d.index, 0) + len(d.token_ids)
        if not d.text and d.finish_reason is None and d.logprobs is None and d.index in sent:
            continue  # text held back (a partial UTF-8 char or a possible stop string)
        prompt_ids = sub.prompt_ids[d.index // sub.n]
        first = d.index not in sent
        before = sent.setdefault(d.index, [])
        choice = _completion_choice(d, sub, echo, state, lp, before, first)
        if echo is not None and first:
            before += prompt_ids
        before += d.token_ids
        yield sse(env.body(choices=[choice], **_chunk_usage(opts, len(prompt_ids), generated[d.index])))
    if opts["include_usage"]:
        yield sse(env.body(choices=[], usage=usage(sum(len(p) for p in sub.prompt_ids), sum(generated.values()))))
    yield sse("[DONE]")


async def _chat_chunks(sub: Submitted, env: Envelope, opts: dict, lp: LogprobFormatter) -> AsyncIterator[bytes]:
    prompt_tokens = len(sub.prompt_ids[0])  # chat has one prompt
    for i in range(sub.n):  # the role comes first, in a delta of its own, as OpenAI sends it
        yield sse(
            env.body(
                choices=[
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
                **_chunk_usage(opts, prompt_tokens, 0),
            )
        )
    generated: dict[int, int] = {}  # choice -> its completion tokens so far
    async for d in sub.deltas:
        generated[d.index] = generated.get(d.index, 0) + len(d.token_ids)
        if not d.text and d.finish_reason is None and not d.logprobs:
            continue  # text held back (a partial UTF-8 char or a possible stop string)
        delta = {"content": d.text} if d.text or d.finish_reason is None else {}
        choice = {
            "index": d.index,
            "delta": delta,
            "logprobs": lp.chat(d.logprobs) if d.logprobs else None,
            "finish_reason": d.finish_reason,
            "stop_reason": d.stop_reason,
        }
        yield sse(env.body(choices=[choice], **_chunk_usage(opts, prompt_tokens, generated[d.index])))
    if opts["include_usage"]:
        yield sse(env.body(choices=[], usage=usage(prompt_tokens, sum(generated.values()))))
    yield sse("[DONE]")
