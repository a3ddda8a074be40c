"""Precision policies of the hand-off: fp32, bf16, fp16 and int8 weight-only.

What each policy stores in `model.safetensors` (HF key names):

- `fp32`, `bf16`, `fp16`: every floating tensor in that dtype, except the RMSNorm weights and
  the router (`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`), which stay fp32:
  selection is a top-k over small score differences and the norms scale normalised activations.
- `int8` (weight-only): every 2-D weight that a matmul or lookup reads, i.e. the attention and
  MLP/expert linears, `model.embed_tokens.weight` and `lm_head.weight`, is stored as
  `<key>` int8 (out, in) plus `<key>_scale` fp32 (out,): symmetric per-output-channel scales,
  `w ~= weight[o, i] * weight_scale[o]` (for `foo.weight` the scale key is `foo.weight_scale`).
  The embedding and head are quantized per row too: they are 2 x vocab x hidden of the weights,
  and per-row int8 keeps each token's vector within 0.4% of its largest entry. Norms and the
  router stay fp32, as above.

Casting to fp16 checks every tensor against fp16's range first (targets without bf16, such as
310P-class NPUs, must use fp16): values above 65504 overflow to inf, nonzero values below
2^-24 (half the smallest subnormal) flush to zero, and values below 2^-14 become subnormal
(fewer significant bits). `check_fp16_range` reports them per tensor; overflow is an error or a
warning by policy.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crosschip import hf
from crosschip.config import POLICIES
from crosschip.errors import CrosschipError
from crosschip.model import DTYPES
from crosschip.paths import check_bundle_folder

SCALE_SUFFIX = "_scale"

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14  # 6.1e-5: below this fp16 is subnormal
FP16_FLUSH = 2.0**-25  # below half the smallest subnormal (2^-24), a value rounds to 0

# Tensors that keep fp32 under every policy (same rule as hf.save_bundle).
KEEP_FP32 = re.compile(r"(norm\.weight|\.mlp\.gate\.weight|\.mlp\.gate\.e_score_correction_bias)$")


class PrecisionError(CrosschipError):
    """A precision policy that cannot be applied to these weights (fp16 overflow, unknown policy)."""


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise PrecisionError(f"unknown precision policy {policy!r}; known: {', '.join(POLICIES)}")
    return policy


# --------------------------------------------------------------------------------------------
# fp16 range check
# --------------------------------------------------------------------------------------------


@dataclass
class TensorRange:
    """fp16 range problems of one tensor."""

    name: str
    numel: int
    max_abs: float
    overflow: int
    """Values with |x| > 65504 (become inf)."""
    flush_to_zero: int
    """Nonzero values that round to 0 in fp16."""
    subnormal: int
    """Nonzero values that survive only as fp16 subnormals (|x| < 2^-14), losing precision."""


@dataclass
class Fp16Report:
    """Per-tensor fp16 range check; only tensors with a problem are listed."""

    tensors_checked: int = 0
    overflow: list[TensorRange] = field(default_factory=list)
    underflow: list[TensorRange] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.overflow

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors_checked": self.tensors_checked,
            "overflow": [dataclasses.asdict(t) for t in self.overflow],
            "underflow": [dataclasses.asdict(t) for t in self.underflow],
        }

    def summary(self) -> str:
        lines = [
            f"fp16 range check: {self.tensors_checked} tensors, {len(self.overflow)} overflow, {len(self.underflow)} underflow"
        ]
        for t in self.overflow:
            lines.append(
                f"  overflow  {t.name}: {t.overflow} of {t.numel} values > {FP16_MAX:g} (max |x| {t.max_abs:.4g})"
            )
        for t in self.underflow[:10]:
            lines.append(
                f"  underflow {t.name}: {t.flush_to_zero} values flush to 0, {t.subnormal} subnormal (of {t.numel})"
            )
        if len(self.underflow) > 10:
            lines.append(f"  ... and {len(self.underflow) - 10} more tensors with underflow")
        return "\n".join(lines)


def check_fp16_range(state: dict[str, Tensor]) -> Fp16Report:
    """Check every floating tensor that an fp16 export would cast (norms and router stay fp32)."""
    report = Fp16Report()
    for name, t in state.items():
        if not t.is_floating_point() or KEEP_FP32.search(name):
            continue
        report.tensors_checked += 1
        a = t.detach().float().abs()
        nonzero = a > 0
        entry = TensorRange(
            name=name,
            numel=t.numel(),
            max_abs=float(a.max()) if t.numel() else 0.0,
            overflow=int((a > FP16_MAX).sum()),
            flush_to_zero=int((nonzero & (a < FP16_FLUSH)).sum()),
            subnormal=int(((a >= FP16_FLUSH) & (a < FP16_MIN_NORMAL)).sum()),
        )
        if entry.overflow:
            report.overflow.append(entry)
        if entry.flush_to_zero or entry.subnormal:
            report.underflow.append(entry)
    return report


def enforce_fp16(report: Fp16Report, on_overflow: str = "error") -> list[str]:
    """Apply the overflow policy: `error` raises PrecisionError, `warn` returns warning lines."""
    if on_overflow not in ("error", "warn"):
        raise PrecisionError(f"unknown fp16 overflow policy {on_overflow!r}; use 'error' or 'warn'")
    if report.ok:
        return []
    names = ", ".join(f"{t.name} (max |x| {t.max_abs:.4g})" for t in report.overflow[:5])
    msg = f"{len(report.overflow)} tensor(s) overflow fp16 (|x| > {FP16_MAX:g}): {names}"
    if on_overflow == "error":
        raise PrecisionError(msg + "; export with --dtype bf16/fp32, or --fp16-overflow warn to clamp to inf anyway")
    return [msg]


# --------------------------------------------------------------------------------------------
# int8 weight-only
# --------------------------------------------------------------------------------------------


def is_int8_weight(name: str, t: Tensor) -> bool:
    """Whether the int8 policy stores this HF tensor as int8 (2-D matmul/lookup weights)."""
    return t.is_floating_point() and t.dim() == 2 and name.endswith(".weight") and not KEEP_FP32.search(name)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: w (out, in) -> q int8 (out, in), scale fp32 (out,)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An fp HF state dict -> the int8 policy's tensors (`<key>` int8 plus `<key>_scale`)."""
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if is_int8_weight(name, t):
            out[name], out[name + SCALE_SUFFIX] = quantize_int8(t)
        else:
            out[name] = t.detach().float().contiguous() if t.is_floating_point() else t
    return out


