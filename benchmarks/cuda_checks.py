"""The accelerator checks in one call: CUDA<->CPU parity, decode tokens/s, training tokens/s and MFU.

    python benchmarks/cuda_checks.py --weights DIR --out OUT [--backend torch:cuda]

Made for a short lease on a GPU machine, so every check runs as its own subprocess under a
time limit: a failure or a hang costs that check, not the others' figures. Before a lease, the
whole script runs on the CPU in two minutes to show it still works:

    python benchmarks/cuda_checks.py --weights DIR --out OUT --backend torch:cpu --preset debug \
        --decode-batches 1,2 --profile-shape 2x64 --learn-args "--steps 2" \
        --train-args "--batch 2 --seq 64 --steps 1 --repeats 1 --threads 1"
 Each check's
output goes to OUT/<check>.log and a summary table is printed last.

- parity: `crosschip verify` of a trained bundle, torch:cpu fp32 as the reference and the
  accelerator fp32 as the target (KL, top-1 agreement, greedy match, the gate's verdict).
  DIR holds the trained weights (model.safetensors, config.json, tokenizer files); a fresh
  bundle with its own manifest is written from them.
- decode: the serving engine's executor (paged latent cache, absorbed MLA, bf16) against
  transformers' `generate` on the same random small-100m bundle (`--preset`): greedy, a 32-token prompt
  plus 64 new tokens per row, batch 1, 8, 32 and 128, median of 3, prefill included for both.
- train / train-compiled: benchmarks/train_throughput.py on small-100m in bf16 (tokens/s
  against transformers and MFU against the bf16 matmul rate measured in the same run), then
  ours without `data.prefetch` (train-noprefetch), then ours with `train.compile`;
  train-compiled-b32 the same at batch 32 (more tokens per step).
- learn / learn-parity: `crosschip train` of the default recipe (configs/default.toml) on the
  accelerator, then the parity check of the weights it trained: trained on one chip, checked
  against the CPU.
- profile: host against device time of our training step and decode steps, kernel launches
  and host syncs per step, the top kernels, and peak memory against the trainer's estimate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from crosschip.config import DEFAULT_CONFIG
from crosschip.scripts import positive_int_list, run_main

HERE = Path(__file__).resolve().parent


def run_check(name: str, cmd: list[str], out: Path, timeout: float) -> tuple[str, float]:
    """Run one check as a subprocess; its stdout and stderr go to OUT/name.log."""
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    took = time.perf_counter() - t0
    print(f"== {name}: {status} in {took:.0f} s", flush=True)
    print(log.read_text()[-2500:], flush=True)
    return status, took


def parity(args: argparse.Namespace) -> None:
    from crosschip import hf

    weights = args.weights
    if (weights / "checkpoints").is_dir():  # a `crosschip train` folder: its newest checkpoint
        weights = sorted((weights / "checkpoints").glob("step_*"))[-1]
    model, tokenizer = hf.load_bundle(weights, verify_checksums=False)
    bundle = args.out / f"{args.tag}-bundle"
    hf.save_bundle(model, bundle, tokenizer=tokenizer)
    verify = [sys.executable, "-m", "crosschip", "verify", str(bundle), "--reference", "torch:cpu"]
    verify += ["--target", args.backend, "--out", str(args.out / args.tag), "--layers"]
    sys.exit(subprocess.run(verify).returncode)


def decode(args: argparse.Namespace) -> None:
    import tempfile

    import torch
    from transformers import DeepseekV3ForCausalLM

    from crosschip import hf
    from crosschip.config import model_preset
    from crosschip.model import Transformer
    from crosschip.serve.executor import Chunk, make_executor

    batches, prompt_len, steps = args.decode_batches, 32, 64
    torch.manual_seed(0)
    bundle = Path(tempfile.mkdtemp()) / "bundle"
    hf.save_bundle(Transformer(model_preset(args.preset)), bundle)
    ex = make_executor(bundle, args.backend, dtype=torch.bfloat16, max_batch=max(batches))
    device = ex.device
    theirs = DeepseekV3ForCausalLM.from_pretrained(bundle, dtype=torch.bfloat16).to(device).eval()

    def prompts(b: int) -> list[list[int]]:
        return [[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(b)]

    def ours(b: int) -> float:
        for i in range(b):
            assert ex.can_allocate(i, prompt_len + steps + 1)
        t0 = time.perf_counter()
        logits = ex.step([Chunk(i, p, 0) for i, p in enumerate(prompts(b))])
        for s in range(steps - 1):
            # One argmax over the batch, as the engine picks greedy tokens (a per-row argmax
            # timed the harness: ~B small ops a step).
            next_ids = logits.argmax(-1).tolist()
            logits = ex.step([Chunk(i, [t], prompt_len + s) for i, t in enumerate(next_ids)])
        took = time.perf_counter() - t0
        for i in range(b):
            ex.release(i)
        return b * steps / took

    @torch.inference_mode()
    def transformers_generate(b: int) -> float:
        ids = torch.tensor(prompts(b), device=device)
        ex.backend.synchronize()
        t0 = time.perf_counter()
        theirs.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        ex.backend.synchronize()
        return b * steps / (time.perf_counter() - t0)

    where = torch.cuda.get_device_name() if device.type == "cuda" else device.type
    print(f"decode on {where} ({args.preset}, bf16, {prompt_len}-token prompts, {steps} new tokens)")
    print(f"{'batch':>5} {'transformers tok/s':>19} {'crosschip tok/s':>16} {'ratio':>7}")
    for b in batches:
        ours(b), transformers_generate(b)  # warm-up
        a, t = [], []
        for _ in range(3):
            a.append(ours(b))
            t.append(transformers_generate(b))
        a_med, t_med = statistics.median(a), statistics.median(t)
        print(f"{b:>5} {t_med:>19,.0f} {a_med:>16,.0f} {a_med / t_med:>6.2f}x", flush=True)


def profile(args: argparse.Namespace) -> None:
    """Host against device time of our training step and decode steps, with the top kernels.

    On the H200 the first profile found the training step host-bound (357 ms of wall time for
    70 ms of GPU time); this check keeps that question answered in every call."""
    import tempfile

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.path.insert(0, str(HERE))
    import train_throughput as tt
    from crosschip import hf
    from crosschip.backends import get_backend
    from crosschip.config import RunConfig, model_preset
    from crosschip.model import Transformer
    from crosschip.serve.executor import Chunk, make_executor
    from crosschip.train.trainer import estimate_memory

    B, T = (int(x) for x in args.profile_shape.split("x"))
    cfg = RunConfig(model=model_preset(args.preset))
    cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_every = B, T, 0
    cfg.train.backend, cfg.train.dtype = args.backend, "bf16"
    backend = get_backend(args.backend).require()
    accelerated = backend.device_type != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if accelerated else [])

    def summary(prof, steps: int, wall_s: float, what: str, table: bool) -> None:
        events = prof.key_averages()
        # Kernel events only, as the profiler's own total counts them (an op's row repeats its kernels' time).
        device_us = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
        count = {e.key: e.count for e in events}
        launches = sum(count.get(k, 0) for k in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
        syncs = sum(count.get(k, 0) for k in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
        print(
            f"{what}: {1e3 * wall_s:.2f} ms wall a step (median), {device_us / 1e3 / steps:.2f} ms device, "
            f"{launches / steps:,.0f} kernel launches and {syncs / steps:.0f} host syncs a step",
            flush=True,
        )
        if table:
            key = "self_device_time_total" if accelerated else "self_cpu_time_total"
            print(events.table(sort_by=key, row_limit=12, max_name_column_width=70), flush=True)

    def timed(fn, n: int) -> float:
        return statistics.median(backend.call_times(fn, n))

    with tempfile.TemporaryDirectory() as tmp:
        step, trainer = tt.ours(cfg, Path(tmp) / "run")
        timed(step, 3)  # warm-up
        if accelerated:
            torch.cuda.reset_peak_memory_stats()
        wall = timed(step, 4)
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                step()
            backend.synchronize()
        print(f"training step, {args.preset} bf16 {B}x{T} on {args.backend}")
        summary(prof, 2, wall, "train", table=True)
        if accelerated:
            est = estimate_memory(cfg, 1, backend.attention_keeps_scores())["total"]
            print(
                f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; estimated {est / 2**30:.2f} GiB"
            )
        trainer.close()

    torch.manual_seed(0)
    bundle = Path(tempfile.mkdtemp()) / "bundle"
    hf.save_bundle(Transformer(model_preset(args.preset)), bundle)
    batches = args.decode_batches
    ex = make_executor(bundle, args.backend, dtype=torch.bfloat16, max_batch=max(batches))
    for b in batches:
        for i in range(b):
            assert ex.can_allocate(i, 64)
        state = {"logits": ex.step([Chunk(i, [(7 * i + j) % 1000 + 1 for j in range(16)], 0) for i in range(b)])}
        state["pos"] = 16

        def decode_step(state: dict = state) -> None:
            ids = state["logits"].argmax(-1).tolist()
            state["logits"] = ex.step([Chunk(i, [t], state["pos"]) for i, t in enumerate(ids)])
            state["pos"] += 1

        timed(decode_step, 3)
        wall = timed(decode_step, 10)
        with torch_profile(activities=activities) as prof:
            for _ in range(5):
                decode_step()
        summary(prof, 5, wall, f"decode batch {b}", table=False)
        for i in range(b):
            ex.release(i)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", nargs="?", default="all", choices=["all", "parity", "decode", "profile"])
    p.add_argument("--weights", type=Path, help="trained weights for the parity check (HF layout)")
    p.add_argument("--tag", default="parity", help="name of the parity check's output folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="torch:cuda")
    p.add_argument("--preset", default="small-100m", help="model of the decode, train and profile checks")
    p.add_argument("--decode-batches", type=positive_int_list, default="1,8,32,128")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out")
    p.add_argument("--train-args", default="--batch 16 --seq 1024 --steps 8 --repeats 3 --threads 8")
    p.add_argument("--profile-shape", default="16x1024", help="BxT of the profiled training step")
    p.add_argument("--learn-args", default="--max-minutes 1.2", help="extra `crosschip train` flags for learn")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.weights is None and (args.check == "parity" or (args.check == "all" and "parity" not in skip)):
        p.error("the parity check needs --weights DIR (or --skip parity)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.check == "parity":
        return parity(args)
    if args.check == "decode":
        return decode(args)
    if args.check == "profile":
        return profile(args)

    me = [sys.executable, str(Path(__file__).resolve())]
    batches = ",".join(map(str, args.decode_batches))
    crosschip, learned = [sys.executable, "-m", "crosschip"], args.out / "learn"
    common = ["--out", str(args.out), "--backend", args.backend]
    train = [sys.executable, str(HERE / "train_throughput.py"), "--backend", args.backend, "--dtype", "bf16"]
    train += ["--preset", args.preset, *args.train_args.split()]
    learn = [*crosschip, "train", "--config", str(DEFAULT_CONFIG), "--backend", args.backend, "--out", str(learned)]
    checks = [  # (name, command, time limit in seconds), most wanted first
        ("parity", [*me, "parity", "--weights", str(args.weights), *common], 90),
        ("decode", [*me, "decode", "--decode-batches", batches, "--preset", args.preset, *common], 100),
        ("train", train, 120),
        # The same step with the batch drawn in the step, not ahead on a thread: data.prefetch's gain.
        ("train-noprefetch", [*train, "--prefetch", "off", "--no-anchor"], 90),
        ("train-compiled", [*train, "--compile", "--no-anchor"], 130),
        ("train-compiled-b32", [*train, "--compile", "--no-anchor", "--batch", "32", "--steps", "4"], 90),
        ("learn", [*learn, *args.learn_args.split()], 100),
        ("learn-parity", [*me, "parity", "--weights", str(learned), "--tag", "learn-parity", *common], 60),
        (
            "profile",
            [*me, "profile", "--profile-shape", args.profile_shape, "--decode-batches", batches]
            + ["--preset", args.preset, *common],
            90,
        ),
    ]
    results = [(name, *run_check(name, cmd, args.out, limit)) for name, cmd, limit in checks if name not in skip]
    print("\nsummary:")
    for name, status, took in results:
        print(f"  {name:<19} {status:<24} {took:>5.0f} s")
    if any(status != "ok" for _, status, _ in results):
        sys.exit(1)  # what each check measured is in OUT; a driver must still see that one failed


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_main(main)
