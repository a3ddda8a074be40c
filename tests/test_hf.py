"""The HF hand-off format against the reference nobody here wrote: transformers' DeepseekV3ForCausalLM.

Weights cross through the real adapter (`save_bundle` / `load_bundle`) in both directions and
the logits must agree in fp32. Router biases are random and partly negative, so a masked
group filled with 0 instead of -inf, or a bias on the wrong side of the top-k, would show.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.modeling_layers import MtpModel

from crosschip.config import ModelConfig, model_preset
from crosschip.errors import BundleError
from crosschip.hf import (
    MANIFEST_FILE,
    from_hf,
    hf_config,
    load_bundle,
    model_config_from_hf,
    read_manifest,
    save_bundle,
    sha256_file,
    to_hf,
    write_manifest,
)
from crosschip.model import Transformer

ATOL = 1e-4

# Tiny variations of the debug preset covering every structural switch of the adapter.
CONFIGS = {
    "group2-qlora-dense1": dict(),
    "group1-noqlora-moe0": dict(n_group=1, topk_group=1, q_lora_rank=None, first_k_dense_replace=0),
    "group4-top2-scaled": dict(
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        first_k_dense_replace=0,
        routed_scaling_factor=2.5,
        norm_topk_prob=False,
    ),
    "tied-2shared-noqlora": dict(
        tie_word_embeddings=True, n_shared_experts=2, q_lora_rank=None, n_group=1, topk_group=1
    ),
    "mtp": dict(num_nextn_predict_layers=1),
}
NO_MTP = [name for name, over in CONFIGS.items() if not over.get("num_nextn_predict_layers")]


def _cfg(name: str) -> ModelConfig:
    return model_preset("debug", **CONFIGS[name])


def _input_batches(cfg: ModelConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, shape, generator=g) for shape in ((2, 7), (1, 19))]


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms away from 1, a router that does not tie, biases partly negative."""
    g = torch.Generator().manual_seed(seed)
    # The state dict, not named_buffers(): transformers' RoPE inv_freq is a non-persistent buffer.
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith(("e_score_correction_bias", "gate.bias")):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5 - 0.3)
        elif "norm" in name:
            t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
        elif name.endswith(("mlp.gate.weight", "ffn.gate.weight")):  # the router
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def _our_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg).eval()
    _randomize(model, seed)
    return model


def _load_hf(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _max_diff(ours: Transformer, theirs: transformers.PreTrainedModel, cfg: ModelConfig) -> float:
    with torch.no_grad():
        return max((ours(ids) - theirs(ids).logits).abs().max().item() for ids in _input_batches(cfg))


@pytest.fixture(autouse=True)
def _quiet_transformers():
    # transformers logs a load report for the MTP keys it ignores; keep test output clean.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


# --------------------------------------------------------------------------------------------
# Parity with transformers, both directions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_our_bundle_loads_in_transformers_with_matching_logits(tmp_path, name):
    cfg = _cfg(name)
    ours = _our_model(cfg)
    save_bundle(ours, tmp_path)

    theirs = _load_hf(tmp_path)

    assert type(theirs) is transformers.DeepseekV3ForCausalLM
    assert theirs.config.num_key_value_heads == cfg.num_attention_heads
    assert _max_diff(ours, theirs, cfg) <= ATOL


@pytest.mark.parametrize("name", CONFIGS)
def test_bundle_round_trip_is_exact(tmp_path, name):
    cfg = _cfg(name)
    ours = _our_model(cfg)
    save_bundle(ours, tmp_path)

    loaded, tokenizer = load_bundle(tmp_path)

    assert tokenizer is None
    assert loaded.cfg == cfg
    assert not loaded.training
    expected, got = ours.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    if cfg.tie_word_embeddings:
        assert loaded.head.weight is loaded.embed.weight
    if cfg.num_nextn_predict_layers:
        ids = _input_batches(cfg)[0]
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.mtp_logits(loaded.hidden(ids), ids), ours.mtp_logits(ours.hidden(ids), ids)
            )


