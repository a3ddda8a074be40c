"""The OpenAI-compatible server, end to end: a real `crosschip serve` process on loopback,
driven by the official `openai` client (sync and async, streaming and not) and raw httpx."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

import crosschip
from crosschip.config import model_preset
from crosschip.hf import load_bundle, save_bundle
from crosschip.pipeline import _free_port
from crosschip.serve.command import client_url
from crosschip.serve.engine import Engine
from crosschip.serve.executor import TorchExecutor
from crosschip.serve.sampling import SamplingParams
from crosschip.tokenizer import Tokenizer
from serve_helpers import ServerProcess, tokenizer_with

pytestmark = pytest.mark.slow

PROMPTS = [
    "12+34=",
    "The quick brown fox",
    "Once upon a time there was",
    "7-3=",
    "hello",
    "a b c d e f g",
    "99+1=",
    "x",
]


@pytest.fixture(scope="module")
def server(debug_bundle):
    srv = ServerProcess(debug_bundle, "--max-batch", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(debug_bundle):
    torch.set_num_threads(1)
    model, tok = load_bundle(debug_bundle)
    return Engine(TorchExecutor(model, max_batch=8), tok, max_batch=8), tok


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def greedy_chat_logprobs(client, max_tokens: int, top_logprobs: int, **kw):
    return client.chat.completions.create(
        model="debug",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=top_logprobs,
        **kw,
    )


def test_health_models_and_metrics(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.post(server.url + "/ping").json() == httpx.get(server.url + "/health").json()
    assert httpx.get(server.url + "/version").json() == {"version": crosschip.__version__}
    models = client.models.list()
    assert [m.id for m in models.data] == ["debug"]
    assert abs(models.data[0].created - time.time()) < 3600  # the server's start, as vLLM reports it
    assert client.models.retrieve("debug").id == "debug"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.body["code"] == "model_not_found"
    text = httpx.get(server.url + "/metrics").text
    for name in ("crosschip_queue_depth", "crosschip_cache_blocks_used", "crosschip_cache_blocks_total"):
        assert re.search(rf"^{name} ", text, re.M), name
    # MLA caches c_kv and k_pe only: (kv_lora_rank + qk_rope_head_dim) x 4 bytes in fp32.
    cfg = model_preset("debug")
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert server.metric("crosschip_cache_bytes_per_token_per_layer") == per_token
    assert any(f"{per_token} bytes per token per layer" in line for line in server.lines)


def test_metrics_count_what_a_request_did(server, client):
    """The counters and histograms move by what one streamed request did (the module's server
    is shared, so by differences)."""
    names = (
        "crosschip_prompt_tokens_total",
        "crosschip_generation_tokens_total",
        "crosschip_time_to_first_token_seconds_count",
        "crosschip_inter_token_latency_seconds_count",
        "crosschip_request_latency_seconds_count",
    )
    ok = 'crosschip_requests_total{endpoint="/v1/completions",status="200"}'
    before = {n: server.metric(n) for n in names}
    ok_before = server.metric(ok, default=0.0)
    stream = client.completions.create(
        model="debug", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert [c.choices[0].finish_reason for c in stream][-1] == "length"
    moved = {n: server.metric(n) - before[n] for n in names}
    prompt_tokens = len(httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[0]}).json()["tokens"])
    assert moved["crosschip_prompt_tokens_total"] == prompt_tokens
    assert moved["crosschip_generation_tokens_total"] == 6
    assert moved["crosschip_time_to_first_token_seconds_count"] == 1
    assert moved["crosschip_request_latency_seconds_count"] == 1
    # One gap per token-carrying delta after the first; a busy event loop gets several tokens
    # in one delta, so there may be fewer than 5.
    assert 0 <= moved["crosschip_inter_token_latency_seconds_count"] <= 5
    assert server.metric(ok, default=0.0) == ok_before + 1
    # Counted by the route, not by the path the client sent: each made-up model id was a new
    # series that /metrics kept for good (300 ids: 8.2 KB of metrics grew to 73 KB).
    missing = 'crosschip_requests_total{endpoint="/v1/models/{model:path}",status="404"}'
    missing_before, size_before = server.metric(missing, default=0.0), len(httpx.get(server.url + "/metrics").text)
    for i in range(20):
        assert httpx.get(f"{server.url}/v1/models/no-such-model-{i}").status_code == 404
    assert server.metric(missing) == missing_before + 20
    assert "no-such-model" not in httpx.get(server.url + "/metrics").text
    assert len(httpx.get(server.url + "/metrics").text) < size_before + 500


def test_greedy_completion_equals_offline_engine(client, offline):
    engine, _ = offline
    expected = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=20, temperature=0))
    for prompt, exp in zip(PROMPTS[:3], expected):
        r = client.completions.create(model="debug", prompt=prompt, max_tokens=20, temperature=0)
        assert r.choices[0].text == exp.text
        assert r.choices[0].finish_reason == exp.finish_reason


def test_streaming_completion_concatenates_to_the_same_text(client):
    r = client.completions.create(model="debug", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(model="debug", prompt=PROMPTS[1], max_tokens=20, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("echo", [False, True])
def test_logprob_text_offsets_index_the_text_streamed_or_not(client, offline, echo):
    """Each token's text_offset is where its text starts in the choice's text: `<|bos|>` adds
    nothing, and a streamed chunk's offsets go on from the chunks before it."""
    _, tok = offline
    kw = dict(model="debug", prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=1, echo=echo)
    whole = client.completions.create(**kw).choices[0]
    ids = [
        int(t.removeprefix("token_id:"))
        for t in client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True})
        .choices[0]
        .logprobs.tokens
    ]
    assert whole.logprobs.text_offset == [len(tok.decode(ids[:t])) for t in range(len(ids))]
    if echo:
        assert ids[0] == tok.bos_id and whole.logprobs.text_offset[:2] == [0, 0]
        assert whole.text[whole.logprobs.text_offset[-12] :] == tok.decode(ids[-12:])
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_stop_reason_names_what_stopped_a_choice(server, client):
    """vLLM's extension: the stop string or stop token id that ended a choice, None at the
    length limit; in a stream, on the last chunk."""
    kw = dict(model="debug", prompt=PROMPTS[2], max_tokens=16, temperature=0)
    as_ids = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    free = client.completions.create(**kw, logprobs=0, extra_body=as_ids).choices[0]
    ids = [int(t.removeprefix("token_id:")) for t in free.logprobs.tokens]
    assert free.finish_reason == "length" and free.model_extra["stop_reason"] is None
    stop = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text[4:6]
    by_text = client.completions.create(**kw, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert by_text.finish_reason == "stop" and by_text.model_extra["stop_reason"] == stop
    by_id = client.completions.create(**kw, extra_body={"ignore_eos": True, "stop_token_ids": [ids[3]]}).choices[0]
    assert by_id.finish_reason == "stop" and by_id.model_extra["stop_reason"] == ids[3]
    stream = client.completions.create(**kw, stop=[stop], stream=True, extra_body={"ignore_eos": True})
    last = [c for c in stream if c.choices][-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == stop


def test_concurrent_requests_return_what_each_returns_alone(server):
    """Batch invariance at temperature 0, and the requests really were batched: one at a time
    they would need a forward step per generated token."""

    async def run() -> tuple[list, list, float]:
        async with openai.AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0) as aclient:

            async def one(p: str):
                r = await aclient.completions.create(model="debug", prompt=p, max_tokens=24, temperature=0)
                return r.choices[0].text, r.usage.completion_tokens

            alone = [await one(p) for p in PROMPTS]
            steps = server.metric("crosschip_engine_steps")
            together = await asyncio.gather(*(one(p) for p in PROMPTS))
        return alone, list(together), server.metric("crosschip_engine_steps") - steps

    alone, together, steps = asyncio.run(run())
    assert together == alone
    generated = sum(n for _, n in together)
    assert steps < generated / 2, f"{steps} forward steps for {generated} tokens of {len(PROMPTS)} requests"


def test_async_chat_streaming(server, offline):
    _, tok = offline

    async def run():
        messages = [{"role": "user", "content": "What is 2+2?"}]
        async with openai.AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0) as aclient:
            full = await aclient.chat.completions.create(model="debug", messages=messages, max_tokens=12, temperature=0)
            stream = await aclient.chat.completions.create(
                model="debug",
                messages=messages,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
        return full, chunks

    full, chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_raw_sse_format(server):
    body = {
        "model": "debug",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(server.api + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_raw_sse_format_of_a_completion_with_usage(server):
    body = {
        "model": "debug",
        "prompt": "hi",
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(server.api + "/completions", json=body, timeout=30)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # As OpenAI sends them: `usage` null on every chunk, then one chunk with no choices and the counts.
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)
    plain = httpx.post(server.api + "/completions", json={**body, "stream_options": None}, timeout=30)
    assert all("usage" not in json.loads(e) for e in sse_events(plain.text)[:-1])
    # vLLM's continuous_usage_stats: the counts so far on every chunk (chat's role chunk: none generated).
    continuous = {"include_usage": True, "continuous_usage_stats": True}
    for path, extra in (("/completions", {}), ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        request = {**body, "stream_options": continuous, **extra}
        if extra:
            del request["prompt"]
        events = sse_events(httpx.post(server.api + path, json=request, timeout=30).text)
        counts = [json.loads(e)["usage"]["completion_tokens"] for e in events[:-1]]
        assert counts == sorted(counts) and counts[-2:] == [4, 4] and (counts[0] == 0) == bool(extra), (path, counts)
        assert len({json.loads(e)["usage"]["prompt_tokens"] for e in events[:-1]}) == 1


def test_usage_counts_match_the_tokenizer(client, offline):
    _, tok = offline
    r = client.completions.create(model="debug", prompt=PROMPTS[2], max_tokens=7, temperature=0)
    assert r.usage.prompt_tokens == len(tok.encode(PROMPTS[2], add_bos=True))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
    c = client.chat.completions.create(model="debug", messages=messages, max_tokens=5, temperature=0)
    assert c.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(messages), add_bos=False))
    # OpenAI's `developer` role is taken as the system message: the same prompt.
    messages[0]["role"] = "developer"
    d = client.chat.completions.create(model="debug", messages=messages, max_tokens=5, temperature=0)
    assert d.usage.prompt_tokens == c.usage.prompt_tokens
    assert d.choices[0].message.content == c.choices[0].message.content


def test_tokenize_counts_what_the_endpoints_send_to_the_model(server, client, offline):
    """vLLM's /tokenize and /detokenize: a client counts a prompt against the context with the
    ids the completions and chat endpoints actually use."""
    _, tok = offline
    r = httpx.post(server.url + "/tokenize", json={"model": "debug", "prompt": PROMPTS[2]}).json()
    assert r["tokens"] == tok.encode(PROMPTS[2], add_bos=True) and r["count"] == len(r["tokens"])
    assert "token_strs" not in r
    strs = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[2], "return_token_strs": True}).json()
    assert strs["token_strs"] == tok.token_strings(r["tokens"])
    assert r["max_model_len"] == client.models.retrieve("debug").model_extra["max_model_len"]
    used = client.completions.create(model="debug", prompt=PROMPTS[2], max_tokens=1).usage.prompt_tokens
    assert r["count"] == used
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    used = client.chat.completions.create(model="debug", messages=messages, max_tokens=1).usage.prompt_tokens
    assert chat["count"] == used
    back = httpx.post(server.url + "/detokenize", json={"model": "debug", "tokens": r["tokens"]}).json()
    assert back == {"prompt": "<|bos|>" + PROMPTS[2]}
    for path, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ("/detokenize", {"tokens": [len(tok)]}, "tokens"),
        ("/detokenize", {"tokens": "12"}, "tokens"),
    ]:
        bad = httpx.post(server.url + path, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (path, body, bad.text)


def test_chat_uses_the_bundles_own_chat_template(debug_bundle, tmp_path):
    """A bundle written with a tokenizer whose tokenizer_config.json carries another
    `chat_template` is served with that template."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages here') }}"
        "{% endif %}{{ bos_token + m['content'] + eos_token }}{% endfor %}"
    )
    folder = tokenizer_with(debug_bundle, tmp_path / "tokenizer", chat_template=template)
    tok = Tokenizer.load(folder)
    model, _ = load_bundle(debug_bundle)
    bundle = save_bundle(model, tmp_path / "debug", tokenizer=tok)
    srv = ServerProcess(bundle)
    try:
        messages = [{"role": "user", "content": "12+34="}]
        r = httpx.post(srv.url + "/tokenize", json={"messages": messages}).json()
        assert r["tokens"] == tok.encode("<|bos|>12+34=<|eos|>")
        client = openai.OpenAI(base_url=srv.api, api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="debug", messages=messages, max_tokens=3, temperature=0)
        assert chat.usage.prompt_tokens == len(r["tokens"])
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="debug", messages=[{"role": "system", "content": "x"}, *messages])
        assert refused.value.body["param"] == "messages" and "no system messages here" in refused.value.body["message"]
    finally:
        srv.stop()


def test_logprobs_and_echo(client, offline):
    _, tok = offline
    r = client.completions.create(model="debug", prompt=PROMPTS[0], max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    n_prompt = len(tok.encode(PROMPTS[0], add_bos=True))
    assert len(lp.token_logprobs) == n_prompt + 3 and lp.token_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert r.choices[0].text.startswith(PROMPTS[0])
    c = greedy_chat_logprobs(client, 3, 3)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    # Greedy: the chosen token is the most likely one.
    assert all(t.logprob == max(x.logprob for x in t.top_logprobs) for t in content)


def test_chat_logprob_bytes_are_each_tokens_own(client, offline):
    """A token that is part of a multi-byte character shows as U+FFFD, but its `bytes` are
    its own, so a client can join them; every entry's bytes are those of a token that
    displays as its `token`."""
    _, tok = offline
    ids = range(tok.vocab_size)
    own = {}
    for s, b in zip(tok.token_strings(ids), tok.token_bytes(ids)):
        own.setdefault(s, set()).add(b)
    c = greedy_chat_logprobs(client, 4, 20)
    entries = [e for t in c.choices[0].logprobs.content for e in (t, *t.top_logprobs)]
    assert all(bytes(e.bytes) in own[e.token] for e in entries)
    partial = [e for e in entries if "\ufffd" in e.token]
    assert partial and all(bytes(e.bytes) != "\ufffd".encode() for e in partial)


def test_return_tokens_as_token_ids_names_every_token_by_id(server, client, offline):
    """vLLM's extension: ids where strings collide (a completions top_logprobs object keeps one
    entry per string). Offsets still index the text."""
    engine, tok = offline
    prompt = tok.encode(PROMPTS[0], add_bos=True)
    expected = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    kw = dict(model="debug", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=5)
    by_id = client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    by_text = client.completions.create(**kw).choices[0].logprobs
    assert by_id.tokens == [f"token_id:{i}" for i in [*prompt, *expected]]
    assert by_id.text_offset == by_text.text_offset and by_id.token_logprobs == by_text.token_logprobs
    # The 5 most likely, and the chosen token where it is not one of them (OpenAI: up to logprobs + 1).
    for token, row in zip(by_id.tokens[1:], by_id.top_logprobs[1:]):
        assert token in row and all(k.startswith("token_id:") for k in row)
        assert len(row) == (5 if row[token] >= sorted(row.values())[-5] else 6), row
    assert any(len(row) == 6 for row in by_id.top_logprobs[1:]), "no prompt token outside its top 5"
    c = greedy_chat_logprobs(client, 3, 2, extra_body={"return_tokens_as_token_ids": True})
    for e in (e for t in c.choices[0].logprobs.content for e in (t, *t.top_logprobs)):
        n = int(e.token.removeprefix("token_id:"))
        assert bytes(e.bytes) == tok.token_bytes([n])[0]
    r = httpx.post(server.api + "/completions", json={**kw, "return_tokens_as_token_ids": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_tokens_as_token_ids"


def test_chat_token_limits_and_top_logprobs_range(server):
    # Greedy: sampled, the untrained model can draw `<|end|>`, which ends a chat turn whatever
    # ignore_eos says, and the reply stops short of either limit (seen once in a suite run).
    chat = {"model": "debug", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "temperature": 0}
    # max_completion_tokens is the current name: it wins over the deprecated max_tokens.
    r = httpx.post(server.api + "/chat/completions", json={**chat, "max_tokens": 2, "max_completion_tokens": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.json()
    assert r.json()["usage"]["completion_tokens"] == 5
    # Its errors name it (they named max_tokens, which the client had not sent).
    for value, says in [(0, "must be >= 1"), (100000, "plus max_completion_tokens (100000) exceeds")]:
        r = httpx.post(server.api + "/chat/completions", json={**chat, "max_completion_tokens": value})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "max_completion_tokens" and says in error["message"], error
    r = httpx.post(server.api + "/chat/completions", json={**chat, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(server.api + "/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    # Without a limit a chat gets the room the prompt leaves, and min_tokens must fit in it (it
    # was a 200 that stopped short of min_tokens at the end of the context).
    r = httpx.post(server.api + "/chat/completions", json={**chat, "min_tokens": 100000})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "min_tokens" and "the prompt leaves in" in error["message"]


def test_n_choices_with_seed_are_reproducible(client):
    kw = dict(model="debug", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=42)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    # A nearby seed shares no choice (seed + index would hand seed 43's first to seed 42's second).
    c = client.completions.create(**{**kw, "seed": 43})
    assert not {x.text for x in a.choices} & {x.text for x in c.choices}


def test_a_repeated_prompt_is_served_from_the_prefix_cache(server, client):
    prompt = " ".join(PROMPTS) * 2
    hits, queries = (server.metric(f"crosschip_prefix_cache_{m}_tokens") for m in ("hit", "query"))
    a, b = (client.completions.create(model="debug", prompt=prompt, max_tokens=6, temperature=0) for _ in range(2))
    assert b.choices[0].text == a.choices[0].text
    assert server.metric("crosschip_prefix_cache_hit_tokens") - hits >= a.usage.prompt_tokens - 16
    assert server.metric("crosschip_prefix_cache_query_tokens") - queries == 2 * a.usage.prompt_tokens


def test_logit_bias_allowed_token_ids_and_min_tokens(client, offline):
    """OpenAI's logit_bias and vLLM's allowed_token_ids and min_tokens, with the official client."""
    _, tok = offline
    x, y = tok.encode("7", add_bos=False)[0], tok.encode("+", add_bos=False)[0]
    kw = dict(model="debug", prompt=PROMPTS[1], max_tokens=6)
    # +100 makes one token all but certain, even sampled at temperature 1.
    c = client.completions.create(**kw, temperature=1.0, seed=1, logit_bias={str(x): 100}, logprobs=0)
    assert c.choices[0].logprobs.tokens == ["7"] * 6
    # Logprobs stay the model's own (vLLM's raw logprobs): the bias does not make them ~0.
    assert max(c.choices[0].logprobs.token_logprobs) < -1.0
    # -100 takes the greedy choice away.
    ids = {"return_tokens_as_token_ids": True}
    plain = client.completions.create(**kw, temperature=0, logprobs=0, extra_body=ids).choices[0].logprobs.tokens
    first = int(plain[0].removeprefix("token_id:"))
    banned = client.completions.create(**kw, temperature=0, logprobs=0, extra_body=ids, logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.tokens[0] != plain[0]
    # Only the allowed tokens come out; EOS (pushed to the top) waits for min_tokens.
    eos = tok.eos_id
    body = {"allowed_token_ids": [x, y, eos], "min_tokens": 3}
    c = client.completions.create(**kw, temperature=1.0, logit_bias={str(eos): 50}, extra_body=body)
    assert c.choices[0].finish_reason == "stop" and c.usage.completion_tokens == 4
    assert set(c.choices[0].text) <= {"7", "+"} and len(c.choices[0].text) == 3
    # A stop string is looked for from the min_tokens-th token on (as in vLLM).
    c = client.completions.create(
        **kw, temperature=0, stop=["7"], extra_body={"allowed_token_ids": [x], "min_tokens": 3}
    )
    assert (c.choices[0].text, c.choices[0].finish_reason, c.usage.completion_tokens) == ("77", "stop", 3)
    # Without min_tokens the same bias stops the choice at once.
    c = client.completions.create(
        **kw, temperature=1.0, logit_bias={str(eos): 50}, extra_body={"allowed_token_ids": [x, eos]}
    )
    assert c.choices[0].finish_reason == "stop" and c.usage.completion_tokens == 1


def test_repetition_penalty_covers_the_prompt_and_the_output(server, client):
    ids = {"return_tokens_as_token_ids": True}
    kw = dict(model="debug", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=0)

    def tokens(**extra):
        c = client.completions.create(**kw, extra_body={**ids, **extra})
        return [int(t.removeprefix("token_id:")) for t in c.choices[0].logprobs.tokens]

    prompt = httpx.post(server.url + "/tokenize", json={"model": "debug", "prompt": kw["prompt"]}).json()["tokens"]
    plain = tokens()
    # Unpenalised, this prompt's greedy output repeats itself and one of the prompt's tokens.
    assert len(set(plain)) < len(plain) and set(plain) & set(prompt)
    # A huge penalty puts every seen token below any unseen one with a positive logit.
    penalised = tokens(repetition_penalty=1e6)
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(prompt)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "logit_bias": {"seven": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"7": 101}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"7": "up"}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids"),
        ({"prompt": "hi", "allowed_token_ids": [100000]}, "allowed_token_ids"),
        ({"prompt": "hi", "allowed_token_ids": [1], "min_tokens": 2}, "min_tokens"),
        ({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "hi", "top_p": 2}, "top_p"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "n": 129}, "n"),
        ({"prompt": "hi", "seed": 2**64}, "seed"),
        ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "stop": [1, 2]}, "stop"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
        ({"prompt": "hi", "min_tokens": 1, "stop_token_ids": [999999]}, "stop_token_ids"),
        ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": "hi", "model": 7}, "model"),
        ({"prompt": "hi", "logit_bias": {" 7": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"1_0": 1}}, "logit_bias"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "tool_choice": "bogus"}, "tool_choice"),
        ({"prompt": [1] * 300, "max_tokens": 1}, "prompt"),
        ({"prompt": "hi", "user": 5}, "user"),
    ],
)
def test_invalid_parameters_get_400_naming_the_param(server, body, param):
    r = httpx.post(server.api + "/completions", json={"model": "debug", **body})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and param in err["message"]


def test_completions_max_tokens_null_runs_to_the_context(server):
    """Absent, max_tokens is OpenAI's 16; an explicit null is the rest of the model's context,
    as vLLM reads it (it was 16 too, and a prompt 3 tokens short of the context got a 400)."""
    context = model_preset("debug").max_position_embeddings
    body = {"model": "debug", "prompt": [20] * (context - 3), "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.api + "/completions", json={**body, "max_tokens": None})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"
    r = httpx.post(server.api + "/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # 16 do not fit
    r = httpx.post(server.api + "/completions", json={**body, "prompt": "hi"})
    assert r.json()["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(
    "path,extra,param",
    [
        ("/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/completions", {"suffix": "!"}, "suffix"),
        ("/completions", {"guided_choice": ["yes", "no"]}, "guided_choice"),
        ("/chat/completions", {"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs"),
        ("/completions", {"bad_words": ["x"]}, "bad_words"),
        ("/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        # vLLM's extra fields that change what comes back: refused, not ignored.
        ("/completions", {"include_stop_str_in_output": True, "stop": ["1"]}, "include_stop_str_in_output"),
        ("/completions", {"skip_special_tokens": False}, "skip_special_tokens"),
        ("/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
        ("/completions", {"truncate_prompt_tokens": 2}, "truncate_prompt_tokens"),
        ("/chat/completions", {"continue_final_message": True}, "continue_final_message"),
        ("/chat/completions", {"chat_template": "{{ messages }}"}, "chat_template"),
        ("/chat/completions", {"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
        ("/chat/completions", {"echo": True}, "echo"),
        # These were taken and ignored.
        ("/completions", {"logits_processors": ["my.module:Processor"]}, "logits_processors"),
        ("/completions", {"return_token_ids": True}, "return_token_ids"),
        ("/chat/completions", {"priority": 1}, "priority"),
        ("/completions", {"prompt_embeds": "AAAA"}, "prompt_embeds"),
        # A tool_choice asks for tools: without them it is refused (OpenAI, vLLM), not ignored.
        ("/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        (
            "/chat/completions",
            {"tools": [], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
        ),
    ],
)
def test_features_we_do_not_implement_are_refused_by_name(server, path, extra, param):
    """Accepting them and returning unconstrained text would hand a client free text where it
    asked for JSON or a tool call."""
    prompt = {"messages": [{"role": "user", "content": "1+1="}]} if path.startswith("/chat") else {"prompt": "1+1="}
    r = httpx.post(server.api + path, json={"model": "debug", "max_tokens": 2, **prompt, **extra})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert "not supported" in err["message"] or "only" in err["message"]


def test_the_supported_forms_of_those_features_still_work(server):
    chat = {"model": "debug", "max_tokens": 2, "messages": [{"role": "user", "content": "1+1="}]}
    tools = [{"type": "function", "function": {"name": "f"}}]
    for extra in (
        {"response_format": {"type": "text"}},
        {"tools": tools, "tool_choice": "none"},
        {"tool_choice": "none"},
        {"logit_bias": {}},
        {"modalities": ["text"]},
        {"skip_special_tokens": True, "include_stop_str_in_output": False, "chat_template_kwargs": {}},
    ):
        assert httpx.post(server.api + "/chat/completions", json={**chat, **extra}).status_code == 200
    # An integer field takes an integral float, as pydantic (vLLM) does.
    body = {"model": "debug", "prompt": "hi", "max_tokens": 3.0, "n": 2.0, "ignore_eos": True}
    r = httpx.post(server.api + "/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] == 6
    # OpenAI bounds n at 128 (this server once stopped at 16).
    r = httpx.post(server.api + "/completions", json={**body, "max_tokens": 1, "n": 40})
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == list(range(40))


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client):
    """lm-evaluation-harness's log-likelihood request: the prompt's logprobs, nothing generated."""
    kw = dict(model="debug", prompt="12+34=46", echo=True, logprobs=2, temperature=0)
    scored = client.completions.create(**kw, max_tokens=0)
    one = client.completions.create(**kw, max_tokens=1)
    (c,) = scored.choices
    assert scored.usage.completion_tokens == 0 and c.finish_reason == "length"
    n = scored.usage.prompt_tokens
    assert len(c.logprobs.tokens) == n and c.logprobs.token_logprobs[0] is None
    assert c.logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[:n]
    assert c.text == one.choices[0].text[: len(c.text)] and c.text.endswith("12+34=46")
    streamed = list(client.completions.create(**kw, max_tokens=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == c.text
    assert streamed[-1].choices[0].finish_reason == "length"
    # Without logprobs: the prompt back, nothing generated (OpenAI's legacy API and vLLM allow it).
    del kw["logprobs"]
    bare = client.completions.create(**kw, max_tokens=0)
    assert (bare.choices[0].text, bare.choices[0].logprobs, bare.usage.completion_tokens) == (c.text, None, 0)


def test_completions_top_logprobs_always_hold_the_chosen_token(client):
    """OpenAI: "the logprob of the sampled token" is always returned, so up to logprobs + 1."""
    out = client.completions.create(model="debug", prompt="hi", max_tokens=6, logprobs=0, seed=1, temperature=1.5)
    lp = out.choices[0].logprobs
    assert [list(row) for row in lp.top_logprobs] == [[t] for t in lp.tokens]
    assert [row[t] for t, row in zip(lp.tokens, lp.top_logprobs)] == lp.token_logprobs


def test_the_endpoints_encode_prompts_as_tokenize_counts_them(server, client):
    """vLLM's `add_special_tokens` (completions) and `add_generation_prompt` (chat) change the
    prompt the model gets, and /tokenize counts the same ids."""
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": None}]
    for path, body in [
        ("/completions", {"prompt": "12+34="}),
        ("/completions", {"prompt": "12+34=", "add_special_tokens": False}),
        ("/chat/completions", {"messages": messages[:1]}),
        ("/chat/completions", {"messages": messages[:1], "add_generation_prompt": False}),
        ("/chat/completions", {"messages": messages}),  # an assistant turn with null content (tool calls only)
        ("/chat/completions", {"messages": messages[:1], "add_special_tokens": True}),  # was ignored
    ]:
        r = httpx.post(server.api + path, json={"model": "debug", "max_tokens": 1, **body})
        assert r.status_code == 200, r.text
        count = httpx.post(server.url + "/tokenize", json={"model": "debug", **body}).json()["count"]
        assert r.json()["usage"]["prompt_tokens"] == count, (path, body)
    plain = httpx.post(server.url + "/tokenize", json={"prompt": "12+34="}).json()["count"]
    bare = httpx.post(server.url + "/tokenize", json={"prompt": "12+34=", "add_special_tokens": False}).json()
    assert bare["count"] == plain - 1
    # Chat's template holds <|bos|>; vLLM puts one more in front with add_special_tokens.
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages[:1]}).json()["tokens"]
    doubled = httpx.post(server.url + "/tokenize", json={"messages": messages[:1], "add_special_tokens": True})
    assert doubled.json()["tokens"] == [chat[0], *chat]
    # What the chat endpoint refuses, /tokenize refuses too: it counted ids no request would send.
    for refused in ({"continue_final_message": True}, {"chat_template": "{{ messages }}"}):
        r = httpx.post(server.url + "/tokenize", json={"messages": messages[:1], **refused})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(refused)), r.text


def test_echo_returns_the_prompt_as_sent(server, client, offline):
    """vLLM and OpenAI echo the prompt itself; the server echoed it decoded, which drops the
    special tokens a text names ("<|user|>hi" came back as "hi"). The logprobs' text_offsets
    index the text that comes back, streamed or not."""
    _, tok = offline
    for prompt in ("<|user|>hi", "x<|bos|>y 1+2=", "plain 12+34="):
        kw = dict(model="debug", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=0)
        whole = client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True}).choices[0]
        assert whole.text.startswith(prompt), (prompt, whole.text)
        ids = [int(t.removeprefix("token_id:")) for t in whole.logprobs.tokens]
        offsets = whole.logprobs.text_offset
        assert ids[0] == tok.bos_id and offsets[0] == 0  # the <|bos|> the server added is in no text
        for t, (i, at) in enumerate(zip(ids[1:], offsets[1:]), 1):
            shown = tok.decode([i], skip_special=t >= len(ids) - 4)  # the completion drops special tokens
            assert whole.text[at:].startswith(shown), (prompt, t, whole.text, offsets)
        chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
        assert "".join(c.text for c in chunks) == whole.text
        assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == offsets
    # A prompt of ids comes back decoded with its special tokens, as /detokenize shows them.
    ids = tok.encode("<|user|>hi", add_bos=True)
    out = client.completions.create(model="debug", prompt=ids, max_tokens=0, echo=True).choices[0]
    assert out.text == httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert out.text == "<|bos|><|user|>hi"


def test_continuous_usage_counts_each_chunks_own_choice(server):
    """vLLM's continuous_usage_stats counts the chunk's own prompt and choice; the server summed
    every prompt and every choice so far into each chunk."""
    body = {
        "model": "debug",
        "prompt": ["1+1=", "22+333="],
        "n": 2,
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": True,
    }
    prompt_tokens = [httpx.post(server.url + "/tokenize", json={"prompt": p}).json()["count"] for p in body["prompt"]]
    chunks = [
        json.loads(e) for e in sse_events(httpx.post(server.api + "/completions", json=body, timeout=30).text)[:-1]
    ]
    seen: dict[int, list[int]] = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        assert c["usage"]["prompt_tokens"] == prompt_tokens[choice["index"] // 2]
        seen.setdefault(choice["index"], []).append(c["usage"]["completion_tokens"])
    assert sorted(seen) == [0, 1, 2, 3] and all(counts[-1] == 3 for counts in seen.values()), seen
    assert all(counts == sorted(counts) for counts in seen.values())
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": sum(prompt_tokens),
        "completion_tokens": 12,
        "total_tokens": sum(prompt_tokens) + 12,
    }


def test_a_chat_turn_ends_at_its_end_token_with_no_stop_reason(server, client, offline):
    """`<|end|>` closes the assistant's turn as EOS does (vLLM reports stop_reason null there);
    a stop id the client sent is still named."""
    _, tok = offline
    end = {"logit_bias": {str(tok.end_id): 100}}
    out = greedy_chat_logprobs(client, 4, 0, extra_body=end)
    assert [t.token for t in out.choices[0].logprobs.content] == ["<|end|>"]
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] is None
    asked = greedy_chat_logprobs(client, 4, 0, extra_body={**end, "stop_token_ids": [tok.end_id]})
    assert asked.choices[0].model_extra["stop_reason"] == tok.end_id


def test_malformed_bodies_get_400(server):
    r = httpx.post(
        server.api + "/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(
        server.api + "/chat/completions",
        content=b'{"messages": "\xff\xfe"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = httpx.post(
        server.api + "/chat/completions", json={"model": "debug", "messages": [{"role": "wizard", "content": "x"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.api + "/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    # Nesting deep enough to exhaust the JSON decoder's recursion is still just a bad body.
    r = httpx.post(server.api + "/completions", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    r = httpx.get(server.api + "/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]
    # These were 500s: an integer over Python's 4300-digit limit for int(), in the body and as a
    # logit_bias key, and a lone surrogate ("\ud800" is valid JSON but not Unicode), which the
    # tokenizer refused with a TypeError and a traceback in the server's log.
    digits = "1" * 5000
    r = httpx.post(
        server.api + "/completions",
        content=b'{"prompt": "hi", "max_tokens": ' + digits.encode() + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    r = httpx.post(server.api + "/completions", json={"prompt": "hi", "logit_bias": {digits: 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    for path, body, param in [
        ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", "\\ud800"]}', "prompt"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
        ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ]:
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)
        assert "lone surrogate" in r.json()["error"]["message"]
    # An error message that quotes one (an unknown role) was a 500: it had no UTF-8 form.
    body = b'{"messages": [{"role": "\\ud800", "content": "x"}]}'
    r = httpx.post(server.api + "/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].endswith("unknown chat role: \ud800"), r.text
    assert not [line for line in server.lines if "Traceback" in line]


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="debug", prompt="hi", max_tokens=100000)
    assert e.value.body["param"] == "max_tokens"


def long_body(stream: bool) -> dict:
    return {"model": "debug", "prompt": "x", "max_tokens": 250, "temperature": 0, "ignore_eos": True, "stream": stream}


def test_streaming_disconnect_frees_blocks(server):
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.api + "/completions", json=long_body(True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
    steps_at_close = server.metric("crosschip_engine_steps")
    assert server.wait_metric("crosschip_cache_blocks_used", 0.0) == 0.0
    assert server.wait_metric("crosschip_running_sequences", 0.0) == 0.0
    # Freed within one decode step of the hang-up (counted from a moment after it).
    assert server.metric("crosschip_engine_steps") - steps_at_close <= 1


def test_non_streaming_disconnect_frees_blocks(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.api + "/completions", json=long_body(False), timeout=httpx.Timeout(30, read=0.1))
    steps_at_close = server.metric("crosschip_engine_steps")
    assert server.wait_metric("crosschip_cache_blocks_used", 0.0) == 0.0
    assert server.metric("crosschip_engine_steps") - steps_at_close <= 1
    # A hang-up is an ordinary end of a request, counted as nginx's 499: the server's log got
    # "Exception in ASGI application" and a traceback for each one.
    closed = 'crosschip_requests_total{endpoint="/v1/completions",status="499"}'
    assert server.wait_metric(closed, 1.0, default=0.0) == 1.0
    assert not [line for line in server.lines if "Traceback" in line or "Exception in ASGI" in line]


def test_a_client_that_hangs_up_while_sending_its_body_is_counted_not_logged(server):
    """Half a body, then the connection closes: starlette's ClientDisconnect was a logged
    "Exception in ASGI application" with a traceback."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((head + "Content-Length: 1000\r\n\r\n" + '{"messages": [').encode())
    closed = 'crosschip_requests_total{endpoint="/v1/chat/completions",status="499"}'
    assert server.wait_metric(closed, 1.0, default=0.0) == 1.0
    assert not [line for line in server.lines if "Traceback" in line or "Exception in ASGI" in line]


