"""Fault injection for tests and demos: `crosschip train --inject SPEC`.

    nan@step=40        the loss of step 40 becomes NaN (so do its gradients)
    nan@p=0.05         each step's loss becomes NaN with probability 0.05
    spike@step=K       the loss of step K is multiplied by 100 (a forced loss spike)
    hang@step=30       step 30 sleeps until the watchdog interrupts it
    slow@p=0.1         a step is delayed (straggler) with probability 0.1
    crash@step=25      the process SIGKILLs itself during step 25
    crash@save=2       the process SIGKILLs itself inside the run's 2nd checkpoint save (step 0's
                       is the 1st), after the files are written and before the folder is
                       renamed into place

A step fault fires once by default; `,times=N` makes it fire the first N times that step is
reached (to exhaust the rollback cap). The counts are the run's, not the process's: each
firing is logged (`inject` events in metrics.jsonl), and a resumed run or a restarted torchrun
group replays them, so a planted hang or crash that ended a process does not end its restart
again. A fault that could never fire is refused before training (`check_faults`,
`FaultInjector.check_resume`): the run would pass for one that survived it.
Probabilistic faults draw from their own seeded RNG so they never perturb training
randomness. An emulated backend's `emulated_faults` are added to the user's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from dataclasses import dataclass

from crosschip.errors import CrosschipError
from crosschip.train.health import WARMUP_STEPS

KINDS = ("nan", "spike", "hang", "slow", "crash")
SPIKE_FACTOR = 100.0
_SPEC = re.compile(r"^(?P<kind>[a-z]+)@(?P<key>step|p|save)=(?P<value>[0-9.eE+-]+)(?:,times=(?P<times>\d+))?$")


@dataclass
class Fault:
    kind: str
    step: int | None = None
    p: float | None = None
    save: int | None = None
    times: int = 1
    spec: str = ""


def parse_fault(spec: str) -> Fault:
    """One `--inject` spec; a CrosschipError explains the grammar for a bad one."""
    m = _SPEC.match(spec.strip())
    grammar = "expected KIND@step=N, KIND@p=P or crash@save=N (optionally ,times=N) with KIND in " + ", ".join(KINDS)
    if m is None or m["kind"] not in KINDS:
        raise CrosschipError(f"--inject {spec!r}: {grammar}")
    kind, key, value = m["kind"], m["key"], m["value"]
    times = int(m["times"] or 1)
    if times < 1:  # it would plant nothing, and the run would look like a run that survived it
        raise CrosschipError(f"--inject {spec!r}: times must be at least 1")
    try:
        if key == "p":
            p = float(value)
            if not 0.0 <= p <= 1.0:
                raise ValueError
            return Fault(kind, p=p, times=times, spec=spec)
        n = int(value)
        if n < 1:
            raise ValueError
    except ValueError:
        raise CrosschipError(
            f"--inject {spec!r}: {key} must be {'a probability' if key == 'p' else 'a positive integer'}"
        ) from None
    if key == "save" and kind != "crash":
        raise CrosschipError(f"--inject {spec!r}: only crash@save=N is supported")
    return Fault(kind, step=n if key == "step" else None, save=n if key == "save" else None, times=times, spec=spec)


def saves_of_run(steps: int, ckpt_every: int) -> int:
    """Checkpoint saves a run of `steps` makes from its start: step 0, every `ckpt_every`
    steps before the last, and the last."""
    return 1 + (steps - 1) // ckpt_every + 1


def check_faults(specs: list[str], steps: int, label: str, ckpt_every: int | None = None) -> None:
    """Each spec parses and could fire in a run of `steps` (named by `label`) from its start:
    no step fault past the last step, no spike in the health guard's warm-up (it would be
    applied, not caught), and, given `ckpt_every`, no save fault past the run's last save."""
    for spec in specs:
        fault = parse_fault(spec)
        if fault.step is not None and fault.step > steps:
            raise CrosschipError(f"--inject {spec!r}: the run ends at step {steps} ({label}), so it would never fire")
        if fault.kind == "spike" and fault.step is not None and fault.step <= WARMUP_STEPS:
            raise CrosschipError(
                f"--inject {spec!r}: the health guard judges spikes only after {WARMUP_STEPS} good steps, so a "
                f"spike at step {fault.step} would be trained on, not rolled back; plant it after step {WARMUP_STEPS}"
            )
        if fault.save is not None and ckpt_every is not None and fault.save > saves_of_run(steps, ckpt_every):
            raise CrosschipError(
                f"--inject {spec!r}: the run saves {saves_of_run(steps, ckpt_every)} checkpoints (step 0, every "
                f"{ckpt_every} steps (train.ckpt_every) and step {steps} ({label})), so it would never fire"
            )


