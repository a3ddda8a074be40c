"""Training stability: short same-seed runs of the real trainer, across a process boundary.

Each run is `python -m crosschip train --config CFG --out DIR --backend SPEC --steps N`; its
`metrics.jsonl` (step lines and health events) is all this module reads. Judgement:
- the target's mean relative loss gap to the reference's fp32 run is at most 1%, and no
  larger (within the factor 2 used for op errors) than the reference's own gap when it
  trains in the target's dtype;
- no NaN, no rollback, the run finished (exit code 0);
- reported with it: step-time coefficient of variation, and determinism (a second run with
  the same seed, compared step by step).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosschip.qualify.metrics import RATIO_GOOD

MAX_LOSS_GAP = 0.01
GAP_SLACK = 1e-3
"""Absolute slack on the reference-gap comparison, so two identical curves (gap 0) don't demand 0."""
BAD_EVENTS = ("nan", "spike", "grad_explosion", "rollback", "give_up", "hang")
WARMUP_STEPS = 2
"""Steps left out of step-time statistics (first-call allocation and kernel selection)."""
LR_WARMUP = 5
REPEAT_STEPS = LR_WARMUP + 1
"""The determinism run: the LR of warm-up steps does not depend on the total step count, so a
run this long must log exactly the first losses of the full run."""


@dataclass
class RunSpec:
    """One short training run; equal specs give equal runs, so results are cached by spec."""

    backend: str
    dtype: str
    steps: int
    seed: int = 0
    replica: int = 0
    """Tells apart runs that are meant to repeat each other (same config, fresh process)."""

    @property
    def key(self) -> str:
        return f"{self.backend.replace(':', '_')}-{self.dtype}-s{self.seed}-n{self.steps}-r{self.replica}"


@dataclass
class RunResult:
    spec: RunSpec
    exit_code: int
    losses: dict[int, float] = field(default_factory=dict)
    step_times: dict[int, float] = field(default_factory=dict)
    tokens_per_s: list[float] = field(default_factory=list)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.spec.backend,
            "dtype": self.spec.dtype,
            "steps": self.spec.steps,
            "seed": self.spec.seed,
            "exit_code": self.exit_code,
            "final_loss": self.losses[max(self.losses)] if self.losses else None,
            "events": {k: len(v) for k, v in self.events.items()},
            "error": self.error,
            "wall_s": self.wall_s,
        }


def config_text(run: RunSpec) -> str:
    """The TOML of a qualification run: the `debug` model on short arithmetic rows.

    No evaluation (generation is slow and says nothing about stability); checkpoints every
    10 steps so a rollback replays little; a straggler is a step over 2x the median, so
    step-time jitter shows up as events.
    """
    return f"""# written by crosschip qualify
[model]
preset = "debug"

[data]
digits = 2
heldout_size = 4

[train]
backend = "{run.backend}"
steps = {run.steps}
batch_size = 4
seq_len = 48
lr = 3e-3
warmup_steps = {LR_WARMUP}
dtype = "{run.dtype}"
seed = {run.seed}
ckpt_every = 10
keep_checkpoints = 2
eval_every = -1
eval_problems = 0
straggler_factor = 2.0
"""


def read_metrics(path: Path) -> tuple[dict[int, float], dict[int, float], list[float], dict[str, list[dict]]]:
    """Step losses and times (the last line of a step wins after a rollback), tokens/s, events."""
    losses, times, tps, events = {}, {}, [], {}
    if not path.is_file():
        return losses, times, tps, events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if rec.get("event") == "step":
            losses[rec["step"]] = float(rec["loss"])
            times[rec["step"]] = float(rec["step_time_s"])
            tps.append(float(rec["tokens_per_s"]))
        elif rec.get("event") in BAD_EVENTS:
            events.setdefault(rec["event"], []).append(rec)
    return losses, times, tps, events


