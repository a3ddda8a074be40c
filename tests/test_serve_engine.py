"""The engine core: paged latent cache, absorbed decode, scheduler, offline generate."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings

import pytest
import torch

from crosschip.hf import load_bundle
from crosschip.serve.engine import AsyncEngine, Engine, QueueFull
from crosschip.serve.executor import Chunk, TorchExecutor, make_executor
from crosschip.serve.sampling import InvalidParameter, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = ["12+34=", "The quick brown fox jumps over the lazy dog, again and again and again.", "7"]


@pytest.fixture(scope="module")
def loaded(debug_bundle):
    torch.set_num_threads(1)
    return load_bundle(debug_bundle)


def make_engine(loaded, *, max_batch: int = 8, block_size: int = 8, **kw) -> Engine:
    model, tok = loaded
    executor = TorchExecutor(model, max_batch=max_batch, block_size=block_size)
    return Engine(executor, tok, max_batch=max_batch, **kw)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation with the model's full (naive-attention) forward, no cache."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(x)[0, -1].argmax()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return x[0, len(ids) :].tolist()


def test_cache_bytes_per_token_per_layer(loaded):
    model, _ = loaded
    ex = TorchExecutor(model, max_batch=2)
    cfg = model.cfg
    assert ex.cache_bytes_per_token_per_layer == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert ex.blocks.block_bytes() == ex.blocks.block_size * cfg.num_hidden_layers * ex.cache_bytes_per_token_per_layer


def test_absorbed_decode_over_paged_cache_equals_full_forward(loaded):
    check_absorbed_decode(loaded[0])


def test_absorbed_decode_without_q_lora():
    from crosschip.config import model_preset
    from crosschip.model import Transformer

    torch.manual_seed(1)
    check_absorbed_decode(Transformer(model_preset("debug", q_lora_rank=None)).eval())


def check_absorbed_decode(model) -> None:
    """Prefill pieces (padded together when of similar length) then batched decode, against the naive forward."""
    ex = TorchExecutor(model, max_batch=4, block_size=4)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)  # naive attention, no cache
    for s in range(3):
        assert ex.can_allocate(s, 21)
    # Prefill pieces of different lengths in one step, then decode the rows together.
    first = [7, 6, 1]  # 7 and 6 run as one padded forward
    outs = ex.step([Chunk(s, ids[s, : first[s]].tolist(), 0) for s in range(3)], all_logits=True)
    for s in range(3):
        torch.testing.assert_close(outs[s], full[s, : first[s]], rtol=1e-5, atol=1e-5)
    lens = list(first)
    while min(lens) < 21:
        chunks = [Chunk(s, [int(ids[s, lens[s]])], lens[s]) for s in range(3) if lens[s] < 21]
        for c, logits in zip(chunks, ex.step(chunks)):
            torch.testing.assert_close(logits, full[c.seq_id, c.start_pos], rtol=1e-5, atol=1e-5)
            lens[c.seq_id] += 1


def test_blocks_are_reserved_and_released(loaded):
    model, _ = loaded
    ex = TorchExecutor(model, max_batch=1, block_size=8, num_blocks=5)  # 4 usable blocks = 32 tokens
    assert ex.can_allocate(0, 20)  # 3 blocks
    assert ex.cache_usage()["blocks_used"] == 3
    assert not ex.can_allocate(1, 16)  # only 1 block left
    assert ex.can_allocate(1, 8)
    ex.release(0)
    assert ex.cache_usage()["blocks_used"] == 1
    assert ex.can_allocate(2, 24)
    assert ex.cache_usage()["bytes_used"] == 4 * ex.blocks.block_bytes()


def test_block_tables_share_a_cached_prompt_prefix_and_evict_it_last():
    from crosschip.serve.executor import BlockTables

    bt = BlockTables(num_blocks=7, block_size=4)  # 6 usable blocks
    prompt = list(range(10, 20))  # 10 tokens: 2 full blocks
    assert bt.reserve(0, 12, prompt) and bt.lengths[0] == 0  # nothing cached yet: 3 blocks
    bt.written(0, 0, prompt)  # prefill done: both full prompt blocks are keyed
    # The same prompt shares both full blocks; it computes only the block with its last token.
    assert bt.reserve(1, 12, prompt) and bt.lengths[1] == 8
    assert bt.tables[1][:2] == bt.tables[0][:2] and bt.tables[1][2] != bt.tables[0][2]
    assert bt.blocks_used == 4
    # A prompt of exactly 2 blocks shares 1: its last token is computed for the first logits.
    assert bt.reserve(2, 9, prompt[:8]) and bt.lengths[2] == 4 and bt.blocks_used == 6
    # A prompt that differs in its first block shares nothing.
    assert not bt.reserve(3, 4, [99, *prompt[1:]])  # and the pool is full: no change
    assert 3 not in bt.tables and bt.blocks_used == 6
    for seq in (0, 1, 2):
        bt.release(seq)
    # Released, the keyed blocks stay cached (not in use) and are shared again.
    assert bt.blocks_used == 0 and len(bt.evictable) == 2
    assert bt.reserve(4, 12, prompt) and bt.lengths[4] == 8
    bt.release(4)
    # Fresh blocks come from the free list first, then from the cached blocks released longest ago.
    assert bt.reserve(5, 6 * 4, [1] * 24) and bt.blocks_used == 6 and not bt.cached
    bt.release(5)
    assert bt.reserve(6, 12, prompt) and bt.lengths[6] == 0  # the prefix was evicted


def test_block_tables_key_the_blocks_a_sequence_generates():
    """A chat's next turn repeats the earlier answer: blocks filled by decoded tokens are keyed
    as prompt blocks are, by the whole sequence of tokens before them."""
    from crosschip.serve.executor import BlockTables

    bt = BlockTables(num_blocks=11, block_size=4)
    prompt, answer = list(range(10, 16)), [40, 41, 42, 43, 44]  # 6 prompt tokens, 5 generated
    assert bt.reserve(0, 12, prompt)
    bt.written(0, 0, prompt)
    for pos, token in enumerate(answer[:-1], start=len(prompt)):  # the last token is never fed
        bt.written(0, pos, [token])
    assert len(bt.cached) == 2  # 10 tokens written: 2 full blocks, the second ends in the answer
    turn2 = prompt + answer + [7, 8]
    assert bt.reserve(1, 16, turn2) and bt.lengths[1] == 8 and bt.tables[1][:2] == bt.tables[0][:2]
    # The same answer after another prompt shares only what the two sequences have in common.
    assert bt.reserve(2, 16, [99, *prompt[1:], *answer]) and bt.lengths[2] == 0
    # A sequence reserved without its prompt (prefix caching off for it) keys nothing.
    bt.release(0)
    bt.release(1)
    bt.release(2)
    keyed = dict(bt.cached)
    assert bt.reserve(3, 12)
    bt.written(3, 0, list(range(12)))
    assert bt.cached == keyed


def test_a_repeated_prompt_reuses_its_prefix_and_generates_the_same(loaded):
    """The second request with a long prompt computes only its last block: the same greedy
    tokens as without prefix caching, and as the first request."""
    prompt = PROMPTS[1] * 3  # 3 x 16 tokens: several blocks of 8
    plain = make_engine(loaded, prefix_caching=False)
    cached = make_engine(loaded)
    ref = plain.generate([prompt], GREEDY)[0]
    first = cached.generate([prompt], GREEDY)[0]
    assert cached.prefix_hit_tokens == 0
    fed = []
    step = cached.executor.step
    cached.executor.step = lambda chunks, **kw: fed.extend(len(c.token_ids) for c in chunks) or step(chunks, **kw)
    again = cached.generate([prompt], GREEDY)[0]
    n = len(ref.prompt_token_ids)
    assert cached.prefix_hit_tokens == (n - 1) // 8 * 8 > 0
    assert sum(fed) == n - cached.prefix_hit_tokens + GREEDY.max_tokens - 1  # only the uncached tail went in
    assert ref.token_ids == first.token_ids == again.token_ids
    assert cached.executor.cache_usage()["blocks_used"] == 0
    # Prompt logprobs need every prompt token's logits: such a request computes its prompt whole.
    echo = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
    hits = cached.prefix_hit_tokens
    out = cached.generate([prompt], echo)[0]
    assert cached.prefix_hit_tokens == hits and len(out.prompt_logprobs) == n


def test_a_chat_turn_reuses_the_blocks_of_the_earlier_answer(loaded):
    """The next turn's prompt holds the first turn's prompt and answer: every full block of
    those comes from the cache, and the answer is the one computed without prefix caching."""
    _, tok = loaded
    plain, cached = make_engine(loaded, prefix_caching=False), make_engine(loaded)
    first = cached.generate([PROMPTS[1]], GREEDY)[0]
    turn2 = first.prompt_token_ids + first.token_ids + tok.encode(" and again", add_bos=False)
    written = len(first.prompt_token_ids) + len(first.token_ids) - 1  # the last token is never fed
    hits = cached.prefix_hit_tokens
    again = cached.generate([turn2], GREEDY)[0]
    assert cached.prefix_hit_tokens - hits == written // 8 * 8 > len(first.prompt_token_ids)
    assert again.token_ids == plain.generate([turn2], GREEDY)[0].token_ids


def test_random_chat_turns_with_aborts_and_evictions_match_the_engine_without_the_cache(loaded):
    """Five conversations sharing a system prompt take random turns (their histories include
    the earlier answers), some requests are aborted mid-way, and the pool is small enough that
    cached blocks are evicted: every finished answer is the no-cache engine's, and once all is
    done every block is free or evictable, none held."""
    import random

    model, tok = loaded
    rng = random.Random(0)
    executor = TorchExecutor(model, max_batch=4, block_size=4, num_blocks=60)
    cached, plain = Engine(executor, tok, max_batch=4), make_engine(loaded, prefix_caching=False)
    blocks, evictions = executor.blocks, []
    take = blocks._take
    blocks._take = lambda: evictions.append(not blocks.free) or take()
    system = [rng.randrange(16, 512) for _ in range(10)]
    histories = [list(system) for _ in range(5)]
    for _ in range(20):
        talking = rng.sample(range(5), rng.randint(1, 4))
        for i in talking:
            histories[i] += [rng.randrange(16, 512) for _ in range(rng.randint(1, 6))]
        params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=0, ignore_eos=True)
        requests = [cached.add_request(list(histories[i]), params) for i in talking]
        aborted = rng.choice(requests) if rng.random() < 0.3 else None
        for step in range(10_000):
            if all(r.finished for r in requests):
                break
            cached.step()
            if aborted is not None and step == 1:
                cached.abort(aborted.request_id)
        expected = plain.generate([histories[i] for i in talking], params)
        for r, i, ref in zip(requests, talking, expected):
            if r is not aborted:
                assert cached.output(r.sequences[0]).token_ids == ref.token_ids
                histories[i] += ref.token_ids
                histories[i] = histories[i] if len(histories[i]) < 200 else list(system)
    assert cached.prefix_hit_tokens > 0 and any(evictions)
    assert blocks.blocks_used == 0 and not blocks.refs and not blocks.keying
    assert len(blocks.free) + len(blocks.evictable) == blocks.num_blocks - 1


def test_make_executor_loads_the_bundle(debug_bundle):
    ex = make_executor(debug_bundle, "torch:cpu", max_batch=2)
    assert ex.vocab_size == 512 and ex.max_seq_len == 256


def test_greedy_generate_equals_the_full_forward_loop(loaded):
    model, tok = loaded
    engine = make_engine(loaded, prefill_chunk=5)  # prompts longer than 5 tokens prefill in chunks
    outs = engine.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == reference_greedy(model, tok.encode(prompt, add_bos=True), 24)
        assert out.finish_reason == "length"
        assert out.text == tok.decode(out.token_ids)
    assert engine.executor.cache_usage()["blocks_used"] == 0


@pytest.mark.slow
def test_the_compiled_step_serves_what_eager_serves_and_falls_back_when_compiling_fails(loaded, monkeypatch):
    """`serve --compile`: the step under torch.compile gives eager's greedy tokens, two rows
    decoding at once (the few-token MoE loop, whose in-place row updates once failed AOT
    autograd and sent every run back to eager after a minute of trying). Traced through AOT
    autograd without inductor's kernel generation, which would take the suite minutes (the
    serving benchmark runs inductor). Then, with no C++ compiler for inductor, the first
    call warns and serves eagerly."""
    import torch._dynamo
    import torch._inductor.config

    from crosschip.serve.compile import compile_forward

    model, tok = loaded
    prompts, params = ["12+34=", "7"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    eager = [o.token_ids for o in make_engine(loaded).generate(prompts, params)]

    def compiled_engine(backend: str) -> Engine:
        torch._dynamo.reset()
        executor = TorchExecutor(model, max_batch=8, block_size=8)
        executor.forward = compile_forward(executor.forward, backend=backend)
        return Engine(executor, tok, max_batch=8)

    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [o.token_ids for o in compiled_engine("aot_eager").generate(prompts, params)] == eager
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    with pytest.warns(UserWarning, match="torch.compile failed .*serving in eager mode"):
        assert [o.token_ids for o in compiled_engine("inductor").generate(prompts, params)] == eager
    torch._dynamo.reset()


def test_batched_requests_return_what_each_returns_alone(loaded):
    engine = make_engine(loaded)
    together = engine.generate(PROMPTS * 3, GREEDY)
    for prompt, out in zip(PROMPTS * 3, together):
        assert out.token_ids == engine.generate([prompt], GREEDY)[0].token_ids


def test_requests_join_a_running_batch(loaded):
    engine = make_engine(loaded)
    first = engine.add_request(PROMPTS[0], GREEDY)
    for _ in range(5):
        engine.step()
    assert len(first.sequences[0].output_ids) > 0
    second = engine.add_request(PROMPTS[1], GREEDY)
    engine.step()
    assert {s.seq_id for s in engine.running} == {first.sequences[0].seq_id, second.sequences[0].seq_id}
    while not (first.finished and second.finished):
        engine.step()
    alone = engine.generate(PROMPTS[:2], GREEDY)
    assert [engine.output(r.sequences[0]).token_ids for r in (first, second)] == [o.token_ids for o in alone]


def test_chunked_prefill_does_not_stall_running_decodes(loaded):
    model, tok = loaded
    engine = make_engine(loaded, prefill_chunk=4)
    short = engine.add_request(PROMPTS[0], GREEDY)
    engine.step()
    engine.step()  # short is decoding
    long_ids = tok.encode("word " * 40, add_bos=True)
    engine.add_request(long_ids, GREEDY)
    before = len(short.sequences[0].output_ids)
    for _ in range(5):
        engine.step()  # the long prompt needs 10+ steps to prefill; the short one gains a token every step
    assert len(short.sequences[0].output_ids) == before + 5


def test_seeded_sampling_is_reproducible_in_any_batch(loaded):
    engine = make_engine(loaded)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], params)[0].token_ids
    mixed = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], params)
    assert mixed[1].token_ids == alone


def test_n_choices_and_logprobs(loaded):
    model, tok = loaded
    engine = make_engine(loaded)
    outs = engine.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=6, temperature=1.0, seed=1, n=3, logprobs=2, ignore_eos=True)
    )
    assert [o.index for o in outs] == [0, 1, 2]
    ids = tok.encode(PROMPTS[0], add_bos=True)
    out = outs[0]
    with torch.no_grad():
        full = model(torch.tensor([ids + out.token_ids]))[0].log_softmax(-1)
    for t, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[t]
        assert abs(lp.logprob - float(full[len(ids) - 1 + t, lp.token_id])) < 1e-4
        assert len(lp.top) == 2


def test_prompt_logprobs_match_the_full_forward(loaded):
    model, tok = loaded
    engine = make_engine(loaded, prefill_chunk=3)
    ids = tok.encode(PROMPTS[1], add_bos=True)
    out = engine.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))[0]
    with torch.no_grad():
        lps = model(torch.tensor([ids]))[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert abs(out.prompt_logprobs[i].logprob - float(lps[i - 1, ids[i]])) < 1e-4


def test_stop_string_across_token_boundary(loaded):
    _, tok = loaded
    engine = make_engine(loaded)
    base = engine.generate([PROMPTS[0]], GREEDY)[0]
    # A stop string made of the end of token 3 and the start of token 4.
    pieces = [tok.decode(base.token_ids[:i]) for i in range(len(base.token_ids) + 1)]
    k = next(i for i in range(3, 20) if len(pieces[i]) > len(pieces[i - 1]) and len(pieces[i + 1]) > len(pieces[i]))
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k])]
    cut = pieces[k + 1].find(stop)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == pieces[k + 1][:cut]
    assert len(out.token_ids) <= k + 1
    assert base.finish_reason == "length" and base.stop_reason is None


def test_stop_token_ids_end_the_choice(loaded):
    engine = make_engine(loaded)
    base = engine.generate([PROMPTS[0]], GREEDY)[0]
    out = engine.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[base.token_ids[4]], ignore_eos=True)
    )[0]
    first = base.token_ids.index(base.token_ids[4])
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    assert out.stop_reason == base.token_ids[4]


def test_bad_requests_are_refused_before_queueing(loaded):
    engine = make_engine(loaded, max_queue=2)
    with pytest.raises(InvalidParameter) as e:
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=1000))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidParameter) as e:
        engine.add_request([1, 99999], SamplingParams())
    assert e.value.param == "prompt"
    engine.add_request(PROMPTS[0], SamplingParams())
    engine.add_request(PROMPTS[0], SamplingParams())
    with pytest.raises(QueueFull):
        engine.add_request(PROMPTS[0], SamplingParams())


def test_abort_frees_the_blocks_at_the_next_step(loaded):
    engine = make_engine(loaded)
    req = engine.add_request(PROMPTS[1], GREEDY)
    engine.step()
    assert engine.executor.cache_usage()["blocks_used"] > 0
    engine.abort(req.request_id)
    engine.step()
    assert engine.executor.cache_usage()["blocks_used"] == 0
    assert not engine.has_work()


def test_a_request_larger_than_the_whole_cache_is_refused_not_stuck(loaded):
    """Its room is reserved whole at admission: a sequence larger than the whole pool would wait forever."""
    model, tok = loaded
    engine = Engine(TorchExecutor(model, max_batch=1, block_size=4, num_blocks=3), tok, max_batch=1)  # 8 tokens
    prompt = tok.encode(PROMPTS[1], add_bos=True)[:5]
    with pytest.raises(InvalidParameter, match=r"latent cache \(8 tokens\)") as e:
        engine.add_request(prompt, SamplingParams(max_tokens=4))
    assert e.value.param == "max_tokens" and not engine.has_work()
    with pytest.raises(InvalidParameter) as e:
        engine.add_request(prompt * 2, SamplingParams(max_tokens=None))
    assert e.value.param == "prompt"
    # Without max_tokens, a request gets the room the cache holds.
    req = engine.add_request(prompt, SamplingParams(max_tokens=None, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert req.sequences[0].finish_reason == "length" and len(req.sequences[0].output_ids) == 3


def test_paged_cache_serves_the_models_own_absorbed_path(loaded):
    """PagedBatchCache implements the model's LatentCache protocol (what `cache=` expects)."""
    from crosschip.serve.executor import build_batch

    model, _ = loaded
    ex = TorchExecutor(model, max_batch=2, block_size=4)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    for s in range(2):
        ex.can_allocate(s, 9)
    with torch.no_grad():
        full = model(ids)
        input_ids, positions, cache = build_batch(
            ex.blocks, [Chunk(0, ids[0, :5].tolist(), 0), Chunk(1, ids[1].tolist(), 0)], ex.device
        )
        out = model(input_ids, positions, cache=cache)
    torch.testing.assert_close(out[0, :5], full[0, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], full[1], rtol=1e-5, atol=1e-5)


