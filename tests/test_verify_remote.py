"""Remote parity: `crosschip verify --target-url` against our own server on loopback, through the
official `openai` client (echo + logprobs for prompt scoring, temperature 0 for greedy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosschip.config import model_preset
from crosschip.hf import load_bundle, save_bundle
from crosschip.model import Transformer
from crosschip.tokenizer import default_tokenizer
from crosschip.verify.gate import GATE_FAILED_EXIT
from crosschip.verify.remote import RemoteSide
from serve_helpers import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote_bundles")
    tok = default_tokenizer(512)
    torch.manual_seed(0)
    model = Transformer(model_preset("debug", initializer_range=0.1))
    clean = save_bundle(model, root / "clean", tokenizer=tok)
    model, _ = load_bundle(clean)
    with torch.no_grad():
        model.layers[1].attn.wo.weight.mul_(1.05)
    return {"clean": clean, "fault": save_bundle(model, root / "fault", tokenizer=tok)}


def verify_remote(bundle: Path, url: str, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    cmd = [sys.executable, "-m", "crosschip", "verify", str(bundle), "--reference", "torch:cpu", "--target-url", url]
    cmd += ["--out", str(out), "--problems", "8", "--corpus-docs", "2", "--no-record", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report = out / "report.json"
    return proc, json.loads(report.read_text()) if report.exists() else None


def test_our_server_passes_the_fp32_gate_over_its_top_k_logprobs(bundles, tmp_path):
    server = ServerProcess(bundles["clean"], "--on", "torch:cpu", "--api-key", "sekret")
    try:
        proc, report = verify_remote(bundles["clean"], server.api, tmp_path / "out", "--api-key", "sekret")
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(server.lines)
    m = report["metrics"]
    assert m["kl_support"].startswith("target top-") and m["kl_max"] <= 1e-6
    assert m["top1"] == 1.0 and m["greedy_identical"] == 1.0
    # Perplexity from the server's prompt logprobs matches the reference's own.
    assert m["ppl_target"] == pytest.approx(m["ppl_reference"], rel=1e-5)
    assert report["target"]["backend"] == "remote" and report["target"]["model"] == "clean"
    assert any("top-" in n for n in report["gate"]["notes"])


def test_a_faulty_served_bundle_fails_the_gate_and_says_it_cannot_be_bisected(bundles, tmp_path):
    server = ServerProcess(bundles["fault"], "--on", "torch:cpu")
    try:
        proc, report = verify_remote(
            bundles["fault"], server.api, tmp_path / "out", "--reference-weights", str(bundles["clean"])
        )
    finally:
        server.stop()
    assert proc.returncode == GATE_FAILED_EXIT, proc.stdout + proc.stderr
    assert report["metrics"]["kl_max"] > 1e-6 and not report["gate"]["passed"]
    assert report["bisect"]["first_departure"] is None and "remote target" in report["bisect"]["note"]


def test_a_wrong_api_key_is_one_clear_line(bundles, tmp_path):
    server = ServerProcess(bundles["clean"], "--on", "torch:cpu", "--api-key", "sekret")
    try:
        proc, report = verify_remote(bundles["clean"], server.api, tmp_path / "out", "--api-key", "wrong")
    finally:
        server.stop()
    assert proc.returncode == 1 and report is None
    assert "refused the API key" in proc.stderr and "Traceback" not in proc.stderr


def test_a_server_without_token_ids_is_read_through_the_tokenizers_strings(bundles):
    """Our server names tokens by id when asked (vLLM's `return_tokens_as_token_ids`); a server
    that does not is read through the token strings. Both readings of one prompt agree wherever
    a string belongs to one id alone, and the shared strings are flagged, not guessed."""
    _, tok = load_bundle(bundles["clean"])
    server = ServerProcess(bundles["clean"], "--on", "torch:cpu")
    try:
        side = RemoteSide(server.api, tok, api_key=None, model=None, top_k=16)
        ids = tok.encode("12+34=46 héllo → 日本 🙂 7-3=4", add_bos=True)
        by_id = side.score_remote(ids)
        assert side.mapped_from_strings == 0 and bool(by_id[2].all())
        side.extra = {}  # ask without the field, as a server that does not know it would answer
        by_text = side.score_remote(ids)
    finally:
        server.stop()
    assert side.mapped_from_strings > 0 and not bool(by_text[2].all())
    torch.testing.assert_close(by_text[3], by_id[3], rtol=0, atol=0)
    for row in range(by_text[0].shape[0]):
        pairs = dict(zip(by_id[0][row].tolist(), by_id[1][row].tolist()))
        for i, lp, exact in zip(*(t[row].tolist() for t in by_text[:3])):
            if exact:
                assert pairs.get(i) == lp
