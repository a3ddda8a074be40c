"""One decode step of two ONNX graphs with the same contract, A against B, in one process.

For a change to the exported graphs (`handoff.onnx_export`): export the bundle before and
after, then

    python benchmarks/graph_ab.py OLD/model.decode.onnx NEW/model.decode.onnx --batches 1,8
    python benchmarks/graph_ab.py OLD/model.onnx NEW/model.onnx --batches 8,32 --record

Two effects make the obvious loop (new inputs; run A, run B on them; repeat) lie, and this
script controls both:

- **Order.** The session created last runs faster. Measured on arith-tiny, CPU, 1 thread,
  with one graph loaded twice: the session created second was 1-9% faster, whichever of
  the two ran first on an input; of four sessions created in a row, the last was 3-11%
  faster than the other three. (Why is not measured; my guess is where each session's
  weights land in memory.) Here the steps are split over two rounds with fresh sessions,
  created A then B, then B then A, and within a round A and B take turns on inputs of
  their own (A B A B ...).
- **Routing.** With the same input ids every step, a token picks the same experts every
  step and their weights stay in the caches: batch 1 then measured 0.55 ms where a real
  decode (new tokens, new experts) took 1.0-1.3 ms. Every run here draws new ids.

The ratio printed is B's median over A's (below 1: B is faster). Each graph gets its own
session with the serving options (`session_options`) and `--threads` intra-op threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from crosschip.scripts import positive_int, positive_int_list, run_main

RESULTS = Path(__file__).parent / "RESULTS.md"


def graph_config(path: Path) -> dict:
    """The model widths the graph's inputs need, from the bundle's config.json next to it."""
    from crosschip import hf

    config = path.parent / hf.CONFIG_FILE
    if not config.is_file():
        raise SystemExit(f"{path}: no {hf.CONFIG_FILE} next to the graph (pass a graph inside an exported bundle)")
    cfg = hf.model_config_from_hf(json.loads(config.read_text(encoding="utf-8")))
    return {
        "layers": cfg.num_hidden_layers,
        "kv_lora_rank": cfg.kv_lora_rank,
        "rope": cfg.qk_rope_head_dim,
        "vocab": cfg.vocab_size,
    }


def step_times(paths: list[Path], batch: int, past: int, steps: int, threads: int, seed: int = 0) -> list[list[float]]:
    """Seconds of each timed step of graph 0 and graph 1, created in this order (they take turns)."""
    from crosschip.serve.ort_executor import load_session

    dims = graph_config(paths[0])
    if graph_config(paths[1]) != dims:
        raise SystemExit("the two graphs come from models of different widths")
    sessions = [load_session(p, None, threads) for p in paths]
    rng = np.random.default_rng(seed)
    L, C, R = dims["layers"], dims["kv_lora_rank"], dims["rope"]
    slots = batch * (past + 1) + 1
    fixed = {
        "positions": np.full((batch, 1), past, np.int64),
        "past_c_kv": rng.standard_normal((L, slots, C), dtype=np.float32),
        "past_k_pe": rng.standard_normal((L, slots, R), dtype=np.float32),
        "past_slots": np.arange(batch * past, dtype=np.int64).reshape(batch, past),
        "attention_mask": np.ones((batch, 1, past + 1), bool),
    }
    times: list[list[float]] = [[] for _ in paths]
    warmup = 10
    for i in range(warmup + steps):
        for g, session in enumerate(sessions):
            # New ids every run (ids below 16 are the tokenizer's specials): new experts every run.
            feeds = {**fixed, "input_ids": rng.integers(16, dims["vocab"], (batch, 1), dtype=np.int64)}
            start = time.perf_counter()
            session.run(None, feeds)
            if i >= warmup:
                times[g].append(time.perf_counter() - start)
    return times


def ab_times(a: Path, b: Path, batch: int, past: int, steps: int, threads: int) -> tuple[list[float], list[float]]:
    """A's and B's step times over two rounds: sessions created A then B, then B then A."""
    a1, b1 = step_times([a, b], batch, past, steps // 2, threads, seed=0)
    b2, a2 = step_times([b, a], batch, past, steps - steps // 2, threads, seed=1)
    return a1 + a2, b1 + b2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="graph A (the baseline), inside an exported bundle")
    ap.add_argument("b", type=Path, help="graph B (the change)")
    ap.add_argument("--batches", type=positive_int_list, default="1,8,32", help="decode rows per step")
    ap.add_argument("--past", type=positive_int, default=64, help="cached tokens per row")
    ap.add_argument("--steps", type=positive_int, default=200, help="timed steps per graph and batch")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--record", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="", help="a line saying what B changes, for the record")
    args = ap.parse_args()
    for p in (args.a, args.b):
        if not p.is_file():
            raise SystemExit(f"{p}: no such graph")

    rows = []
    for batch in args.batches:
        times = ab_times(args.a, args.b, batch, args.past, args.steps, args.threads)
        med = [statistics.median(t) * 1e3 for t in times]
        rows.append({"batch": batch, "a": med[0], "b": med[1], "ratio": med[1] / med[0]})

    print(f"A: {args.a}\nB: {args.b}")
    print(
        f"{args.threads} thread(s), {args.past} cached tokens per row, median of {args.steps} steps each, new ids per step"
    )
    print(f"{'batch':>5} {'A ms':>8} {'B ms':>8} {'B / A':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['a']:>8.3f} {r['b']:>8.3f} {r['ratio']:>6.3f}x")
    if args.record:
        record(args, rows)


def record(args, rows: list[dict]) -> None:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## graph_ab — {when}, {os.cpu_count()}-core CPU ({platform.node()}), load avg {os.getloadavg()[0]:.1f},"
        f" {args.threads} thread(s)\n",
        f"`python benchmarks/graph_ab.py A B --batches {args.batches} --past {args.past} --steps {args.steps}"
        f" --threads {args.threads}` (A and B take turns, new ids every run)\n",
        f"A: `{args.a}`, B: `{args.b}`. {args.note}\n",
        "| batch | A ms | B ms | B / A |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['a']:.3f} | {r['b']:.3f} | {r['ratio']:.3f}x |")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    run_main(main)