def test_a_step_wakes_the_event_loop_once_whatever_the_streams(loaded):
    """Each wake-up from the engine thread lets go of the GIL to the event loop; one per step, not one per stream."""
    engine = make_engine(loaded)
    front = AsyncEngine(engine)
    wakeups: list[str] = []

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        plain = loop.call_soon_threadsafe

        def counted(*args, **kw):
            wakeups.append(threading.current_thread().name)
            return plain(*args, **kw)

        loop.call_soon_threadsafe = counted
        front.start()
        streams = [front.submit(p, GREEDY)[1] for p in PROMPTS * 2]

        async def tokens(stream) -> list[int]:
            return [t async for deltas in stream for d in deltas for t in d.token_ids]

        return await asyncio.gather(*(tokens(s) for s in streams))

    try:
        got = asyncio.run(main())
    finally:
        front.shutdown()
    steps = engine.steps
    assert got == [o.token_ids for o in engine.generate(PROMPTS * 2, GREEDY)]
    from_engine = wakeups.count("crosschip-engine")
    # 6 streams x 24 tokens (144 deltas) came over in at most one wake-up per step
    assert 0 < from_engine <= steps < 6 * 24


def test_a_stream_that_fell_behind_gets_one_delta_per_choice(loaded):
    """What piled up while the reader was busy arrives merged: all the tokens, the first token's TTFT, the finish."""
    engine = make_engine(loaded)
    front = AsyncEngine(engine)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=2, logprobs=1, ignore_eos=True)

    async def main():
        front.start()
        request, stream = front.submit(PROMPTS[0], params)
        while not request.finished:  # the event loop is blocked: every step's deltas queue up
            time.sleep(0.01)
        front.shutdown()  # joins the engine thread, so the last step's hand-off is queued too
        return [deltas async for deltas in stream]

    try:
        reads = asyncio.run(main())
    finally:
        front.shutdown()
    assert len(reads) == 1
    offline = engine.generate([PROMPTS[0]], params)
    assert sorted(d.index for d in reads[0]) == [0, 1]
    for d in reads[0]:
        assert d.token_ids == offline[d.index].token_ids
        assert d.text == offline[d.index].text
        assert [lp.token_id for lp in d.logprobs] == d.token_ids
        assert d.finish_reason == "length"
        assert d.ttft_s is not None and d.ttft_s > 0


