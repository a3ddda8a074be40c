"""Shared helpers of the training tests: run `crosschip train` for real and read its outputs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from light import cli_light

DEBUG_TOML = """
[model]
preset = "debug"

[data]
digits = 2
heldout_size = 20
prefetch = {prefetch}

[train]
steps = {steps}
batch_size = 8
seq_len = 64
warmup_steps = 3
ckpt_every = {ckpt_every}
eval_every = 0
hang_timeout_s = {hang_timeout_s}
max_rollbacks = {max_rollbacks}
"""


def write_config(
    folder: Path,
    steps: int = 12,
    ckpt_every: int = 4,
    hang_timeout_s: float = 60.0,
    max_rollbacks: int = 3,
    prefetch: bool = False,
) -> Path:
    path = folder / "debug.toml"
    path.write_text(
        DEBUG_TOML.format(
            steps=steps,
            ckpt_every=ckpt_every,
            hang_timeout_s=hang_timeout_s,
            max_rollbacks=max_rollbacks,
            prefetch=str(prefetch).lower(),
        )
    )
    return path


def _train_command(config: Path, out: Path, *args: str, **env: str) -> tuple[list[str], dict[str, str]]:
    """`crosschip train` and its environment: one thread (the CI box has two cores), plus `env`."""
    cmd = [sys.executable, "-m", "crosschip", "train", "--config", str(config), "--out", str(out), *args]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", **env}


def train(
    config: Path, out: Path, *args: str, timeout: float = 300, file_size_limit: int | None = None
) -> subprocess.CompletedProcess:
    """`crosschip train --quiet` in a fresh process, to its end; with `file_size_limit`, one
    that cannot write a file past that many bytes (RLIMIT_FSIZE: a write fails with EFBIG,
    as one on a full disk fails with ENOSPC)."""
    cmd, env = _train_command(config, out, "--quiet", *args)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    preexec = limit if file_size_limit is not None else None
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


def train_reporting_imports(
    config: Path, out: Path, *args: str, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`train(...)`, and the runtimes the `crosschip train` process itself imported."""
    cmd, env = _train_command(config, out, "--quiet", *args)
    return cli_light(*cmd[3:], env=env, timeout=timeout)  # cmd[3:]: from "train" on


def start_train(config: Path, out: Path, *args: str, new_session: bool = False, **env: str) -> subprocess.Popen:
    """`crosschip train` started in a fresh process (not quiet), its output piped, for a test to
    signal; with `new_session`, in a process group of its own, as a terminal's job is."""
    cmd, env = _train_command(config, out, *args, **env)
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=new_session
    )


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def events(out: Path, name: str) -> list[dict]:
    return [r for r in records(out) if isinstance(r, dict) and r.get("event") == name]


def losses(out: Path) -> dict[int, float]:
    """Loss of every completed step; a step redone after a rollback or resume keeps its last value."""
    return {r["step"]: r["loss"] for r in events(out, "step")}


def processes_tagged(name: str, tag: str) -> list[str]:
    """Command lines of live processes whose environment has name=tag: a command and everything
    it started, spawned helpers included (their command lines need not say whose they are)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.environ().get(name) == tag:
                found.append(" ".join(p.info["cmdline"] or []))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_for_first_step(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Return once the training run `proc` writes into `out` has logged a step; fail if it ends first."""
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and '"event": "step"' in log.read_text():
            return
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    raise AssertionError(f"no training step logged in {timeout:.0f} s")
