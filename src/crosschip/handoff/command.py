"""`crosschip export SRC --to TARGET --dtype POLICY --out BUNDLE`."""

from __future__ import annotations

import argparse
import json
import subprocess

from crosschip.config import POLICIES
from crosschip.errors import CrosschipError, first_line
from crosschip.handoff.source import check_source
from crosschip.paths import path_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        metavar="SRC",
        type=path_arg,
        help="checkpoint folder, checkpoint root / training run folder (newest verified checkpoint), or a bundle",
    )
    parser.add_argument(
        "--to",
        dest="target",
        default="ort:cpu",
        help="target backend, e.g. ort:cpu, ort:cann, torch:npu (default ort:cpu)",
    )
    parser.add_argument("--dtype", default="fp32", help=f"precision policy: {', '.join(POLICIES)} (default fp32)")
    parser.add_argument("--out", required=True, type=path_arg, help="bundle folder to write")
    parser.add_argument(
        "--fp16-overflow", choices=["error", "warn"], default="error", help="what an fp16 overflow does (default error)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace the bundle an earlier export wrote to --out (nothing else)"
    )
    parser.add_argument(
        "--measure-memory",
        action="store_true",
        help="also serve the bundle in a subprocess and record its resident memory",
    )
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_source(args.src)
    from crosschip import hf
    from crosschip.handoff.export import export_bundle

    if args.measure_memory:  # it serves the bundle here: said before the export, not after it
        from crosschip.backends import get_backend

        try:
            get_backend(args.target).require()
        except CrosschipError as e:
            raise CrosschipError(
                f"--measure-memory serves the bundle on this machine, and {e}; export without it, "
                "and measure where the target runs"
            ) from None

    manifest = export_bundle(
        args.src,
        args.out,
        target=args.target,
        policy=args.dtype,
        fp16_overflow=args.fp16_overflow,
        force=args.force,
        progress=not args.no_progress,
    )
    if args.measure_memory:
        from crosschip.handoff.memory import measure_serving_rss

        try:
            resident = measure_serving_rss(args.out, manifest["target"]["spec"])
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            raise CrosschipError(
                f"the bundle {args.out} is written, but --measure-memory failed: {first_line(e)}"
            ) from None
        hf.write_manifest(args.out, {"resident": resident})
        manifest = hf.read_manifest(args.out)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(summary(args.out, manifest))
    return 0


def summary(out: str, m: dict) -> str:
    sizes = m["sizes"]
    lines = [
        f"bundle {out}: {m['precision']['policy']} for {m['target']['spec']} from {m['source']['kind']} {m['source']['path']}",
        f"  weights {sizes['weights_bytes'] / 1e6:.2f} MB, onnx {sizes['onnx_bytes'] / 1e6:.2f} MB, total {sizes['total_bytes'] / 1e6:.2f} MB",
    ]
    if m.get("onnx"):
        o = m["onnx"]
        lines.append(
            f"  onnx: {o['expert_weights']} expert weights, ORT vs torch max |diff| {o['parity_fp32_max_abs']:.2e}"
        )
        if o.get("traced_from_cache"):
            lines.append(f"  traced graphs reused from the trace cache: {', '.join(o['traced_from_cache'])}")
        if o.get("cache_unwritable"):
            lines.append(
                f"  trace cache not written ({o['cache_unwritable']}): every export traces again; set "
                "CROSSCHIP_CACHE_DIR to a writable folder, or CROSSCHIP_TRACE_CACHE=0"
            )
    if r := m["precision"].get("fp16_range"):
        lines.append(f"  fp16 range: {len(r['overflow'])} tensors overflow, {len(r['underflow'])} underflow")
    if res := m.get("resident"):
        lines.append(f"  resident memory when served on {res['backend']}: {res['rss_served_bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)