class FaultInjector:
    """Decides, step by step, which planted faults fire."""

    def __init__(self, specs: list[str], seed: int = 0):
        self.faults = [parse_fault(s) for s in specs]
        self.fired: dict[int, int] = {}
        self.rng = random.Random(f"crosschip-faults:{seed}")
        self.saves = 0

    def _fires(self, i: int, fault: Fault, step: int) -> bool:
        if fault.p is not None:
            return self.rng.random() < fault.p
        if fault.step == step and self.fired.get(i, 0) < fault.times:
            self.fired[i] = self.fired.get(i, 0) + 1
            return True
        return False

    def at_step(self, step: int) -> set[str]:
        """Kinds of fault that fire during `step`; the caller logs them, then acts (a crash:
        `kill_self`)."""
        return {f.kind for i, f in enumerate(self.faults) if f.save is None and self._fires(i, f, step)}

    def replay(self, records: list[dict]) -> None:
        """Count as fired the faults that earlier processes of this run logged firing, and
        count the checkpoint saves they made (a save fault names the run's N-th save)."""
        for r in records:
            if r.get("event") == "checkpoint":
                self.saves += 1
            if r.get("event") != "inject":
                continue
            if r.get("save") is not None:  # a process killed inside that save: it logged no checkpoint
                self.saves += 1
            for i, f in enumerate(self.faults):
                # A save fault's event also names the step it saved: match on save alone.
                planted = (
                    f.save == r["save"] if r.get("save") is not None else f.save is None and f.step == r.get("step")
                )
                if planted and f.kind in r.get("faults", ()):
                    self.fired[i] = self.fired.get(i, 0) + 1

    def check_resume(self, step: int, steps: int, ckpt_every: int) -> None:
        """On resume from `step` (after `replay`): refuse a fault that has not fired and never
        can, a step fault at or before `step` (never trained again) or a save fault among the
        saves already made or past those this process makes up to step `steps`."""
        # This process saves every ckpt_every steps after `step` before the last, then the last.
        more = len(range((step // ckpt_every + 1) * ckpt_every, steps, ckpt_every)) + (step < steps)
        for i, f in enumerate(self.faults):
            if self.fired.get(i):
                continue
            if f.step is not None and f.step <= step:
                raise CrosschipError(
                    f"--inject {f.spec!r}: the run resumes from step {step}, past step {f.step}, so it would never fire"
                )
            if f.save is not None and not self.saves < f.save <= self.saves + more:
                raise CrosschipError(
                    f"--inject {f.spec!r}: the run has made {self.saves} checkpoint saves and this resume makes "
                    f"{more} more, so it would never fire"
                )

    def at_save(self) -> bool:
        """Whether a planted crash fires inside this checkpoint save (called in every save,
        before the rename); the caller logs it, then acts (`kill_self`)."""
        self.saves += 1
        fires = False
        for i, f in enumerate(self.faults):
            if f.save == self.saves and not self.fired.get(i):
                self.fired[i] = 1
                fires = True
        return fires


def kill_self() -> None:
    """SIGKILL this process: no handler, no cleanup, no flush, like an OOM kill or a power cut."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached
