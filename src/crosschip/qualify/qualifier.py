"""Qualify backends against a reference: op numerics, model parity, stability, collectives.

The orchestrator imports no accelerator. Every measurement on a backend runs in a child
process bound to that backend alone (`qualify.worker`, the trainer, `qualify.collective`),
so a target and a reference on different accelerators never share a process. Reference
measurements are cached, so qualifying several targets against one reference pays for the
reference once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from crosschip.backends import get_backend
from crosschip.backends.base import Backend
from crosschip.backends.cpu import side_by_side_env
from crosschip.errors import CrosschipError
from crosschip.qualify.collective import measure_collectives
from crosschip.qualify.metrics import judge
from crosschip.qualify.parity import compare_parity, load_parity, parity_why
from crosschip.qualify.stability import REPEAT_STEPS, RunResult, RunSpec, judge_stability, train_run
from crosschip.qualify.verdict import TRAIN, UNFIT, decide

LOW_PRECISION = ("bf16", "fp16")
STABILITY_STEPS = 40


class Qualifier:
    """Qualifies targets against one reference; `workdir` keeps every child's output."""

    def __init__(self, reference: str = "torch:cpu", workdir: Path | None = None, steps: int = STABILITY_STEPS):
        # The reference trains and runs fp64, here: a torch backend this machine has.
        try:
            self.reference = get_backend(reference, to_train=True).require()
        except CrosschipError as e:
            raise CrosschipError(f"--reference {reference}: {e}") from None
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="crosschip-qualify-")
        self.workdir = Path(workdir or self._tmp.name)
        self.steps = steps
        self._workers: dict[str, dict[str, Any]] = {}
        self._runs: dict[str, RunResult] = {}

    # -- children --------------------------------------------------------------------------
    def worker(self, spec: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Op numerics and parity tensors of `spec`, measured in its own process (cached)."""
        if spec not in self._workers:
            out = self.workdir / "workers" / spec.replace(":", "_")
            cmd = [sys.executable, "-m", "crosschip.qualify.worker", "--backend", spec, "--out", str(out)]
            if spec == self.reference.spec:
                cmd.append("--gold")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            if proc.returncode != 0 or not (out / "worker.json").is_file():
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise CrosschipError(f"qualify worker for {spec} failed (exit {proc.returncode}): {tail}")
            info = json.loads((out / "worker.json").read_text(encoding="utf-8"))
            info["dir"] = str(out)
            self._workers[spec] = info
        return self._workers[spec]

    def run(self, spec: RunSpec, env: dict[str, str] | None = None) -> RunResult:
        if spec.key not in self._runs:
            self._runs[spec.key] = train_run(spec, self.workdir / "runs", env=env)
        return self._runs[spec.key]

    @staticmethod
    def side_by_side(measure, keys: list[str], cached: dict) -> None:
        """`measure(key, env)` at once for each key not yet in `cached` (untimed measurements);
        `env` is None for a lone one."""
        todo = list(dict.fromkeys(k for k in keys if k not in cached))
        if todo:
            env = side_by_side_env() if len(todo) > 1 else None
            with ThreadPoolExecutor(len(todo)) as pool:
                list(pool.map(lambda k: measure(k, env), todo))

    # -- checks ----------------------------------------------------------------------------
    def op_numerics(self, x: dict[str, Any], ref: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Per dtype: every op judged against fp64 and the reference's error in that dtype."""
        result = {}
        for d, usable in x["dtypes"].items():
            if not usable["ok"]:
                result[d] = {"usable": False, "ok": False, "why": f"{d} does not compute: {usable['error']}"}
                continue
            ops = {}
            for name, per_dtype in x["ops"].items():
                stats = per_dtype[d]
                if "error" in stats:
                    ops[name] = {"ok": False, "why": f"raised {stats['error']}"}
                    continue
                ref_stats = ref["ops"].get(name, {}).get(d)
                ops[name] = judge(d, stats, ref_stats if ref_stats and "error" not in ref_stats else None)
            failed = [n for n, r in ops.items() if not r["ok"]]
            why = (
                f"all {len(ops)} ops pass in {d}" + _worst_ratio_text(ops)
                if not failed
                else "; ".join(f"{n} fails in {d}: {ops[n]['why']}" for n in failed)
            )
            result[d] = {"usable": True, "ok": not failed, "ops": ops, "failed": failed, "why": why}
        return result

    def model_parity(self, x: dict[str, Any], ref: dict[str, Any]) -> dict[str, dict[str, Any]]:
        gold = load_parity(Path(ref["dir"]) / "parity_fp64.safetensors")
        result = {}
        for d, entry in x["parity"].items():
            if "error" in entry:
                result[d] = {"forward_ok": False, "backward_ok": False, "why": f"model raised {entry['error']}"}
                continue
            ref_entry = ref["parity"].get(d, {})
            ref_t = load_parity(Path(ref["dir"]) / ref_entry["file"]) if "file" in ref_entry else None
            p = compare_parity(d, load_parity(Path(x["dir"]) / entry["file"]), ref_t, gold)
            p["why"] = parity_why(p, backward=True)
            result[d] = p
        return result

    def choose_train_dtype(self, backend: Backend, ops: dict, parity: dict) -> str | None:
        """As the trainer's `auto` does, where measured to pass: on the host CPU bf16 if its cores
        compute it natively, else fp32; elsewhere bf16, else fp16, else fp32.

        The emulated chips stand for accelerators, so they choose as an accelerator would.
        """

        def passes(d: str) -> bool:
            p = parity.get(d, {})
            return ops.get(d, {}).get("ok", False) and p.get("forward_ok", False) and p.get("backward_ok", False)

        if backend.device_type == "cpu" and not backend.emulation:
            order = ("bf16", "fp32") if backend.native_bf16() else ("fp32",)
        else:
            order = (*LOW_PRECISION, "fp32")
        return next((d for d in order if passes(d)), None)

    def stability(self, spec: str, dtype: str) -> dict[str, Any]:
        """The target's run alone (it is timed), then the untimed ones side by side."""
        ref = self.reference.spec
        ref_dtype = dtype if self.worker(ref)["dtypes"].get(dtype, {}).get("ok") else "fp32"
        # When the target is the reference itself, its run must be a second, fresh run.
        replica = 1 if spec == ref else 0
        x = self.run(RunSpec(spec, dtype, self.steps, replica=replica))
        runs = [
            RunSpec(spec, dtype, REPEAT_STEPS, replica=replica),
            RunSpec(ref, "fp32", self.steps),
            RunSpec(ref, ref_dtype, self.steps, replica=replica if ref_dtype == dtype else 0),
        ]
        by_key = {r.key: r for r in runs}  # the same run twice would share a folder
        self.side_by_side(lambda k, env: self.run(by_key[k], env), list(by_key), self._runs)
        x_again, ref_fp32, ref_same = (self.run(r) for r in runs)
        return judge_stability(x, x_again, ref_fp32, ref_same)

    # -- one target ------------------------------------------------------------------------
    def qualify(self, spec: str) -> dict[str, Any]:
        """Measure `spec` and return the verdict with its reasons and every measurement."""
        t0 = time.perf_counter()
        backend = get_backend(spec)
        report: dict[str, Any] = {
            "backend": spec,
            "emulation": backend.emulation,
            "reference": self.reference.spec,
            "runtime": backend.runtime,
        }
        if backend.runtime != "torch":
            return self._qualify_ort(backend, report, t0)
        self.side_by_side(self.worker, [spec, self.reference.spec], self._workers)
        x, ref = self.worker(spec), self.worker(self.reference.spec)
        if not x.get("available"):
            reasons = [f"not available here: {x.get('reason')}"]
            return {**report, "verdict": UNFIT, "reasons": reasons, "checks": {}, "measurements": {},
                    "seconds": time.perf_counter() - t0}  # fmt: skip
        ops, parity = self.op_numerics(x, ref), self.model_parity(x, ref)
        serve, serve_dtypes = _serve_check(ops, parity)
        train_dtype = self.choose_train_dtype(backend, ops, parity)
        measurements: dict[str, Any] = {"train_dtype": train_dtype, "serve_dtypes": serve_dtypes}
        checks = {"serve": serve, **self._train_checks(backend, x, ops, parity, train_dtype, measurements)}
        verdict, reasons = decide(checks, backend.runtime, train_dtype)
        return {**report, "verdict": verdict, "reasons": _annotate(reasons, backend, ops, train_dtype, verdict),
                "train_dtype": train_dtype, "serve_dtypes": serve_dtypes, "measurements": measurements,
                "checks": {**checks, "op_numerics": ops, "model_parity": parity},
                "seconds": time.perf_counter() - t0}  # fmt: skip

    def _train_checks(
        self, backend: Backend, x: dict, ops: dict, parity: dict, train_dtype: str | None, measurements: dict
    ) -> dict[str, dict[str, Any]]:
        """Numerics in the training dtype, then stability, then collectives; stops at the first failure."""
        if train_dtype is None:
            bad = {d: ops[d]["why"] if not ops[d].get("ok") else parity.get(d, {}).get("why") for d in ops}
            return {"train_numerics": {"ok": False, "why": "; ".join(f"{d}: {w}" for d, w in bad.items() if w)}}
        why = f"{ops[train_dtype]['why']}; model {parity_why(parity[train_dtype], backward=True)}"
        checks = {"train_numerics": {"ok": True, "why": why}}
        stab = checks["stability"] = self.stability(backend.spec, train_dtype)
        keys = ("train_tokens_per_s", "loss_gap", "reference_gap", "step_time_cv", "deterministic", "repeat_gap")
        measurements.update({k: stab[k] for k in keys})
        multi = backend.dist_backend is not None and (backend.device_type == "cpu" or x["device_count"] > 1)
        if not stab["ok"]:
            measurements["collectives"] = "not measured: the stability run already rules out training"
        elif not multi:
            measurements["collectives"] = "not measured: one device"
        else:
            coll = checks["collectives"] = measure_collectives(
                backend.spec, self.workdir / "collectives" / backend.spec.replace(":", "_")
            )
            measurements.update({k: coll.get(k) for k in ("comm_to_compute", "latency_s", "bus_bandwidth_gbps")})
        return checks

    def _qualify_ort(self, backend: Backend, report: dict[str, Any], t0: float) -> dict[str, Any]:
        """Inference-only runtimes: a small ORT graph against fp64; model parity is `crosschip verify`'s job."""
        from crosschip.backends.command import probe_in_subprocess

        probe = probe_in_subprocess(backend.spec, self.workdir)
        if not probe.get("available"):
            checks = {"serve": {"ok": False, "why": f"not available here: {probe.get('reason')}"}}
        else:
            small = probe["small_run"]
            why = f"ORT {small['graph']} rel err {small['rel_err_vs_fp64']:.1e} vs fp64 on {small['session_providers'][0]}"
            checks = {
                "serve": {
                    "ok": small["ok"],
                    "why": why + "; model parity is checked by `crosschip verify` after export",
                }
            }
        verdict, reasons = decide(checks, backend.runtime, None)
        return {**report, "verdict": verdict, "reasons": reasons, "train_dtype": None, "measurements": {},
                "checks": checks, "seconds": time.perf_counter() - t0}  # fmt: skip


def _serve_check(ops: dict, parity: dict) -> tuple[dict[str, Any], list[str]]:
    """Serving needs one dtype in which every op and the model's forward pass are within bounds."""
    serve_dtypes = [d for d in ops if ops[d].get("ok") and parity.get(d, {}).get("forward_ok")]
    if not serve_dtypes:
        why = "; ".join(o["why"] for o in ops.values() if not o.get("ok")) or "model forward fails in every dtype"
        return {"ok": False, "why": why}, []
    d = serve_dtypes[0]
    why = f"serves in {', '.join(serve_dtypes)}: {ops[d]['why']}; forward {parity_why(parity[d], backward=False)}"
    return {"ok": True, "why": why}, serve_dtypes


def _annotate(reasons: list[str], backend: Backend, ops: dict, train_dtype: str | None, verdict: str) -> list[str]:
    """Reasons with what frames them: the emulation, dtypes that do not compute, loss scaling."""
    if train_dtype == "fp16" and verdict == TRAIN:
        reasons = [("trains in fp16 with loss scaling (the trainer's GradScaler)" if r == "trains in fp16" else r)
                   for r in reasons]  # fmt: skip
    unusable = [ops[d]["why"] for d in ops if not ops[d]["usable"]]
    if unusable:
        usable = ", ".join(d for d in ops if ops[d]["usable"])
        reasons = [f"dtypes: {usable} compute; " + "; ".join(unusable), *reasons]
    if backend.emulation:
        reasons = [f"EMULATED target ({backend.emulation}) on the host CPU", *reasons]
    return reasons


def _worst_ratio_text(ops: dict[str, dict[str, Any]]) -> str:
    ratios = {n: r["ratio"] for n, r in ops.items() if r.get("ratio") is not None}
    if not ratios:
        return ""
    worst = max(ratios, key=ratios.get)
    return f" (worst error ratio to the reference: {worst} {ratios[worst]:.2f}x)"


def qualify(spec: str, reference: str = "torch:cpu", workdir: Path | None = None) -> dict[str, Any]:
    """Qualify one backend against `reference`; see `Qualifier`."""
    return Qualifier(reference, workdir).qualify(spec)