def _hf_reference(cfg: ModelConfig, seed: int = 0) -> transformers.DeepseekV3ForCausalLM:
    """transformers' model built from its own config class (not from our hf_config)."""
    fields = dataclasses.asdict(cfg)
    theta = fields.pop("rope_theta")
    # Leave num_mtp_layers at transformers' default (1): its model never has MTP weights.
    fields.pop("num_nextn_predict_layers")
    config = transformers.DeepseekV3Config(
        **fields,
        num_key_value_heads=cfg.num_attention_heads,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    _randomize(model, seed)
    return model


@pytest.mark.parametrize("name", NO_MTP)
def test_transformers_checkpoint_loads_in_crosschip_with_matching_logits(tmp_path, name):
    cfg = _cfg(name)
    theirs = _hf_reference(cfg, seed=3)
    theirs.save_pretrained(tmp_path)
    assert not (tmp_path / "crosschip.json").exists()

    ours, _ = load_bundle(tmp_path)

    # Their config says num_nextn_predict_layers 1 but holds no MTP weights.
    assert ours.mtp is None
    assert dataclasses.replace(ours.cfg, num_nextn_predict_layers=0) == dataclasses.replace(
        cfg, num_nextn_predict_layers=0
    )
    assert _max_diff(ours, theirs, cfg) <= ATOL


def test_sharded_transformers_checkpoint_loads(tmp_path):
    cfg = _cfg("group1-noqlora-moe0")
    theirs = _hf_reference(cfg, seed=5)
    theirs.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    ours, _ = load_bundle(tmp_path)

    assert _max_diff(ours, theirs, cfg) <= ATOL


@pytest.mark.parametrize("name", ["group2-qlora-dense1", "tied-2shared-noqlora"])
def test_from_hf_accepts_transformers_in_memory_fused_experts(name):
    cfg = _cfg(name)
    theirs = _hf_reference(cfg, seed=4)
    live = theirs.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in live)  # the 3-D layout this test is about

    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf(live, cfg), strict=True)

    assert _max_diff(ours, theirs, cfg) <= ATOL


def test_mtp_block_matches_transformers_mtp_layer(tmp_path):
    cfg = _cfg("mtp")
    ours = _our_model(cfg)
    save_bundle(ours, tmp_path)
    theirs = _load_hf(tmp_path)
    # transformers finds MTP weights through a pattern hard-coded for DeepSeek-V3's 61 layers;
    # point it at this model's MTP layer index. Everything else is its own loading code.
    theirs._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.num_hidden_layers}\..*"]
    mtp = MtpModel.from_pretrained(theirs).eval()

    ids = _input_batches(cfg)[1]
    T = ids.shape[1]
    with torch.no_grad():
        h = theirs(ids, output_hidden_states=True).hidden_states[-1]
        positions = torch.arange(1, T)[None]  # the MTP layer sees tokens 1..T-1
        their_logits = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], positions, None, input_ids=ids[:, 1:]))
        our_logits = ours.mtp_logits(ours.hidden(ids), ids)

    assert (our_logits - their_logits).abs().max().item() <= ATOL


def test_mtp_weights_are_stored_with_their_own_embedding_and_head(tmp_path):
    cfg = _cfg("mtp")
    ours = _our_model(cfg)
    save_bundle(ours, tmp_path)

    stored = load_file(tmp_path / "model.safetensors")

    n = cfg.num_hidden_layers
    assert torch.equal(stored[f"model.layers.{n}.embed_tokens.weight"], ours.embed.weight)
    assert torch.equal(stored[f"model.layers.{n}.shared_head.head.weight"], ours.head.weight)
    assert torch.equal(stored[f"model.layers.{n}.shared_head.norm.weight"], ours.mtp.norm.weight)
    assert torch.equal(stored[f"model.layers.{n}.eh_proj.weight"], ours.mtp.eh_proj.weight)
    assert torch.equal(
        stored[f"model.layers.{n}.mlp.experts.7.up_proj.weight"], ours.mtp.block.ffn.experts[7].w3.weight
    )


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------

