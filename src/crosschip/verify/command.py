"""`crosschip verify`: the parity gate between a reference and a target on the same prompts.

Exit codes: 0 the gate passed; 4 the gate failed (report written); 1 bad input.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from crosschip.config import DataConfig, VerifyConfig
from crosschip.errors import CrosschipError
from crosschip.paths import check_output_dir, path_arg, refuse_empty
from crosschip.verify.gate import GATE_FAILED_EXIT, PPL_GAP
from crosschip.verify.prompts import CORPUS_NEW_TOKENS

EPILOG = f"""
exit codes: 0 gate passed, 4 gate failed (report.json / report.txt still written), 1 bad input.

gates by precision class (the bundle's crosschip.json precision policy, or --target-dtype):
  fp32       KL max <= 1e-6 and identical greedy output
  fp16/bf16  top-1 agreement >= 99% and KL mean <= 1e-3
  int8       task accuracy within 1 point of the reference (a model trained on a
             corpus: corpus perplexity within {PPL_GAP:.0%} of the reference's)

examples:
  crosschip verify bundle/ --reference torch:cpu --target ort:cpu --out runs/verify
  crosschip verify bundle/ --target torch:cpu --target-dtype bf16
  crosschip verify bundle/ --reference torch:cpu --target-url http://127.0.0.1:8000/v1
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, v = DataConfig(), VerifyConfig()
    p.epilog = (p.epilog or "") + "\n" + EPILOG
    p.add_argument("bundle", type=path_arg, help="bundle folder (written by crosschip export)")
    p.add_argument("--reference", default=v.reference, help=f"reference backend (default {v.reference})")
    p.add_argument("--target", default=None, help="target backend, e.g. ort:cpu, torch:cpu (default ort:cpu)")
    p.add_argument("--target-url", default=None, help="OpenAI-compatible server with logprobs instead of --target")
    p.add_argument("--api-key", default=None, help="API key of --target-url")
    p.add_argument("--model-name", default=None, help="model name at --target-url (default: its first model)")
    p.add_argument("--top-k", type=int, default=None, help="logprobs per position asked of --target-url (default 20)")
    p.add_argument(
        "--reference-weights",
        default="auto",
        help="weights the reference runs in fp32: auto (the source checkpoint recorded in crosschip.json when it is "
        "here, else the bundle), bundle, or a checkpoint/bundle folder (default auto)",
    )
    p.add_argument(
        "--target-weights", type=path_arg, default=None, help="weights a torch target runs (default: the bundle)"
    )
    p.add_argument(
        "--target-dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="compute precision of a torch target; also picks the gate (default: the bundle's policy)",
    )
    p.add_argument(
        "--problems", type=int, default=None, help=f"held-out problems continued greedily (default {v.prompts})"
    )
    p.add_argument("--corpus-docs", type=int, default=16, help="corpus paragraphs scored for perplexity (default 16)")
    p.add_argument(
        "--corpus",
        nargs="+",
        type=path_arg,
        default=None,
        metavar="PATH",
        help="the corpus paragraphs' source: .txt/.jsonl files or folders, as data.corpus (default: the built-in "
        "corpus). A bundle trained on a corpus is scored on corpus text alone, and its int8 gate on the perplexity: "
        "give the text it was trained on",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"greedy length (default: enough to finish every problem; {CORPUS_NEW_TOKENS} for a corpus model)",
    )
    trained = "default: the task the bundle's crosschip.json records it was trained on, else"
    p.add_argument("--digits", type=int, default=None, help=f"operand digits of the problems ({trained} {d.digits})")
    p.add_argument(
        "--ops",
        nargs="+",
        choices=["+", "-"],
        default=None,
        help=f"operations of the problems ({trained} {' '.join(d.ops)})",
    )
    p.add_argument("--no-bisect", action="store_true", help="skip the layer bisection when the gate fails")
    p.add_argument("--layers", action="store_true", help="also compute the per-layer error table when the gate passes")
    p.add_argument(
        "--no-record", action="store_true", help="do not record the parity report in the bundle's crosschip.json"
    )
    p.add_argument(
        "--out", type=path_arg, default="runs/verify", help="folder for report.json, report.txt and the sides' files"
    )


def _apply(flags: list[str]) -> str:
    return f"{' and '.join(flags)} {'applies' if len(flags) == 1 else 'apply'}"


def run(args: argparse.Namespace) -> int:
    from crosschip.verify.parity import VerifyOptions, verify

    if args.top_k is not None and args.top_k < 1:
        raise CrosschipError(f"--top-k must be >= 1, got {args.top_k}")
    check_output_dir(args.out, "--out")
    # Empty (an unset shell variable) was the default target, and the current folder as weights.
    refuse_empty(args.target, "--target", "give a backend such as ort:cpu, or leave the flag out")
    refuse_empty(args.reference_weights, "--reference-weights", "give auto, bundle or a folder")
    refuse_empty(args.model_name, "--model-name", "name a model the server lists, or leave the flag out")
    args.out = Path(args.out)
    bundle = Path(args.bundle).resolve()
    if args.out.resolve() == bundle or bundle in args.out.resolve().parents:
        raise CrosschipError(f"--out {args.out} is inside the bundle it verifies; choose another folder")
    # What only a torch target runs: a served graph or a server has its own weights and precision.
    torch_only = [
        flag
        for flag, value in (("--target-dtype", args.target_dtype), ("--target-weights", args.target_weights))
        if value is not None
    ]
    if torch_only and (args.target_url or not (args.target or "ort:cpu").startswith("torch:")):
        where = f"--target-url {args.target_url}" if args.target_url else f"--target {args.target or 'ort:cpu'}"
        raise CrosschipError(f"{_apply(torch_only)} to a torch target; {where} runs its own weights and precision")
    # And what only a server is asked for: taken without one, they were dropped without a word.
    url_only = [
        flag
        for flag, value in (("--top-k", args.top_k), ("--api-key", args.api_key), ("--model-name", args.model_name))
        if value is not None
    ]
    if url_only and not args.target_url:
        raise CrosschipError(f"{_apply(url_only)} to --target-url; --target {args.target or 'ort:cpu'} runs here")
    if not args.no_record and Path(args.bundle).is_dir() and not os.access(args.bundle, os.W_OK | os.X_OK):
        # Said now, not after both sides have run (the verdict would be lost to the error).
        raise CrosschipError(
            f"{args.bundle} is read-only, so the verdict cannot be recorded in its crosschip.json; pass --no-record"
        )
    target = args.target if args.target or args.target_url else "ort:cpu"
    opts = VerifyOptions(
        bundle=args.bundle,
        out=args.out,
        reference=args.reference,
        target=target,
        target_url=args.target_url,
        api_key=args.api_key,
        model_name=args.model_name,
        top_k=args.top_k or VerifyOptions.top_k,
        reference_weights=args.reference_weights,
        target_weights=args.target_weights,
        target_dtype=args.target_dtype,
        problems=args.problems,
        corpus_docs=args.corpus_docs,
        corpus=args.corpus,
        max_new_tokens=args.max_new_tokens,
        digits=args.digits,
        ops=args.ops,
        bisect=not args.no_bisect,
        layers=args.layers,
    )
    report = verify(opts)
    from crosschip.verify.report import record_in_bundle, render_text, write_report

    json_path, _ = write_report(report, args.out)
    print(render_text(report), end="")
    if not args.no_record:
        record_in_bundle(report, args.bundle)
    print(f"report: {json_path}")
    return 0 if report["gate"]["passed"] else GATE_FAILED_EXIT
