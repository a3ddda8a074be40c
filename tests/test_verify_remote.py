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
    # The key reached the remote side's worker by its environment, not its command line (ps).
    from crosschip.verify.parity import SideSpec, VerifyOptions

    opts = VerifyOptions(bundle=bundles["clean"], out=tmp_path, target=None, target_url=server.api, api_key="sekret")
    assert "sekret" not in " ".join(SideSpec("target", "remote", url=server.api).argv(opts, tmp_path / "p.json"))


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


def test_a_wrong_api_key_or_model_name_is_one_clear_line(bundles, tmp_path):
    server = ServerProcess(bundles["clean"], "--on", "torch:cpu", "--api-key", "sekret")
    try:
        proc, report = verify_remote(bundles["clean"], server.api, tmp_path / "out", "--api-key", "wrong")
        # A model the server does not serve was said after the reference side's whole run.
        named = verify_remote(
            bundles["clean"], server.api, tmp_path / "out2", "--api-key", "sekret", "--model-name", "nope"
        )
    finally:
        server.stop()
    assert proc.returncode == 1 and report is None
    assert "refused the API key" in proc.stderr and "Traceback" not in proc.stderr
    assert (
        named[0].returncode == 1
        and f"--model-name 'nope' is not served at {server.api}; it serves 'clean'" in named[0].stderr
    )
    assert not (tmp_path / "out2" / "reference.json").exists()


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


def _reply(rows: list[dict | None], token_lp: list[float | None], tokens: list[str]):
    """An echo=True completion's logprobs as the openai client gives them (position 0: null)."""
    from types import SimpleNamespace

    return SimpleNamespace(top_logprobs=[None, *rows], token_logprobs=[None, *token_lp], tokens=[None, *tokens])


def test_a_server_whose_logprobs_no_distribution_has_is_refused(bundles):
    """Each of these passed the fp32 gate (the KL renormalised them away, or a NaN scored 0),
    or crashed verify, or was blamed on the model. Names are token ids, as our server sends them."""
    from types import SimpleNamespace

    from crosschip.errors import CrosschipError

    _, tok = load_bundle(bundles["clean"])
    side = RemoteSide("http://127.0.0.1:1/v1", tok, api_key=None, model="m", top_k=2)
    a, b, c = "token_id:20", "token_id:21", "token_id:22"
    good = [{a: -0.5, b: -1.5}, {b: -0.2, c: -2.0}]
    ids, lp, exact, token_lp = side._scored([1, 20, 21], _reply(good, [-0.5, -0.2], [a, b]))
    assert ids.tolist() == [[20, 21], [21, 22]] and bool(exact.all()) and token_lp.tolist() == [-0.5, -0.2]
    for rows, token_lps, says in [
        ([{a: float("nan"), b: -1.5}, good[1]], [-0.5, -0.2], "are not log-probabilities of one distribution"),
        ([{a: 2.5, b: 1.5}, good[1]], [2.5, -0.2], "not log-probabilities"),  # lifted above 0
        ([{a: -0.1, b: -0.2}, good[1]], [-0.1, -0.2], "not log-probabilities of one distribution"),  # sum > 1
        ([{a: -0.5}, good[1]], [-0.5, -0.2], "returned 1 alternatives at a position where 2 were asked"),
        ([None, good[1]], [-0.5, -0.2], "returned no top_logprobs at prompt position 1"),
        (good, [-5.0, -0.2], "gives token token_id:20 log-prob -5.0 at prompt position 1, and -0.5"),
        ([{a: -0.5, "token_id:5000": -1.5}, good[1]], [-0.5, -0.2], "token_id:5000, outside the bundle's vocabulary"),
    ]:
        with pytest.raises(CrosschipError, match=says):
            side._scored([1, 20, 21], _reply(rows, token_lps, [a, b]))
    # A reply that is not an OpenAI completion at all: one line, not an IndexError traceback.
    side._call = lambda **kw: SimpleNamespace(choices=[])
    with pytest.raises(
        CrosschipError, match=r"answered a completion with something that is not an OpenAI reply \(Index"
    ):
        side.score_remote([1, 20, 21])


def test_a_server_with_another_tokenizer_is_refused(bundles, tmp_path):
    """Sent and returned as ids, the text never passed through the tokenizer: a server whose
    tokenizer numbers the tokens differently passed the gate."""
    import shutil

    from crosschip.errors import CrosschipError
    from crosschip.hf import write_manifest

    bundle = shutil.copytree(bundles["clean"], tmp_path / "other_tokenizer")
    spec = json.loads((bundle / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    plain = sorted((i, t) for t, i in vocab.items() if i >= 16)  # the specials keep their ids
    for (i, _), (_, t) in zip(plain, reversed(plain)):
        vocab[t] = i
    (bundle / "tokenizer.json").write_text(json.dumps(spec))
    write_manifest(bundle, {})
    _, tok = load_bundle(bundles["clean"])
    server = ServerProcess(bundle, "--on", "torch:cpu")
    try:
        side = RemoteSide(server.api, tok, api_key=None, model=None, top_k=4)
        with pytest.raises(CrosschipError, match="tokenizer is not the bundle's: it writes ids"):
            side.greedy([tok.encode("12+34=", add_bos=True)], 8, [tok.eos_id])
    finally:
        server.stop()
