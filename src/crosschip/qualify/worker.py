"""The target side of qualification: runs on ONE backend, in its own process.

`python -m crosschip.qualify.worker --backend SPEC --out DIR [--gold]` measures, on that
backend: which dtypes compute at all, every model op's error against fp64 in each of them
(`numerics.OPS`), and the `debug` model's forward and backward in each dtype, whose logits
and gradients it saves to DIR/parity_<dtype>.safetensors for the parent to compare. With
`--gold` it also writes the fp64 CPU result of the same model (parity_fp64.safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from crosschip.backends import get_backend
from crosschip.backends.base import Backend
from crosschip.backends.probe import check_autocast, check_matmul
from crosschip.config import model_preset
from crosschip.errors import CrosschipError
from crosschip.hf import save_safetensors
from crosschip.model import DTYPES, Transformer
from crosschip.qualify.numerics import OPS, measure_op

PARITY_BATCH = (2, 32)
"""(B, T) of the model-parity forward/backward."""


def parity_model() -> tuple[Transformer, torch.Tensor]:
    """The seeded `debug` model (built on the CPU, so every process gets the same weights) and tokens."""
    torch.manual_seed(0)
    cfg = model_preset("debug")
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, PARITY_BATCH, generator=torch.Generator().manual_seed(1))
    return model, tokens


def forward_backward(
    model: Transformer, tokens: torch.Tensor, device_type: str, dtype: str | None
) -> dict[str, torch.Tensor]:
    """Logits and every parameter's gradient of one next-token loss, as fp32 (fp64 for gold) CPU tensors."""
    model.zero_grad(set_to_none=True)
    enabled = dtype not in (None, "fp32")
    with torch.autocast(device_type, dtype=DTYPES[dtype] if enabled else torch.bfloat16, enabled=enabled):
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().to(logits.device)
    )
    loss.backward()
    keep = torch.float64 if dtype is None else torch.float32
    out = {"logits": logits.detach().to("cpu", keep).contiguous(), "loss": loss.detach().to("cpu", keep).reshape(1)}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[f"grad.{name}"] = p.grad.detach().to("cpu", keep).contiguous()
    return out


def measure_dtypes(backend: Backend) -> dict[str, dict[str, Any]]:
    """Each dtype is usable when a matmul and an autocast forward/backward both work."""
    result = {}
    for d in DTYPES:
        mm, ac = check_matmul(backend, d), check_autocast(backend, d)
        result[d] = {"ok": mm["ok"] and ac["ok"], "error": mm.get("error") or ac.get("error")}
    return result


def run_worker(spec: str, out: Path, gold: bool = False) -> dict[str, Any]:
    """Everything the parent needs from `spec`, measured in this process; writes DIR/worker.json."""
    backend = get_backend(spec)
    info: dict[str, Any] = {"backend": spec, "emulation": backend.emulation, "pid": os.getpid()}
    out.mkdir(parents=True, exist_ok=True)
    try:
        backend.require()
    except CrosschipError as e:
        info.update(available=False, reason=str(e))
        (out / "worker.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        return info
    device = backend.device()
    dtypes = measure_dtypes(backend)
    usable = [d for d, r in dtypes.items() if r["ok"]]
    ops = {name: {d: measure_op(op, device, d) for d in usable} for name, op in OPS.items()}
    parity = {}
    model, tokens = parity_model()
    if gold:
        save_safetensors(forward_backward(model.double(), tokens, "cpu", None), out / "parity_fp64.safetensors")
        model, tokens = parity_model()
    model = model.to(device)
    for d in usable:
        try:
            tensors = forward_backward(model, tokens.to(device), backend.device_type, d)
        except Exception as e:  # noqa: BLE001 - a model that fails on the device is a finding
            parity[d] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        save_safetensors(tensors, out / f"parity_{d}.safetensors")
        parity[d] = {"file": f"parity_{d}.safetensors"}
    info.update(
        available=True,
        fingerprint=backend.fingerprint(),
        device_count=backend.device_count(),
        dtypes=dtypes,
        ops=ops,
        parity=parity,
    )
    (out / "worker.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="qualification measurements on one backend (run by crosschip qualify)")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--gold", action="store_true", help="also write the fp64 CPU result of the parity model")
    args = parser.parse_args(argv)
    try:
        run_worker(args.backend, args.out, args.gold)
    except CrosschipError as e:
        print(f"qualify worker {args.backend}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
