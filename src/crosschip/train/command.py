"""`crosschip train`: the CLI entry point (thin: the work is in trainer.Trainer)."""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from pathlib import Path

from crosschip.config import DEFAULT_CONFIG, RunConfig, load_config
from crosschip.errors import CrosschipError
from crosschip.paths import check_output_dir, path_arg, refuse_empty

EPILOG_EXTRA = """
faults (for tests and demos), repeatable:
  --inject nan@step=40 | nan@p=0.05 | spike@step=K | hang@step=30 | slow@p=0.1
  --inject crash@step=25 | crash@save=2     (append ,times=N to repeat a step fault)

several processes (torchrun underneath):
  crosschip train --config configs/default.toml --out runs/t --nproc 2
  multi-node, on every node:
  crosschip train ... --nproc 8 --nnodes 2 --rdzv-endpoint HOST:29500 --rdzv-id job1

exit codes: 0 done, 1 user error, 3 the health guard gave up (fail over), 130 / 143 interrupted (Ctrl-C / SIGTERM)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (parser.epilog or "") + "\n" + EPILOG_EXTRA
    parser.add_argument(
        "--config", type=path_arg, help="run config TOML (default: the default run's, configs/default.toml)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=path_arg,
        help="run folder: metrics.jsonl, checkpoints/, loss.png, train_summary.json",
    )
    parser.add_argument(
        "--backend", help="backend spec, overrides train.backend (e.g. torch:cpu, torch:cuda, torch:npu)"
    )
    parser.add_argument("--steps", type=int, help="total optimizer steps, overrides train.steps")
    parser.add_argument(
        "--max-minutes", type=float, help="stop after this much training time, overrides train.max_minutes"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest verified checkpoint in --out")
    parser.add_argument("--inject", action="append", default=[], metavar="SPEC", help="plant a fault (see below)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    dist = parser.add_argument_group("several processes (passed to torchrun)")
    dist.add_argument("--nproc", type=int, default=1, help="processes per node (one device each)")
    dist.add_argument("--nnodes", help="nodes, or MIN:MAX for elastic")
    dist.add_argument("--node-rank", type=int, help="this node's rank (static rendezvous)")
    dist.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous")
    dist.add_argument("--rdzv-backend", help="rendezvous backend (default with --rdzv-endpoint: c10d)")
    dist.add_argument("--rdzv-id", help="job id shared by every node")
    dist.add_argument("--master-addr", help="static rendezvous address (with --node-rank)")
    dist.add_argument("--master-port", type=int, help="static rendezvous port")
    dist.add_argument("--max-restarts", type=int, help="torchrun restarts of a failed worker group")


def _config(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config or DEFAULT_CONFIG)
    if args.backend is not None:
        refuse_empty(args.backend, "--backend", "name one, e.g. --backend torch:cpu")
        cfg.train.backend = args.backend
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.max_minutes is not None:
        cfg.train.max_minutes = args.max_minutes
    return cfg


def _worker_argv(argv: list[str]) -> list[str]:
    """The user's arguments minus the launcher's own (torchrun gets those)."""
    launcher = {"--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-backend", "--rdzv-id"}
    launcher |= {"--master-addr", "--master-port", "--max-restarts"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in launcher:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _gave_up(out: str) -> int:
    """3 when the workers' health guard gave up (torchrun itself only reports a failure)."""
    import json

    path = Path(out) / "train_summary.json"
    try:
        return 3 if json.loads(path.read_text(encoding="utf-8")).get("status") == "gave_up" else 0
    except (OSError, ValueError):
        return 0


def _give_up_in_group(error: Exception) -> int:
    """A torchrun worker whose health guard gave up says so (rank 0) and exits 0: a failed
    worker would have torchrun restart the group (--max-restarts), only to give up again. The
    launcher reads the verdict from train_summary.json (`_gave_up`) and exits 3."""
    if os.environ.get("RANK", "0") == "0":
        print(f"crosschip train: error: {error}", file=sys.stderr, flush=True)
    return 0


def _report_saved(args: argparse.Namespace) -> None:
    """The workers' "saved step N before stopping" line, from their log: torchrun's stderr,
    which carried it, is dropped once the launcher is interrupted."""
    from crosschip.train.metrics import read_metrics, saved_note

    path = Path(args.out) / "metrics.jsonl"
    last = read_metrics(path)[-1:] if path.exists() else []
    if last and last[0]["event"] == "stopped" and last[0].get("checkpoint") and not args.quiet:
        print(f"crosschip train: {saved_note(last[0]['step'], last[0]['checkpoint'])}", file=sys.stderr)


