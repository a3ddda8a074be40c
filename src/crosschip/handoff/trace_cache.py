"""A disk cache of traced ONNX graphs: a second export of the same architecture skips the trace.

Tracing the cached step (torch.export, its decompositions, the ONNX translation) is most of an
export: arith-tiny's first `crosschip export` took 31.7 s on a 2-core machine, the next one,
with both graphs from this cache, 8.4 s. The trace does not depend on the weights' values. Its initializers are the
step's parameters and buffers, by name (those the step uses): `store` checks that and does
not keep a graph that also captured some other tensor. So an export of another checkpoint of the same model
(another precision policy, a later step, `make run` again) loads the stored graph, binds its
own weights by name, and then runs what a fresh trace would run (the optimizer, the weight
storage, the checks). The file it writes is the one a fresh trace writes.

The key is everything that shapes a trace but the weights: the model config, the graph kind,
the parameters' and buffers' names, shapes and dtypes, the versions of torch and the ONNX packages, and the source of
crosschip itself (any code change starts a new key). Entries are stored without weights.

Where: $CROSSCHIP_CACHE_DIR/onnx-traces, by default $XDG_CACHE_HOME/crosschip or
~/.cache/crosschip. CROSSCHIP_TRACE_CACHE=0 turns the cache off. A cache that cannot be read
or written never fails an export: the export traces as if it were empty, and one that cannot
be written is named in the export's summary (every later export would trace again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

import onnx
import torch
from torch import nn

import crosschip

_PACKAGES = ("torch", "onnx", "onnxscript", "onnx-ir")


class Unwritable(Exception):
    """The cache folder cannot take an entry: the message names the path and the reason."""


def cache_dir() -> Path | None:
    """The folder of stored traces, or None when the cache is turned off."""
    if os.environ.get("CROSSCHIP_TRACE_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = os.environ.get("CROSSCHIP_CACHE_DIR")
    if not root:
        try:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "crosschip")
        except RuntimeError:  # no home folder to be found: no cache
            return None
    return Path(root) / "onnx-traces"


@functools.cache
def _code_fingerprint() -> str:
    """sha256 over crosschip's Python sources and the versions of the packages that trace."""
    h = hashlib.sha256()
    root = Path(crosschip.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in _PACKAGES:
        try:
            h.update(f"{name}={metadata.version(name)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=?\0".encode())
    return h.hexdigest()


def trace_key(model: nn.Module, kind: str) -> str:
    """The cache key of `model`'s `kind` graph ("general" or "decode")."""
    tensors = sorted((name, list(t.shape), str(t.dtype)) for name, t in _state(model).items())
    facts = {"config": dataclasses.asdict(model.cfg), "kind": kind, "tensors": tensors, "code": _code_fingerprint()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by the names the exporter gives their initializers."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _path(key: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / f"{key}.onnx"


def has(key: str) -> bool:
    path = _path(key)
    return path is not None and path.is_file()


def evict(key: str) -> None:
    """Drop the entry of `key`, if any (one whose graph no longer computes its model)."""
    path = _path(key)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def load(key: str, step: nn.Module) -> onnx.ModelProto | None:
    """The stored graph of `key` with `step`'s weights bound, or None.

    None also when the entry does not fit `step` (names, shapes or dtypes differ) or cannot be
    read; a broken entry is removed so that the next export replaces it."""
    path = _path(key)
    if path is None or not path.is_file():
        return None
    try:
        proto = onnx.load(str(path))
    except Exception:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    state = _state(step)
    if not {t.name for t in proto.graph.initializer} <= state.keys():
        return None
    for t in proto.graph.initializer:
        try:
            bound = onnx.numpy_helper.from_array(state[t.name].detach().cpu().contiguous().numpy(), t.name)
        except (TypeError, RuntimeError):  # a dtype numpy lacks (bf16): trace it instead
            return None
        if list(t.dims) != list(bound.dims) or t.data_type != bound.data_type:
            return None
        t.CopyFrom(bound)
    return proto


def store(key: str, traced: onnx.ModelProto, step: nn.Module) -> bool:
    """Keep the `traced` graph of `step` under `key`, without its weights. Returns
    whether it was stored: not when the cache is off, nor when the graph holds an initializer
    that is not one of `step`'s parameters or buffers (a captured tensor whose value a later
    export could not rebind). Raises Unwritable when the cache folder refuses the entry."""
    path = _path(key)
    if path is None or not {t.name for t in traced.graph.initializer} <= _state(step).keys():
        return False
    proto = onnx.ModelProto()
    proto.CopyFrom(traced)
    for t in proto.graph.initializer:
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: concurrent exports (pytest workers, the decode-graph
        # process) never read a half-written entry.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
        return True
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise Unwritable(f"{e.filename or path.parent}: {e.strerror or e}") from None
