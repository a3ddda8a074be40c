"""`crosschip export`: a checkpoint becomes a bundle for a target.

Bundle = the HF DeepseekV3 folder (`hf.save_bundle`) in the policy's storage dtype, plus
`model.onnx` for ONNX Runtime targets, plus `crosschip.json` recording the source checkpoint,
the training backend fingerprint, the target, the precision policy (with its fp16 range
report), the ONNX facts (expert count, parity against torch) and the size of every file.
"""

from __future__ import annotations

import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosschip import hf
from crosschip.backends import get_backend
from crosschip.errors import CrosschipError
from crosschip.handoff import ONNX_FILE, check_target_policy, precision
from crosschip.handoff.source import Source, resolve_source
from crosschip.model import DTYPES
from crosschip.paths import check_output_dir

PHASES = ["load source", "check precision", "write HF bundle", "export ONNX", "check ONNX vs torch", "write manifest"]


def check_target(target: str, policy: str) -> Any:
    """The target backend (not required to run here: exporting for a CANN box is the point)."""
    backend = get_backend(target)
    precision.check_policy(policy)
    check_target_policy(backend, policy)
    return backend


@contextmanager
def _progress(enabled: bool):
    """A rich progress bar over the export phases (on stderr); a no-op callable when disabled
    or when stderr is no terminal (a log file would only get the empty line a bar leaves)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda phase, detail="": None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        SpinnerColumn(),
        TextColumn("[bold]export[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
    ]
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(PHASES[0], total=len(PHASES))

        def advance(phase: str, detail: str = "") -> None:
            done = PHASES.index(phase) if phase in PHASES else bar.tasks[0].completed
            bar.update(task, completed=done, description=f"{phase}{': ' + detail if detail else ''}")

        yield advance
        bar.update(task, completed=len(PHASES), description="done")


def export_bundle(
    src: str | Path,
    out: str | Path,
    *,
    target: str = "ort:cpu",
    policy: str = "fp32",
    fp16_overflow: str = "error",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Export SRC to the bundle folder `out` for `target` under precision `policy`; returns the manifest.

    The bundle is written into a hidden folder next to `out` and renamed into place at the end,
    so an export that fails or is interrupted leaves `out` as it was (with --force, the old
    bundle is replaced only by a finished one) and never a bundle that looks complete."""
    backend = check_target(target, policy)
    out = Path(out)
    _check_out(Path(src), out, force)
    started = time.time()
    with _progress(progress) as phase, _staged(out) as staging:
        phase("load source", str(src))
        source = resolve_source(src)
        if source.tokenizer is None:  # the bundle would be written, then refused by serve and verify
            raise CrosschipError(
                f"{source.info['path']} has no tokenizer.json: a bundle without one cannot be served or verified"
            )
        phase("check precision", policy)
        precision_info = _check_precision(source, policy, fp16_overflow)
        phase("write HF bundle", str(out))
        _write_hf(source, staging, policy)
        onnx_info = None
        if backend.runtime == "ort":
            phase("export ONNX")
            served = precision.round_model(source.model, policy)
            onnx_info = _write_onnx(served, staging, policy, lambda msg: phase("export ONNX", msg))
            phase("check ONNX vs torch")
            onnx_info["parity_fp32_max_abs"] = _check_graphs(served, staging, onnx_info, policy, phase)
        phase("write manifest")
        manifest = {
            "source": source.info,
            "training_backend": source.training,
            "task": source.task,
            "target": {"spec": backend.spec, "runtime": backend.runtime, "device_type": backend.device_type},
            "precision": precision_info,
            "onnx": onnx_info,
            "export": {"time_s": round(time.time() - started, 2), "torch": torch.__version__},
        }
        hf.write_manifest(staging, manifest, scan=True)  # with the files the export added
        hf.write_manifest(staging, {"sizes": bundle_sizes(staging)})
    return hf.read_manifest(out)


