"""crosschip probe: real measurements on this machine, each backend in its own process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from crosschip.backends import get_backend
from crosschip.backends.probe import check_autocast, check_matmul, probe

# One pytest-xdist worker for the module: its `probed` fixture (a full probe, ~16 s) then runs once.
pytestmark = pytest.mark.xdist_group("probe")


def test_absent_accelerator_is_reported_with_a_reason_not_an_error():
    result = probe("torch:npu")  # torch_npu is not installed here
    assert result["available"] is False
    assert "torch_npu" in result["reason"]


def test_emulated_fp16_only_chip_refuses_bf16_but_computes_fp16():
    backend = get_backend("emu:fp16-only")
    refused = check_matmul(backend, "bf16")
    assert refused["ok"] is False and "refuses bf16" in refused["error"] and "emulation" in refused["error"]
    assert check_autocast(backend, "bf16")["ok"] is False
    fp16 = check_matmul(backend, "fp16")
    assert fp16["ok"] and 0 < fp16["rel_err"] < 1e-2  # really computed in fp16, so not exact
    assert check_autocast(backend, "fp16")["output_dtype"] == "float16"


def test_call_times_waits_for_the_device_around_each_call(monkeypatch):
    """One time per call, each taken between two synchronizations: the call's own work."""
    import time

    backend = get_backend("torch:cpu")
    events = []
    monkeypatch.setattr(type(backend), "synchronize", lambda self: events.append("sync"))
    times = backend.call_times(lambda: (events.append("call"), time.sleep(0.01)), 3)
    assert len(times) == 3 and all(0.01 <= t < 1 for t in times)
    assert events == ["sync", "call", "sync"] * 3


def test_probes_that_time_the_host_cpu_run_alone(monkeypatch, tmp_path):
    """Device probes side by side, then each host-CPU probe with no other probe running."""
    import threading
    import time

    from crosschip.backends import command

    running, overlaps, lock = set(), [], threading.Lock()

    def fake_probe(spec, workdir):
        with lock:
            if spec in hosts or running & set(hosts):
                overlaps.extend(running)
            running.add(spec)
        time.sleep(0.05)
        with lock:
            running.discard(spec)
        return {"backend": spec}

    specs = ["torch:cuda", "torch:cpu", "ort:cuda", "ort:cpu", "torch:npu"]
    hosts = [s for s in specs if get_backend(s).device_type == "cpu"]
    monkeypatch.setattr(command, "probe_in_subprocess", fake_probe)
    assert [r["backend"] for r in command.probe_all(specs, tmp_path)] == specs
    assert hosts == ["torch:cpu", "ort:cpu"] and overlaps == []
    # A backend named twice (`--backend ort:cpu --backend ort:cpu`) is probed, and listed, once.
    calls = []
    monkeypatch.setattr(command, "probe_in_subprocess", lambda spec, workdir: calls.append(spec) or {"backend": spec})
    assert [r["backend"] for r in command.probe_all(["ort:cpu", "torch:cpu", "ort:cpu"], tmp_path)] == [
        "ort:cpu",
        "torch:cpu",
    ]
    assert sorted(calls) == ["ort:cpu", "torch:cpu"]