def test_a_stream_whose_event_loop_closed_is_aborted_and_the_engine_serves_on(loaded):
    """A caller's loop can end with its request still running; its deltas cannot be delivered, so the
    request is aborted (its blocks freed) and the engine thread goes on serving other loops."""
    engine = make_engine(loaded)
    front = AsyncEngine(engine)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def leave_early():
        front.start()
        request, stream = front.submit(PROMPTS[0], long)
        async for _ in stream:
            return request  # the loop closes with the request mid-generation

    async def serve_again() -> list[int]:
        _, stream = front.submit(PROMPTS[1], GREEDY)
        return [t async for deltas in stream for d in deltas for t in d.token_ids]

    try:
        left = asyncio.run(leave_early())
        deadline = time.monotonic() + 30
        while not left.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert left.finished and len(left.sequences[0].output_ids) < 200
        assert left.sequences[0].finish_reason == "abort"
        got = asyncio.run(asyncio.wait_for(serve_again(), 60))
    finally:
        front.shutdown()
    assert got == engine.generate([PROMPTS[1]], GREEDY)[0].token_ids
    assert engine.executor.cache_usage()["blocks_used"] == 0


def test_an_aborted_non_streaming_request_gets_what_it_generated(loaded):
    """A drain's timeout (or any abort) ends a request, not its output: a non-streaming request,
    which gets nothing before it ends, used to end with no tokens and empty text."""
    engine = make_engine(loaded)
    got: list = []
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    req = engine.add_request(PROMPTS[0], params, "r", got.extend, False)
    for _ in range(8):
        engine.step()
    assert got == []  # nothing is sent before the request ends
    engine.abort("r")
    engine.step()
    (d,) = got
    assert d.finish_reason == "abort" and len(d.token_ids) >= 4 and d.token_ids == req.sequences[0].output_ids
    assert d.text == loaded[1].decode(d.token_ids) and d.error is None


