"""The health guard: detect bad steps, decide on rollbacks, and a hang watchdog.

Detection (per optimizer step, on values every process agrees on: the global loss and the
global gradient norm):
- `nan`: loss or gradient norm is NaN/Inf;
- `spike`: loss above `spike_factor` x its running average;
- `grad_explosion`: pre-clip gradient norm above `grad_norm_limit`;
- `straggler`: step time above `straggler_factor` x the running median (logged only);
- `hang`: a watchdog thread sees one step run past `hang_timeout_s`.

Response (the PaLM recipe): roll back to the newest verified checkpoint and skip the batch
that caused the fault. Rollbacks are counted per step; past `max_rollbacks` at the same step
the guard gives up and the run exits with code 3, so an orchestrator can fail over.
"""

from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

from crosschip.config import TrainConfig
from crosschip.errors import CrosschipError

EXIT_GAVE_UP = 3
WARMUP_STEPS = 10
"""Steps of history before spikes and stragglers are judged."""


class HealthGaveUp(CrosschipError):
    """The guard hit its rollback cap (or could not recover): fail over to another backend."""

    exit_code = EXIT_GAVE_UP


class StepHang(Exception):
    """Raised in the main thread by the watchdog when a step runs past its timeout."""


class HealthGuard:
    """Judges each step and counts rollbacks per step."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.loss_avg: float | None = None
        self.good_steps = 0
        self.step_times: deque[float] = deque(maxlen=50)
        self.rollbacks: dict[int, int] = {}

    def check(self, loss: float, grad_norm: float) -> tuple[str, dict] | None:
        """(event, details) when the step must not be applied, else None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nan", {"loss": loss, "grad_norm": grad_norm}
        if (
            self.loss_avg is not None
            and self.good_steps >= WARMUP_STEPS
            and loss > self.cfg.spike_factor * self.loss_avg
        ):
            return "spike", {"loss": loss, "running_avg": self.loss_avg, "factor": loss / self.loss_avg}
        if grad_norm > self.cfg.grad_norm_limit:
            return "grad_explosion", {"grad_norm": grad_norm, "limit": self.cfg.grad_norm_limit}
        return None

    def accept(self, loss: float) -> None:
        """Fold a good step's loss into the running average (EMA, ~20 steps)."""
        self.loss_avg = loss if self.loss_avg is None else 0.95 * self.loss_avg + 0.05 * loss
        self.good_steps += 1

    def straggler(self, step_time: float) -> dict | None:
        """Details when `step_time` is a straggler; records the time either way."""
        event = None
        if len(self.step_times) >= WARMUP_STEPS:
            median = statistics.median(self.step_times)
            if step_time > self.cfg.straggler_factor * median:
                event = {"step_time_s": step_time, "median_s": median, "factor": step_time / median}
        self.step_times.append(step_time)
        return event

    def median_step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else 0.1

    def count_rollback(self, step: int) -> int:
        """Rollbacks at `step` so far, this one included (the trainer gives up past the cap)."""
        n = self.rollbacks.get(step, 0) + 1
        self.rollbacks[step] = n
        return n


class Watchdog:
    """A thread that interrupts the main thread when one step runs past `timeout_s`.

    The main thread calls `arm()` at the start of a step and `disarm()` at its end. On a hang
    the watchdog calls `on_hang(elapsed)` and sends SIGUSR1 to the main thread, whose handler
    raises StepHang (a blocking sleep or a Python-level wait is interrupted). If the main
    thread is stuck in native code and does not recover within another `timeout_s`,
    `on_stuck()` runs in the watchdog thread (it logs and exits the process).
    """

    def __init__(self, timeout_s: float, on_hang: Callable[[float], None], on_stuck: Callable[[], None]):
        self.timeout_s = timeout_s
        self.on_hang, self.on_stuck = on_hang, on_stuck
        self._started: float | None = None
        self._limit = timeout_s
        self._fired_at: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._main = threading.main_thread().ident
        self._previous = signal.signal(signal.SIGUSR1, self._raise_hang)
        self._thread = threading.Thread(target=self._run, name="crosschip-watchdog", daemon=True)
        self._thread.start()

    @staticmethod
    def _raise_hang(signum, frame) -> None:
        raise StepHang()

    def arm(self, grace: float = 1.0) -> None:
        with self._lock:
            self._started, self._limit, self._fired_at = time.monotonic(), self.timeout_s * grace, None

    def disarm(self) -> None:
        with self._lock:
            self._started, self._fired_at = None, None

    def _run(self) -> None:
        poll = min(0.2, self.timeout_s / 10)
        while not self._stop.wait(poll):
            with self._lock:
                started, limit, fired_at = self._started, self._limit, self._fired_at
            if started is None:
                continue
            now = time.monotonic()
            if fired_at is None and now - started > limit:
                with self._lock:
                    self._fired_at = now
                self.on_hang(now - started)
                signal.pthread_kill(self._main, signal.SIGUSR1)
            elif fired_at is not None and now - fired_at > self.timeout_s:
                self.on_stuck()
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        signal.signal(signal.SIGUSR1, self._previous)
