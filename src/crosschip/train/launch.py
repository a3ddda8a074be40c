"""The torchrun launch of `crosschip train --nproc N`, and the checks made before it.

The launching process only starts torchrun and relays what it says; the workers do the
training. This module imports no torch: the launcher answers at once, and torchrun's
workers do not wait for a second import of torch in the process that started them (1.7 s
here, before the first worker could start).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from crosschip.backends.cpu import cpu_share
from crosschip.errors import CrosschipError

# crosschip train flags handled by the launcher, with the torchrun flag each maps to.
TORCHRUN_FLAGS = {
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "rdzv_endpoint": "--rdzv-endpoint",
    "rdzv_backend": "--rdzv-backend",
    "rdzv_id": "--rdzv-id",
    "master_addr": "--master-addr",
    "master_port": "--master-port",
    "max_restarts": "--max-restarts",
}


def in_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_torchrun_env() -> None:
    """The variables torchrun gives its workers, checked before any is read: a shell or a
    container can carry some of them (LOCAL_RANK and WORLD_SIZE alone made this process wait
    for a rendezvous that env:// then refused with a traceback)."""
    numbers = ["TORCHELASTIC_RESTART_COUNT"]
    if in_torchrun():
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise CrosschipError(
                f"LOCAL_RANK and WORLD_SIZE are set in the environment, as torchrun sets them for its workers, "
                f"but {' and '.join(missing)} not: unset them to train in one process, or use --nproc N"
            )
        numbers += ["LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_WORLD_SIZE"]
    for name in numbers:
        value = os.environ.get(name)
        if value is not None and not value.strip().isdigit():
            raise CrosschipError(f"{name}={value!r} in the environment is not a whole number")


def torchrun_command(args: Any, argv: list[str]) -> list[str]:
    """The torchrun command line that runs `crosschip train ARGV` with `args.nproc` workers per node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}"]
    for name, flag in TORCHRUN_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            cmd.append(f"{flag}={value}")
    endpoint = getattr(args, "rdzv_endpoint", None)
    if getattr(args, "nnodes", None) in (None, "1", 1) and endpoint is None:
        cmd.append("--standalone")
    elif endpoint is not None and getattr(args, "rdzv_backend", None) is None:
        # torchrun's own default is the static rendezvous, where every node not given
        # --node-rank claims rank 0 and the group never forms; c10d assigns the ranks.
        cmd.append("--rdzv-backend=c10d")
    return [*cmd, "-m", "crosschip", "train", *argv]


# A worker's own one-line error (cli.py). What follows it on torchrun's stderr is the fallout:
# the other ranks' broken collectives, each a traceback, and torchrun's ChildFailedError report.
WORKER_ERROR = "crosschip train: error: "


def torchrun_log(out: str | Path) -> Path:
    """Everything torchrun and its workers wrote to stderr, appended launch after launch (one
    file per host: the run folder may be shared by every node)."""
    return Path(out) / f"torchrun.{socket.gethostname()}.log"


def launch_torchrun(args: Any, argv: list[str]) -> int:
    """Run `crosschip train ARGV` under torchrun with `args.nproc` workers per node; its exit code."""
    cmd = torchrun_command(args, argv)
    env = dict(os.environ)
    # Each worker gets its share of the cores unless the user chose.
    env.setdefault("OMP_NUM_THREADS", str(cpu_share(int(args.nproc))))
    log_path = torchrun_log(args.out)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # torchrun's stderr (its workers' too) passes through here, so that once this process is
    # interrupted, or a worker has said why it failed, what comes after is kept from the
    # terminal: torchrun answers any signal or failure with a traceback of its own, and the
    # other ranks with theirs. This process then reports it once, for them all; the log keeps it.
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        # Set by an interruption (below) or by a worker's error line (the relay); with
        # --max-restarts a worker's error ends one attempt only, and the next one's lines follow.
        quiet = threading.Event()
        final = not getattr(args, "max_restarts", None)
        relay = threading.Thread(target=_relay, args=(proc.stderr, log, quiet, final), daemon=True)
        relay.start()
        try:
            code = _wait(proc)
        except KeyboardInterrupt:
            quiet.set()
            # torchrun stops its workers on SIGTERM (a Ctrl-C in a terminal reached them already;
            # a SIGTERM sent to this process alone did not). Killing it outright would orphan them.
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            relay.join(timeout=5)
    if code != 0 and quiet.is_set():  # not interrupted (that raised): a worker said why
        print(f"crosschip train: the other processes stopped with it; torchrun's report: {log_path}", file=sys.stderr)
    return code


def _wait(proc: subprocess.Popen) -> int:
    """proc's exit code, waiting in short naps: a signal that the kernel hands to another
    thread (torch's, the relay) does not wake a main thread blocked in waitpid(), which
    would see the interruption only once torchrun had exited, after its workers' own lines
    had come through the relay (6 of 17 simulated Ctrl-Cs on this machine)."""
    while True:
        try:
            return proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass


def _relay(stream: IO[bytes], log: IO[str], quiet: threading.Event, final: bool) -> None:
    """Copy torchrun's stderr to `log` and to ours, line by line; to ours only until `quiet` is
    set, which a worker's error line does when the group is not restarted (`final`)."""
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace")
        log.write(text)
        log.flush()
        if not quiet.is_set():
            sys.stderr.write(text)
            sys.stderr.flush()
            if final and text.startswith(WORKER_ERROR):
                quiet.set()
    stream.close()


def check_batch_split(batch_size: int, world: int, grad_accum: int) -> None:
    """Every process takes the same number of rows for each of its grad_accum micro-batches."""
    if batch_size % (world * grad_accum):
        raise CrosschipError(
            f"train.batch_size {batch_size} must be divisible by processes x grad_accum ({world} x {grad_accum})"
        )
