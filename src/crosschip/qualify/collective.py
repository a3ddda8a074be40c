"""Collective throughput: can this backend train on more than one device?

Two processes (one device each) start a process group on the backend's collective library
and time, against the compute of one training step of the `debug` model measured in the
same processes:
- latency: all-reduce of one value; bandwidth: all-reduce of 4 MiB;
- one data-parallel step's communication in the FSDP pattern: per unit (embedding, each
  block, the head) a gather for the forward, a gather for the backward and a reduce of the
  gradients. It is predicted as `n * latency + bytes / bandwidth` from the best of several
  reps of each (load from other work on a shared machine only ever adds time), which a
  burst of load moves far less than a direct timing of the pattern. Compute is timed the
  same way, so the ratio compares like with like.
An emulated slow interconnect pays its `emulated_collective_delay_s` after every collective,
as the trainer does. The check passes when a step's communication takes at most
`MAX_COMM_TO_COMPUTE` of its compute.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MAX_COMM_TO_COMPUTE = 0.5
"""Communication per step / compute per step above this fails: 2-way data parallelism would
then run at under 2/3 of its ideal speed even before any overlap is lost."""
COLLECTIVES_PER_UNIT = 3
STEP_BATCH = (8, 128)
"""(B, T) of the compute step the communication is compared with: 1k tokens per device."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _best_time(fn, backend, reps: int) -> float:
    """Fastest of `reps` timed calls after a warm-up."""
    fn()
    return min(backend.call_times(fn, reps))


def bench_rank(spec: str, rank: int, world: int, port: int) -> dict[str, Any]:
    """One rank of the benchmark; every rank measures, rank 0's numbers are reported."""
    import torch
    import torch.distributed as dist

    from crosschip.backends import get_backend
    from crosschip.backends.cpu import cpu_share
    from crosschip.config import model_preset
    from crosschip.model import Transformer

    backend = get_backend(spec).require()
    if backend.device_type != "cpu":
        backend.set_device(rank)
    torch.set_num_threads(cpu_share(world) if backend.device_type == "cpu" else 1)
    device = backend.device(rank)
    delay = backend.emulated_collective_delay_s
    dist.init_process_group(backend.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:

        def all_reduce(t):
            dist.all_reduce(t)
            time.sleep(delay)  # the emulated interconnect's extra cost per collective

        torch.manual_seed(0)
        model = Transformer(model_preset("debug")).to(device)
        units = [model.embed, *model.layers, model.head]
        unit_bytes = [sum(p.numel() * p.element_size() for p in u.parameters()) for u in units]
        tokens = torch.randint(0, model.cfg.vocab_size, STEP_BATCH, device=device)

        def compute():
            model.zero_grad(set_to_none=True)
            model(tokens).float().logsumexp(-1).mean().backward()

        small, big = torch.ones(1, device=device), torch.ones(2**20, device=device)
        latency = _best_time(lambda: all_reduce(small), backend, 10)
        seconds_big = _best_time(lambda: all_reduce(big), backend, 5)
        dist.barrier()
        compute_s = _best_time(compute, backend, 3)
        dist.barrier()
        # A ring all-reduce moves 2 (n-1)/n of the buffer per rank ("bus bandwidth").
        bus_gbps = 2 * (world - 1) / world * big.numel() * 4 / max(seconds_big - latency, 1e-9) / 1e9
        n_coll, step_bytes = COLLECTIVES_PER_UNIT * len(units), COLLECTIVES_PER_UNIT * sum(unit_bytes)
        comm = n_coll * latency + 2 * (world - 1) / world * step_bytes / (bus_gbps * 1e9)
        return {
            "world": world,
            "dist_backend": backend.dist_backend,
            "emulated_delay_s": delay,
            "latency_s": latency,
            "bus_bandwidth_gbps": bus_gbps,
            "collectives_per_step": n_coll,
            "bytes_per_step": step_bytes,
            "step_tokens": STEP_BATCH[0] * STEP_BATCH[1],
            "comm_per_step_s": comm,
            "compute_per_step_s": compute_s,
            "comm_to_compute": comm / compute_s,
            "pid": os.getpid(),
        }
    finally:
        dist.barrier()  # without it, gloo can abort at exit (DESIGN: FSDP2 on CPU)
        dist.destroy_process_group()


def measure_collectives(spec: str, workdir: Path, world: int = 2, timeout_s: float = 120.0) -> dict[str, Any]:
    """Run the benchmark on `world` processes and judge it; never raises for a failing backend."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    out = workdir / "collective.json"
    out.unlink(missing_ok=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "crosschip.qualify.collective", "--backend", spec, "--rank", str(r),
             "--world", str(world), "--port", str(port), "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]  # fmt: skip
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return {"ok": False, "why": f"collective benchmark timed out after {timeout_s:.0f} s"}
    if any(p.returncode for p in procs) or not out.is_file():
        tail = next((log.strip().splitlines()[-1] for log in logs if log.strip()), "no output")
        return {"ok": False, "why": f"collective benchmark failed: {tail}"}
    result = json.loads(out.read_text(encoding="utf-8"))
    ratio = result["comm_to_compute"]
    ok = ratio <= MAX_COMM_TO_COMPUTE
    result.update(
        ok=ok,
        threshold=MAX_COMM_TO_COMPUTE,
        why=(
            f"{world}-process {result['dist_backend']}: a step's communication "
            f"({result['collectives_per_step']} collectives at {result['latency_s'] * 1e3:.2f} ms latency, "
            f"{result['bus_bandwidth_gbps']:.2f} GB/s: {result['comm_per_step_s'] * 1e3:.1f} ms) is "
            f"{ratio:.2f}x its compute ({result['compute_per_step_s'] * 1e3:.1f} ms); limit {MAX_COMM_TO_COMPUTE}x"
        ),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of the collective benchmark (run by crosschip qualify)")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = bench_rank(args.backend, args.rank, args.world, args.port)
    if args.rank == 0:
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