def dequantize_state(state: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Inverse of `quantize_state` (up to rounding): int8 weights times their scales, in `dtype`."""
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in state:
            continue
        scale = state.get(name + SCALE_SUFFIX)
        if t.dtype == torch.int8:
            if scale is None:
                raise hf.BundleError(f"int8 tensor {name} has no {name + SCALE_SUFFIX}")
            out[name] = dequantize_int8(t, scale, dtype)
        else:
            out[name] = t
    return out


def is_quantized(state: dict[str, Tensor]) -> bool:
    return any(t.dtype == torch.int8 for t in state.values())


# --------------------------------------------------------------------------------------------
# Applying a policy to a model, and loading any policy's bundle
# --------------------------------------------------------------------------------------------


def round_model(model: torch.nn.Module, policy: str) -> torch.nn.Module:
    """`model` with its weights rounded as the policy stores them, computing in fp32.

    This is what a target sees after loading the bundle: the ONNX graph is exported from it,
    so the graph and the safetensors hold the same values.
    """
    check_policy(policy)
    cfg = model.cfg
    state = hf.to_hf({k: v.detach().float() for k, v in model.state_dict().items()}, cfg)
    if policy == "int8":
        state = dequantize_state(quantize_state(state))
    elif policy in ("bf16", "fp16"):
        dt = DTYPES[policy]
        state = {
            k: v if KEEP_FP32.search(k) or not v.is_floating_point() else v.to(dt).float() for k, v in state.items()
        }
    return hf.build_model(cfg, state)


def write_int8_weights(bundle: Path, state: dict[str, Tensor]) -> None:
    """Replace the bundle's model.safetensors with the int8 policy's tensors (atomic), and mark
    config.json so that loaders that cannot read them refuse the bundle (`hf.INT8_MARK`)."""
    target = bundle / hf.WEIGHTS_FILE
    tmp = target.with_name(target.name + ".tmp")
    hf.save_safetensors(
        quantize_state(state), tmp, metadata={"format": "pt", "crosschip_quantization": "int8-weight-only"}
    )
    tmp.replace(target)
    config = hf.read_json(bundle / hf.CONFIG_FILE)
    hf.write_json(bundle / hf.CONFIG_FILE, {**config, "quantization_config": hf.INT8_MARK})


def load_for_serving(bundle: str | Path, backend: Any = None, *, dtype: torch.dtype | None = None):
    """Load any policy's bundle as an eval-mode Transformer for torch serving.

    Checksums are verified (a tampered bundle is refused). int8 bundles are dequantized to
    `dtype` (default fp32); fp16/bf16 bundles compute in fp32 unless `dtype` says otherwise,
    with the router bias kept fp32. Returns (model, tokenizer | None).
    """
    folder = Path(bundle)
    check_bundle_folder(folder)
    if (folder / hf.MANIFEST_FILE).exists():
        hf.verify_manifest(folder)
    weights = hf.load_safetensors(folder / hf.WEIGHTS_FILE) if (folder / hf.WEIGHTS_FILE).is_file() else None
    if weights is None or not is_quantized(weights):
        return hf.load_bundle(folder, device=_device(backend), dtype=dtype, verify_checksums=False)
    cfg = hf.model_config_from_hf(hf.read_json(folder / hf.CONFIG_FILE))
    model = hf.build_model(cfg, dequantize_state(weights), device=_device(backend), dtype=dtype)
    return model, hf._load_tokenizer(folder)


def _device(backend: Any) -> Any:
    if backend is None or getattr(backend, "runtime", "torch") != "torch":
        return "cpu"
    return backend.device()


def weight_bytes(bundle: str | Path) -> int:
    """Bytes of the bundle's weight files on disk."""
    folder = Path(bundle)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
