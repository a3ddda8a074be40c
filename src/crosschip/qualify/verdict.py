"""From measurements to a verdict: TRAIN, SERVE-ONLY or UNFIT, with the reasons.

- SERVE needs one dtype in which every op and the model's forward pass are within bounds.
- TRAIN needs a torch runtime, every op and the model's forward and backward within bounds
  in the training dtype, a stable training run, and collectives fast enough for several
  devices (when measured).
Each reason names the measurement it comes from.
"""

from __future__ import annotations

from typing import Any

TRAIN, SERVE_ONLY, UNFIT = "TRAIN", "SERVE-ONLY", "UNFIT"


def decide(checks: dict[str, dict[str, Any]], runtime: str, train_dtype: str | None) -> tuple[str, list[str]]:
    """The verdict and its reasons from the checks (each {"ok": bool, "why": str}).

    checks: "serve" (ops + forward parity in some dtype), "train_numerics" (ops + forward
    and backward in the training dtype), "stability", "collectives"; a missing check was
    not measured and does not count.
    """
    serve = checks.get("serve", {"ok": False, "why": "no serving measurement"})
    if runtime != "torch":
        train_fail = [f"cannot train: {runtime} is an inference-only runtime"]
    else:
        train_fail = [
            f"{name} failed: {checks[name]['why']}"
            for name in ("train_numerics", "stability", "collectives")
            if name in checks and not checks[name]["ok"]
        ]
        if train_dtype is None:
            train_fail.insert(0, "no dtype passes op numerics and model parity for training")
    if not train_fail:
        reasons = [f"trains in {train_dtype}"]
        reasons += [checks[n]["why"] for n in ("train_numerics", "stability", "collectives") if n in checks]
        return TRAIN, reasons + ([serve["why"]] if serve["ok"] else [])
    if checks.get("stability", {}).get("ok"):
        train_fail.append(f"on one device it is {checks['stability']['why']}")
    if serve["ok"]:
        return SERVE_ONLY, [*train_fail, f"can serve: {serve['why']}"]
    return UNFIT, [*train_fail, f"cannot serve: {serve['why']}"]