def test_unknown_backend_is_one_clear_line():
    proc = subprocess.run(
        [sys.executable, "-m", "crosschip", "probe", "--backend", "torch:tpu"], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown backend 'torch:tpu'" in proc.stderr and "torch:cpu" in proc.stderr


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """The real `crosschip probe --json` on this machine (about 20-40 s on 2 shared cores)."""
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    proc = subprocess.run(
        [sys.executable, "-m", "crosschip", "probe", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["backend"]: r for r in json.loads(out.read_text())["backends"]}
    return rows, proc.stdout


@pytest.mark.slow
def test_probe_measures_cpu_and_ort(probed):
    rows, table = probed
    cpu = rows["torch:cpu"]
    assert cpu["available"] and cpu["emulation"] is None
    for d in ("fp32", "bf16", "fp16"):
        assert cpu["dtypes"][d]["matmul"]["ok"] and cpu["dtypes"][d]["autocast"]["ok"], d
        assert cpu["matmul_tflops"][d] > 0
    # bf16/fp16 really ran in low precision: their error vs fp64 is far above fp32's.
    assert cpu["dtypes"]["bf16"]["matmul"]["rel_err"] > 100 * cpu["dtypes"]["fp32"]["matmul"]["rel_err"]
    assert cpu["copy_gbps"] > 0 and cpu["memory_bytes"] > 0
    assert cpu["collective"] == {**cpu["collective"], "backend": "gloo", "ok": True}
    assert cpu["op_coverage"]["ok"] and cpu["op_coverage"]["params_with_grad"] > 10
    assert cpu["op_coverage"]["cpu_fallbacks"] == []
    ort = rows["ort:cpu"]
    assert ort["available"] and ort["small_run"]["ok"] and ort["small_run"]["latency_ms"] > 0
    assert "CPUExecutionProvider" in ort["available_providers"]
    assert "torch:cpu" in table and "ort:cpu" in table


@pytest.mark.slow
def test_probe_reports_absent_accelerators_and_names_emulations(probed):
    rows, table = probed
    for spec in ("torch:cuda", "torch:npu", "ort:cuda", "ort:cann"):
        assert rows[spec]["available"] is False and rows[spec]["reason"], spec
    assert "torch_npu" in rows["torch:npu"]["reason"]
    for spec in ("emu:fp16-only", "emu:flaky", "emu:slow-collectives"):
        assert rows[spec]["emulation"], spec
        assert f"{spec} (EMULATED)" in table
    assert rows["emu:fp16-only"]["dtypes"]["bf16"]["matmul"]["ok"] is False
    assert rows["emu:fp16-only"]["dtypes"]["fp16"]["matmul"]["ok"] is True
    assert rows["emu:slow-collectives"]["collective"]["emulated_delay_s"] == 0.05


@pytest.mark.slow
def test_every_backend_was_probed_in_its_own_process(probed):
    """Except the devices the installed runtimes are built without (this CPU torch: cuda, xpu;
    mps off macOS; the CPU onnxruntime: cuda, cann): `crosschip probe` answers those itself,
    without a process that imports torch."""
    rows, _ = probed
    command = rows["torch:cpu"]["parent_pid"]
    built_without = {s for s, r in rows.items() if r["pid"] == command}
    assert {s for s in built_without if get_backend(s).build_lacks()} == built_without
    assert all(
        rows[s]["available"] is False and re.search(r"is built without|this onnxruntime build has", rows[s]["reason"])
        for s in built_without - {"torch:mps"}
    )
    assert {"ort:cuda", "ort:cann"} <= built_without
    probed_apart = [r for s, r in rows.items() if s not in built_without]
    pids = [r["pid"] for r in probed_apart]
    assert len(set(pids)) == len(pids)  # one process per backend
    assert os.getpid() not in pids
    # Each probe's parent is the `crosschip probe` process, not this test and not another probe.
    parents = {r["parent_pid"] for r in probed_apart}
    assert parents == {command} and command not in pids and command != os.getpid()


def test_the_build_facts_read_without_importing_torch_are_torchs_own():
    """`build_lacks` rules devices out from torch/version.py, read as text: it must say what
    the imported torch says of itself."""
    import re

    import torch

    from crosschip.backends.accelerator import torch_build
    from crosschip.errors import CrosschipError

    build = torch_build()
    assert build["__version__"] == torch.__version__
    assert build["cuda"] == torch.version.cuda and build["hip"] == torch.version.hip
    has_cuda = torch.version.cuda is not None or torch.version.hip is not None
    assert (get_backend("torch:cuda").build_lacks() is None) == has_cuda
    if not has_cuda:
        with pytest.raises(
            CrosschipError,
            match=rf"torch:cuda is not available: this torch \({re.escape(torch.__version__)}\) is built without cuda",
        ):
            get_backend("torch:cuda").require()
