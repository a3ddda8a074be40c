"""Shared helpers of the training tests: run `crosschip train` for real and read its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def train(config: Path, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`crosschip train` in a fresh process, one thread (the CI box has two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "crosschip", "train", "--config", str(config), "--out", str(out), "--quiet", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def events(out: Path, name: str) -> list[dict]:
    return [r for r in records(out) if r["event"] == name]


def losses(out: Path) -> dict[int, float]:
    """Loss of every completed step; a step redone after a rollback or resume keeps its last value."""
    return {r["step"]: r["loss"] for r in events(out, "step")}
