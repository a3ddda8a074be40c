"""`crosschip bench NAME`: run a script from benchmarks/ (they print side-by-side ratios)."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from crosschip.errors import CrosschipError


def _bench_dir() -> Path:
    # benchmarks/ sits next to src/ in a checkout; the scripts are not part of the wheel.
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="benchmark name (a file benchmarks/NAME.py); omit to list them")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def run(args: argparse.Namespace) -> int:
    scripts = sorted(p.stem for p in _bench_dir().glob("*.py"))
    if args.name is None:
        print("benchmarks: " + (", ".join(scripts) or "none found (run from a checkout)"))
        return 0
    if not args.name.strip():  # an unset shell variable, not a request for the list
        raise CrosschipError(f"the benchmark name is empty; available: {', '.join(scripts) or 'none'}")
    if args.name not in scripts:
        raise CrosschipError(f"unknown benchmark {args.name!r}; available: {', '.join(scripts) or 'none'}")
    # As `python benchmarks/NAME.py` would run it: its folder first on the import path (the
    # scripts import each other), and its usage line naming the command that was typed.
    sys.argv = [f"crosschip bench {args.name}", *args.args]
    sys.path.insert(0, str(_bench_dir()))
    # As a module with sys left alone: run_path set argv[0] back to the script's path.
    runpy.run_module(args.name, run_name="__main__", alter_sys=False)
    return 0
