"""Find what `crosschip export SRC` exports: a checkpoint, a checkpoint root, or a bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosschip.errors import CrosschipError
from crosschip.paths import check_input_dir

TRAINER_STATE = "trainer_state.json"


@dataclass
class Source:
    """A resolved export source: the model, its tokenizer and where they came from."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    """path, kind (checkpoint | bundle), step, weights sha256."""
    training: dict[str, Any] | None = None
    """Training backend fingerprint (backend, device, torch version) and dtype, when recorded."""
    task: dict[str, Any] | None = None
    """The task the model learned (`DataConfig.task_info`), when recorded."""


def checkpoint_root(path: Path) -> Path | None:
    """`path` itself or its `checkpoints/` when that holds step_XXXXXXXX folders."""
    from crosschip.train.checkpoint import list_checkpoints

    for root in (path / "checkpoints", path):
        if root.is_dir() and list_checkpoints(root):
            return root
    return None


def check_source(path: Path) -> None:
    """SRC exists and is a folder: answered before the exporter's imports (torch, onnx: seconds)."""
    check_input_dir(path, "export source", "checkpoint or bundle folder")


def resolve_source(src: str | Path) -> Source:
    """Load SRC: a training checkpoint folder, a checkpoint root (its newest verified
    checkpoint), a training run folder (its `checkpoints/`), or an existing bundle."""
    path = Path(src)
    check_source(path)
    from crosschip import hf  # torch

    if (path / TRAINER_STATE).is_file():
        return _from_checkpoint(path)
    if (path / hf.CONFIG_FILE).is_file():
        return _from_bundle(path)
    root = checkpoint_root(path)
    if root is None:
        raise CrosschipError(
            f"{path} is not a checkpoint, a checkpoint root or a bundle (no trainer_state.json, config.json or step_* folders)"
        )
    from crosschip.train.checkpoint import latest_verified

    newest = latest_verified(root)
    if newest is None:
        raise CrosschipError(f"no checkpoint under {root} passes its checksums")
    return _from_checkpoint(newest)


def _from_checkpoint(folder: Path) -> Source:
    from crosschip import hf
    from crosschip.train.checkpoint import load_model, unreadable_as_error

    model, tokenizer = load_model(folder)
    with unreadable_as_error(folder):  # invalid JSON was a traceback, where train said one line
        state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise TypeError(f"{TRAINER_STATE} holds a {type(state).__name__}, not an object")
    training = None
    if isinstance(state.get("backend"), dict):
        training = {**state["backend"], "dtype": state.get("dtype")}
    info = {
        "path": str(folder.resolve()),
        "kind": "checkpoint",
        "step": state.get("step"),
        "weights_sha256": hf.weights_sha256(folder),
    }
    task = state.get("task") if isinstance(state.get("task"), dict) else None
    return Source(model, tokenizer, info, training, task)


def _from_bundle(folder: Path) -> Source:
    from crosschip import hf
    from crosschip.handoff.precision import load_for_serving

    model, tokenizer = load_for_serving(folder)
    manifest = hf.read_manifest(folder) if (folder / hf.MANIFEST_FILE).exists() else {}
    info = {"path": str(folder.resolve()), "kind": "bundle", "weights_sha256": hf.weights_sha256(folder)}
    if manifest.get("precision", {}).get("policy") not in (None, "fp32"):
        info["note"] = f"re-exported from a {manifest['precision']['policy']} bundle: its rounding is kept"
    return Source(model, tokenizer, info, manifest.get("training_backend"), manifest.get("task"))
