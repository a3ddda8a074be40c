"""Serving throughput: crosschip's engine and HTTP server against transformers' `generate`.

One run, same bundle, same thread count: TTFT and decode tokens/s at 1, 8 and 32 concurrent
requests through the HTTP server (streaming completions), the offline engine's tokens/s, and
transformers' `generate` at batch 1, 8 and 32. Prints ratios (medians of --repeats), two
rooflines and the fraction reached, and the server's peak RSS and cache bytes at 32 requests.

    .venv/bin/python benchmarks/serve_throughput.py --threads 1
    .venv/bin/python benchmarks/serve_throughput.py --threads 1 --on ort:cpu   # exports model.onnx first
    .venv/bin/python benchmarks/serve_throughput.py --threads 2 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

from crosschip.config import model_preset
from crosschip.errors import CrosschipError
from crosschip.hf import save_bundle
from crosschip.model import Transformer, count_params
from crosschip.scripts import positive_int, run_main
from crosschip.tokenizer import default_tokenizer

CONCURRENCY = (1, 8, 32)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def make_bundle(preset: str, out: Path, on: str = "torch:cpu") -> Path:
    """A random-weight bundle of `preset`; for an ort:* target, exported with its ONNX graphs (fp32)."""
    torch.manual_seed(0)
    model = Transformer(model_preset(preset))
    src = save_bundle(model, out / preset, tokenizer=default_tokenizer(model.cfg.vocab_size))
    if not on.startswith("ort:"):
        return src
    from crosschip.handoff.export import export_bundle

    export_bundle(src, out / f"{preset}-onnx", target=on, policy="fp32", progress=False)
    return out / f"{preset}-onnx"


def make_prompts(n: int, prompt_len: int, vocab: int, skip: int = 16) -> list[list[int]]:
    """Fixed-length random prompts (no padding needed by either side); ids >= `skip` avoid specials."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(skip, vocab, (n, prompt_len), generator=g).tolist()


# --------------------------------------------------------------------------------------------
# The three contenders. Each `run_*` does one timed repeat at batch/concurrency `c`; main()
# interleaves them so that load from other users of the machine hits all three alike.
# --------------------------------------------------------------------------------------------


class HF:
    """transformers' DeepseekV3ForCausalLM.generate on the bundle (greedy, fixed length)."""

    def __init__(self, bundle: Path):
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int) -> float:
        ids = torch.tensor(prompts)
        t = time.perf_counter()
        self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - t

    def run(self, prompts: list[list[int]], n: int) -> dict:
        ttft = self.generate(prompts, 1)
        cpu = time.process_time()
        total = self.generate(prompts, n)
        cpu = time.process_time() - cpu
        return {"ttft_s": ttft, "tokens_per_s": len(prompts) * n / total, "tokens_per_cpu_s": len(prompts) * n / cpu}


class Offline:
    """crosschip's Engine.generate in this process."""

    def __init__(self, bundle: Path, compile: bool, on: str = "torch:cpu"):
        from crosschip.serve.engine import Engine
        from crosschip.serve.executor import make_executor
        from crosschip.serve.sampling import SamplingParams
        from crosschip.tokenizer import Tokenizer

        self.params = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        self.engine = Engine(
            make_executor(bundle, on, max_batch=32, compile=compile), Tokenizer.load(bundle), max_batch=32
        )

    def run(self, prompts: list[list[int]], n: int) -> dict:
        t, cpu = time.perf_counter(), time.process_time()
        self.engine.generate(prompts, self.params(n))
        cpu = time.process_time() - cpu
        return {
            "tokens_per_s": len(prompts) * n / (time.perf_counter() - t),
            "tokens_per_cpu_s": len(prompts) * n / cpu,
        }