def test_overload_gets_503_with_retry_after_and_api_key_is_enforced(debug_bundle):
    srv = ServerProcess(
        debug_bundle, "--max-batch", "1", "--max-queue", "2", "--api-key", "sekret", "--no-prefix-caching"
    )
    try:
        r = httpx.post(srv.api + "/completions", json={"prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # The scheme is case-insensitive (RFC 9110), the key is not.
        for sent, code in [("bearer sekret", 200), ("BEARER  sekret", 200), ("Bearer Sekret", 401), ("sekret", 401)]:
            assert httpx.get(srv.api + "/models", headers={"Authorization": sent}).status_code == code, sent
        headers = {"Authorization": "Bearer sekret"}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60, headers=headers) as http:
                return await asyncio.gather(
                    *(http.post(srv.api + "/completions", json=long_body(False)) for _ in range(8))
                )

        codes = [r.status_code for r in asyncio.run(burst())]
        assert codes.count(200) >= 2 and 503 in codes, (
            codes
        )  # two queue places (plus one running); the rest are refused
        refused = next(r for r in asyncio.run(burst()) if r.status_code == 503)
        assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "service_unavailable"
        # More sequences than the queue holds can never be admitted: 400, not a 503 to retry.
        for extra, param in [({"prompt": ["a", "b", "c"]}, "prompt"), ({"prompt": "a", "n": 3}, "n")]:
            r = httpx.post(srv.api + "/completions", json={"max_tokens": 1, **extra}, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "--max-queue" in r.json()["error"]["message"]
        # --no-prefix-caching: a repeated long prompt is computed whole every time.
        body = {"model": "debug", "prompt": " ".join(PROMPTS) * 2, "max_tokens": 2}
        for _ in range(2):
            assert httpx.post(srv.api + "/completions", json=body, headers=headers, timeout=60).status_code == 200
        assert srv.metric("crosschip_prefix_cache_hit_tokens") == srv.metric("crosschip_prefix_cache_query_tokens") == 0
    finally:
        srv.stop()


def test_a_request_larger_than_the_whole_latent_cache_gets_400(debug_bundle):
    """Room is reserved whole at admission, so a sequence larger than the whole cache could
    never start: it is refused by name, and without max_tokens it gets what the cache holds."""
    srv = ServerProcess(debug_bundle, "--num-blocks", "5", "--block-size", "16")  # 4 x 16 = 64 tokens
    try:
        client = openai.OpenAI(base_url=srv.api, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="debug", prompt="1+2=", max_tokens=100)
        error = e.value.body
        assert error["param"] == "max_tokens" and "latent cache (64 tokens)" in error["message"], error
        # A chat request without max_tokens may use the rest of the context; here the cache is smaller.
        messages = [{"role": "user", "content": "1+2="}]
        out = client.chat.completions.create(model="debug", messages=messages, extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens + out.usage.completion_tokens == 64
    finally:
        assert srv.stop() == 0


def test_health_is_503_while_the_bundle_loads(debug_bundle, tmp_path):
    """The server listens before the model is loaded; until then /health (and any request)
    gets 503 with Retry-After, and the body says it is loading.

    The loading is held open for as long as the test needs: the bundle's config.json is a named
    pipe, whose read waits until the test writes the file's text into it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(debug_bundle, bundle)
    (bundle / "crosschip.json").unlink()  # without its manifest: no checksum reads the pipe first
    config = (bundle / "config.json").read_bytes()
    (bundle / "config.json").unlink()
    os.mkfifo(bundle / "config.json")
    port, loading = _free_port(), {}

    def hold_the_load(proc) -> None:
        def ask(path: str) -> httpx.Response:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if path == "/v1/completions":
                        return httpx.post(f"http://127.0.0.1:{port}{path}", json={"prompt": "hi"}, timeout=5)
                    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
                except httpx.TransportError:
                    time.sleep(0.01)  # not listening yet
            raise AssertionError(f"{path} was never answered")

        for path in ("/health", "/v1/completions", "/v1/models"):
            loading[path] = ask(path)
        with open(bundle / "config.json", "wb") as pipe:  # the load goes on
            pipe.write(config)

    srv = ServerProcess(bundle, port=port, on_start=hold_the_load)
    try:
        assert all(r.status_code == 503 and r.headers["retry-after"] for r in loading.values()), loading
        assert loading["/health"].json() == {"status": "loading"}
        assert loading["/v1/completions"].json()["error"]["type"] == "service_unavailable"
        # The model list too: it answered 200 with max_model_len 0 before the model was loaded.
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.api + "/models").json()["data"][0]["max_model_len"] > 0
    finally:
        srv.stop()


def test_a_drain_stops_at_its_timeout_and_aborts_what_is_left(debug_bundle):
    """A request longer than --drain-timeout is cut off at the deadline: its stream ends with
    finish_reason "abort" and [DONE], and the server exits 0."""
    srv = ServerProcess(debug_bundle, "--drain-timeout", "0.2")
    body = {**long_body(True), "n": 8}  # eight sequences of 250 tokens: longer than 0.2 s here
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", srv.api + "/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.proc.terminate()
            start = time.monotonic()
            rest = [first, *(line for line in lines if line.startswith("data: "))]
    assert srv.proc.wait(30) == 0
    assert time.monotonic() - start < 10
    assert rest[-1] == "data: [DONE]"
    finished = [c["choices"][0] for c in map(json.loads, (line[len("data: ") :] for line in rest[:-1]))]
    reasons = {c["index"]: c["finish_reason"] for c in finished if c["finish_reason"]}
    assert "abort" in reasons.values(), reasons
    srv.stop()


def test_sigterm_drains_in_flight_requests_then_exits_0(debug_bundle):
    srv = ServerProcess(debug_bundle, "--drain-timeout", "30")
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", srv.api + "/completions", json=long_body(True)) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.proc.terminate()  # SIGTERM while the request is in flight
            health = httpx.get(srv.url + "/health")
            late = httpx.post(srv.api + "/completions", json={"prompt": "hi"})
            rest = [first, *(line for line in lines if line.startswith("data: "))]
    assert health.status_code == 503
    assert late.status_code == 503 and late.headers["retry-after"]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert srv.proc.wait(30) == 0
    srv.stop()  # exited already: this only closes the output pipe


def test_a_second_sigterm_stops_the_drain_at_once_without_a_traceback(debug_bundle):
    """As with vLLM or uvicorn, the second signal means: stop now. The in-flight requests
    (which the 30 s drain would have waited for) end at once as aborted, each with a whole
    answer. uvicorn's force exit cancelled their handlers: the plain request got a plain-text
    500, the stream was cut mid-chunk, and the log held two tracebacks."""
    srv = ServerProcess(debug_bundle, "--drain-timeout", "30")
    plain = {}
    with httpx.Client(timeout=60) as http:
        thread = threading.Thread(
            target=lambda: plain.update(r=http.post(srv.api + "/completions", json=long_body(False)))
        )
        thread.start()
        with http.stream("POST", srv.api + "/completions", json=long_body(True)) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.wait_metric("crosschip_running_sequences", 2)
            srv.proc.terminate()
            time.sleep(0.05)
            start = time.monotonic()
            srv.proc.terminate()
            rest = [first, *(line for line in lines if line.startswith("data: "))]
        thread.join(30)
    assert srv.proc.wait(10) == 0
    assert time.monotonic() - start < 10
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in rest[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "abort"
    assert plain["r"].status_code == 200, plain["r"].text
    assert plain["r"].json()["choices"][0]["finish_reason"] == "abort"
    srv.stop()  # exited already: joins the reader thread, which takes the last lines
    out = "".join(srv.lines)
    assert "draining" in out and "stopping now" in out, out
    assert "Traceback" not in out and "Exception in ASGI application" not in out, out


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
        ("localhost", "http://localhost:8000"),
    ],
)
def test_client_url_reaches_wildcards_on_loopback_and_brackets_ipv6(host, url):
    assert client_url(host, 8000) == url


def test_serves_on_an_ipv6_loopback_address(debug_bundle):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    srv = ServerProcess(debug_bundle, "--host", "::1")
    try:
        assert srv.url.startswith("http://[::1]:")
        client = openai.OpenAI(base_url=srv.api, api_key="unused", max_retries=0)
        out = client.completions.create(model=client.models.list().data[0].id, prompt="1+2=", max_tokens=3)
        assert 1 <= out.usage.completion_tokens <= 3
    finally:
        assert srv.stop() == 0


def test_text_parts_of_a_message_are_joined_by_newlines(server):
    """As vLLM joins them: a client that splits its text gets the prompt vLLM would build."""

    def ids(content):
        body = {"messages": [{"role": "user", "content": content}]}
        return httpx.post(server.url + "/tokenize", json=body).json()["tokens"]

    assert ids([{"type": "text", "text": "12+"}, {"type": "text", "text": "34="}]) == ids("12+\n34=")


def test_a_long_prompt_is_tokenized_without_stalling_the_server(server):
    """A 3 MB text takes seconds to tokenize (`/tokenize` counts any text); meanwhile the
    server answers others. It used to tokenize on the event loop, and then in a thread that
    held the GIL (/health: 3.8 s of the 4.4 s the prompt took)."""
    took = {}

    def big():
        body = {"model": "debug", "prompt": "ab " * 1_000_000}
        t0 = time.monotonic()
        r = httpx.post(server.url + "/tokenize", json=body, timeout=120)
        took["big"] = time.monotonic() - t0, r.status_code

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.5)  # its body is in, and being tokenized
    t0 = time.monotonic()
    health = httpx.get(server.url + "/health", timeout=120)
    took["health"] = time.monotonic() - t0
    thread.join()
    assert health.status_code == 200 and took["big"][1] == 200
    assert took["health"] < took["big"][0] / 4, took


@pytest.mark.parametrize(
    "path, body",
    [
        ("/completions", {"prompt": "ab " * 1_000_000}),
        ("/completions", {"prompt": ["hi", "ab " * 1_000_000]}),
        ("/chat/completions", {"messages": [{"role": "user", "content": "ab " * 1_000_000}]}),
    ],
)
def test_a_text_too_long_for_the_context_is_refused_before_it_is_tokenized(server, path, body):
    """The server was 61 s and 4.9 GB into a 50 MB prompt (and kept the memory) before it said
    the prompt exceeds the context. A token stands for at most so many characters, so the
    length of the text says it first ("N tokens leave no room" would mean it was tokenized)."""
    r = httpx.post(server.api + path, json={"model": "debug", "max_tokens": 1, **body}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    param = "messages" if path.startswith("/chat") else "prompt"
    assert err["param"] == param
    context = model_preset("debug").max_position_embeddings
    assert f"characters are more tokens than the model's context of {context} holds" in err["message"]


def test_the_pipelines_smoke_run_of_a_corpus_sends_its_text_and_scores_nothing(server, tmp_path):
    """`crosschip run` on a corpus sent held-out arithmetic problems to the server and reported an
    accuracy of 0.0% for a model that never saw arithmetic."""
    from types import SimpleNamespace

    from crosschip.config import DataConfig
    from crosschip.pipeline import _smoke

    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "\n".join(json.dumps({"text": f"document {i} of the corpus says hello to the server"}) for i in range(20))
    )
    facts = _smoke(server.api, SimpleNamespace(data=DataConfig(task="corpus", corpus=[str(docs)])), "")
    assert facts["requests"] == 16 and facts["accuracy"] is None and facts["ttft_ms_median"] > 0
    assert [s["prompt"] for s in facts["samples"][:2]] == [
        "document 0 of the corpus says hello to",
        "document 1 of the corpus says hello to",
    ]
    assert all(s["correct"] is None and s["completion"] for s in facts["samples"])
