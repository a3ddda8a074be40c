"""The parity gate: thresholds by the bundle's precision class.

- fp32: KL max <= 1e-6 and identical greedy output on every prompt;
- fp16 / bf16: top-1 agreement >= 99% and KL mean <= 1e-3;
- int8 (weight-only): the perplexity of the model's own kind of text (arithmetic, or the corpus
  it trained on) within `PPL_GAP` of the reference's, and for a task with a checker, task
  accuracy within 1 point. Accuracy alone could not fail where the reference solves nothing:
  a target with two layers' weights overwritten passed at 0% against 0%.

A failed gate exits with `GATE_FAILED_EXIT` (4), distinct from user errors (1) and from the
trainer's give-up (3), so a pipeline can tell "the target is not faithful" from "bad input".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crosschip.errors import CrosschipError

GATE_FAILED_EXIT = 4
PPL_GAP = 0.01
"""The int8 gate: |perplexity target / reference - 1| at most this. Measured on real int8
exports: 6.1e-6 and 4.4e-4 (corpus models), 4.4e-4 (the default run's arith-micro, arith text)."""
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "fp32": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp16": "fp16",
    "int8": "int8",
    "int8-weight-only": "int8",
    "w8": "int8",
}


def normalize_precision(name: Any) -> str | None:
    return _ALIASES.get(str(name).lower()) if name is not None else None


def stored_precision(bundle: str | Path) -> str | None:
    """The precision class the weights themselves are stored in: int8 when model.safetensors
    carries the int8 policy's mark, else config.json's dtype (both files are checksummed, the
    manifest is not). None when neither can be read."""
    folder = Path(bundle)
    try:
        with open(folder / "model.safetensors", "rb") as f:  # the header: a length, then JSON
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        if (header.get("__metadata__") or {}).get("crosschip_quantization") == "int8-weight-only":
            return "int8"
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError, MemoryError):
        return None
    return normalize_precision(config.get("torch_dtype") or config.get("dtype"))


def precision_of_bundle(bundle: str | Path) -> tuple[str, str]:
    """(precision class, where it was read): the manifest's precision policy, else config.json's
    dtype. A policy the stored weights contradict is refused: an fp32 bundle whose manifest was
    edited to say int8 was judged by the int8 gate, the loosest."""
    folder = Path(bundle)
    try:
        manifest = json.loads((folder / "crosschip.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    policy = manifest.get("precision")
    candidates = [
        (policy.get("policy") if isinstance(policy, dict) else policy, "crosschip.json precision policy"),
        (
            (manifest.get("export") or {}).get("dtype") if isinstance(manifest.get("export"), dict) else None,
            "crosschip.json export",
        ),
    ]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    candidates.append((config.get("torch_dtype") or config.get("dtype"), "config.json torch_dtype"))
    for value, where in candidates:
        if (p := normalize_precision(value)) is not None:
            stored = stored_precision(folder)
            if stored is not None and stored != p:
                raise CrosschipError(
                    f"{folder}: {where} says {p}, but its weights are stored in {stored}; export the bundle again"
                )
            return p, where
    return "fp32", "default"


@dataclass
class Check:
    name: str
    value: float
    threshold: float
    op: str  # "<=" | ">=" | "=="
    ok: bool


@dataclass
class GateResult:
    precision: str
    passed: bool
    checks: list[Check]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, value: float, op: str, threshold: float) -> Check:
    ok = value <= threshold if op == "<=" else value >= threshold if op == ">=" else value == threshold
    return Check(name, float(value), float(threshold), op, bool(ok))


def _ppl_gap(target: float | None, reference: float | None) -> float:
    """|target / reference - 1|; infinite where either is missing (no text of that kind scored)."""
    return abs(target / reference - 1) if target and reference else float("inf")


def evaluate(metrics: dict[str, Any], precision: str) -> GateResult:
    """Judge `metrics` (see `verify.metrics.all_metrics`) by the thresholds of `precision`."""
    notes: list[str] = []
    if precision == "fp32":
        checks = [
            _check("kl_max", metrics["kl_max"], "<=", 1e-6),
            _check("greedy_identical", metrics["greedy_identical"], "==", 1.0),
        ]
    elif precision in ("bf16", "fp16"):
        checks = [_check("top1", metrics["top1"], ">=", 0.99), _check("kl_mean", metrics["kl_mean"], "<=", 1e-3)]
    elif precision == "int8" and metrics["accuracy_problems"]:
        gap = abs(metrics["accuracy_target"] - metrics["accuracy_reference"])
        checks = [
            _check("ppl_gap", _ppl_gap(metrics["ppl_arith_target"], metrics["ppl_arith_reference"]), "<=", PPL_GAP),
            _check("accuracy_gap", gap, "<=", 0.01),
        ]
        if metrics["accuracy_reference"] == 0:
            notes.append("the reference solves no held-out problem, so the accuracy check says little")
        if metrics["accuracy_problems"] < 100:
            notes.append(f"{metrics['accuracy_problems']} problems: one problem is more than 1 point")
    elif precision == "int8":
        # A corpus model: no checker scores its text, so its perplexity is all there is.
        checks = [_check("ppl_gap", _ppl_gap(metrics["ppl_target"], metrics["ppl_reference"]), "<=", PPL_GAP)]
    else:
        raise ValueError(f"unknown precision class {precision!r}")
    if metrics.get("kl_support", "").startswith("target top-"):
        notes.append(f"KL is over the {metrics['kl_support']} (remote target): a lower bound on the full KL")
    return GateResult(precision, all(c.ok for c in checks), checks, notes)
