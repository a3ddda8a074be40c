"""Atomic, checksummed, portable training checkpoints.

A checkpoint is a folder `step_XXXXXXXX/` that is also a loadable HF DeepseekV3 folder:

    config.json, model.safetensors    the model in the HF layout (through `crosschip.hf.to_hf`)
    tokenizer.json, ...               the tokenizer
    optimizer.safetensors             optimizer state tensors, keyed `{param fqn}/{name}`
    rng.safetensors                   torch RNG states (host and device)
    trainer_state.json                step, data cursor, optimizer param groups, loss scaler,
                                      python RNG, anything else scalar
    crosschip.json                    manifest: sha256 of every other file, kind, step

Every tensor is stored with safetensors and every scalar as JSON: no pickle. All tensors are
full (unsharded), so a checkpoint written by N processes resumes on M.

A save writes into a hidden temp folder, fsyncs every file, renames the folder into place and
fsyncs the parent, so a crash mid-save leaves either the old set of checkpoints or the new one,
never a half-written folder under a real name. Temp folders left by a crash are removed on the
next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from crosschip import hf
from crosschip.config import ModelConfig
from crosschip.errors import BundleError, CrosschipError
from crosschip.train import step_dir

if TYPE_CHECKING:
    from crosschip.model import Transformer
    from crosschip.tokenizer import Tokenizer

STEP_DIR = re.compile(r"^step_(\d{8})$")
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Everything a checkpoint holds, as full (unsharded) tensors and JSON scalars."""

    step: int
    model: dict[str, Tensor]
    """Our state-dict keys (the adapter renames them on disk)."""
    optimizer: dict[str, Tensor]
    """Flattened optimizer tensors `{fqn}/{name}`."""
    rng: dict[str, Tensor]
    scalars: dict[str, Any]
    """JSON-able trainer state: data cursor, param groups, scaler, python RNG..."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, state: TrainState, cfg: ModelConfig, tokenizer: Tokenizer | None) -> None:
    ids = {}
    if tokenizer is not None:
        tokenizer.save(tmp, model_max_length=cfg.max_position_embeddings)
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    (tmp / hf.CONFIG_FILE).write_text(json.dumps(hf.hf_config(cfg, **ids), indent=2) + "\n", encoding="utf-8")
    weights = {k: t.detach().cpu().contiguous() for k, t in hf.to_hf(state.model, cfg).items()}
    hf.save_safetensors(weights, tmp / hf.WEIGHTS_FILE, metadata={"format": "pt"})
    hf.save_safetensors({k: t.detach().cpu().contiguous() for k, t in state.optimizer.items()}, tmp / OPTIMIZER_FILE)
    hf.save_safetensors({k: t.detach().cpu().contiguous() for k, t in state.rng.items()}, tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"step": state.step, **state.scalars}, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(
    root: str | Path,
    state: TrainState,
    cfg: ModelConfig,
    *,
    tokenizer: Tokenizer | None = None,
    keep: int = 3,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Write `state` atomically as `root/step_XXXXXXXX` and keep only the newest `keep` (>= 2).

    before_rename: called once every file is written and synced, just before the folder is
    renamed into place (fault injection kills the process there).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = step_dir(root, state.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, state, cfg, tokenizer)
        hf.write_manifest(tmp, {"kind": "checkpoint", "step": state.step}, scan=True)
        # safetensors writes 0600 whatever the umask; every file gets the mode open() gave the
        # state file, so whoever may read the run folder may export from it.
        mode = (tmp / STATE_FILE).stat().st_mode & 0o777
        for f in tmp.iterdir():
            os.chmod(f, mode)
            _fsync_file(f)
        _fsync_dir(tmp)
        if before_rename is not None:
            before_rename()
        if final.exists():  # a re-save of the same step after a rollback replaces it
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a quota, a folder gone read-only
            raise _write_failed(root, final.name, e) from None
        raise
    _prune(root, max(2, keep))
    return final


def _write_failed(root: Path, name: str, error: OSError) -> CrosschipError:
    """One line for a checkpoint that could not be written: the folder, the reason, and what
    is left to resume from (the half-written folder is already gone)."""
    newest = list_checkpoints(root)
    left = (
        f"the newest checkpoint, {newest[0].name}, is intact: continue from it with --resume once the folder takes writes"
        if newest
        else "there is no earlier checkpoint"
    )
    return CrosschipError(f"cannot write checkpoint {name} in {root}: {error.strerror or error}; {left}")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, newest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> str | None:
    """None when every file matches the manifest, else why not."""
    path = Path(path)
    if not (path / hf.MANIFEST_FILE).is_file():
        return f"{path}: no {hf.MANIFEST_FILE} (every checkpoint the trainer writes has its manifest)"
    try:
        hf.verify_manifest(path)
        files = hf.read_manifest(path)["files"]
    except BundleError as e:
        return str(e)
    for name in (hf.WEIGHTS_FILE, hf.CONFIG_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE):
        if name not in files:
            return f"{path}: {name} is not in the manifest"
    return None


def latest_verified(ckpt_root: str | Path, report: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest checkpoint whose checksums verify; each corrupt one is reported and skipped.

    report(path, reason) is called for every checkpoint skipped; by default a warning goes to
    stderr.
    """
    for path in list_checkpoints(ckpt_root):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        if report is not None:
            report(path, reason)
        else:
            print(f"crosschip: skipping corrupt checkpoint {path}: {reason}", file=sys.stderr)
    return None


def read_checkpoint(path: str | Path, verify: bool = True) -> tuple[TrainState, ModelConfig]:
    """Load a checkpoint folder into memory (CPU tensors); refuses one that fails its checksums."""
    path = Path(path)
    if verify and (reason := verify_checkpoint(path)) is not None:
        raise CrosschipError(f"checkpoint {path} is corrupt: {reason}")
    with unreadable_as_error(path):
        cfg = hf.model_config_from_hf(json.loads((path / hf.CONFIG_FILE).read_text(encoding="utf-8")))
        model = hf.from_hf(load_file(path / hf.WEIGHTS_FILE), cfg)
        scalars = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        step = int(scalars.pop("step"))
        state = TrainState(step, model, load_file(path / OPTIMIZER_FILE), load_file(path / RNG_FILE), scalars)
    return state, cfg


@contextmanager
def unreadable_as_error(path: Path):
    """A checkpoint whose files match its manifest but do not hold what a checkpoint holds (a
    file replaced along with its checksum, a writer of another version) is one clear error."""
    try:
        yield
    except (SafetensorError, KeyError, IndexError, TypeError, ValueError) as e:
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CrosschipError(
            f"checkpoint {path} matches its manifest but cannot be read ({what}); remove it to resume from the one before"
        ) from None


def load_model(ckpt_dir: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """The model (eval mode, fp32, CPU) and tokenizer of a checkpoint folder, checked as the
    trainer checks it before a resume: a manifest listing every file, all checksums matching."""
    reason = verify_checkpoint(ckpt_dir)
    if reason is not None:
        raise BundleError(reason)
    return hf.load_bundle(ckpt_dir, verify_checksums=False)


# --------------------------------------------------------------------------------------------
# Optimizer state <-> flat tensors + JSON (no pickle)
# --------------------------------------------------------------------------------------------


def flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """A FQN-keyed optimizer state dict -> ({`fqn/name`: tensor}, JSON-able param groups)."""
    tensors = {}
    for fqn, per_param in osd["state"].items():
        for name, value in per_param.items():
            tensors[f"{fqn}/{name}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return tensors, [dict(g) for g in osd["param_groups"]]


def unflatten_optimizer(tensors: dict[str, Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": [dict(g) for g in groups]}
