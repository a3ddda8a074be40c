"""One CLI, one subcommand per stage.

Each stage lives in its own module that provides `add_arguments(parser)` and
`run(args) -> int`. The CLI imports a stage only when it is asked for, so `crosschip --help`
stays fast and never imports an accelerator runtime.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import types
from dataclasses import dataclass

from crosschip import interrupts
from crosschip.errors import CrosschipError


@dataclass(frozen=True)
class Stage:
    module: str
    summary: str
    example: str


STAGES: dict[str, Stage] = {
    "probe": Stage(
        "crosschip.backends.command",
        "measure every backend usable here (dtypes, memory, FLOP/s, op coverage)",
        "crosschip probe --json probe.json",
    ),
    "qualify": Stage(
        "crosschip.qualify.command",
        "judge a backend TRAIN, SERVE-ONLY or UNFIT against a reference",
        "crosschip qualify --backend torch:cpu --reference torch:cpu",
    ),
    "train": Stage(
        "crosschip.train.command",
        "train a model on one backend, with checkpoints and a health guard",
        "crosschip train --config configs/default.toml --out runs/train",
    ),
    "export": Stage(
        "crosschip.handoff.command",
        "turn a checkpoint into a bundle for a target (dtype policy, int8, ONNX)",
        "crosschip export runs/train/checkpoints --to ort:cpu --dtype fp16 --out bundle/",
    ),
    "verify": Stage(
        "crosschip.verify.command",
        "parity gate: compare a target against a reference on the same prompts",
        "crosschip verify bundle/ --reference torch:cpu --target ort:cpu",
    ),
    "serve": Stage(
        "crosschip.serve.command",
        "serve a bundle behind an OpenAI-compatible HTTP API",
        "crosschip serve bundle/ --on torch:cpu --port 8000",
    ),
    "run": Stage(
        "crosschip.pipeline",
        "the whole trip: probe, qualify, assign roles, train, export, verify, serve",
        "crosschip run --config configs/default.toml",
    ),
    "bench": Stage(
        "crosschip.bench",
        "run a benchmark script from benchmarks/ and print its ratios",
        "crosschip bench train_throughput",
    ),
}


def _load_stage(name: str):
    """The stage's module, or None when it is not built yet."""
    module = STAGES[name].module
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            return None
        raise


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosschip",
        description="Train on one chip, serve on another, and prove the model survived the trip.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  crosschip run                       # the whole pipeline on the default config\n"
        "  crosschip <stage> --help            # arguments of one stage",
    )
    import crosschip

    parser.add_argument("--version", action="version", version=f"crosschip {crosschip.__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, stage in STAGES.items():
        p = sub.add_parser(
            name,
            help=stage.summary,
            description=stage.summary,
            epilog=f"example:\n  {stage.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # Only the stage that was asked for is imported (its runtime may be heavy).
        if name == wanted:
            module = _load_stage(name)
            if module is None:
                p.description = f"{stage.summary}\n\n(not built yet)"
            else:
                module.add_arguments(p)
    parser.stage_parsers = sub.choices  # for errors in a stage's own words (main)
    return parser


def _os_error(e: OSError) -> str:
    """'cannot use PATH: REASON' (and the second path of a rename or link)."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"cannot use {paths}: {e.strerror or e}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(wanted if wanted in STAGES else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the stage's parser, with its usage: the top-level one showed "crosschip STAGE ..."
        (parser.stage_parsers[args.stage] if args.stage else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.stage is None:
        parser.print_help()
        return 2
    module = _load_stage(args.stage)
    if module is None:
        print(f"crosschip {args.stage}: this stage is not built yet.", file=sys.stderr)
        return 2
    previous = interrupts.install()
    try:
        return _run_stage(module, args)
    finally:
        interrupts.restore(previous)  # an in-process caller (a test runner) keeps its own handlers


def _run_stage(module: types.ModuleType, args: argparse.Namespace) -> int:
    try:
        code = int(module.run(args) or 0)
    except (KeyboardInterrupt, Exception) as e:
        # A library can catch the KeyboardInterrupt and raise its own error instead: after a
        # Ctrl-C, whatever ends the stage is the interruption, not a failure to report.
        if not (isinstance(e, KeyboardInterrupt) or interrupts.seen()):
            if isinstance(e, CrosschipError):
                print(f"crosschip {args.stage}: error: " + textwrap.indent(str(e), "  ").lstrip(), file=sys.stderr)
                return e.exit_code
            if isinstance(e, OSError) and e.filename is not None:
                # A path the user gave (or its disk) refused us: name it, no traceback.
                print(f"crosschip {args.stage}: error: {_os_error(e)}", file=sys.stderr)
                return 1
            raise
    else:
        # A stage that handled the Ctrl-C itself returns its own code; one that a library let
        # finish after it did not finish as asked, and its outputs are not to be trusted.
        if code != 0 or not interrupts.seen():
            return code
    by = "" if interrupts.exit_code() == 130 else f" ({interrupts.signal_name()})"
    print(f"\ncrosschip {args.stage}: interrupted{by}", file=sys.stderr)
    return interrupts.exit_code()
