"""Parity of an ONNX Runtime target: export a bundle, then `crosschip verify --target ort:cpu`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosschip.hf import load_bundle, read_manifest, save_bundle

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ort_bundles")]


@pytest.fixture(scope="module")
def ort_bundle(ort_bundle_of, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ort") / "ort32"
    shutil.copytree(ort_bundle_of("fp32"), out)  # verify records its parity into the manifest
    return out


def verify(bundle: Path, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    cmd = [sys.executable, "-m", "crosschip", "verify", str(bundle), "--reference", "torch:cpu", "--target", "ort:cpu"]
    cmd += ["--out", str(out), "--problems", "8", "--corpus-docs", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report = out / "report.json"
    return proc, json.loads(report.read_text()) if report.exists() else None


def test_fp32_torch_to_ort_passes_the_fp32_gate(ort_bundle, debug_bundle, tmp_path):
    proc, report = verify(ort_bundle, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = report["metrics"]
    assert m["kl_max"] <= 1e-6 and m["greedy_identical"] == 1.0 and m["top1"] == 1.0
    assert 0 < m["max_abs"] < 1e-4  # two runtimes: close, not bit-identical
    assert report["target"]["fingerprint"]["provider"] == "CPUExecutionProvider"
    # The reference ran the export's source (recorded in crosschip.json), not the bundle itself.
    assert report["reference"]["weights"].startswith(str(debug_bundle))
    assert read_manifest(ort_bundle)["parity"]["target"] == "ort:cpu"


def test_an_ort_target_is_bisected_in_torch_with_its_own_weights(ort_bundle, tmp_path):
    # The reference runs weights that differ in one attention projection: the bisection,
    # done in torch with the ORT bundle's weights, must name that module and say how it bisected.
    model, tok = load_bundle(ort_bundle)
    with torch.no_grad():
        model.layers[1].attn.wo.weight.mul_(1.5)
    other = save_bundle(model, tmp_path / "other", tokenizer=tok)
    proc, report = verify(ort_bundle, tmp_path / "out", "--reference-weights", str(other), "--no-record")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert report["bisect"]["first_departure"] == "layer 1 attention"
    assert "bisected in torch:cpu with the target's weights" in report["bisect"]["note"]


def test_a_graph_whose_weights_were_changed_is_named_by_the_bisection(ort_bundle, tmp_path):
    """The bisection runs torch with the bundle's safetensors: a weight changed in the ONNX graphs
    only was invisible to it, and it blamed rounding spread over the whole model."""
    import onnx
    from onnx import numpy_helper

    from crosschip.hf import write_manifest

    bundle = shutil.copytree(ort_bundle, tmp_path / "edited")
    name = "model.layers.1.attn.wo.weight"
    for graph in ("model.onnx", "model.decode.onnx"):
        proto = onnx.load(str(bundle / graph))
        (t,) = [t for t in proto.graph.initializer if t.name == name]
        w = numpy_helper.to_array(t).copy()
        w[3, 5] += 0.5
        t.CopyFrom(numpy_helper.from_array(w, name))
        onnx.save(proto, str(bundle / graph))
    write_manifest(bundle, {})  # checksums recorded again: the edit is not caught as tampering
    proc, report = verify(bundle, tmp_path / "out", "--no-record")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert report["bisect"]["first_departure"] == f"model.onnx: {name}", report["bisect"]
    assert "max |diff| 0.5" in report["bisect"]["why"] and "export the bundle again" in report["bisect"]["why"]