def _check_out(src: Path, out: Path, force: bool) -> None:
    """`out` may be replaced (--force) only where that deletes nothing but an old bundle."""
    check_output_dir(out, "--out")
    target = out.resolve()
    for what, path in (("the source", src), ("the current folder", Path.cwd())):
        path = path.resolve()
        if target == path or target in path.parents:
            raise CrosschipError(f"--out {out} holds {what} ({path}); choose another folder")
    # Nor inside it: a bundle in a checkpoint's folder went with it when training pruned it, and
    # a run folder's checkpoints are the source too (the newest verified one is read, the others
    # are what a failed check falls back to).
    if src.is_dir() and src.resolve() in target.parents:
        raise CrosschipError(f"--out {out} is inside the source ({src.resolve()}); choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CrosschipError(f"--out {out} is not empty; pass --force to replace the bundle there")
        if not (out / hf.MANIFEST_FILE).is_file():  # every bundle an export writes has one
            raise CrosschipError(
                f"--out {out} is not empty and is not a bundle (no {hf.MANIFEST_FILE}); --force replaces "
                "only an earlier export, so choose another folder"
            )
        manifest = hf.read_manifest(out)
        if "target" not in manifest or manifest.get("kind") == "checkpoint":  # what every export records
            what = "a checkpoint" if manifest.get("kind") == "checkpoint" else "a bundle no export wrote"
            raise CrosschipError(
                f"--out {out} holds {what} (see its {hf.MANIFEST_FILE}); --force replaces only an earlier "
                "export, so choose another folder"
            )
        # The whole folder is replaced: files someone added beside the bundle would go with it.
        # The manifest lists (and checksums) every file of the bundle but itself.
        written = {*manifest.get("files", {}), hf.MANIFEST_FILE}
        added = sorted(
            f for f in (p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if f not in written
        )
        if added:
            shown = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
            raise CrosschipError(
                f"--out {out} holds files the earlier export did not write ({shown}); --force would delete "
                "them with the old bundle: move them, or choose another folder"
            )


@contextmanager
def _staged(out: Path):
    """A hidden folder beside `out` to write the bundle into; on success it replaces `out`
    (the old folder is removed only after the new one is in place), on failure it goes."""
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f"{staging.name}.old")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_precision(source: Source, policy: str, fp16_overflow: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "policy": policy,
        "keep_fp32": "RMSNorm weights, router gate.weight and e_score_correction_bias",
    }
    if policy == "int8":
        info["int8"] = {
            "scheme": "weight-only, symmetric, per output channel",
            "weights": "attention/MLP/expert linears, embed_tokens, lm_head",
            "keys": "<name>.weight int8 (out, in) + <name>.weight_scale fp32 (out,); w = weight * weight_scale[:, None]",
            "onnx": "int8 initializer + fp32 scale -> DequantizeLinear, folded to fp32 when ONNX Runtime loads it",
        }
    if policy == "fp16":
        state = hf.to_hf(source.model.state_dict(), source.model.cfg)
        report = precision.check_fp16_range(state)
        warnings = precision.enforce_fp16(report, fp16_overflow)
        info["fp16_range"] = {**report.to_dict(), "on_overflow": fp16_overflow, "warnings": warnings}
        for w in warnings:
            print(f"crosschip export: warning: {w}")
    return info


def _write_hf(source: Source, out: Path, policy: str) -> None:
    dtype = DTYPES.get(policy)
    hf.save_bundle(source.model, out, tokenizer=source.tokenizer, dtype=dtype if policy != "fp32" else torch.float32)
    if policy == "int8":
        precision.write_int8_weights(out, hf.to_hf(source.model.state_dict(), source.model.cfg))


def _write_onnx(model: torch.nn.Module, out: Path, policy: str, say) -> dict[str, Any]:
    from crosschip.handoff.onnx_export import export_onnx

    return export_onnx(model, out / ONNX_FILE, policy=policy, progress=say)


# How far a graph's outputs may lie from torch's, relative to the largest output: fp32 rounding
# (the graphs compute in fp32 whatever the policy stores) gave 1.7e-6-2.4e-6 absolute on the
# debug model in every policy; an edited cache entry, 5.6e+2, and the bundle shipped.
GRAPH_PARITY_REL = 1e-3


def _check_graphs(
    model: torch.nn.Module, out: Path, info: dict[str, Any], policy: str, phase, retraced: bool = False
) -> float:
    """Both graphs against torch; the worst max |diff|. Graphs from the trace cache that fail
    are traced afresh (the entry was damaged or edited); graphs traced here that fail are an error."""
    from crosschip.handoff import trace_cache

    worst = {name: _parity(model, out / name) for name in (ONNX_FILE, info["decode_file"])}
    bad = [name for name, (diff, scale) in worst.items() if _departs(diff, scale)]
    if bad and info["traced_from_cache"] and not retraced:
        phase("check ONNX vs torch", f"{', '.join(bad)} from the trace cache disagree with torch: tracing again")
        for kind in ("general", "decode"):
            trace_cache.evict(trace_cache.trace_key(model, kind))
        info.update(_write_onnx(model, out, policy, lambda msg: phase("export ONNX", msg)))
        return _check_graphs(model, out, info, policy, phase, retraced=True)
    if bad:
        raise CrosschipError(f"{_departure(bad[0], *worst[bad[0]])}; the bundle was not written")
    return max(diff for diff, _ in worst.values())


def graph_departure(model: torch.nn.Module, onnx_path: Path) -> str | None:
    """Why the graph's outputs depart from `model`'s on a test step, or None where they agree."""
    diff, scale = _parity(model, onnx_path)
    return _departure(onnx_path.name, diff, scale) if _departs(diff, scale) else None


def _departs(diff: float, scale: float) -> bool:
    return diff > GRAPH_PARITY_REL * max(1.0, scale)


def _departure(name: str, diff: float, scale: float) -> str:
    return (
        f"{name} departs from the torch model: max |ORT - torch| {diff:.3g} against outputs up to {scale:.3g} "
        f"(more than {GRAPH_PARITY_REL:g} of them)"
    )


def onnx_parity(model: torch.nn.Module, onnx_path: Path, backend: Any = None, seed: int = 0) -> float:
    """Max |ORT - torch| over logits and latents of a cached step with a ragged past (fp32 compute)."""
    return _parity(model, onnx_path, backend, seed)[0]


def _parity(model: torch.nn.Module, onnx_path: Path, backend: Any = None, seed: int = 0) -> tuple[float, float]:
    """`onnx_parity`, and the largest |output| of torch's step."""
    from crosschip.handoff.onnx_export import INPUT_NAMES, CachedStep, causal_mask, open_session

    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    B, T, S, P = 3, 4, 6, 32
    lens = torch.tensor([S, 2, 0])
    inputs = (
        torch.randint(0, cfg.vocab_size, (B, T), generator=g),
        lens[:, None] + torch.arange(T),
        torch.randn(cfg.num_hidden_layers, P, cfg.kv_lora_rank, generator=g),
        torch.randn(cfg.num_hidden_layers, P, cfg.qk_rope_head_dim, generator=g),
        torch.randint(0, P, (B, S), generator=g),
        causal_mask(lens, T, S),
    )
    with torch.no_grad():
        ref = CachedStep(model)(*inputs)
    got = open_session(onnx_path, backend).run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
    diff = max(float(np.abs(r.numpy() - o).max()) for r, o in zip(ref, got))
    return diff, max(float(r.abs().max()) for r in ref)


def bundle_sizes(folder: str | Path) -> dict[str, Any]:
    """Bytes on disk: every file, the HF weights, the ONNX graph (with external data), the total."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {
        "files": files,
        "weights_bytes": sum(n for f, n in files.items() if f.endswith(".safetensors")),
        "onnx_bytes": sum(n for f, n in files.items() if f.startswith(ONNX_FILE)),
        "total_bytes": sum(files.values()),
    }
