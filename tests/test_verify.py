"""Fast checks of the parity metrics, the gate, the bisection and the torch side (in-process)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crosschip.config import model_preset
from crosschip.errors import CrosschipError
from crosschip.hf import save_bundle
from crosschip.model import Transformer
from crosschip.tokenizer import default_tokenizer
from crosschip.verify import bisect, gate
from crosschip.verify.metrics import kl_full, kl_topk, match_length
from crosschip.verify.prompts import PromptSet, build_prompts
from crosschip.verify.sides import STOP, TorchSide, finish


def debug_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_preset("debug", num_hidden_layers=3, initializer_range=0.1, **overrides)).eval()


# -- metrics ----------------------------------------------------------------------------------


def test_kl_full_matches_the_definition_and_is_zero_on_itself():
    torch.manual_seed(0)
    p, q = torch.randn(5, 50), torch.randn(5, 50)
    lp, lq = p.double().log_softmax(-1), q.double().log_softmax(-1)
    manual = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(kl_full(p, q), manual)
    assert float(kl_full(p, p).max()) == 0.0
    # KL is not symmetric: the reference is the first argument.
    assert not torch.allclose(kl_full(p, q), kl_full(q, p))


def test_kl_topk_is_full_kl_on_the_whole_support_and_a_lower_bound_that_a_lie_cannot_hide_under():
    torch.manual_seed(1)
    p, q = torch.randn(4, 30), torch.randn(4, 30)
    lq = q.double().log_softmax(-1)
    ids = lq.argsort(-1, descending=True)
    torch.testing.assert_close(kl_topk(p, ids, lq.gather(1, ids)), kl_full(p, q))
    # On a top-5 support (and the rest), a lower bound on the full KL; zero on itself.
    top = ids[:, :5]
    assert bool((kl_topk(p, top, lq.gather(1, top)) <= kl_full(p, q) + 1e-12).all())
    assert float(kl_topk(p, top, p.double().log_softmax(-1).gather(1, top)).max()) < 1e-12
    # Renormalised on the top-K, log-probs all shifted down (mass moved off the top-K) or up
    # (a "distribution" above 1) scored KL 0 against the reference itself.
    own = p.double().log_softmax(-1).gather(1, top)
    assert float(kl_topk(p, top, own - math.log(2)).min()) > 0.01  # the fp32 gate: 1e-6
    assert float(kl_topk(p, top, own + 3.0).min()) > 1.0


def test_match_length_and_stop_marking():
    assert match_length([1, 2, 3], [1, 2, 3]) == 3
    assert match_length([1, 2, 3], [1, 9, 3]) == 1
    assert match_length([1, 2], [1, 2, 3]) == 2
    assert finish([5, 6, 2, 7], eos_ids=[2]) == [5, 6, STOP]
    assert finish([5, 6], eos_ids=[2]) == [5, 6]
    # A side that stopped and one that went on diverge at the stop.
    assert match_length(finish([5, 2], [2]), [5, 6]) == 1


# -- gate -------------------------------------------------------------------------------------


def metrics(**kw):
    base = dict(
        kl_max=0.0,
        kl_mean=0.0,
        top1=1.0,
        greedy_identical=1.0,
        accuracy_reference=0.9,
        accuracy_target=0.9,
        accuracy_problems=200,
        ppl_arith_reference=3.93,
        ppl_arith_target=3.93,
    )
    return {**base, **kw}


@pytest.mark.parametrize(
    "precision, kw, passed",
    [
        ("fp32", {}, True),
        ("fp32", {"kl_max": 2e-6}, False),
        ("fp32", {"greedy_identical": 0.99}, False),
        ("bf16", {"top1": 0.99, "kl_mean": 1e-3, "kl_max": 0.5, "greedy_identical": 0.5}, True),
        ("fp16", {"top1": 0.985}, False),
        ("bf16", {"kl_mean": 1.1e-3}, False),
        ("int8", {"accuracy_target": 0.895, "kl_max": 1.0}, True),
        ("int8", {"accuracy_target": 0.88}, False),
        # Accuracy alone passed a broken target where the reference solves nothing (0% = 0%):
        # the perplexity of the task's text must hold within 1% too.
        ("int8", {"accuracy_reference": 0.0, "accuracy_target": 0.0, "ppl_arith_target": 150.4}, False),
        ("int8", {"ppl_arith_target": 3.97}, False),
        ("int8", {"ppl_arith_target": 3.931}, True),  # the default run's model in int8: 3.931 / 3.933
        # A corpus model (no problems to check): the perplexity of its text, within 1%.
        ("int8", {"accuracy_problems": 0, "ppl_reference": 6.35, "ppl_target": 6.40}, True),
        ("int8", {"accuracy_problems": 0, "ppl_reference": 6.35, "ppl_target": 6.30}, True),
        ("int8", {"accuracy_problems": 0, "ppl_reference": 6.35, "ppl_target": 6.45}, False),
        ("int8", {"accuracy_problems": 0, "ppl_reference": 6.35, "ppl_target": 6.25}, False),
    ],
)
def test_gate_thresholds_by_precision_class(precision, kw, passed):
    result = gate.evaluate(metrics(**kw), precision)
    assert result.passed is passed
    assert all(c.ok for c in result.checks) is passed


def test_precision_class_comes_from_the_manifest_policy_then_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert gate.precision_of_bundle(tmp_path) == ("bf16", "config.json torch_dtype")
    (tmp_path / "crosschip.json").write_text(json.dumps({"precision": {"policy": "int8"}}))
    assert gate.precision_of_bundle(tmp_path)[0] == "int8"
    (tmp_path / "crosschip.json").write_text(json.dumps({"precision": "fp16"}))
    assert gate.precision_of_bundle(tmp_path)[0] == "fp16"


# -- bisection --------------------------------------------------------------------------------


def bisect_first(ref: Transformer, tgt: Transformer, precision: str = "fp32") -> str | None:
    torch.manual_seed(5)
    prompts = [torch.randint(7, 512, (20,)).tolist() for _ in range(3)]
    cpu = torch.device("cpu")
    rows = bisect.compare(
        bisect.capture(ref, prompts, cpu), bisect.capture(tgt, prompts, cpu), bisect.labels(ref), precision
    )
    first = bisect.first_departure(rows)
    return first.label if first else None


def test_bisection_names_a_perturbed_attention_weight():
    ref, tgt = debug_model(), debug_model()
    with torch.no_grad():
        tgt.layers[1].attn.wo.weight.mul_(1.01)
    assert bisect_first(ref, tgt) == "layer 1 attention"


def test_bisection_names_a_router_whose_bias_flips_top_k():
    ref, tgt = debug_model(), debug_model()
    with torch.no_grad():
        tgt.layers[2].ffn.gate.bias[5] += 0.3  # selection only: the scores themselves are unchanged
    assert bisect_first(ref, tgt) == "layer 2 router"


def test_bisection_names_a_broken_norm_and_the_head():
    ref, tgt = debug_model(), debug_model()
    with torch.no_grad():
        tgt.layers[2].ffn_norm.weight[0] = 5.0
    assert bisect_first(ref, tgt) == "layer 2 ffn_norm"
    tgt = debug_model()
    with torch.no_grad():
        tgt.head.weight[3] += 0.5
    assert bisect_first(ref, tgt) == "head"


def test_bisection_finds_nothing_between_identical_models_and_in_bf16_rounding():
    ref = debug_model()
    assert bisect_first(ref, debug_model()) is None
    assert bisect_first(ref, debug_model().to(torch.bfloat16), "bf16") is None


def test_tensor_errors_follow_msprobe_definitions():
    r = torch.tensor([1.0, -2.0, 4.0])
    t = torch.tensor([1.0, -2.5, 4.0])
    e = bisect.tensor_errors(r, t)
    assert e["max_abs"] == pytest.approx(0.5)
    assert e["max_rel"] == pytest.approx(0.25)
    assert e["cosine"] == pytest.approx(float(r @ t / (r.norm() * t.norm())))
    assert bisect.topk_flip_rate(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 0], [2, 4]])) == 0.5


# -- the torch side ----------------------------------------------------------------------------


def test_torch_side_greedy_matches_recomputing_the_full_forward():
    model = debug_model(seed=3)
    side = TorchSide(model, torch.device("cpu"))
    prompts = [[0, 10, 11, 12], [0, 20, 21, 22], [0, 30, 31]]  # two lengths: two cache batches
    got = side.greedy(prompts, 8, eos_ids=[1])
    for p, g in zip(prompts, got):
        ids = list(p)
        want = []
        for _ in range(8):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == 1:
                want.append(STOP)
                break
            want.append(nxt)
            ids.append(nxt)
        assert g == want


def test_prompts_round_trip_and_follow_the_training_format(tmp_path):
    tok = default_tokenizer(512)
    ps = build_prompts(tok, problems=6, scored_problems=4, corpus_docs=2, digits=2, ops=["+", "-"], seed=0, max_len=64)
    assert [p.kind for p in ps.scored] == ["arith"] * 4 + ["corpus"] * 2
    first = ps.greedy[0].as_problem()
    assert ps.greedy[0].ids == [tok.bos_id, *tok.encode(first.prompt)]
    assert ps.scored[0].ids == [tok.bos_id, *tok.encode(first.text), tok.eos_id]
    assert ps.max_new_tokens >= max(len(tok.encode(p.as_problem().completion)) for p in ps.greedy if p.kind == "arith")
    ps.save(tmp_path / "p.json")
    assert PromptSet.load(tmp_path / "p.json") == ps


def test_a_corpus_model_s_prompts_are_corpus_text_only(tmp_path):
    """Arithmetic prompts said nothing of a model trained on a corpus, and its int8 gate
    compared two accuracies of 0 (a gate that could not fail)."""
    from crosschip.errors import CrosschipError

    tok = default_tokenizer(512)
    texts = ["the first document of the user's own text, long enough to score", "a second one", "a third"]
    ps = build_prompts(
        tok, problems=6, scored_problems=4, corpus_docs=2, digits=2, ops=["+"], seed=0, max_len=64,
        task="corpus", corpus=texts, context=40,
    )  # fmt: skip
    assert [p.kind for p in ps.scored + ps.greedy] == ["corpus"] * 4
    assert ps.scored[0].ids == [tok.bos_id, *tok.encode(texts[0])]
    assert ps.greedy[0].ids == ps.scored[0].ids[:16]
    assert ps.max_new_tokens == 40 - 16  # the default (32) cut to the context
    assert ps.meta == {"task": "corpus", "seed": 0, "problems": 0, "corpus_docs": 2}
    with pytest.raises(CrosschipError, match="trained on a corpus, so verify scores corpus text.*--corpus-docs 1"):
        build_prompts(tok, problems=6, scored_problems=4, corpus_docs=0, digits=2, ops=["+"], seed=0, max_len=64,
                      task="corpus")  # fmt: skip


def test_a_saved_debug_bundle_loads_on_the_torch_side(tmp_path):
    from crosschip.backends import get_backend
    from crosschip.verify.worker import load_torch_model

    save_bundle(debug_model(), tmp_path / "b", tokenizer=default_tokenizer(512))
    model, what = load_torch_model(str(tmp_path / "b"), "fp16", get_backend("torch:cpu"))
    assert next(model.parameters()).dtype == torch.float16
    assert "computed in float16" in what


def test_an_int8_bundle_is_judged_by_the_int8_gate_and_loads_dequantized(tmp_path):
    from crosschip.backends import get_backend
    from crosschip.handoff.precision import write_int8_weights
    from crosschip.hf import to_hf, write_manifest
    from crosschip.verify.worker import load_torch_model

    model = debug_model()
    bundle = save_bundle(model, tmp_path / "b", tokenizer=default_tokenizer(512))
    write_int8_weights(bundle, to_hf(model.state_dict(), model.cfg))
    write_manifest(bundle, {"precision": {"policy": "int8"}})
    assert gate.precision_of_bundle(bundle) == ("int8", "crosschip.json precision policy")
    loaded, what = load_torch_model(str(bundle), "fp32", get_backend("torch:cpu"))
    assert "int8 weights, computed in float32" in what
    w, q = model.layers[1].attn.wo.weight.detach(), loaded.layers[1].attn.wo.weight.detach()
    assert q.dtype == torch.float32 and not torch.equal(w, q)
    assert float((w - q).abs().max() / w.abs().max()) < 0.01  # per-channel int8: within 1% of the row max
    # The manifest is not checksummed: an fp32 bundle whose policy was edited to int8 was judged
    # by the int8 gate, the loosest. The weights (checksummed) must agree with it.
    plain = save_bundle(model, tmp_path / "plain", tokenizer=default_tokenizer(512))
    write_manifest(plain, {"precision": {"policy": "int8"}})
    with pytest.raises(
        CrosschipError, match="crosschip.json precision policy says int8, but its weights are stored in fp32"
    ):
        gate.precision_of_bundle(plain)
    write_manifest(bundle, {"precision": {"policy": "fp32"}})
    with pytest.raises(CrosschipError, match="says fp32, but its weights are stored in int8"):
        gate.precision_of_bundle(bundle)


def test_a_tampered_bundle_is_refused_before_either_side_runs(tmp_path, capsys):
    """The reference side may run from the source checkpoint, not the bundle: the bundle's
    checksums are checked first, not after the reference has spent its run."""
    from crosschip.cli import main

    bundle = save_bundle(debug_model(), tmp_path / "b", tokenizer=default_tokenizer(512))
    config = json.loads((bundle / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (bundle / "config.json").write_text(json.dumps(config))
    assert main(["verify", str(bundle), "--out", str(tmp_path / "v")]) == 1
    captured = capsys.readouterr()
    assert f"checksum mismatch for bundle file {bundle / 'config.json'}" in captured.err
    assert "reference side" not in captured.out and not (tmp_path / "v").exists()


def test_the_reference_is_the_source_checkpoint_only_while_it_holds_the_exported_weights(tmp_path):
    """A later run can write a checkpoint of the same name where the bundle's source was: the
    reference would then be another model, and the gate would blame the hand-off for it."""
    from crosschip import hf
    from crosschip.errors import CrosschipError
    from crosschip.verify.parity import VerifyOptions, reference_weights

    source, bundle = tmp_path / "step_00000020", tmp_path / "bundle"
    save_bundle(debug_model(), source, tokenizer=default_tokenizer(512))
    save_bundle(debug_model(), bundle, tokenizer=default_tokenizer(512))
    sha = hf.read_manifest(source)["files"][hf.WEIGHTS_FILE]
    hf.write_manifest(bundle, {"source": {"path": str(source), "weights_sha256": sha}})
    opts = VerifyOptions(bundle=bundle, out=tmp_path / "v")
    assert reference_weights(opts) == source
    torch.manual_seed(1)
    save_bundle(Transformer(model_preset("debug")), source, tokenizer=default_tokenizer(512))  # retrained
    with pytest.raises(CrosschipError, match="is not the checkpoint it was exported from.*--reference-weights bundle"):
        reference_weights(opts)
    assert reference_weights(VerifyOptions(bundle=bundle, out=tmp_path / "v", reference_weights="bundle")) is None


def test_the_problems_are_of_the_task_the_bundle_records_unless_the_flags_say_otherwise(tmp_path):
    """A 3-digit model was scored on 2-digit problems, and one trained on addition on
    subtraction too, unless the user repeated the task's settings to `crosschip verify`."""
    from crosschip import hf
    from crosschip.errors import CrosschipError
    from crosschip.verify.parity import VerifyOptions, trained_task

    bundle = save_bundle(debug_model(), tmp_path / "bundle", tokenizer=default_tokenizer(512))
    opts = VerifyOptions(bundle=bundle, out=tmp_path / "v")
    assert trained_task(opts) == ("arith", 2, ["+", "-"])  # nothing recorded: the data defaults
    hf.write_manifest(bundle, {"task": {"task": "arith", "digits": 3, "ops": ["-"]}})
    assert trained_task(opts) == ("arith", 3, ["-"])
    assert trained_task(VerifyOptions(bundle=bundle, out=tmp_path / "v", digits=1)) == ("arith", 1, ["-"])
    assert trained_task(VerifyOptions(bundle=bundle, out=tmp_path / "v", ops=["+"])) == ("arith", 3, ["+"])
    # A corpus model is scored on its text: the problems' settings are refused, not ignored.
    hf.write_manifest(bundle, {"task": {"task": "corpus"}})
    assert trained_task(opts) == ("corpus", None, None)
    for given, named in (({"digits": 2}, "--digits"), ({"problems": 8, "ops": ["+"]}, "--problems and --ops")):
        with pytest.raises(CrosschipError, match=f"{named} choose arithmetic problems, but .* trained on a corpus"):
            trained_task(VerifyOptions(bundle=bundle, out=tmp_path / "v", **given))
    hf.write_manifest(bundle, {"task": {"task": "code"}})  # it was scored on 2-digit arithmetic
    with pytest.raises(CrosschipError, match=r"records a task verify cannot score .* give --digits and --ops"):
        trained_task(opts)
    hf.write_manifest(bundle, {"task": {"task": "arith", "digits": 7, "ops": ["+"]}})
    with pytest.raises(CrosschipError, match=r"records a task verify cannot score .* give --digits and --ops"):
        trained_task(opts)
    # ...as the error says: the flags then stand for the record.
    given = VerifyOptions(bundle=bundle, out=tmp_path / "v", digits=2, ops=["-"])
    assert trained_task(given) == ("arith", 2, ["-"])
    hf.write_manifest(bundle, {"task": {"task": "code"}})
    assert trained_task(given) == ("arith", 2, ["-"])


