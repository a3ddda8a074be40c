"""The run's outputs for people and machines: metrics.jsonl, progress, loss.png, train_summary.json."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import IO, Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per line; every line has "event" and "time". Only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._f: IO[str] | None = None  # opened by the first event: a run refused before it leaves no file

    def event(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": time.time(), **_clean(fields)}
        self.records.append(record)
        if self.enabled:
            if self._f is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        return record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every event record of a metrics.jsonl. A line cut by a kill mid-write is ignored, and so
    is one that is not an event (an object with its "event" name), such as a line added by
    hand: the summary and a resume read every record's "event"."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            records.append(record)
    return records


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; a line now and then otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.every = max(1, total // 20)
        self.start, self.t0 = start, time.monotonic()  # the ETA of the line form: this process's pace
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def retotal(self, total: int) -> None:
        self.total, self.every = total, max(1, total // 20)
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  {info}  ETA {self.eta(step)}", flush=True)

    def eta(self, step: int) -> str:
        """Time left at this process's pace so far, as H:MM:SS ("-:--:--" before a step is done)."""
        done = step - self.start
        if done <= 0:
            return "-:--:--"
        left = round(max(0, self.total - step) * (time.monotonic() - self.t0) / done)
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def kept_steps(records: list[dict[str, Any]], reached: int | None = None) -> list[dict[str, Any]]:
    """The step records of the trajectory that ends at step `reached` (None: the last logged),
    in step order: a step redone after a rollback or resume keeps its last record, and a step
    past `reached` is dropped (trained, then lost to a rollback, a kill or a hard stop, and
    not trained again)."""
    kept = {r["step"]: r for r in records if r.get("event") == "step" and (reached is None or r["step"] <= reached)}
    return [kept[step] for step in sorted(kept)]


def plot_loss(records: list[dict[str, Any]], path: Path, reached: int) -> None:
    """loss.png: training loss per step up to `reached`, held-out accuracy on a second axis,
    rollbacks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(r["step"], r["loss"]) for r in kept_steps(records, reached) if isinstance(r.get("loss"), float)]
    evals = sorted({r["step"]: r["accuracy"] for r in records if r["event"] == "eval" and r["step"] <= reached}.items())
    rollbacks = [r["from_step"] for r in records if r["event"] == "rollback"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(*zip(*steps), lw=1, label="train loss")
        ax.set_yscale("log")
    for s in rollbacks:
        ax.axvline(s, color="red", alpha=0.4, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:green", label="held-out accuracy")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("exact-answer accuracy")
    ax.set_title("crosschip train" + (f" ({len(rollbacks)} rollbacks)" if rollbacks else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def saved_note(step: int, path: str | Path) -> str:
    """The line that tells where an interrupted run saved the step it reached."""
    return f"saved step {step} before stopping: {path}"
