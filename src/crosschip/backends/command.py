"""`crosschip probe`: measure every backend usable here, each in its own subprocess.

Accelerators never share a process (torch_npu refuses to start next to another one), so
every backend is probed by `python -m crosschip.backends.probe` in a child process. Probes
of non-CPU devices run side by side (absent ones answer in a second or two); then the probes
that time the host CPU run one after another, alone, so nothing skews their numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from crosschip.backends import REGISTRY, get_backend
from crosschip.backends.probe import probe
from crosschip.errors import CrosschipError
from crosschip.paths import check_output_file, path_arg

PROBE_TIMEOUT_S = 120.0


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def probe_in_subprocess(spec: str, workdir: Path, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Probe `spec` in a fresh `python -m crosschip.backends.probe` process and read its JSON."""
    out = workdir / f"probe-{spec.replace(':', '_')}.json"
    cmd = [sys.executable, "-m", "crosschip.backends.probe", "--backend", spec, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_child_env())
    except subprocess.TimeoutExpired:
        return {"backend": spec, "available": False, "reason": f"probe timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"backend": spec, "available": False, "reason": f"probe process failed (exit {proc.returncode}): {tail}"}
    return json.loads(out.read_text(encoding="utf-8"))


def _times_host_cpu(spec: str) -> bool:
    return get_backend(spec).device_type == "cpu"


def probe_all(specs: list[str] | None = None, workdir: Path | None = None) -> list[dict[str, Any]]:
    """Probe every backend in `specs` (default: all known, emulations included), in registry order."""
    specs = list(REGISTRY) if specs is None else list(dict.fromkeys(specs))  # a backend named twice: one probe
    for spec in specs:
        get_backend(spec)  # unknown names fail here, before any process starts
    with tempfile.TemporaryDirectory(prefix="crosschip-probe-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        devices = [s for s in specs if not _times_host_cpu(s)]
        hosts = [s for s in specs if _times_host_cpu(s)]
        # Devices first, side by side: each times its own device. Then the probes that time the
        # host CPU, one at a time and alone: the device probes' start-up (each imports torch)
        # beside them took the host's fp32 matmul from ~210 to 36-102 GFLOP/s on 2 cores.
        results: dict[str, dict[str, Any]] = {}
        # A device the installed runtime is built without is answered here, from its build
        # facts: a process of its own would spend seconds importing torch to say the same.
        for spec in [s for s in devices if get_backend(s).build_lacks()]:
            results[spec] = probe(spec)
            devices.remove(spec)
        with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
            results.update(zip(devices, pool.map(lambda s: probe_in_subprocess(s, work), devices)))
        for spec in hosts:
            results[spec] = probe_in_subprocess(spec, work)
    return [results[s] for s in specs]


# -- output ------------------------------------------------------------------------------------
def _fmt_bytes(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.1f} GiB"


def _name(r: dict[str, Any]) -> str:
    return r["backend"] + (" [EMULATED]" if r.get("emulation") else "")


def _dtypes_cell(r: dict[str, Any]) -> str:
    """Dtypes whose matmul and autocast both worked; a refused/failed one shows as `-bf16`."""
    cells = []
    for d, checks in r.get("dtypes", {}).items():
        works = checks["matmul"]["ok"] and checks["autocast"]["ok"]
        cells.append(d if works else f"-{d}")
    return " ".join(cells) or "fp32 (ORT)"


def _speed_cell(r: dict[str, Any]) -> str:
    """Matmul GFLOP/s as fp32|bf16|fp16, `-` for a dtype that does not work."""
    tf = r.get("matmul_tflops", {})
    return "|".join(f"{tf[d] * 1e3:.0f}" if d in tf else "-" for d in ("fp32", "bf16", "fp16")) if tf else "-"


def _collective_cell(r: dict[str, Any]) -> str:
    coll = r.get("collective")
    if not coll:
        return "-"
    text = f"{coll.get('backend')} {'ok' if coll.get('ok') else 'FAIL'}"
    if coll.get("emulated_delay_s"):
        text += f" +{coll['emulated_delay_s'] * 1e3:.0f}ms/op"
    return text


def _coverage_cell(r: dict[str, Any]) -> str:
    cov = r.get("op_coverage")
    if cov is None:
        small = r.get("small_run", {})
        return (
            f"ORT graph err {small.get('rel_err_vs_fp64', float('nan')):.0e}" if small.get("ok") else "ORT run FAILED"
        )
    text = "fwd+bwd ok" if cov.get("ok") else f"FAIL at {cov.get('failed_op')}"
    if cov.get("cpu_fallbacks"):
        text += f", {len(cov['cpu_fallbacks'])} CPU fallbacks"
    return text


def render_table(results: list[dict[str, Any]]) -> None:
    """Print the people's view of the probe: one row per backend, then notes."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="crosschip probe: measured on this machine")
    for col in (
        "backend",
        "status",
        "dtypes",
        "memory",
        "GFLOP/s fp32|bf16|fp16",
        "copy GB/s",
        "collective",
        "debug model",
    ):
        table.add_column(col, no_wrap=col in ("backend", "status"))
    notes = []
    for r in results:
        name = r["backend"] + (" (EMULATED)" if r.get("emulation") else "")
        if not r.get("available"):
            table.add_row(name, "absent", "", "", "", "", "", "")
            notes.append(f"{r['backend']}: absent: {r.get('reason', '')}")
            continue
        copy = f"{r['copy_gbps']:.1f}" if "copy_gbps" in r else "-"
        cells = [_dtypes_cell(r), _fmt_bytes(r.get("memory_bytes")), _speed_cell(r), copy, _collective_cell(r)]
        table.add_row(name, "ok", *map(escape, cells), escape(_coverage_cell(r)))
        where = r.get("device") or ", ".join(r.get("small_run", {}).get("session_providers", []))
        notes.append(
            f"{r['backend']}: {where}"
            + (f"; EMULATION on the host CPU: {r['emulation']}" if r.get("emulation") else "")
        )
        for d, checks in r.get("dtypes", {}).items():
            for kind in ("matmul", "autocast"):
                if not checks[kind]["ok"]:
                    notes.append(f"{r['backend']}: {d} {kind} does not work: {checks[kind].get('error', '')}")
    console = Console(width=max(150, Console().width))
    console.print(table)
    for note in notes:
        console.print("  " + escape(note), highlight=False)


# -- CLI ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=path_arg, metavar="FILE", help="also write the measurements as JSON here")
    parser.add_argument(
        "--backend",
        action="append",
        metavar="SPEC",
        help=f"probe only this backend (repeatable); default: all of {', '.join(REGISTRY)}",
    )


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")
    results = probe_all(args.backend)
    render_table(results)
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"backends": results}, indent=2, default=str), encoding="utf-8")
        except OSError as e:
            raise CrosschipError(f"cannot write {args.json}: {e.strerror}") from None
        print(f"wrote {args.json}")
    return 0