DELETE = object()
REQUIRED_KEYS = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "moe_layer_freq": 1,
    "rope_interleave": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rope_scaling": None,
}


def test_config_json_writes_every_key_explicitly(tmp_path):
    cfg = _cfg("group1-noqlora-moe0")
    save_bundle(_our_model(cfg), tmp_path)

    text = (tmp_path / "config.json").read_text()
    config = json.loads(text)

    for key, value in REQUIRED_KEYS.items():
        assert config[key] == value, key
    for field in dataclasses.fields(ModelConfig):
        assert field.name in config, field.name
    for key in (
        "num_key_value_heads",
        "rope_parameters",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
    ):
        assert key in config, key
    assert '"q_lora_rank": null' in text
    assert config["num_key_value_heads"] == cfg.num_attention_heads
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": cfg.rope_theta}
    assert config["num_nextn_predict_layers"] == 0
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["do_sample"] is False


@pytest.mark.parametrize("name", CONFIGS)
def test_model_config_round_trips_through_hf_config(name):
    cfg = _cfg(name)
    assert model_config_from_hf(json.loads(json.dumps(hf_config(cfg)))) == cfg


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"model_type": "llama"}, "model_type"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
        ({"hidden_size": DELETE}, "hidden_size"),
        ({"model_type": DELETE}, "model_type"),
    ],
)
def test_unsupported_or_missing_config_keys_are_named(change, key):
    config = {**hf_config(_cfg("group2-qlora-dense1")), **change}
    config = {k: v for k, v in config.items() if v is not DELETE}
    with pytest.raises(BundleError, match=key):
        model_config_from_hf(config)


# --------------------------------------------------------------------------------------------
# Bad bundles
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bundle(tmp_path) -> Path:
    save_bundle(_our_model(_cfg("group2-qlora-dense1")), tmp_path / "bundle")
    return tmp_path / "bundle"


def _rewrite_weights(bundle: Path, edit) -> None:
    weights = load_file(bundle / "model.safetensors")
    edit(weights)
    save_file(weights, bundle / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named_with_its_shape(bundle):
    _rewrite_weights(bundle, lambda w: w.pop("model.layers.1.mlp.gate.weight"))
    with pytest.raises(BundleError, match=r"missing tensor.*model\.layers\.1\.mlp\.gate\.weight.*\[8, 64\]"):
        load_bundle(bundle, verify_checksums=False)


def test_extra_tensor_is_named_with_its_shape(bundle):
    _rewrite_weights(bundle, lambda w: w.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(
        BundleError, match=r"unexpected tensor.*model\.layers\.1\.mlp\.experts\.8\.up_proj\.weight.*\[32, 64\]"
    ):
        load_bundle(bundle, verify_checksums=False)


def test_wrongly_shaped_tensor_is_named_with_the_expected_shape(bundle):
    _rewrite_weights(bundle, lambda w: w.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(128, 16)}))
    with pytest.raises(
        BundleError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight has shape \[128, 16\], expected \[128, 32\]"
    ):
        load_bundle(bundle, verify_checksums=False)


def test_tampered_file_fails_its_checksum(bundle):
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    (bundle / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for bundle file .*model\.safetensors"):
        load_bundle(bundle)
    load_bundle(bundle, verify_checksums=False)  # the file itself is still well-formed
    # A checkpoint's manifest says so, and its error names a checkpoint, not a bundle.
    write_manifest(bundle, {"kind": "checkpoint"})
    (bundle / "model.safetensors").write_bytes(bytes(data[:-1]))
    with pytest.raises(BundleError, match=r"checkpoint file .*model\.safetensors.* after the checkpoint was written"):
        load_bundle(bundle)


def test_a_file_the_loader_reads_must_be_in_the_manifest(bundle):
    """Checksums covered only the files the manifest listed: weights dropped from its table (or
    a graph put beside the bundle after it was written) were read unchecked."""
    import json

    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    del manifest["files"]["model.safetensors"]
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"bundle file .*model\.safetensors is not in crosschip\.json"):
        load_bundle(bundle)
    write_manifest(bundle, {}, scan=True)
    load_bundle(bundle)
    (bundle / "model.onnx").write_bytes(b"a graph no export wrote")
    with pytest.raises(BundleError, match=r"model\.onnx is not in crosschip\.json"):
        load_bundle(bundle)
    (bundle / "model.onnx").unlink()
    (bundle / "notes.txt").write_text("what a user keeps beside a bundle is not read, and not refused")
    load_bundle(bundle)