@pytest.mark.parametrize("flag", ["reference_weights", "target_weights"])
def test_weights_of_another_vocabulary_are_refused_before_either_side_runs(tmp_path, flag):
    """They ended in an IndexError in the worker that used them, after the other side had run."""
    from crosschip.errors import CrosschipError
    from crosschip.verify.parity import VerifyOptions, check_inputs

    bundle = save_bundle(debug_model(), tmp_path / "bundle", tokenizer=default_tokenizer(512))
    other = save_bundle(debug_model(vocab_size=384), tmp_path / "other", tokenizer=default_tokenizer(384))
    value = str(other) if flag == "reference_weights" else other
    opts = VerifyOptions(bundle=bundle, out=tmp_path / "out", target="torch:cpu", **{flag: value})
    with pytest.raises(CrosschipError, match=r"has a vocabulary of 384 tokens and the bundle .* one of 512"):
        check_inputs(opts)
    check_inputs(VerifyOptions(bundle=bundle, out=tmp_path / "out", target="torch:cpu", **{flag: type(value)(bundle)}))


def test_greedy_tokens_past_the_context_are_refused_before_either_side_runs(debug_bundle, tmp_path, capsys):
    """The debug model's context is 256 tokens: --max-new-tokens 600 generated past it on a torch
    target and passed, 300 failed on ONNX Runtime after the reference's whole run, 100000 ran for
    minutes."""
    from crosschip.cli import main

    args = ["verify", str(debug_bundle), "--target", "torch:cpu", "--problems", "2", "--no-record"]
    assert main([*args, "--max-new-tokens", "600", "--out", str(tmp_path / "v")]) == 1
    err = capsys.readouterr().err
    assert "new tokens exceed the model's context of 256 tokens; give --max-new-tokens" in err, err
    assert len(err.strip().splitlines()) == 1 and not list((tmp_path / "v").glob("*/"))
