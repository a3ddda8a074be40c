"""The parity check end to end: prompts, the two side processes, metrics, gate, bisection.

The parent never runs the model: it writes the prompts, starts one worker process per side
(`python -m crosschip.verify.worker`), reads their safetensors/JSON back, and judges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosschip.backends.cpu import cpu_share
from crosschip.errors import CrosschipError, flag
from crosschip.paths import check_bundle_folder
from crosschip.verify import gate as gate_mod
from crosschip.verify.prompts import PromptSet

if TYPE_CHECKING:  # the metrics need torch; `crosschip verify` checks its input before importing it
    from crosschip.verify.metrics import SideResult


@dataclass
class VerifyOptions:
    bundle: Path
    out: Path
    reference: str = "torch:cpu"
    target: str | None = "ort:cpu"
    target_url: str | None = None
    api_key: str | None = None
    model_name: str | None = None
    top_k: int = 20
    reference_weights: str = "auto"
    """`auto` (the source checkpoint the manifest records, when it is here; else the bundle),
    `bundle`, or a weights folder."""
    target_weights: Path | None = None
    target_dtype: str | None = None
    problems: int | None = None
    """Held-out problems continued greedily; None: `VerifyConfig.prompts`."""
    scored_problems: int = 48
    corpus_docs: int = 16
    max_len: int = 128
    max_new_tokens: int | None = None
    digits: int | None = None
    """Held-out problems of this many digits and these ops; None: the task the bundle records
    (`trained_task`)."""
    ops: list[str] | None = None
    task: str = "arith"
    """What the model was trained on (`verify` reads it from the bundle: `trained_task`):
    `arith` scores the held-out problems, `corpus` corpus text only."""
    corpus: list[str | Path] | None = None
    """Files (or folders) of the corpus text to score, as `data.corpus`; None: the built-in corpus."""
    seed: int = 0
    bisect: bool = True
    layers: bool = False
    """Compute the per-layer error table even when the gate passes (the run report charts it)."""
    timeout_s: float = 1800.0


API_KEY_ENV = "CROSSCHIP_TARGET_API_KEY"
"""How the parent hands --api-key to the remote side's worker."""