def test_truncated_weights_are_a_clear_error(bundle):
    (bundle / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"model\.safetensors: not a readable safetensors file"):
        load_bundle(bundle, verify_checksums=False)


def test_file_listed_in_manifest_but_deleted_is_named(bundle):
    (bundle / "generation_config.json").unlink()
    with pytest.raises(BundleError, match=r"generation_config\.json.*missing"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_bundle_file_is_named_with_its_path(bundle, name):
    (bundle / name).unlink()
    with pytest.raises(BundleError, match=rf"not found: .*bundle/{name}"):
        load_bundle(bundle, verify_checksums=False)


def test_a_config_json_that_is_a_folder_is_named_as_one(bundle):
    (bundle / "config.json").unlink()
    (bundle / "config.json").mkdir()
    with pytest.raises(BundleError, match=r"config\.json is a folder, not a file"):
        load_bundle(bundle, verify_checksums=False)


def test_missing_bundle_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# Manifest, dtype policy, atomic writes
# --------------------------------------------------------------------------------------------


def test_manifest_lists_every_file_and_takes_later_reports(bundle):
    manifest = read_manifest(bundle)
    assert manifest["format"] == 1
    assert set(manifest["files"]) == {"config.json", "generation_config.json", "model.safetensors"}
    assert manifest["files"]["model.safetensors"] == sha256_file(bundle / "model.safetensors")

    (bundle / "onnx").mkdir()
    (bundle / "onnx" / "model.onnx").write_bytes(b"graph")
    write_manifest(bundle, {"parity": {"verdict": "pass", "max_abs_diff": 1e-7}})

    manifest = read_manifest(bundle)
    assert manifest["parity"]["verdict"] == "pass"
    # A report (verify's verdict) does not adopt a file put beside the bundle: listed, it was
    # deleted with the bundle by a later `export --force`. The stage that wrote it scans.
    assert "onnx/model.onnx" not in manifest["files"]
    write_manifest(bundle, {}, scan=True)
    manifest = read_manifest(bundle)
    assert manifest["parity"]["verdict"] == "pass"
    assert manifest["files"]["onnx/model.onnx"] == sha256_file(bundle / "onnx" / "model.onnx")
    (bundle / "onnx" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"onnx/model\.onnx"):
        load_bundle(bundle)
    # A listed file that is gone is not dropped from the list by a report: the bundle is broken.
    (bundle / "onnx" / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"onnx/model\.onnx is listed in crosschip\.json but missing"):
        write_manifest(bundle, {"parity": {"verdict": "pass"}})


class _TokenizerStandIn:
    """The parts of crosschip.tokenizer.Tokenizer that save_bundle uses."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def save(self, folder: Path) -> None:
        (Path(folder) / "tokenizer_config.json").write_text("{}")


def test_tokenizer_ids_reach_config_and_manifest(tmp_path):
    cfg = _cfg("group2-qlora-dense1")
    save_bundle(_our_model(cfg), tmp_path, tokenizer=_TokenizerStandIn(), manifest_extra={"trained_on": "torch:cpu"})

    config = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    manifest = read_manifest(tmp_path)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert "tokenizer_config.json" in manifest["files"]
    assert manifest["trained_on"] == "torch:cpu"


def test_real_tokenizer_travels_with_the_bundle(tmp_path):
    tokenization = pytest.importorskip("crosschip.tokenizer", reason="crosschip.tokenizer is not written yet")
    tokenizer = tokenization.train_tokenizer(["12+34=46", "hello world", "the bundle crosses chips"] * 20, 300)
    save_bundle(_our_model(_cfg("group2-qlora-dense1")), tmp_path, tokenizer=tokenizer)

    _, loaded = load_bundle(tmp_path)

    assert {"tokenizer.json", "tokenizer_config.json"} <= set(read_manifest(tmp_path)["files"])
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == tokenizer.eos_id
    assert loaded.encode("12+34=46 hello") == tokenizer.encode("12+34=46 hello")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def test_bf16_export_keeps_norms_and_router_in_fp32(tmp_path):
    cfg = _cfg("mtp")
    ours = _our_model(cfg)
    save_bundle(ours, tmp_path, dtype=torch.bfloat16)

    stored = load_file(tmp_path / "model.safetensors")
    fp32 = {k for k, t in stored.items() if t.dtype == torch.float32}
    assert fp32 and all(k.endswith(("norm.weight", "mlp.gate.weight", "e_score_correction_bias")) for k in fp32)
    assert all(t.dtype == torch.bfloat16 for k, t in stored.items() if k not in fp32)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in fp32
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"

    loaded, _ = load_bundle(tmp_path, dtype=torch.bfloat16)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert all(moe.gate.bias.dtype == torch.float32 for moe in loaded.moe_layers())
    ids = _input_batches(cfg)[0]
    with torch.no_grad():
        err = (loaded(ids).float() - ours(ids)).abs().max().item()
    assert err < 0.1  # bf16 rounding of the weights, not a broken mapping (logits are O(1))


def test_save_leaves_no_temp_files_and_overwrites_in_place(bundle):
    model, _ = load_bundle(bundle)
    save_bundle(model, bundle)
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]
    load_bundle(bundle)


def test_a_loaded_model_owns_its_weights(bundle):
    """safetensors maps the file: a model whose parameters aliased that map would change when
    the bundle is rewritten in place under a running server (and crash when it is truncated)."""
    model, _ = load_bundle(bundle)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = bundle / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with weights.open("r+b") as f:  # zero every tensor's bytes where they lie
        f.seek(header)
        f.write(bytes(weights.stat().st_size - header))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_loading_a_bundle_and_running_it_needs_no_tracing_machinery(bundle):
    """Serving and verify processes load a bundle at start: torch's symbolic-shape machinery
    (and sympy, about half a second) belongs to tracing, not to loading and running a model."""
    code = (
        "import sys, torch; from crosschip.hf import load_bundle\n"
        f"model, _ = load_bundle({str(bundle)!r})\n"
        "with torch.no_grad(): model(torch.tensor([[1, 2, 3, 4]]))\n"
        "print(sorted(m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_to_hf_uses_per_expert_keys_and_hf_names():
    cfg = _cfg("group2-qlora-dense1")
    keys = set(to_hf(Transformer(cfg).state_dict(), cfg))
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.self_attn.q_a_layernorm.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_bundle_files_take_the_umask_like_any_file(tmp_path):
    """A serving account reads the bundle: its JSON files and weights were written 0600 (through
    mkstemp) whatever the umask, beside 0644 tokenizer files."""
    import stat

    from crosschip.tokenizer import default_tokenizer

    previous = os.umask(0o022)
    try:
        torch.manual_seed(0)
        folder = save_bundle(Transformer(model_preset("debug")), tmp_path / "b", tokenizer=default_tokenizer(512))
        write_manifest(folder, {"note": "x"})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert "config.json" in modes and "model.safetensors" in modes and "crosschip.json" in modes
    assert set(modes.values()) == {0o644}, modes


def test_checkpoint_files_take_the_umask_like_any_file(tmp_path):
    import stat

    from crosschip.config import RunConfig
    from crosschip.train.trainer import Trainer

    cfg = RunConfig(model=model_preset("debug"))
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_every = 1, 2, 64, 0
    cfg.data.heldout_size = 10
    previous = os.umask(0o022)
    try:
        Trainer(cfg, tmp_path / "run", verbose=False).fit()
    finally:
        os.umask(previous)
    files = [p for step in (tmp_path / "run" / "checkpoints").glob("step_*") for p in step.iterdir()]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert any(p.name == "model.safetensors" for p in files) and set(modes.values()) == {0o644}, modes
