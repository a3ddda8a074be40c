"""One side of a parity check, in its own process (one accelerator per process).

    python -m crosschip.verify.worker --side target --bundle B --backend ort:cpu \
        --prompts prompts.json --out DIR

Writes `DIR/SIDE.safetensors` (per scored prompt: `scored.I` logits (T, V) fp32, or for a
remote side `topk_ids.I`, `topk_lp.I`, `token_lp.I`) and `DIR/SIDE.json` (greedy token ids,
what ran: backend fingerprint, weights, dtype, timings). With `--capture` it records module
outputs for the layer bisection instead (`DIR/SIDE.capture.safetensors`). No pickle: tensors
go through safetensors, everything else through JSON.

A user error is printed as one `error: ...` line on stderr and exits with its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from crosschip.errors import CrosschipError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m crosschip.verify.worker", description=__doc__)
    p.add_argument("--side", required=True, help="name of this side in the output files (reference / target)")
    p.add_argument("--bundle", required=True, help="bundle folder (tokenizer, config, default weights)")
    p.add_argument("--backend", required=True, help="backend spec (torch:cpu, ort:cpu, ...) or 'remote'")
    p.add_argument("--prompts", required=True, help="prompts.json written by the parent")
    p.add_argument("--out", required=True, help="folder for SIDE.safetensors and SIDE.json")
    p.add_argument("--weights", default=None, help="weights folder for a torch side (default: the bundle)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="torch compute precision")
    p.add_argument("--capture", action="store_true", help="record module outputs for the bisection")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    p.add_argument("--url", default=None, help="remote side: OpenAI-compatible base URL (.../v1)")
    p.add_argument("--model-name", default=None, help="remote side: model name (default: the server's first)")
    p.add_argument("--top-k", type=int, default=20, help="remote side: logprobs per position")
    return p.parse_args(argv)


def load_torch_model(weights: str, dtype: str, backend: Any) -> tuple[Any, str]:
    """The model for a torch side and a description of what was loaded.

    Any precision policy's bundle (or a training checkpoint) loads through the hand-off's
    loader: int8 weights are dequantized, and `dtype` is the compute precision (int8
    weight-only computes in fp32 on its dequantized weights).
    """
    import torch

    from crosschip.handoff.precision import load_for_serving
    from crosschip.verify.gate import precision_of_bundle

    stored, _ = precision_of_bundle(weights)
    name = DTYPES.get(dtype, "float32")
    model, _ = load_for_serving(weights, backend, dtype=getattr(torch, name))
    return model, f"{weights} ({stored} weights, computed in {name})"


def make_side(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The side object (score / greedy) and what it runs on."""
    if args.backend == "remote":
        from crosschip.tokenizer import Tokenizer
        from crosschip.verify.parity import API_KEY_ENV
        from crosschip.verify.remote import RemoteSide

        side = RemoteSide(
            args.url,
            Tokenizer.load(args.bundle),
            api_key=os.environ.get(API_KEY_ENV),
            model=args.model_name,
            top_k=args.top_k,
        )
        return side, {"backend": "remote", "url": args.url, "model": side.model, "top_k": args.top_k}
    from crosschip.backends import get_backend

    backend = get_backend(args.backend).require()
    info: dict[str, Any] = {"backend": args.backend, "fingerprint": backend.fingerprint()}
    if backend.runtime == "ort":
        from crosschip.serve.executor import make_executor
        from crosschip.verify.sides import ExecutorSide

        info["weights"] = f"{args.bundle} (model.onnx through the serving executor)"
        opts = {"threads": args.threads} if args.threads > 0 else {}
        return ExecutorSide(make_executor(args.bundle, args.backend, **opts)), info
    from crosschip.verify.sides import TorchSide

    model, info["weights"] = load_torch_model(args.weights or args.bundle, args.dtype, backend)
    info["dtype"] = args.dtype
    return TorchSide(model, backend.device()), info


def run_side(args: argparse.Namespace) -> None:
    import torch

    from crosschip.hf import save_safetensors
    from crosschip.verify.prompts import PromptSet

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    prompts = PromptSet.load(args.prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    side, info = make_side(args)
    info["load_s"] = round(time.perf_counter() - t0, 3)

    if args.capture:
        from crosschip.verify.bisect import capture, labels
        from crosschip.verify.sides import TorchSide

        if not isinstance(side, TorchSide):
            raise CrosschipError(f"{args.backend}: the bisection needs the weights in torch (use a torch backend)")
        records = capture(side.model, [prompts.scored[i].ids for i in prompts.capture], side.device)
        save_safetensors({k: v.contiguous() for k, v in records.items()}, out / f"{args.side}.capture.safetensors")
        info["labels"] = labels(side.model)
        (out / f"{args.side}.capture.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        return

    t0 = time.perf_counter()
    tensors = side.score_all(prompts) if hasattr(side, "score_all") else _score_all(side, prompts)
    info["score_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    greedy = side.greedy([p.ids for p in prompts.greedy], prompts.max_new_tokens, prompts.eos_ids)
    info["greedy_s"] = round(time.perf_counter() - t0, 3)
    if getattr(side, "mapped_from_strings", 0):
        info["token_ids"] = "canonical"  # the parent canonicalises the reference's ids too
        info["token_ids_note"] = (
            f"the server returns token strings, not ids: {side.mapped_from_strings} mapped back through the tokenizer, "
            f"{side.ambiguous} shared by several ids (left out of the KL support, compared by canonical id)"
        )
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out / f"{args.side}.safetensors")
    (out / f"{args.side}.json").write_text(json.dumps({"info": info, "greedy": greedy}), encoding="utf-8")


def _score_all(side: Any, prompts: Any) -> dict[str, Any]:
    return {f"scored.{i}": side.score(p.ids) for i, p in enumerate(prompts.scored)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_side(args)
    except CrosschipError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
