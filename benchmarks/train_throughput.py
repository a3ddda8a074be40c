"""Training tokens/s: our step against transformers' DeepseekV3ForCausalLM, in one run.

Same model config, batch, sequence length and thread count. Ours is the real
`Trainer.train_step` (packed arithmetic rows, per-problem masks, AdamW, clipping, the balance
bias update); transformers' is forward with labels, backward, clipping and AdamW on the same
shape (plain causal rows of the same packed tokens). The two are timed interleaved, median of
`--repeats`. Also printed: FLOPs per token (6 x active parameters + attention) and the share
of the matmul GFLOP/s measured in the same run (the compute roofline).

    python benchmarks/train_throughput.py --threads 2 --record
    python benchmarks/train_throughput.py --backend torch:cuda --dtype bf16 --preset small-100m --batch 16 --seq 1024

On an accelerator the roofline is MFU: the same FLOPs per token against the dense matmul rate
measured in the same run, in the training dtype (bf16 8192^3 products).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from crosschip.backends import Backend
from crosschip.config import RunConfig, model_preset
from crosschip.hf import hf_config
from crosschip.model import DTYPES, count_params
from crosschip.scripts import positive_int, run_main
from crosschip.train.trainer import Trainer

RESULTS = Path(__file__).parent / "RESULTS.md"


def matmul_gflops(backend: Backend, dtype: torch.dtype, reps: int = 20) -> float:
    """Dense matmul GFLOP/s on random data: 1024^3 on CPU, 8192^3 on an accelerator."""
    n = 1024 if backend.device_type == "cpu" else 8192
    device = backend.device()
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    backend.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    backend.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def flops_per_token(cfg: RunConfig) -> float:
    """6 x active parameters + attention (QK^T and AV over the causal half of the row), fwd + bwd."""
    m = cfg.model
    active = count_params(m).active
    attn = 6 * m.num_hidden_layers * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * cfg.train.seq_len / 2
    return 6 * active + attn


def ours(cfg: RunConfig, out: Path):
    trainer = Trainer(cfg, out, verbose=False)
    trainer.total_steps = 10**9
    state = {"step": 0}

    def step() -> int:
        state["step"] += 1
        r = trainer.train_step(state["step"])
        return r["tokens"]

    return step, trainer


def theirs(cfg: RunConfig, trainer: Trainer):
    """transformers' model of the same shape, with the trainer's precision recipe (autocast over
    fp32 master weights, fused AdamW on an accelerator)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf = DeepseekV3Config(**{k: v for k, v in hf_config(cfg.model).items() if k not in ("architectures", "model_type")})
    device = trainer.device
    model = DeepseekV3ForCausalLM(hf).to(device).train()
    fused = device.type != "cpu"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=not fused, fused=fused)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    dtype = DTYPES.get(trainer.dtype, torch.float32)

    def step() -> int:
        _, batch = trainer.stream.next()
        ids = batch.input_ids.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return B * T

    return step


