"""`crosschip verify` end to end: real worker processes, real bundles on disk, real reports."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosschip.config import model_preset
from crosschip.hf import load_bundle, read_manifest, save_bundle, write_manifest
from crosschip.model import Transformer
from crosschip.tokenizer import default_tokenizer
from crosschip.verify.gate import GATE_FAILED_EXIT

pytestmark = pytest.mark.slow
SMALL = ["--problems", "8", "--corpus-docs", "2"]


def verify(
    bundle: Path, out: Path, *args: str, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, dict | None]:
    cmd = [sys.executable, "-m", "crosschip", "verify", str(bundle), "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    report = out / "report.json"
    return proc, json.loads(report.read_text()) if report.exists() else None


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """A 3-layer debug model (layers 1-2 MoE) and two copies with one planted fault each."""
    root = tmp_path_factory.mktemp("verify_bundles")
    tok = default_tokenizer(512)
    torch.manual_seed(0)
    model = Transformer(model_preset("debug", num_hidden_layers=3, initializer_range=0.1))
    out = {"clean": save_bundle(model, root / "clean", tokenizer=tok)}
    with torch.no_grad():
        model.layers[1].attn.wkv_b.weight.mul_(1.02)  # 2% on one attention projection
    out["attn_fault"] = save_bundle(model, root / "attn_fault", tokenizer=tok)
    model, _ = load_bundle(out["clean"])
    with torch.no_grad():
        model.layers[2].ffn.gate.bias[3] += 0.2  # selection bias only: flips top-k, scores unchanged
    out["router_fault"] = save_bundle(model, root / "router_fault", tokenizer=tok)
    return out


def test_fp32_torch_to_torch_passes_with_zero_kl_and_records_parity(bundles, tmp_path):
    bundle = shutil.copytree(bundles["clean"], tmp_path / "bundle")
    write_manifest(bundle, {"task": {"task": "arith", "digits": 3, "ops": ["+"]}})  # as an export records it
    proc, report = verify(bundle, tmp_path / "out", "--reference", "torch:cpu", "--target", "torch:cpu", *SMALL)
    assert proc.returncode == 0, proc.stderr
    # Without --digits or --ops, the held-out problems are of the task the bundle was trained on.
    assert report["prompts"]["digits"] == 3 and report["prompts"]["ops"] == ["+"]
    assert "held-out problems, 3 digits, +)" in proc.stdout
    m = report["metrics"]
    assert m["kl_max"] <= 1e-12 and m["top1"] == 1.0 and m["greedy_identical"] == 1.0
    assert m["max_abs"] == 0.0 and m["cosine"] == pytest.approx(1.0)
    assert m["ppl_reference"] == m["ppl_target"] and m["accuracy_reference"] == m["accuracy_target"]
    assert report["gate"]["precision"] == "fp32" and report["gate"]["passed"]
    assert report["bisect"] is None
    text = (tmp_path / "out" / "report.txt").read_text()
    assert "gate (fp32): PASS" in text and text in proc.stdout
    # Both sides ran in processes of their own, and said what they ran.
    assert report["reference"]["fingerprint"]["backend"] == "torch:cpu"
    assert "computed in float32" in report["target"]["weights"]
    parity = read_manifest(bundle)["parity"]
    assert parity["passed"] and parity["by_target"]["torch:cpu"]["metrics"]["kl_max"] == m["kl_max"]
    load_bundle(bundle)  # the manifest's checksums were recomputed: the bundle still loads


def test_a_corpus_model_is_scored_on_its_text_and_its_int8_gate_on_the_perplexity(bundles, tmp_path):
    """A bundle trained on a corpus was scored on arithmetic problems, and its int8 gate compared
    two accuracies of 0: it could not fail. Its prompts are now the text it was trained on
    (--corpus, as `crosschip run` passes data.corpus), and the gate judges the perplexity."""
    from crosschip.handoff.precision import write_int8_weights
    from crosschip.hf import to_hf

    docs = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document {i} is the user's own text, which verify reads"}) for i in range(4)]
    docs.write_text("\n".join(lines) + "\n")

    def int8_bundle(name: str, head_scale: float) -> Path:
        model, _ = load_bundle(bundles["clean"])
        with torch.no_grad():
            model.head.weight.mul_(head_scale)
        bundle = save_bundle(model, tmp_path / name, tokenizer=default_tokenizer(512))
        write_int8_weights(bundle, to_hf(model.state_dict(), model.cfg))
        write_manifest(bundle, {"precision": {"policy": "int8"}, "task": {"task": "corpus"}})  # as an export does
        return bundle

    args = ["--target", "torch:cpu", "--reference-weights", str(bundles["clean"]), "--no-record", "--no-bisect"]
    args += ["--corpus", str(docs), "--corpus-docs", "3"]
    for name, head_scale, rc in (("int8", 1.0, 0), ("faulty", 1.5, GATE_FAILED_EXIT)):
        proc, report = verify(int8_bundle(name, head_scale), tmp_path / f"{name}_out", *args)
        assert proc.returncode == rc, proc.stdout + proc.stderr
        assert report["prompts"]["task"] == "corpus" and report["prompts"]["problems"] == 0
        assert report["prompts"]["scored"] == report["prompts"]["greedy"] == 3  # of the 4 documents
        m = report["metrics"]
        assert m["accuracy_problems"] == 0 and m["accuracy_reference"] is None and m["ppl_arith_reference"] is None
        (check,) = report["gate"]["checks"]
        assert check["name"] == "ppl_gap" and check["value"] == pytest.approx(
            abs(m["ppl_target"] / m["ppl_reference"] - 1)
        )
        assert check["ok"] is (rc == 0)
        assert "task accuracy     not scored: the model was trained on a corpus" in proc.stdout
    assert check["value"] > 0.01  # the faulty head moved the perplexity past the gate


def test_fp16_target_passes_its_gate(bundles, tmp_path):
    proc, report = verify(
        bundles["clean"], tmp_path / "fp16", "--target", "torch:cpu", "--target-dtype", "fp16", "--no-record", *SMALL
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["precision"]["class"] == "fp16" and report["metrics"]["top1"] >= 0.99
    assert 0 < report["metrics"]["kl_mean"] <= 1e-3


def test_bf16_target_fails_its_gate_on_an_untrained_model_and_no_module_is_blamed(bundles, tmp_path):
    # bf16 keeps 8 mantissa bits: an untrained model's near-ties flip, top-1 drops below 99%.
    proc, report = verify(
        bundles["clean"], tmp_path / "bf16", "--target", "torch:cpu", "--target-dtype", "bf16", "--no-record", *SMALL
    )
    assert proc.returncode == GATE_FAILED_EXIT, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in report["gate"]["checks"]}
    assert not checks["top1"]["ok"] and report["metrics"]["top1"] < 0.99
    # Rounding everywhere, no faulty module: the bisection blames none.
    assert report["bisect"]["first_departure"] is None
    assert "rounding" in report["bisect"]["why"]


@pytest.mark.parametrize("fault, module", [("attn_fault", "layer 1 attention"), ("router_fault", "layer 2 router")])
def test_a_planted_fault_fails_the_gate_and_the_bisection_names_its_module(bundles, tmp_path, fault, module):
    bundle = shutil.copytree(bundles[fault], tmp_path / "bundle")
    proc, report = verify(
        bundle, tmp_path / "out", "--target", "torch:cpu", "--reference-weights", str(bundles["clean"]), *SMALL
    )
    assert proc.returncode == GATE_FAILED_EXIT, proc.stdout + proc.stderr
    assert not report["gate"]["passed"] and report["metrics"]["kl_max"] > 1e-6
    bisect = report["bisect"]
    assert bisect["first_departure"] == module
    table = {row["label"]: row for row in bisect["table"]}
    before = bisect["table"][: [r["label"] for r in bisect["table"]].index(module)]
    assert before and all(row["max_abs"] == 0.0 and not row["departs"] for row in before)
    if fault == "router_fault":
        assert table[module]["topk_flips"] > 0 and table[module]["max_abs"] == 0.0  # scores equal, choices differ
    text = (tmp_path / "out" / "report.txt").read_text()
    assert f"first departure: {module}" in text and "<- first departure" in text
    assert read_manifest(bundle)["parity"]["first_departure"] == module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "torch:cpu"], "bundle folder not found"),
        (["--target", "tpu:v5"], "unknown backend 'tpu:v5'"),
        # A side the installed build cannot run, said before the other side runs whole.
        (["--target", "ort:cuda"], "ort:cuda is not available: this onnxruntime build has"),
        (["--target", "ort:cpu", "--reference", "torch:xpu"], "torch:xpu is not available: this torch"),
        (["--target-url", "http://127.0.0.1:{port}/v1"], "cannot reach http://127.0.0.1:{port}/v1"),
        (["--target", "torch:cpu", "--target-url", "http://127.0.0.1:1/v1"], "exactly one of --target"),
    ],
)
def test_bad_input_is_one_clear_line(bundles, tmp_path, args, message):
    port = free_port()
    args = [a.format(port=port) for a in args]
    bundle = tmp_path / "missing" if message == "bundle folder not found" else bundles["clean"]
    proc, report = verify(bundle, tmp_path / "out", *args, timeout=60)
    assert proc.returncode == 1
    assert message.format(port=port) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "side" not in proc.stdout, proc.stdout  # refused before either side started
    assert report is None