def check_launcher(args: argparse.Namespace) -> None:
    """The launcher's numbers, checked here: torchrun answers them with an AssertionError
    traceback, or (a port out of range) by waiting for a rendezvous that cannot happen."""

    def refuse(flag: str, rule: str, value) -> None:
        raise CrosschipError(f"{flag} {rule}, got {value}")

    if args.nproc < 1:
        refuse("--nproc", "must be >= 1", args.nproc)
    max_nodes = None
    if args.nnodes is not None:
        bounds = args.nnodes.split(":")
        try:
            lo, hi = int(bounds[0]), int(bounds[-1])
        except ValueError:
            lo = hi = 0
        if len(bounds) > 2 or not 1 <= lo <= hi:
            refuse("--nnodes", "must be N or MIN:MAX with 1 <= MIN <= MAX", repr(args.nnodes))
        max_nodes = hi
    if args.node_rank is not None and not 0 <= args.node_rank < (max_nodes or 1):
        refuse("--node-rank", f"must be between 0 and --nnodes - 1 ({(max_nodes or 1) - 1})", args.node_rank)
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        refuse("--master-port", "must be between 1 and 65535", args.master_port)
    if args.max_restarts is not None and args.max_restarts < 0:
        refuse("--max-restarts", "must be >= 0", args.max_restarts)


def run(args: argparse.Namespace) -> int:
    from crosschip.backends import get_backend
    from crosschip.train import launch
    from crosschip.train.faults import check_faults
    from crosschip.train.health import HealthGaveUp

    cfg = _config(args)
    # A resumed run's saves are counted from its log: the trainer checks its save faults.
    ckpt_every = None if args.resume else cfg.train.ckpt_every
    check_faults(args.inject, cfg.train.steps, "--steps" if args.steps is not None else "train.steps", ckpt_every)
    check_launcher(args)
    check_output_dir(args.out, "--out")
    if args.resume and not Path(args.out).is_dir():  # refused before anything is made there
        raise CrosschipError(f"--resume: {args.out} does not exist; there is no run to continue")
    if (args.nproc > 1 or args.nnodes) and not launch.in_torchrun():
        # Fail here, once, rather than in every worker (and then in torchrun's traceback).
        get_backend(cfg.train.backend, to_train=True).require()
        nodes = (args.nnodes or "1").split(":")
        if len(set(nodes)) == 1:  # a fixed world size (an elastic one is known at the rendezvous)
            launch.check_batch_split(cfg.train.batch_size, args.nproc * int(nodes[0]), cfg.train.grad_accum)
        argv = sys.argv[sys.argv.index("train") + 1 :] if "train" in sys.argv else []
        try:
            code = launch.launch_torchrun(args, _worker_argv(argv))
        except KeyboardInterrupt:
            _report_saved(args)
            raise
        return _gave_up(args.out) or code
    # A training process killed by a fatal signal (a segfault in a kernel or a collective) prints
    # its Python stack first: torchrun's report of such a worker says only "Signal 11". To the
    # process's own stderr: sys.stderr may be a caller's capture, with no file descriptor.
    if sys.__stderr__ is not None:
        faulthandler.enable(file=sys.__stderr__)
    # A worker group restarted by torchrun (--max-restarts) continues from the last checkpoint.
    launch.check_torchrun_env()
    # The launcher stops above: it imports no torch (the workers start sooner).
    from crosschip.train.trainer import Trainer

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        trainer = Trainer(cfg, args.out, resume=args.resume or restarted, inject=args.inject, verbose=not args.quiet)
    except HealthGaveUp as e:  # a resume that carries a hang past the cap (Trainer._carry_over_hangs)
        if launch.in_torchrun():
            return _give_up_in_group(e)
        raise
    ok = False
    try:
        summary = trainer.fit()
        ok = True
    except HealthGaveUp as e:
        ok = True  # every process reached the same verdict: end the group cleanly
        if launch.in_torchrun():
            return _give_up_in_group(e)
        raise
    except KeyboardInterrupt:
        ok = trainer.stopped  # all processes stopped after the same step, and saved it
        raise
    finally:
        trainer.close(ok)
    if not args.quiet and trainer.dist.is_main:
        acc = summary.get("accuracy")
        extra = f", held-out accuracy {acc:.1%}" if acc is not None else ""
        print(f"done: step {summary['step']}, loss {summary['final_loss']:.4f}{extra}; {args.out}/train_summary.json")
    return 0
