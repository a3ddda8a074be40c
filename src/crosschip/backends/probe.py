"""Probe one backend by running things on it, in this process only.

`python -m crosschip.backends.probe --backend SPEC --out FILE.json` measures one backend and
writes what it found: which dtypes really work for matmul and autocast (run, checked finite
and close to fp32), memory, the collective backend (a one-rank group is started and used),
matmul TFLOP/s and copy GB/s (median of a few reps), and op coverage of the `debug` model's
forward and backward (failures, and CPU fallbacks as the runtime reports them in warnings).
An absent backend is a result too: the JSON says why. `crosschip probe` runs this once per
backend, each in its own subprocess, because some runtimes (torch_npu) refuse to share a
process with another accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crosschip.backends import get_backend
from crosschip.backends.base import Backend
from crosschip.errors import CrosschipError

DTYPE_NAMES = ("fp32", "bf16", "fp16")
FALLBACK_WORDS = ("fallback", "fall back", "falls back", "cpu")
"""Warning text that marks an op that left the device (torch_npu warns when an op runs on the CPU)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _median_seconds(fn: Callable[[], None], backend: Backend, reps: int = 5, min_rep_s: float = 0.02) -> float:
    """Median seconds per call of `fn`, over `reps` reps of enough calls to last `min_rep_s`.

    One timed warm-up call sizes the reps; the device is synchronised around each rep so
    asynchronous backends are timed for the work, not the launch.
    """
    t0 = time.perf_counter()
    fn()
    backend.synchronize()
    calls = max(1, min(50, int(min_rep_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        backend.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


# -- dtypes ------------------------------------------------------------------------------------
def check_matmul(backend: Backend, dtype: str) -> dict[str, Any]:
    """Run a matmul in `dtype` and check it is finite and close to fp32 on the same inputs."""
    import torch

    from crosschip.model import DTYPES
    from crosschip.qualify.metrics import BANDS, error_stats, refusal

    refused = refusal(backend.emulated_refused_dtypes, dtype, backend.spec, backend.emulation)
    if refused:
        return {"ok": False, "error": refused}
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(128, 128, generator=gen).to(DTYPES[dtype])
    b = torch.randn(128, 128, generator=gen).to(DTYPES[dtype])
    try:
        out = a.to(backend.device()) @ b.to(backend.device())
        backend.synchronize()
    except Exception as e:  # noqa: BLE001 - a dtype the device lacks is what we are measuring
        return {"ok": False, "error": _first_line(e)}
    stats = error_stats(out, a.double() @ b.double())
    # "Works" is looser than the qualify band: 10x the band still means the kernel computes.
    ok = stats["finite"] and stats["rel_err"] <= 10 * BANDS[dtype]
    return {"ok": ok, "rel_err": stats["rel_err"], **({} if ok else {"error": "result not finite or far from fp64"})}


def check_autocast(backend: Backend, dtype: str) -> dict[str, Any]:
    """A Linear forward and backward under autocast(dtype): it must really compute in dtype."""
    import torch

    from crosschip.model import DTYPES
    from crosschip.qualify.metrics import error_stats, refusal

    refused = refusal(backend.emulated_refused_dtypes, dtype, backend.spec, backend.emulation)
    if refused:
        return {"ok": False, "error": refused}
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).to(backend.device())
    x = torch.randn(16, 64).to(backend.device())
    ref = lin(x).detach()
    try:
        with torch.autocast(backend.device_type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
            y = lin(x)
        y.float().square().mean().backward()
        backend.synchronize()
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": _first_line(e)}
    stats = error_stats(y, ref)
    grad_ok = lin.weight.grad is not None and bool(torch.isfinite(lin.weight.grad).all())
    ok = y.dtype == DTYPES[dtype] and stats["finite"] and stats["cosine"] > 0.99 and grad_ok
    result = {"ok": ok, "output_dtype": str(y.dtype).removeprefix("torch."), "cosine_vs_fp32": stats["cosine"]}
    if not ok:
        result["error"] = "autocast did not compute in this dtype" if y.dtype != DTYPES[dtype] else "bad result"
    return result


# -- speed -------------------------------------------------------------------------------------
def matmul_tflops(backend: Backend, dtype: str) -> float:
    """Square matmul throughput in TFLOP/s (2 n^3 FLOPs per product), median of 5 reps."""
    import torch

    from crosschip.model import DTYPES

    n = 512 if backend.device_type == "cpu" else 4096
    a = torch.randn(n, n, device=backend.device(), dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=backend.device(), dtype=DTYPES[dtype])
    seconds = _median_seconds(lambda: a @ b, backend)
    return 2 * n**3 / seconds / 1e12


def copy_gbps(backend: Backend) -> float:
    """Device-memory copy bandwidth in GB/s (bytes read + written), median of 5 reps."""
    import torch

    n = (32 if backend.device_type == "cpu" else 256) * 2**20 // 4
    src = torch.empty(n, device=backend.device())
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), backend)
    return 2 * n * 4 / seconds / 1e9


# -- collectives -------------------------------------------------------------------------------
def check_collective(backend: Backend) -> dict[str, Any]:
    """Start a one-rank process group on the backend's collective library and all-reduce once."""
    import torch
    import torch.distributed as dist

    if backend.dist_backend is None:
        return {"backend": None, "ok": False, "error": "no collective library for this device type"}
    info: dict[str, Any] = {"backend": backend.dist_backend}
    if backend.emulated_collective_delay_s:
        info["emulated_delay_s"] = backend.emulated_collective_delay_s
    try:
        store = dist.HashStore()
        t0 = time.perf_counter()
        dist.init_process_group(backend.dist_backend, store=store, rank=0, world_size=1)
        x = torch.ones(1024, device=backend.device())
        dist.all_reduce(x)
        backend.synchronize()
        time.sleep(backend.emulated_collective_delay_s)  # the emulated interconnect's cost
        info.update(ok=bool(x[0].item() == 1.0), init_and_allreduce_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        info.update(ok=False, error=_first_line(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return info


# -- op coverage of the debug model ------------------------------------------------------------
def op_coverage(backend: Backend) -> dict[str, Any]:
    """Forward and backward of the `debug` model on the device, in fp32.

    Warnings are captured whatever their category; the ones that mention a CPU fallback
    (torch_npu reports ops it runs on the host that way) are listed as fallbacks. When the
    step fails, it is run again under a dispatch mode that names the aten op that raised
    (only then: entering such a mode costs seconds of imports).
    """
    import torch

    from crosschip.config import model_preset
    from crosschip.model import Transformer

    torch.manual_seed(0)
    cfg = model_preset("debug")
    model = Transformer(cfg).to(backend.device())
    tokens = torch.randint(0, cfg.vocab_size, (2, 16)).to(backend.device())

    def step() -> float:
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        backend.synchronize()
        return loss.detach().item()

    result: dict[str, Any] = {"model": "debug", "dtype": "fp32", "modules": len(list(model.modules()))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loss = step()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            result.update(ok=finite and loss == loss, loss=loss, params_with_grad=len(grads))
        except Exception as e:  # noqa: BLE001 - a missing kernel is what we are measuring
            result.update(ok=False, error=_first_line(e), failed_op=_failing_op(step))
    messages = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    result["warnings"] = messages
    on_host = backend.device_type == "cpu"
    result["cpu_fallbacks"] = [] if on_host else [m for m in messages if any(w in m.lower() for w in FALLBACK_WORDS)]
    return result


def _failing_op(step: Callable[[], float]) -> str | None:
    """Re-run a failed step under a dispatch mode and return the aten op that raised."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FindFailure(TorchDispatchMode):
        failed: str | None = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            try:
                return func(*args, **(kwargs or {}))
            except Exception:
                self.failed = self.failed or str(func.overloadpacket.__name__)
                raise

    mode = FindFailure()
    try:
        with mode:
            step()
    except Exception:  # noqa: BLE001 - expected: we are looking for where it fails
        pass
    return mode.failed


# -- ONNX Runtime ------------------------------------------------------------------------------
def ort_small_run(backend: Backend) -> dict[str, Any]:
    """Build a tiny ONNX graph (MatMul -> Softmax) and run it on this EP against numpy fp64."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = 64
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["ab"]), helper.make_node("Softmax", ["ab"], ["y"], axis=-1)],
        "probe",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=backend.providers())
    feeds = {"a": a, "b": b}
    y = session.run(None, feeds)[0]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    ab = a.astype(np.float64) @ b.astype(np.float64)
    ref = np.exp(ab - ab.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    return {
        "ok": bool(np.isfinite(y).all() and rel < 1e-5),
        "graph": "MatMul+Softmax 64x64 fp32",
        "rel_err_vs_fp64": rel,
        "latency_ms": statistics.median(times) * 1e3,
        "session_providers": session.get_providers(),
    }


# -- one backend -------------------------------------------------------------------------------
def probe_torch(backend: Backend) -> dict[str, Any]:
    """Every measurement for a torch backend that `require()` accepted."""
    dtypes = {d: {"matmul": check_matmul(backend, d), "autocast": check_autocast(backend, d)} for d in DTYPE_NAMES}
    tflops = {d: matmul_tflops(backend, d) for d in DTYPE_NAMES if dtypes[d]["matmul"]["ok"]}
    return {
        "device": backend.device_name(),
        "device_count": backend.device_count(),
        "memory_bytes": backend.memory_bytes(),
        "dtypes": dtypes,
        "working_dtypes": [d for d in DTYPE_NAMES if dtypes[d]["matmul"]["ok"] and dtypes[d]["autocast"]["ok"]],
        "matmul_tflops": tflops,
        "copy_gbps": copy_gbps(backend),
        "collective": check_collective(backend),
        "op_coverage": op_coverage(backend),
    }


def probe_ort(backend: Backend) -> dict[str, Any]:
    import onnxruntime as ort

    return {"available_providers": ort.get_available_providers(), "small_run": ort_small_run(backend)}


def probe(spec: str) -> dict[str, Any]:
    """Probe backend `spec` in this process and return the JSON-able result."""
    backend = get_backend(spec)
    result: dict[str, Any] = {
        "backend": spec,
        "runtime": backend.runtime,
        "emulation": backend.emulation,
        "pid": os.getpid(),
        "parent_pid": os.getppid(),
    }
    t0 = time.perf_counter()
    try:
        backend.require()
    except CrosschipError as e:
        return {**result, "available": False, "reason": str(e), "seconds": time.perf_counter() - t0}
    measured = probe_torch(backend) if backend.runtime == "torch" else probe_ort(backend)
    return {
        **result,
        "available": True,
        "fingerprint": backend.fingerprint(),
        **measured,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="probe one backend in this process (crosschip probe runs this)")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        result = probe(args.backend)
    except CrosschipError as e:
        print(f"probe {args.backend}: error: {e}", file=sys.stderr)
        return e.exit_code
    args.out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
