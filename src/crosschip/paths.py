"""Output paths named on the command line, checked before a stage does any work.

A folder or file that cannot be created (a file where a folder should be, a folder under a
file, a read-only parent) would otherwise surface as an OSError traceback from deep inside a
stage, or, for a JSON report, only after the whole measurement it reports.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from pathlib import Path
from typing import IO

from crosschip.errors import BundleError, CrosschipError


def _check_ancestors(path: Path, flag: str, folders: tuple[Path, ...]) -> None:
    """The nearest existing one of `folders` must be a folder this process can write into."""
    for p in folders:
        if not p.exists():
            continue
        if not p.is_dir():
            raise CrosschipError(f"{flag} {path}: {p} is a file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise CrosschipError(f"{flag} {path}: {p} is not writable")
        return


def refuse_empty(value: str | Path | None, flag: str, hint: str = "") -> None:
    """A flag given as an empty string (an unset variable) is refused, not taken as not given:
    `--config ""` ran the default config, `--resume ""` started a new run."""
    if value is not None and not str(value).strip():
        raise CrosschipError(f"{flag} is empty" + (f"; {hint}" if hint else ""))


def path_arg(value: str) -> Path:
    """The argparse `type` of a path argument: empty is an error (most often an unset shell
    variable), where `Path("")` would quietly be the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return Path(value)


def check_output_dir(path: Path | str, flag: str) -> None:
    """`path` is, or can be made, a writable folder; not an empty string (an unset variable,
    which would write into the current folder)."""
    refuse_empty(path, flag, "name a folder")
    path = Path(path)
    _check_ancestors(path, flag, (path, *path.parents))


def check_input_dir(path: Path, what: str, kind: str) -> None:
    """`path` is an existing folder; else one line naming `what` (a missing one, or a file where
    a `kind` folder belongs). Light enough to run before a stage imports its runtime."""
    if not path.exists():
        raise CrosschipError(f"{what} not found: {path}")
    if not path.is_dir():
        raise CrosschipError(f"{what} must be a {kind}, got a file: {path}")


def check_bundle_folder(path: Path) -> None:
    """`path` is a folder, as a bundle is: else one BundleError naming a missing one, or a file
    given for it (a bundle's model.onnx, say)."""
    if path.is_file():
        raise BundleError(f"{path} is a file; give the bundle's folder")
    if not path.is_dir():
        raise BundleError(f"bundle folder not found: {path}")


def check_output_file(path: Path | str, flag: str) -> None:
    """`path` can be written as a file."""
    refuse_empty(path, flag, "name a file")
    path = Path(path)
    if path.is_dir():
        raise CrosschipError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):  # said after the measurement, minutes in
        raise CrosschipError(f"{flag} {path} exists and is not writable")
    _check_ancestors(path, flag, tuple(path.parents))


LOCK_FILE = ".lock"


def lock_folder(out: Path, who: str) -> IO[str]:
    """Hold `out`/.lock while this process (`who`, e.g. "crosschip train") writes there;
    another writer is refused, named by its pid.

    Two trainings on one folder appended to one metrics log, and each save removed the other's
    half-written checkpoint; two `crosschip run --resume` of one run redid a stage side by side,
    the second overwrote the first's log, and its export stage deletes the bundle the other
    verifies. The lock is released when the returned file is closed or the process ends,
    however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - the caller closes it
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise CrosschipError(
            f"{out} is being written by another {who} (pid {holder}); wait for it to end or use another folder"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