def test_a_failing_engine_step_answers_500_or_an_error_event_and_says_so(loaded, monkeypatch, capfd):
    """A step that raises (a damaged bundle, a kernel error) used to end its requests as
    aborted choices with a 200 and empty text, and the server said nothing."""
    import httpx

    from crosschip.serve.api import ServerState, create_app

    engine = make_engine(loaded)
    front = AsyncEngine(engine)
    state = ServerState(model_name="debug")
    state.set_engine(front, loaded[1])

    def broken(*args, **kwargs):
        raise RuntimeError("the kernel fell over")

    monkeypatch.setattr(engine.executor, "step", broken)
    body = {"model": "debug", "prompt": "12+34=", "max_tokens": 4}

    async def main():
        front.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://t") as c:
            plain = await c.post("/v1/completions", json=body)
            streamed = await c.post("/v1/completions", json={**body, "stream": True})
        return plain, streamed

    try:
        plain, streamed = asyncio.run(main())
    finally:
        front.shutdown()
    assert plain.status_code == 500
    error = plain.json()["error"]
    assert error["type"] == "internal_error" and "RuntimeError: the kernel fell over" in error["message"]
    events = [line[len("data: ") :] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "the kernel fell over" in events[-2] and '"error"' in events[-2]
    assert (
        "crosschip serve: error: an engine step failed (RuntimeError: the kernel fell over)" in capfd.readouterr().err
    )
    assert not engine.requests and not engine.running  # their blocks are free
