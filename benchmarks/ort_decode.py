"""Decode tokens/s: ONNX Runtime executor vs the torch executor, same bundle, same threads.

The ORT executor runs twice: as served (the small-batch `model.decode.onnx` for decode
batches of a few rows) and with only the general `model.onnx`, so the decode graph's gain is
measured in the same run.

    python benchmarks/ort_decode.py [--bundle DIR] [--preset arith-tiny] [--threads 2] [--steps 64] [--record]

Without --bundle, a random-weight model of --preset is exported (fp32, ort:cpu) to a temp
folder. Both executors run the same greedy loop (prefill 32 tokens, then --steps decode steps)
at batch 1 and 8; the median of --repeats runs is reported with the ratio ORT / torch.
Appends a dated section to benchmarks/RESULTS.md.

On a shared 2-core machine prefer --threads 1: with 2 threads and other load, torch's
OpenMP pool makes each tiny matmul of the absorbed attention take ~10 ms (thread wake-ups),
which measures the machine's load, not the executors.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from crosschip.scripts import positive_int, positive_int_list, run_main


def decode_tokens_per_s(executor, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    """(decoded tokens per wall second, per CPU-second of this process)."""
    from crosschip.serve.executor import Chunk

    for i in range(batch):
        assert executor.can_allocate(i, prompt_len + steps + 1)
    prompts = [[(7 * i + j) % 100 + 1 for j in range(prompt_len)] for i in range(batch)]
    logits = executor.step([Chunk(i, p, 0) for i, p in enumerate(prompts)])
    start, cpu = time.perf_counter(), time.process_time()
    for s in range(steps):
        logits = executor.step([Chunk(i, [int(row.argmax())], prompt_len + s) for i, row in enumerate(logits)])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    for i in range(batch):
        executor.release(i)
    return batch * steps / elapsed, batch * steps / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="an fp32 bundle with model.onnx (default: export a random --preset)")
    ap.add_argument("--preset", default="arith-tiny")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--steps", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--batches", type=positive_int_list, default="1,8")
    ap.add_argument("--record", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()

    from crosschip import hf
    from crosschip.backends import get_backend
    from crosschip.config import model_preset
    from crosschip.handoff.export import export_bundle
    from crosschip.model import Transformer
    from crosschip.serve.executor import TorchExecutor
    from crosschip.serve.ort_executor import OrtExecutor
    from crosschip.tokenizer import default_tokenizer

    torch.set_num_threads(args.threads)
    bundle = args.bundle
    if bundle is None:
        tmp = Path(tempfile.mkdtemp(prefix="ort_decode_"))
        torch.manual_seed(0)
        model = Transformer(model_preset(args.preset))
        hf.save_bundle(model, tmp / "src", tokenizer=default_tokenizer(model.cfg.vocab_size))  # export needs one
        bundle = tmp / "bundle"
        print(f"exporting a random {args.preset} to {bundle} ...", file=sys.stderr)
        export_bundle(tmp / "src", bundle, target="ort:cpu", policy="fp32", progress=False)
    model, _ = hf.load_bundle(bundle)
    batches = args.batches
    max_batch = max(batches)
    torch_ex = TorchExecutor(model, get_backend("torch:cpu"), max_batch=max_batch)
    ort_ex = OrtExecutor(bundle, get_backend("ort:cpu"), max_batch=max_batch, threads=args.threads)
    general_ex = OrtExecutor(bundle, get_backend("ort:cpu"), max_batch=max_batch, threads=args.threads)
    general_ex.decode_session = None  # model.onnx for every step

    rows = []
    names = ("torch", "general", "ort")
    print(
        f"{'batch':>5} | tok/s: {'torch':>7} {'ort general':>11} {'ort':>7} | tok/CPU-s: {'torch':>7} {'ort general':>11} {'ort':>7}"
    )
    for batch in batches:
        runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for ex in (torch_ex, general_ex, ort_ex):
            decode_tokens_per_s(ex, batch, 32, 8)  # warm-up
        for _ in range(args.repeats):  # interleaved, so load from other users hits all three alike
            for name, ex in zip(names, (torch_ex, general_ex, ort_ex)):
                runs[name].append(decode_tokens_per_s(ex, batch, 32, args.steps))
        wall = [statistics.median(r[0] for r in runs[n]) for n in names]
        cpu = [statistics.median(r[1] for r in runs[n]) for n in names]
        rows.append((batch, *wall, *cpu))
        print(
            f"{batch:>5} | {'':>6} {wall[0]:>7.0f} {wall[1]:>11.0f} {wall[2]:>7.0f} | {'':>10} {cpu[0]:>7.0f} {cpu[1]:>11.0f} {cpu[2]:>7.0f}"
        )

    if args.record:  # as the other scripts: a run from a checkout leaves it as it was
        record(rows, args)


def record(rows, args) -> None:
    """Append a self-contained, dated section to benchmarks/RESULTS.md."""
    import os

    path = Path(__file__).with_name("RESULTS.md")
    if not path.exists():
        path.write_text("# Benchmark results\n\nDated, machine-named rows; append only.\n", encoding="utf-8")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    what = args.bundle or f"random {args.preset}"
    lines = [
        "",
        f"## ort_decode — {now}, {os.cpu_count()}-core CPU ({platform.node()}), load avg {load:.1f}, {what} fp32, {args.threads} threads",
        "",
        f"`.venv/bin/python benchmarks/ort_decode.py --threads {args.threads}` (greedy decode, {args.steps} steps after a"
        f" 32-token prefill, median of {args.repeats}, interleaved; OrtExecutor vs TorchExecutor on the same bundle;"
        " 'model.onnx only' = OrtExecutor without the small-batch decode graph)",
        "",
        "| batch | torch tok/s | ort tok/s, model.onnx only | ort tok/s | ort / torch | torch tok/CPU-s | ort model.onnx only | ort | ort / torch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {b} | {t:.0f} | {g:.0f} | {o:.0f} | {o / t:.2f}x | {ct:.0f} | {cg:.0f} | {co:.0f} | {co / ct:.2f}x |"
            for b, t, g, o, ct, cg, co in rows
        ),
        "",
    ]
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
