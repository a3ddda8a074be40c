"""`crosschip qualify`: judge backends TRAIN, SERVE-ONLY or UNFIT against a reference.

Exit codes: 0 every backend can train or serve; 5 at least one is UNFIT (verdicts printed and
the --json file written all the same); 1 bad input. So `crosschip qualify --backend X && ...`
does not go on with a backend that can do neither.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from crosschip.backends import REGISTRY, get_backend
from crosschip.errors import CrosschipError
from crosschip.paths import check_output_dir, check_output_file, lock_folder, path_arg

UNFIT_EXIT = 5

EPILOG = "exit codes: 0 every backend is TRAIN or SERVE-ONLY, 5 one is UNFIT (--json still written), 1 bad input."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (parser.epilog or "") + "\n" + EPILOG
    parser.add_argument(
        "--backend",
        action="append",
        required=True,
        metavar="SPEC",
        help=f"backend to qualify (repeatable; the reference is measured once): {', '.join(REGISTRY)}",
    )
    parser.add_argument("--reference", default="torch:cpu", metavar="SPEC", help="trusted backend (default torch:cpu)")
    parser.add_argument(
        "--json", type=path_arg, metavar="FILE", help="write the verdict(s) and every measurement as JSON"
    )
    parser.add_argument("--workdir", type=path_arg, help="keep the children's outputs (training runs, tensors) here")
    parser.add_argument("--steps", type=int, default=None, help="steps of the stability runs (default 40)")


def render(result: dict[str, Any]) -> str:
    """The people's view of one verdict: the verdict line, its reasons, the key numbers."""
    name = result["backend"] + (f" [EMULATED: {result['emulation']}]" if result.get("emulation") else "")
    lines = [f"{name}: {result['verdict']}   (reference {result['reference']}, {result.get('seconds', 0):.0f} s)"]
    lines += [f"  - {r}" for r in result["reasons"]]
    m = result.get("measurements", {})
    numbers = []
    if m.get("train_tokens_per_s") is not None:
        numbers.append(f"train {m['train_tokens_per_s']:.0f} tokens/s")
    if m.get("step_time_cv") is not None:
        numbers.append(f"step-time CV {m['step_time_cv']:.2f}")
    if m.get("deterministic") is not None:
        numbers.append(
            "deterministic" if m["deterministic"] else f"NOT deterministic (repeat gap {m['repeat_gap']:.2e})"
        )
    if isinstance(m.get("collectives"), str):
        numbers.append(f"collectives {m['collectives']}")
    if numbers:
        lines.append("  measured: " + ", ".join(numbers))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from crosschip.qualify.qualifier import STABILITY_STEPS, Qualifier
    from crosschip.qualify.verdict import UNFIT

    for spec in [*args.backend, args.reference]:
        get_backend(spec)  # unknown names fail before any work starts
    if get_backend(args.reference).emulation:  # every verdict is measured against it
        raise CrosschipError(
            f"--reference {args.reference} is an emulated chip ({get_backend(args.reference).emulation}); "
            "the reference is the backend you trust, such as torch:cpu"
        )
    if args.steps is not None and args.steps < 8:
        raise CrosschipError(f"--steps must be at least 8, got {args.steps}")
    lock = None
    if args.workdir is not None:
        check_output_dir(args.workdir, "--workdir")
        # Two qualifications in one workdir trained into each other's folders: the second's
        # stability run failed on the first's checkpoints, and it judged the backend SERVE-ONLY.
        lock = lock_folder(args.workdir, "crosschip qualify")  # noqa: F841 - the open file is the lock
    if args.json:
        check_output_file(args.json, "--json")
    qualifier = Qualifier(args.reference, args.workdir, args.steps or STABILITY_STEPS)
    results = {}
    for spec in args.backend:
        results[spec] = qualifier.qualify(spec)
        print(render(results[spec]), flush=True)
    if args.json:
        payload = results[args.backend[0]] if len(args.backend) == 1 else results
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
        except OSError as e:
            raise CrosschipError(f"cannot write {args.json}: {e.strerror}") from None
        print(f"wrote {args.json}")
    return UNFIT_EXIT if any(r["verdict"] == UNFIT for r in results.values()) else 0