def timed(step, n: int, backend: Backend) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process); the second is steadier
    on a shared machine, where other work takes turns on the cores."""
    backend.synchronize()
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(n):
        tokens += step()
    backend.synchronize()
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="arith-tiny")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--seq", type=positive_int, default=128)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--backend", default="torch:cpu", help="training backend (torch:cpu, torch:cuda, ...)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="train.dtype")
    p.add_argument("--no-anchor", action="store_true", help="time ours only (no transformers model)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument(
        "--compile", action="store_true", help="train.compile: torch.compile our attention, RMSNorm and SwiGLU regions"
    )
    p.add_argument(
        "--activation-checkpoint",
        default="none",
        choices=["none", "full"],
        help="train.activation_checkpoint (ours only: transformers keeps every activation)",
    )
    p.add_argument(
        "--prefetch", default="auto", choices=["auto", "on", "off"], help="data.prefetch (auto: on accelerators)"
    )
    p.add_argument("--record", action="store_true", help="append a dated row to benchmarks/RESULTS.md")
    p.add_argument("--machine", default=None, help="machine named in the recorded row (default: the backend's device)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = RunConfig(model=model_preset(args.preset))
    cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_every = args.batch, args.seq, 0
    cfg.train.compile = args.compile
    cfg.train.activation_checkpoint = args.activation_checkpoint
    cfg.data.prefetch = {"auto": "auto", "on": True, "off": False}[args.prefetch]
    cfg.train.backend, cfg.train.dtype = args.backend, args.dtype
    with tempfile.TemporaryDirectory() as tmp:
        ours_step, trainer = ours(cfg, Path(tmp) / "run")
        backend, dtype = trainer.backend, DTYPES.get(trainer.dtype, torch.float32)
        steps = [ours_step] if args.no_anchor else [ours_step, theirs(cfg, trainer)]
        for step in steps:  # warm-up (and compile)
            timed(step, 2, backend)
        a, b, g = [], [], []
        for _ in range(args.repeats):
            a.append(timed(ours_step, args.steps, backend))
            if not args.no_anchor:
                b.append(timed(steps[1], args.steps, backend))
            g.append(matmul_gflops(backend, dtype))
        trainer.close()
    b = b or [(float("nan"), float("nan"))]

    tps_ours, tps_theirs = (statistics.median(x[0] for x in a), statistics.median(x[0] for x in b))
    cpu_ours, cpu_theirs = (statistics.median(x[1] for x in a), statistics.median(x[1] for x in b))
    gflops = statistics.median(g)
    fpt = flops_per_token(cfg)
    roof_ours = fpt * tps_ours / (gflops * 1e9)
    roof_theirs = fpt * tps_theirs / (gflops * 1e9)
    ratio = tps_ours / tps_theirs
    print(
        f"config: {args.preset}, batch {args.batch} x seq {args.seq}, {args.backend} {trainer.dtype}, "
        f"{args.threads} threads, median of {args.repeats}{_flags(args)}"
    )
    print(
        f"FLOPs/token (6 x active + attention): {fpt / 1e6:.1f} MFLOP; "
        f"{trainer.dtype} matmul {gflops:.1f} GFLOP/s measured on {backend.device_type}"
    )
    print(f"{'':14}{'tokens/s':>10}{'roofline':>10}{'tok/CPU-s':>11}")
    print(f"{'crosschip':14}{tps_ours:>10,.0f}{roof_ours:>10.1%}{cpu_ours:>11,.0f}")
    if not args.no_anchor:
        print(f"{'transformers':14}{tps_theirs:>10,.0f}{roof_theirs:>10.1%}{cpu_theirs:>11,.0f}")
        print(f"ratio crosschip / transformers: {ratio:.2f}x wall, {cpu_ours / cpu_theirs:.2f}x per CPU-second")
    if args.record:
        args.machine = args.machine or backend.device_name()
        record(args, trainer.dtype, tps_ours, tps_theirs, ratio, roof_ours, gflops, cpu_ours / cpu_theirs)


def _flags(args: argparse.Namespace) -> str:
    """The run's options that change our step, as the printed config and the row name them."""
    flags = ["compiled"] * args.compile + ["full activation checkpointing"] * (args.activation_checkpoint == "full")
    return "".join(", " + f for f in flags)


def record(
    args, dtype: str, tps_ours: float, tps_theirs: float, ratio: float, roof: float, gflops: float, cpu_ratio: float
) -> None:
    date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nDated rows; rerun the script named in each table to reproduce.\n")
    text = RESULTS.read_text()
    header = "## train_throughput.py"
    if header not in text:
        text += (
            f"\n{header}\n\n`python benchmarks/train_throughput.py --threads 2 --record` (median of repeats, interleaved)\n\n"
            "| date | machine | config | crosschip tok/s | transformers tok/s | ratio | ratio per CPU-s | roofline | matmul GFLOP/s |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
        )
    row = (
        f"| {date} | {args.machine} | {args.preset} B{args.batch}xT{args.seq}, {dtype}, {args.threads} threads"
        f"{_flags(args)} | {tps_ours:,.0f} | {tps_theirs:,.0f} | {ratio:.2f}x | {cpu_ratio:.2f}x "
        f"| {roof:.0%} | {gflops:.0f} |\n"
    )
    lines = text.rstrip("\n").split("\n")
    # insert the row at the end of this script's table (other sections may follow it)
    at = next(i for i in range(lines.index(header), len(lines)) if lines[i].startswith("|"))
    while at + 1 < len(lines) and lines[at + 1].startswith("|"):
        at += 1
    lines.insert(at + 1, row.rstrip("\n"))
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    run_main(main)