def train_run(run: RunSpec, workdir: Path, timeout_s: float = 600.0, env: dict[str, str] | None = None) -> RunResult:
    """Run the real trainer in a child process (in `env`, if given) and read what it wrote."""
    out = workdir / run.key
    cfg = workdir / f"{run.key}.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier must not be resumed or mixed in
    cfg.write_text(config_text(run), encoding="utf-8")
    cmd = [sys.executable, "-m", "crosschip", "train", "--config", str(cfg), "--out", str(out)]
    cmd += ["--backend", run.backend, "--steps", str(run.steps), "--quiet"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr = 124, f"training run timed out after {timeout_s:.0f} s"
    (workdir / f"{run.key}.log").write_text(stderr, encoding="utf-8")
    losses, times, tps, events = read_metrics(out / "metrics.jsonl")
    error = None
    if code != 0:
        error = (stderr.strip().splitlines() or [f"exit code {code}"])[-1][:300]
    return RunResult(run, code, losses, times, tps, events, error, time.perf_counter() - t0)


def mean_rel_gap(a: dict[int, float], b: dict[int, float]) -> float:
    """Mean over common steps of |a - b| / |b|; inf when a step is non-finite or none are shared."""
    steps = sorted(set(a) & set(b))
    if not steps:
        return math.inf
    gaps = [abs(a[s] - b[s]) / abs(b[s]) if math.isfinite(a[s]) and math.isfinite(b[s]) else math.inf for s in steps]
    return sum(gaps) / len(gaps)


def step_time_cv(times: dict[int, float]) -> float | None:
    values = [t for s, t in sorted(times.items()) if s > WARMUP_STEPS]
    if len(values) < 3:
        return None
    return statistics.stdev(values) / statistics.mean(values)


def judge_stability(x: RunResult, x_again: RunResult, ref: RunResult, ref_in_x_dtype: RunResult) -> dict[str, Any]:
    """Judge the target's run against the reference's fp32 run; failures name the measurement."""
    failures: list[str] = []
    label = f"{x.spec.dtype}, {x.spec.steps} steps, seed {x.spec.seed}"
    bad = {k: v for k, v in x.events.items() if k in BAD_EVENTS}
    if bad:
        steps = sorted({e.get("step", e.get("from_step")) for v in bad.values() for e in v} - {None})
        counts = ", ".join(f"{len(v)} {k}" for k, v in bad.items())
        failures.append(f"health events in training: {counts} (steps {', '.join(map(str, steps))})")
    if x.exit_code != 0:
        failures.append(f"training run exited with code {x.exit_code}: {x.error}")
    if any(not math.isfinite(v) for v in x.losses.values()):
        failures.append("non-finite loss logged")
    gap = mean_rel_gap(x.losses, ref.losses)
    floor = mean_rel_gap(ref_in_x_dtype.losses, ref.losses)
    allowed = min(MAX_LOSS_GAP, max(RATIO_GOOD * floor, GAP_SLACK)) if math.isfinite(floor) else MAX_LOSS_GAP
    if ref.exit_code != 0 or not ref.losses:
        failures.append(f"reference run failed ({ref.error}); no loss curve to compare with")
    elif not gap <= allowed:
        failures.append(
            f"mean relative loss gap {gap:.2%} to the reference's fp32 run exceeds {allowed:.2%} "
            f"(limit {MAX_LOSS_GAP:.0%}; the reference's own gap in {x.spec.dtype}: {floor:.2%})"
        )
    repeat_gap = mean_rel_gap({s: v for s, v in x_again.losses.items() if s <= REPEAT_STEPS}, x.losses)
    deterministic = repeat_gap == 0.0
    cv = step_time_cv(x.step_times)
    tps = statistics.median(x.tokens_per_s) if x.tokens_per_s else None
    ok = not failures
    why = (
        f"stable ({label}): loss gap {gap:.3%} to the reference's fp32 run (allowed {allowed:.2%}; "
        f"the reference's own gap in {x.spec.dtype}: {floor:.3%}), no NaN or rollback"
        if ok
        else f"unstable ({label}): " + "; ".join(failures)
    )
    return {
        "ok": ok,
        "why": why,
        "failures": failures,
        "dtype": x.spec.dtype,
        "loss_gap": gap,
        "reference_gap": floor,
        "allowed_gap": allowed,
        "deterministic": deterministic,
        "repeat_gap": repeat_gap,
        "repeat_steps": x_again.spec.steps,
        "step_time_cv": cv,
        "reference_step_time_cv": step_time_cv(ref.step_times),
        "train_tokens_per_s": tps,
        "events": {k: len(v) for k, v in x.events.items()},
        "runs": {"target": x.summary(), "target_repeat": x_again.summary(), "reference_fp32": ref.summary(),
                 "reference_same_dtype": ref_in_x_dtype.summary()},
    }  # fmt: skip