@dataclass
class SideSpec:
    """How to start one side's worker."""

    name: str
    backend: str
    weights: Path | None = None
    dtype: str = "fp32"
    url: str | None = None

    def label(self) -> str:
        return self.url or self.backend

    def argv(self, opts: VerifyOptions, prompts: Path, capture: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "crosschip.verify.worker", "--side", self.name, "--bundle", str(opts.bundle)]
        cmd += ["--backend", self.backend, "--prompts", str(prompts), "--out", str(opts.out), "--dtype", self.dtype]
        cmd += ["--threads", str(cpu_share(2))]
        if self.weights is not None:
            cmd += ["--weights", str(self.weights)]
        if self.url is not None:
            cmd += ["--url", self.url, "--top-k", str(opts.top_k)]
            if opts.model_name:
                cmd += ["--model-name", opts.model_name]
        if capture:
            cmd.append("--capture")
        return cmd


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def _start(side: SideSpec, opts: VerifyOptions, prompts: Path, capture: bool) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if side.url is not None and opts.api_key:  # by the environment: a command line is anyone's to read (ps)
        env[API_KEY_ENV] = opts.api_key
    log = opts.out / f"{side.name}{'.capture' if capture else ''}.log"
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(side.argv(opts, prompts, capture), stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, log


def run_workers(
    sides: list[SideSpec], opts: VerifyOptions, prompts: Path, *, capture: bool = False, progress: Any = print
) -> None:
    """Run the sides' workers at once (one process each) and wait; a failure names its side."""
    started = [(side, *_start(side, opts, prompts, capture)) for side in sides]
    deadline = time.monotonic() + opts.timeout_s
    failures = []
    try:
        for side, proc, log in started:
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failures.append(
                    f"{side.name} side ({side.label()}) did not finish within {opts.timeout_s:.0f} s (log: {log})"
                )
                continue
            if rc != 0:
                failures.append(f"{side.name} side ({side.label()}): {_last_error(log)}")
            else:
                progress(f"verify: {side.name} side ({side.label()}) done")
    finally:
        # Never leave a side running behind a failure, a timeout or Ctrl-C.
        for _, proc, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failures:
        raise CrosschipError("; ".join(failures))


def _last_error(log: Path) -> str:
    """The worker's one-line error, or the last line of its traceback with the log's path."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return f"{lines[-1] if lines else 'exited without output'} (full log: {log})"


def read_side(out: Path, name: str, prompts: PromptSet) -> SideResult:
    from safetensors.torch import load_file

    from crosschip.verify.metrics import SideResult

    tensors = load_file(out / f"{name}.safetensors")
    data = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    n = len(prompts.scored)
    result = SideResult(greedy=data["greedy"], info=data["info"])
    if "scored.0" in tensors:
        result.logits = [tensors[f"scored.{i}"] for i in range(n)]
    else:
        result.topk = [
            (tensors[f"topk_ids.{i}"], tensors[f"topk_lp.{i}"], tensors[f"topk_exact.{i}"]) for i in range(n)
        ]
        result.token_logprobs = [tensors[f"token_lp.{i}"] for i in range(n)]
    return result


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def check_reference(spec: str, label: str = "--reference") -> None:
    """The reference runs the trained weights in fp32 torch, and the per-layer table and the
    bisection capture its torch modules: another runtime there failed after the target's run."""
    from crosschip.backends import get_backend

    if get_backend(spec).runtime != "torch":
        raise CrosschipError(
            f"{label} {spec}: the reference runs the trained weights in torch; give a torch backend such as torch:cpu"
        )


def check_inputs(opts: VerifyOptions) -> None:
    """Clear errors before any process starts (and before torch is imported: a mistyped path is
    answered at once)."""
    from crosschip.backends import get_backend

    check_bundle_folder(opts.bundle)
    check_reference(opts.reference)
    for name in ("config.json", "tokenizer.json"):
        if not (opts.bundle / name).is_file():
            raise CrosschipError(f"{opts.bundle} is not a bundle: {name} is missing")
    if (opts.target is None) == (opts.target_url is None):
        raise CrosschipError("give exactly one of --target SPEC or --target-url URL")
    # A side this machine's build cannot run is said now: the other side would run whole first.
    for spec in filter(None, (opts.reference, opts.target)):
        get_backend(spec).check_build()
    ref_w = None if opts.reference_weights in ("auto", "bundle") else Path(opts.reference_weights)
    for w in (ref_w, opts.target_weights):
        if w is not None and not (w / "config.json").is_file():
            raise CrosschipError(f"weights folder not found or not a bundle/checkpoint: {w}")
    from crosschip import hf

    if (opts.bundle / hf.MANIFEST_FILE).is_file():
        # Here, not only when the target loads it: the reference side may run from the source
        # checkpoint, and would spend its whole run before a tampered bundle is noticed.
        hf.verify_manifest(opts.bundle)
    # Both sides read the bundle tokenizer's ids: weights with another vocabulary would index past
    # their embedding, or give logits of another width (an IndexError in a worker, after the other
    # side's whole run).
    vocab = hf.read_json(opts.bundle / hf.CONFIG_FILE).get("vocab_size")
    for name, w in (("reference_weights", ref_w), ("target_weights", opts.target_weights)):
        theirs = None if w is None else hf.read_json(w / hf.CONFIG_FILE).get("vocab_size")
        if w is not None and theirs != vocab:
            raise CrosschipError(
                f"{flag(name)} {w} has a vocabulary of {theirs} tokens and the bundle {opts.bundle} one of {vocab}: "
                "the prompts are the bundle tokenizer's ids; give weights of the same model"
            )
    if opts.target_url is not None:
        from crosschip.verify.remote import check_reachable

        check_reachable(opts.target_url, opts.api_key, opts.model_name)


def check_target_graph(opts: VerifyOptions) -> None:
    """An ONNX Runtime target runs the bundle's graph: a bundle without one (a checkpoint, a
    torch export) failed in the target's worker, after the reference side's whole run."""
    from crosschip.backends import get_backend
    from crosschip.handoff import ONNX_FILE

    ort = opts.target is not None and get_backend(opts.target).runtime == "ort"
    if ort and not (opts.bundle / ONNX_FILE).is_file():
        raise CrosschipError(
            f"{opts.bundle} has no {ONNX_FILE}, which --target {opts.target} runs; export it with "
            f"`crosschip export ... --to {opts.target}`, or give a torch --target"
        )


def reference_weights(opts: VerifyOptions) -> Path | None:
    """What the reference runs: the trained model when the bundle says where it is."""
    if opts.reference_weights == "bundle":
        return None
    if opts.reference_weights != "auto":
        return Path(opts.reference_weights)
    try:
        source = json.loads((opts.bundle / "crosschip.json").read_text(encoding="utf-8")).get("source") or {}
    except (OSError, ValueError):
        return None
    path = Path(source["path"]) if isinstance(source, dict) and source.get("path") else None
    if path is None or path.resolve() == opts.bundle.resolve() or not (path / "config.json").is_file():
        return None
    from crosschip import hf

    recorded = source.get("weights_sha256")
    if recorded and hf.weights_sha256(path) != recorded:  # a later run wrote a checkpoint of the same name there
        raise CrosschipError(
            f"the bundle's source {path} is not the checkpoint it was exported from (its weights' sha256 "
            f"differs from the one {opts.bundle / 'crosschip.json'} records); pass --reference-weights bundle "
            "to take the bundle's own weights as the reference, or export it again"
        )
    return path


def sides_of(opts: VerifyOptions, precision: str) -> tuple[SideSpec, SideSpec]:
    ref = SideSpec("reference", opts.reference, reference_weights(opts), "fp32")
    if opts.target_url is not None:
        return ref, SideSpec("target", "remote", url=opts.target_url)
    compute = opts.target_dtype or ("fp32" if precision == "int8" else precision)
    return ref, SideSpec("target", opts.target, opts.target_weights, compute)


def plan_prompts(
    opts: VerifyOptions, tokenizer: Any, context: int | None, label: Callable[[str], str] = flag
) -> PromptSet:
    """The prompts `opts` asks for, or the CrosschipError that `crosschip verify` would end
    with. `crosschip run` calls it before its first stage, with the tokenizer and context its
    model will have, and its config keys as the `label`."""
    from crosschip.config import VerifyConfig
    from crosschip.data.corpus import load_texts
    from crosschip.verify.prompts import build_prompts

    problems = VerifyConfig.prompts if opts.problems is None else opts.problems
    return build_prompts(
        tokenizer,
        task=opts.task,
        corpus=None if opts.corpus is None else load_texts(opts.corpus, limit=opts.corpus_docs),
        problems=problems,
        scored_problems=min(opts.scored_problems, problems),
        corpus_docs=opts.corpus_docs,
        digits=opts.digits,
        ops=opts.ops,
        seed=opts.seed,
        max_len=opts.max_len,
        max_new_tokens=opts.max_new_tokens,
        context=context,
        label=label,
    )


def trained_task(opts: VerifyOptions) -> tuple[str, int | None, list[str] | None]:
    """(task, digits, ops) of what verify scores: the held-out problems' digits and ops as
    given, else as the bundle's manifest records the training task (a 3-digit model scored on
    2-digit problems, or one trained on addition scored on subtraction, would show an accuracy
    that says nothing of the model), else the data defaults. A bundle trained on a corpus is
    scored on corpus text alone: (corpus, None, None)."""
    from crosschip import hf
    from crosschip.config import ConfigError, DataConfig

    manifest = hf.read_manifest(opts.bundle) if (opts.bundle / hf.MANIFEST_FILE).is_file() else {}
    task = manifest.get("task")
    task = task if isinstance(task, dict) else {}
    if task.get("task") == "corpus":
        given = [flag(name) for name in ("problems", "digits", "ops") if getattr(opts, name) is not None]
        if given:
            raise CrosschipError(
                f"{' and '.join(given)} choose arithmetic problems, but {opts.bundle / hf.MANIFEST_FILE} records "
                "that the bundle was trained on a corpus, which verify scores on corpus text"
            )
        return "corpus", None, None
    # What the flags leave to the record, checked as a config's would be (the held-out count is
    # verify's own, --problems): a record verify cannot read is refused, not guessed past.
    wanted = [name for name in ("digits", "ops") if getattr(opts, name) is None]
    try:
        if wanted and task.get("task", "arith") != "arith":  # a kind of task this verify does not know
            raise ConfigError(f"task {task.get('task')!r}")
        recorded = DataConfig(**{k: task[k] for k in wanted if k in task}, heldout_size=1)
    except (ConfigError, TypeError):
        raise CrosschipError(
            f"{opts.bundle / hf.MANIFEST_FILE} records a task verify cannot score ({task}); give --digits and --ops"
        ) from None
    return (
        "arith",
        recorded.digits if opts.digits is None else opts.digits,
        recorded.ops if opts.ops is None else opts.ops,
    )


def build_prompt_file(opts: VerifyOptions) -> tuple[PromptSet, Path, Any]:
    from crosschip import hf
    from crosschip.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(opts.bundle)
    context = hf.read_json(opts.bundle / hf.CONFIG_FILE).get("max_position_embeddings")
    prompts = plan_prompts(opts, tokenizer, context if isinstance(context, int) else None)
    path = opts.out / "prompts.json"
    prompts.save(path)
    return prompts, path, tokenizer


def verify(opts: VerifyOptions, progress: Any = print) -> dict[str, Any]:
    """Run the parity check; returns the report (its `gate.passed` says whether it passed)."""
    check_inputs(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    precision, source = gate_mod.precision_of_bundle(opts.bundle)
    if opts.target_dtype and opts.target_url is None:
        precision, source = opts.target_dtype, "--target-dtype"
    opts.task, opts.digits, opts.ops = trained_task(opts)
    prompts, prompt_path, tokenizer = build_prompt_file(opts)
    check_target_graph(opts)
    ref_spec, tgt_spec = sides_of(opts, precision)
    progress(
        f"verify: {len(prompts.scored)} scored texts, {len(prompts.greedy)} greedy prompts x {prompts.max_new_tokens} tokens; "
        f"reference {ref_spec.label()} | target {tgt_spec.label()} (each in its own process)"
    )
    t0 = time.perf_counter()
    run_workers([ref_spec, tgt_spec], opts, prompt_path, progress=progress)
    ref, tgt = read_side(opts.out, "reference", prompts), read_side(opts.out, "target", prompts)
    from crosschip.verify.metrics import all_metrics

    metrics = all_metrics(prompts, ref, tgt, tokenizer)
    result = gate_mod.evaluate(metrics, precision)
    report = {
        "bundle": str(opts.bundle.resolve()),
        "reference": {"spec": ref_spec.label(), **ref.info},
        "target": {"spec": tgt_spec.label(), **tgt.info},
        "precision": {"class": precision, "from": source},
        "prompts": prompts.meta | {"scored": len(prompts.scored), "greedy": len(prompts.greedy)},
        "metrics": metrics,
        "gate": result.to_dict(),
        "bisect": None,
        "elapsed_s": round(time.perf_counter() - t0, 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if opts.bisect and (not result.passed or opts.layers):
        progress("verify: gate failed; bisecting layer by layer" if not result.passed else "verify: per-layer errors")
        report["bisect"] = bisect_sides(opts, prompt_path, ref_spec, tgt_spec, precision, progress)
    return report


def bisect_sides(
    opts: VerifyOptions, prompt_path: Path, ref: SideSpec, tgt: SideSpec, precision: str, progress: Any = print
) -> dict[str, Any]:
    """Capture module outputs on both sides (torch) and find the first departure."""
    from safetensors.torch import load_file

    from crosschip.backends import get_backend
    from crosschip.verify.bisect import bisect_report, compare

    if tgt.url is not None:
        return {
            "first_departure": None,
            "note": "a remote target cannot be bisected: its weights are not here",
            "table": [],
        }
    note, clean = "", None
    if get_backend(tgt.backend).runtime != "torch":
        # Torch cannot look inside the target's graphs: first ask whether they compute what the
        # bundle's weights compute. A graph edited after export (or a broken exporter) passed
        # this bisection, which then blamed rounding spread over the whole model.
        if departed := _graph_departure(opts.bundle):
            return {
                "first_departure": departed[0],
                "first_departure_key": None,
                "why": departed[1],
                "note": "",
                "table": [],
            }
        tgt = SideSpec("target", "torch:cpu", tgt.weights, "fp32" if precision == "int8" else precision)
        note = (
            f"bisected in torch:cpu with the target's weights and {precision} precision; "
            f"a departure that only {opts.target} shows (its runtime's ops) does not appear here"
        )
        clean = (
            f"no module departs in torch with the target's weights, and the bundle's graphs compute what those "
            f"weights compute on a test step: the departure is in how {opts.target} runs them on these prompts"
        )
    run_workers([ref, tgt], opts, prompt_path, capture=True, progress=progress)
    records = [load_file(opts.out / f"{s}.capture.safetensors") for s in ("reference", "target")]
    names = json.loads((opts.out / "reference.capture.json").read_text(encoding="utf-8"))["labels"]
    return bisect_report(compare(*records, names, precision), precision, note=note, none=clean)


def _graph_departure(bundle: Path) -> tuple[str, str] | None:
    """(what, why) for the first of the bundle's ONNX graphs whose outputs depart from its own
    weights run in torch (the check export makes before it writes a bundle), naming the first
    weight in it that differs from the bundle's where there is one; else None."""
    from crosschip.handoff import ONNX_FILE
    from crosschip.handoff.export import graph_departure
    from crosschip.handoff.onnx_export import decode_path
    from crosschip.handoff.precision import load_for_serving

    model, _ = load_for_serving(bundle)
    for graph in (bundle / ONNX_FILE, decode_path(bundle / ONNX_FILE)):
        if graph.is_file() and (why := graph_departure(model, graph)):
            fix = "the graph is not what the export checked; export the bundle again"
            if weight := _changed_weight(model, graph):
                return (
                    f"{graph.name}: {weight[0]}",
                    f"{why}; its {weight[0]} differs from the bundle's ({weight[1]}): {fix}",
                )
            return graph.name, f"{why}, run on the bundle's own weights: {fix}"
    return None


def _changed_weight(model: Any, graph: Path) -> tuple[str, str] | None:
    """The first float initializer of `graph` that differs from the model's tensor of that name
    (the graphs name the weights of the step's `model` by their names in it), with how much;
    int8 and bf16 ones, stored in forms numpy does not compare directly, are left to the
    outputs' check."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for t in onnx.load(str(graph)).graph.initializer:
        if t.name not in state or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        ours = state[t.name].detach().float().numpy()
        theirs = numpy_helper.to_array(t).astype(np.float32)
        if theirs.shape != ours.shape:
            return t.name, f"shape {list(theirs.shape)} against {list(ours.shape)}"
        if not np.array_equal(theirs, ours):
            return t.name, f"max |diff| {float(np.abs(theirs - ours).max()):.3g}"
    return None
