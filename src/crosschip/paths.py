"""Output paths named on the command line, checked before a stage does any work.

A folder or file that cannot be created (a file where a folder should be, a folder under a
file, a read-only parent) would otherwise surface as an OSError traceback from deep inside a
stage, or, for a JSON report, only after the whole measurement it reports.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from crosschip.errors import CrosschipError


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


def check_output_file(path: Path | str, flag: str) -> None:
    """`path` can be written as a file."""
    refuse_empty(path, flag, "name a file")
    path = Path(path)
    if path.is_dir():
        raise CrosschipError(f"{flag} {path} is a folder; give a file name")
    _check_ancestors(path, flag, tuple(path.parents))
