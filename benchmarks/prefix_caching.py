"""Prefix caching on a multi-turn chat: time to the first token with it and without it.

Two `crosschip serve` processes on the same bundle, one with prefix caching (the default) and
one with `--no-prefix-caching`, in one run. Each conversation shares a system prompt with the
others; each turn's prompt is the whole history so far, the server's earlier answers included,
as a chat client sends it. Prompts go as token ids and answers come back as token ids
(`return_tokens_as_token_ids`), so the history is exactly the tokens the server computed: a
chat template renders text, and text does not always tokenize back to the same ids. The
conversations alternate between the two servers, so load from other users of the machine hits
both alike. Prints per turn the median time to the first token of each server, their ratio,
and the prompt tokens the cache supplied; and whether both servers answered the same tokens.

    .venv/bin/python benchmarks/prefix_caching.py --threads 1
    .venv/bin/python benchmarks/prefix_caching.py --threads 1 --on torch:cpu --turns 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from crosschip.config import model_preset
from crosschip.scripts import positive_int, run_main
from serve_throughput import Server, make_bundle


def random_ids(n: int, vocab: int, seed: int, skip: int = 16) -> list[int]:
    """`n` token ids >= `skip` (no special tokens), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(skip, vocab, (n,), generator=g).tolist()


def turn(http: httpx.Client, server: Server, prompt: list[int], max_tokens: int) -> tuple[float, list[int], float]:
    """One streamed greedy completion: (seconds to the first token, answer ids, prompt tokens
    the prefix cache supplied)."""
    before = server.metric("crosschip_prefix_cache_hit_tokens")
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
    }
    ttft, answer = None, []
    t = time.perf_counter()
    with http.stream("POST", server.url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                tokens = choice["logprobs"]["tokens"]
                answer += [int(tok.removeprefix("token_id:")) for tok in tokens]
                if tokens and ttft is None:
                    ttft = time.perf_counter() - t
    hits = server.metric("crosschip_prefix_cache_hit_tokens") - before
    return ttft if ttft is not None else float("nan"), answer, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="arith-tiny")
    parser.add_argument("--on", default="ort:cpu", help="backend of both servers (ort:cpu, torch:cpu)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--conversations", type=positive_int, default=8)
    parser.add_argument("--turns", type=positive_int, default=4)
    parser.add_argument("--system-tokens", type=positive_int, default=96, help="the prompt every conversation shares")
    parser.add_argument("--user-tokens", type=positive_int, default=24, help="new tokens in each user turn")
    parser.add_argument("--answer-tokens", type=positive_int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cfg = model_preset(args.preset)
    longest = args.system_tokens + args.turns * (args.user_tokens + args.answer_tokens)
    if longest > cfg.max_position_embeddings:
        parser.error(
            f"the last turn reaches {longest} tokens; {args.preset}'s context is {cfg.max_position_embeddings}"
        )

    ttft = {"on": [[] for _ in range(args.turns)], "off": [[] for _ in range(args.turns)]}
    hits, prompt_len, same = [[] for _ in range(args.turns)], [[] for _ in range(args.turns)], True
    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(args.preset, Path(tmp), args.on)
        print(
            f"{args.preset}, fp32, {args.on}, {args.threads} threads: {args.conversations} conversations of "
            f"{args.turns} turns (system {args.system_tokens}, user {args.user_tokens}, answer {args.answer_tokens} tokens)",
            flush=True,
        )
        servers = {"on": Server(bundle, args.threads, False, args.on)}
        # One client for the run: a new httpx client builds an SSL context (tens of ms here),
        # which would count in every time to the first token.
        http = httpx.Client(timeout=600)
        try:
            servers["off"] = Server(bundle, args.threads, False, args.on, extra=["--no-prefix-caching"])
            for s in servers.values():  # warm-up, on a prompt no conversation starts with
                turn(http, s, random_ids(8, cfg.vocab_size, seed=10**6), 4)
            system = random_ids(args.system_tokens, cfg.vocab_size, seed=0)
            for conv in range(args.conversations):
                order = ("on", "off") if conv % 2 == 0 else ("off", "on")
                history = {name: list(system) for name in order}
                for t in range(args.turns):
                    user = random_ids(args.user_tokens, cfg.vocab_size, seed=1 + conv * args.turns + t)
                    answers = {}
                    for name in order:
                        history[name] += user
                        seconds, answers[name], hit = turn(http, servers[name], history[name], args.answer_tokens)
                        ttft[name][t].append(seconds)
                        history[name] += answers[name]
                        if name == "on":
                            hits[t].append(hit)
                    prompt_len[t].append(len(history["on"]) - len(answers["on"]))
                    same = same and answers["on"] == answers["off"]
        finally:
            http.close()
            for s in servers.values():
                s.stop()

    med = statistics.median
    print(
        f"\n{'turn':>4} | {'prompt tokens':>13} | {'from the cache':>14} | {'TTFT off ms':>11} | {'TTFT on ms':>10} | {'off / on':>8}"
    )
    for t in range(args.turns):
        off, on = med(ttft["off"][t]) * 1e3, med(ttft["on"][t]) * 1e3
        print(
            f"{t + 1:>4} | {med(prompt_len[t]):>13.0f} | {med(hits[t]):>14.0f} | {off:>11.1f} | {on:>10.1f} | {off / on:>7.2f}x"
        )
    print(
        f"\n(medians over {args.conversations} conversations; both servers answered the same tokens: {'yes' if same else 'NO'})"
    )


if __name__ == "__main__":
    run_main(main)