class Server:
    """`crosschip serve` in its own process, driven over HTTP."""

    def __init__(self, bundle: Path, threads: int, compile: bool, on: str = "torch:cpu", extra: list[str] = ()):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [
            sys.executable,
            "-m",
            "crosschip",
            "serve",
            str(bundle),
            "--port",
            "0",
            "--threads",
            str(threads),
            "--max-batch",
            "32",
            "--on",
            on,
        ]
        if compile:
            cmd.append("--compile")
        cmd += extra
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url, said = "", []
        for line in self.proc.stdout:
            said.append(line.rstrip())
            m = re.search(r"ready on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:  # the server's own last words name the cause (a missing runtime, a bad bundle)
            raise CrosschipError(f"the server did not start: {said[-1] if said else 'it printed nothing'}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = 0
        self.peak_cache = 0.0
        # One client for every metrics read: each new httpx client builds an SSL context, 39 ms
        # of CPU here, which the sampler below would take from the server 10 times a second.
        self.http = httpx.Client(timeout=60)

    def metric(self, name: str) -> float:
        m = re.search(rf"^{name} (\S+)$", self.http.get(self.url + "/metrics").text, re.M)
        return float(m.group(1)) if m else float("nan")

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(60)

    def run(self, prompts: list[list[int]], n: int, watch: bool = False) -> dict:
        """A streaming burst (TTFT, tokens/s) then a non-streaming one (tokens/s)."""
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
                self.peak_cache = max(self.peak_cache, self.metric("crosschip_cache_bytes_used"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        if watch:
            sampler.start()
        ttft, stream_tps = asyncio.run(burst(self.url, prompts, n, stream=True))
        cpu = sum(self.ps.cpu_times()[:2])
        _, tps = asyncio.run(burst(self.url, prompts, n, stream=False))
        cpu = sum(self.ps.cpu_times()[:2]) - cpu  # the server process's CPU time (user + system)
        done.set()
        if watch:
            sampler.join()
        tokens_per_cpu_s = len(prompts) * n / cpu if cpu > 0 else float("nan")
        return {
            "ttft_s": ttft,
            "stream_tokens_per_s": stream_tps,
            "tokens_per_s": tps,
            "tokens_per_cpu_s": tokens_per_cpu_s,
        }


async def one_request(http: httpx.AsyncClient, url: str, prompt: list[int], n: int, stream: bool) -> tuple[float, int]:
    """(time to the first streamed chunk or the whole response, completion tokens)."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    t = time.perf_counter()
    if not stream:
        r = await http.post(url + "/v1/completions", json=body)
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]
    ttft, tokens = None, 0
    body.update(stream=True, stream_options={"include_usage": True})
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ttft = ttft or time.perf_counter() - t
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or float("nan"), tokens


async def burst(url: str, prompts: list[list[int]], n: int, stream: bool) -> tuple[float, float]:
    """(median first-chunk time, generated tokens/s over the burst) of len(prompts) concurrent requests."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        t = time.perf_counter()
        results = await asyncio.gather(*(one_request(http, url, p, n, stream) for p in prompts))
        wall = time.perf_counter() - t
    return median([r[0] for r in results]), sum(r[1] for r in results) / wall


# --------------------------------------------------------------------------------------------
# Rooflines
# --------------------------------------------------------------------------------------------


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(32 * 2**20, dtype=torch.float32).fill_(1.0)  # 128 MiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / median(times)


def matmul_flops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 1024**3 / median(times)


def per_token_costs(preset: str, context: int) -> tuple[float, float]:
    """(bytes read per decoded token at batch 1, FLOPs per token) for fp32 weights.

    Batch 1 reads every active weight once per token (the embedding is one row), plus the
    cached latents of `context` tokens; FLOPs are 2 per active weight plus absorbed attention.
    """
    cfg = model_preset(preset)
    active = count_params(cfg).active
    cache = cfg.num_hidden_layers * context * cfg.latent_dim * 4
    attn_flops = (
        cfg.num_hidden_layers * cfg.num_attention_heads * context * 2 * (cfg.kv_lora_rank * 2 + cfg.qk_rope_head_dim)
    )
    return (active + cfg.hidden_size) * 4 + cache, 2 * active + attn_flops


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="arith-tiny")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--prompt-len", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--compile", action="store_true", help="serve with torch.compile")
    parser.add_argument(
        "--on", default="torch:cpu", help="backend of the server and offline engine (torch:cpu, ort:cpu)"
    )
    parser.add_argument("--results", type=Path, default=None, help="append dated rows to this RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(args.preset, Path(tmp), args.on)
        cfg = model_preset(args.preset)
        prompts = make_prompts(32, args.prompt_len, cfg.vocab_size)
        n, r = args.new_tokens, args.repeats
        print(
            f"{args.preset}, fp32, {args.on}, {args.threads} threads, prompt {args.prompt_len} tokens, {n} new tokens, median of {r}",
            flush=True,
        )
        server = Server(bundle, args.threads, args.compile, args.on)
        try:
            contenders = {"hf": HF(bundle), "eng": Offline(bundle, args.compile, args.on), "srv": server}
            for c in contenders.values():  # warm-up
                c.run(prompts[:2], 4)
            results: dict = {k: {c: [] for c in CONCURRENCY} for k in contenders}
            for c in CONCURRENCY:
                for _ in range(r):
                    for name, contender in contenders.items():
                        kw = {"watch": c == 32} if name == "srv" else {}
                        results[name][c].append(contender.run(prompts[:c], n, **kw))
                print(f"concurrency {c} done", flush=True)
        finally:
            server.stop()
    med = {
        k: {c: {f: median([x[f] for x in runs]) for f in runs[0]} for c, runs in v.items()} for k, v in results.items()
    }
    hf, eng, srv = med["hf"], med["eng"], med["srv"]
    srv[32]["peak_rss"], srv[32]["peak_cache_bytes"] = server.peak_rss, server.peak_cache

    bw, flops = copy_bandwidth(), matmul_flops()
    bytes_tok, flops_tok = per_token_costs(args.preset, args.prompt_len + n // 2)
    roof1, roof32 = bw / bytes_tok, flops / flops_tok

    rows = []
    print(
        f"\n{'':>4} | {'transformers tok/s':>18} | {'server tok/s':>12} | {'ratio':>6} | {'streaming':>9} | {'ratio':>6} | {'offline tok/s':>13} | {'ratio':>6} | {'TTFT hf ms':>10} | {'TTFT srv ms':>11} | {'ratio':>6}"
    )
    for c in CONCURRENCY:
        h, s, e = hf[c], srv[c], eng[c]
        row = {
            "c": c,
            "hf": h["tokens_per_s"],
            "srv": s["tokens_per_s"],
            "srv_ratio": s["tokens_per_s"] / h["tokens_per_s"],
            "stream": s["stream_tokens_per_s"],
            "stream_ratio": s["stream_tokens_per_s"] / h["tokens_per_s"],
            "eng": e["tokens_per_s"],
            "eng_ratio": e["tokens_per_s"] / h["tokens_per_s"],
            "ttft_hf": h["ttft_s"] * 1e3,
            "ttft_srv": s["ttft_s"] * 1e3,
        }
        row["ttft_ratio"] = row["ttft_hf"] / row["ttft_srv"]
        rows.append(row)
        print(
            f"{c:>4} | {row['hf']:>18.0f} | {row['srv']:>12.0f} | {row['srv_ratio']:>5.1f}x | {row['stream']:>9.0f} | {row['stream_ratio']:>5.1f}x | {row['eng']:>13.0f} | {row['eng_ratio']:>5.1f}x | {row['ttft_hf']:>10.1f} | {row['ttft_srv']:>11.1f} | {row['ttft_ratio']:>5.1f}x"
        )
    print("\n(ratio = crosschip / transformers for tokens/s; transformers / crosschip for TTFT; higher is better)")
    print("\ntokens per CPU-second (robust to other users of a shared machine):")
    for row, c in zip(rows, CONCURRENCY):
        h, s, e = hf[c]["tokens_per_cpu_s"], srv[c]["tokens_per_cpu_s"], eng[c]["tokens_per_cpu_s"]
        row.update(cpu_hf=h, cpu_srv=s, cpu_eng=e)
        print(
            f"{c:>4} | transformers {h:>7.0f} | server {s:>7.0f} ({s / h:.1f}x) | offline engine {e:>7.0f} ({e / h:.1f}x)"
        )
    frac1, frac32 = srv[1]["tokens_per_s"] / roof1, srv[32]["tokens_per_s"] / roof32
    print(
        f"roofline batch 1 : copy {bw / 1e9:.1f} GB/s / {bytes_tok / 1e6:.2f} MB per token = {roof1:.0f} tok/s; server reached {frac1:.1%}"
    )
    print(
        f"roofline batch 32: matmul {flops / 1e9:.1f} GFLOP/s / {flops_tok / 1e6:.2f} MFLOP per token = {roof32:.0f} tok/s; server reached {frac32:.1%}"
    )
    print(
        f"server at 32 concurrent: peak RSS {srv[32]['peak_rss'] / 2**20:.0f} MiB, latent cache in use up to {srv[32]['peak_cache_bytes'] / 2**10:.0f} KiB"
    )

    if args.results:
        write_results(args, rows, frac1, frac32, srv[32])


def write_results(args, rows: list[dict], frac1: float, frac32: float, s32: dict) -> None:
    path: Path = args.results
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\nDated, machine-named rows; append only. Each benchmark script prints how to rerun it.\n",
            encoding="utf-8",
        )
    from crosschip.backends import get_backend

    host = f"{get_backend('torch:cpu').device_name()}, {platform.node()}"
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = f", load average {os.getloadavg()[0]:.1f}"
    lines = [
        "",
        f"## serve_throughput — {day}, {host}, {args.preset} fp32, {args.on}, {args.threads} threads{', compile' if args.compile else ''}{load}",
        "",
        f"`.venv/bin/python benchmarks/serve_throughput.py --threads {args.threads} --on {args.on}{' --compile' if args.compile else ''}` (median of {args.repeats}, {args.new_tokens} new tokens)",
        "",
        "| concurrent | transformers tok/s | server tok/s | ratio | server streaming tok/s | ratio | offline engine tok/s | ratio | TTFT transformers ms | TTFT server ms | tok/CPU-s transformers | server | ratio | offline | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['c']} | {r['hf']:.0f} | {r['srv']:.0f} | {r['srv_ratio']:.1f}x | {r['stream']:.0f} | {r['stream_ratio']:.1f}x | {r['eng']:.0f} | {r['eng_ratio']:.1f}x | {r['ttft_hf']:.1f} | {r['ttft_srv']:.1f} | {r['cpu_hf']:.0f} | {r['cpu_srv']:.0f} | {r['cpu_srv'] / r['cpu_hf']:.1f}x | {r['cpu_eng']:.0f} | {r['cpu_eng'] / r['cpu_hf']:.1f}x |"
        )
    lines += [
        "",
        f"Roofline fraction: batch 1 {frac1:.1%} of copy bandwidth, batch 32 {frac32:.1%} of matmul FLOP/s. Server peak RSS at 32 concurrent {s32['peak_rss'] / 2**20:.0f} MiB, cache in use up to {s32['peak_cache_bytes'] / 2**10:.0f} KiB.",
        "",
    ]
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
