"""The hand-off format: Hugging Face `DeepseekV3ForCausalLM` layout, and bundle I/O.

One state-dict adapter (`to_hf` / `from_hf`) is the only place where key names cross
formats. A *bundle* is a folder every serving stack can load:

- `config.json`: `model_type: deepseek_v3`, every key written explicitly;
- `model.safetensors`: per-expert keys (`model.layers.N.mlp.experts.J.gate_proj.weight`),
  the MTP block at `model.layers.{num_hidden_layers}` with its own copies of the
  embedding and head, as DeepSeek-V3 ships them;
- `generation_config.json`, and `tokenizer.json` + `tokenizer_config.json` when given;
- `crosschip.json`: the manifest, sha256 of every other file plus whatever later stages add
  (the parity report).

Every file is written atomically (temp name in the same folder, fsync, `os.replace`), so a
killed export never leaves a half-written bundle that looks whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from crosschip.config import ConfigError, ModelConfig, build_section
from crosschip.errors import BundleError
from crosschip.model import Transformer
from crosschip.paths import check_bundle_folder

if TYPE_CHECKING:
    from crosschip.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MANIFEST_FILE = "crosschip.json"
MANIFEST_FORMAT = 1

# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------

# ModelConfig fields copied one-to-one (the dataclass already uses the HF names).
_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
    "first_k_dense_replace",
)
# Keys that may be absent from a config.json, with the value transformers gives them then.
_OPTIONAL_KEYS = {
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    # transformers defaults num_mtp_layers to 1 but its main model never reads it; a
    # checkpoint without the key has no MTP weights.
    "num_nextn_predict_layers": 0,
}
# Keys whose value is fixed by the architecture we implement: (key, required value, default
# when absent). A different value is a model we would run differently, so it is refused.
_FIXED_KEYS = (
    ("model_type", "deepseek_v3", None),
    ("scoring_func", "sigmoid", "sigmoid"),
    ("topk_method", "noaux_tc", "noaux_tc"),
    ("moe_layer_freq", 1, 1),
    ("rope_interleave", True, True),
    ("hidden_act", "silu", "silu"),
    ("attention_bias", False, False),
    ("rope_scaling", None, None),
)


def hf_config(
    cfg: ModelConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """`config.json` for transformers' `DeepseekV3ForCausalLM`, vLLM and llama.cpp's converter.

    Every key is explicit: readers disagree on defaults (transformers defaults
    `num_key_value_heads` to 128 and `routed_scaling_factor` to 2.5, vLLM defaults
    `scoring_func` to softmax), so nothing may be left to them.
    """
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **{key: getattr(cfg, key) for key in _SHAPE_KEYS},
        # MLA has no grouped KV heads; every reader still wants the key.
        "num_key_value_heads": cfg.num_attention_heads,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        # transformers >= 5 reads rope_parameters; vLLM and llama.cpp still read rope_theta
        # and rope_scaling (null = plain RoPE, no YaRN).
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_interleave": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        # transformers 5 reads `dtype`, older readers `torch_dtype`.
        "dtype": torch_dtype,
        "torch_dtype": torch_dtype,
    }


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
            raise BundleError(
                f"config.json: rope_parameters {params!r} is not supported; only plain RoPE (rope_type default)"
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if "rope_theta" in config:
        return float(config["rope_theta"])
    return 10000.0


# config.json's `quantization_config` in an int8 bundle. The int8 weights (with a per-row
# `weight_scale`) are crosschip's own layout: transformers loaded such a bundle without a word
# and ran the raw int8 values as fp32 weights (logits off by 3.6e+3). Without a `quant_method`,
# transformers refuses the config (ValueError) and vLLM names it an unknown quantization.
INT8_MARK = {
    "format": "crosschip-int8-weight-only",
    "note": "int8 weights with per-row weight_scale, read by crosschip and its ONNX graphs; for transformers "
    "or vLLM, export fp32, bf16 or fp16",
}


def model_config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of an HF DeepseekV3 `config.json`; BundleError names any key we cannot honour."""
    quant = config.get("quantization_config")
    if quant is not None and quant != INT8_MARK:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise BundleError(
            f"config.json: quantization_config{f' ({method})' if method else ''} is not supported: crosschip reads "
            "unquantized weights and its own int8 export"
        )
    for key, required, default in _FIXED_KEYS:
        value = config.get(key, default)
        if key not in config and default is None and required is not None:
            raise BundleError(f"config.json: missing key {key!r} (expected {required!r})")
        if value != required or type(value) is not type(required):
            raise BundleError(
                f"config.json: {key} = {value!r} is not supported (crosschip implements {key} = {required!r})"
            )
    kv_heads = config.get("num_key_value_heads", config.get("num_attention_heads"))
    if kv_heads != config.get("num_attention_heads"):
        raise BundleError(
            f"config.json: num_key_value_heads = {kv_heads!r} must equal num_attention_heads "
            f"({config.get('num_attention_heads')!r}); MLA has no grouped KV heads"
        )
    missing = [key for key in _SHAPE_KEYS if key not in config]
    if missing:
        raise BundleError(f"config.json: missing key(s) {', '.join(missing)}")
    values = {key: config[key] for key in _SHAPE_KEYS}
    values.update({key: config.get(key, default) for key, default in _OPTIONAL_KEYS.items()})
    # transformers may save num_mtp_layers (its attribute name) instead of ours.
    values["num_nextn_predict_layers"] = config.get(
        "num_nextn_predict_layers", config.get("num_mtp_layers", _OPTIONAL_KEYS["num_nextn_predict_layers"])
    )
    values["rope_theta"] = _rope_theta(config)
    try:
        # The same type and range checks as a TOML [model] table.
        return build_section(ModelConfig, values, "config.json")
    except ConfigError as e:
        raise BundleError(str(e)) from None


# --------------------------------------------------------------------------------------------
# State-dict adapter
# --------------------------------------------------------------------------------------------

# Inside one block: our module prefix -> the HF decoder layer's. First match wins.
_BLOCK_PREFIXES = (
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("attn.wq.", "self_attn.q_proj."),
    ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_layernorm."),
    ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."),
    ("attn.kv_norm.", "self_attn.kv_a_layernorm."),
    ("attn.wkv_b.", "self_attn.kv_b_proj."),
    ("attn.wo.", "self_attn.o_proj."),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.", "mlp."),
)
# SwiGLU names: DeepSeek's reference code -> HF.
_SWIGLU = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# MTP-only modules at layer index num_hidden_layers.
_MTP_PREFIXES = (
    ("enorm.", "enorm."),
    ("hnorm.", "hnorm."),
    ("eh_proj.", "eh_proj."),
    ("norm.", "shared_head.norm."),
)


def _block_key_to_hf(rest: str) -> str:
    for ours, theirs in _BLOCK_PREFIXES:
        if rest.startswith(ours):
            rest = theirs + rest[len(ours) :]
            break
    else:
        raise KeyError(rest)
    parts = rest.split(".")
    if len(parts) >= 2 and parts[-2] in _SWIGLU:
        parts[-2] = _SWIGLU[parts[-2]]
    return ".".join(parts)


def hf_key(key: str, cfg: ModelConfig) -> str:
    """The HF name of one of our state-dict keys."""
    if key == "embed.weight":
        return "model.embed_tokens.weight"
    if key == "norm.weight":
        return "model.norm.weight"
    if key == "head.weight":
        return "lm_head.weight"
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
        return f"model.layers.{m[1]}.{_block_key_to_hf(m[2])}"
    if m := re.fullmatch(r"mtp\.block\.(.+)", key):
        return f"model.layers.{cfg.num_hidden_layers}.{_block_key_to_hf(m[1])}"
    if m := re.fullmatch(r"mtp\.(.+)", key):
        for ours, theirs in _MTP_PREFIXES:
            if m[1].startswith(ours):
                return f"model.layers.{cfg.num_hidden_layers}.{theirs}{m[1][len(ours) :]}"
    raise KeyError(key)


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """HF keys of the MTP block's own embedding and head -> the our key they copy."""
    if not cfg.num_nextn_predict_layers:
        return {}
    n = cfg.num_hidden_layers
    return {
        f"model.layers.{n}.embed_tokens.weight": "embed.weight",
        f"model.layers.{n}.shared_head.head.weight": "head.weight",
    }


def _expected(cfg: ModelConfig) -> dict[str, tuple[str, torch.Size]]:
    """Every HF key a checkpoint of `cfg` holds -> (our key, shape); built on the meta device."""
    with torch.device("meta"):
        ours = Transformer(cfg).state_dict()
    expected = {}
    for key, t in ours.items():
        if key == "head.weight" and cfg.tie_word_embeddings:
            continue  # a tied head is the embedding; HF does not store it twice
        expected[hf_key(key, cfg)] = (key, t.shape)
    return expected


def to_hf(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> the HF DeepseekV3 layout (per-expert keys, MTP with its own copies)."""
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        if key == "head.weight" and cfg.tie_word_embeddings:
            continue
        try:
            out[hf_key(key, cfg)] = t
        except KeyError:
            raise BundleError(f"to_hf: no HF name for tensor {key!r} of shape {list(t.shape)}") from None
    for copy_key, src in _mtp_copies(cfg).items():
        # A clone: safetensors refuses tensors that share storage.
        out[copy_key] = state_dict[src].detach().clone()
    return out


def _unfuse_experts(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """transformers' in-memory 3-D expert layout -> per-expert keys.

    `save_pretrained` (5.24) writes per-expert keys, but a live `DeepseekV3ForCausalLM`'s
    `state_dict()` holds `experts.gate_up_proj` (E, 2I, D) and `experts.down_proj` (E, D, I).
    """
    out = dict(hf_state)
    inter = cfg.moe_intermediate_size
    for key in [k for k in hf_state if k.endswith(".mlp.experts.gate_up_proj")]:
        prefix = key.removesuffix("gate_up_proj")
        gate_up = out.pop(key)
        if gate_up.dim() != 3 or gate_up.shape[1] != 2 * inter:
            raise BundleError(
                f"tensor {key} has shape {list(gate_up.shape)}, expected "
                f"{[cfg.n_routed_experts, 2 * inter, cfg.hidden_size]}"
            )
        for j in range(gate_up.shape[0]):
            out[f"{prefix}{j}.gate_proj.weight"] = gate_up[j, :inter]
            out[f"{prefix}{j}.up_proj.weight"] = gate_up[j, inter:]
    for key in [k for k in hf_state if k.endswith(".mlp.experts.down_proj")]:
        prefix = key.removesuffix("down_proj")
        down = out.pop(key)
        for j in range(down.shape[0]):
            out[f"{prefix}{j}.down_proj.weight"] = down[j]
    return out


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(keys[:limit]) + more


def from_hf(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """An HF DeepseekV3 state dict -> ours, checked tensor by tensor against `cfg`.

    Missing, unexpected or wrongly shaped tensors raise BundleError naming each tensor and
    the shape `cfg` expects. The MTP block's copies of the embedding and head are optional
    and dropped (we share the main model's).
    """
    hf_state = _unfuse_experts(hf_state, cfg)
    expected = _expected(cfg)
    optional = {k: expected[hf_key(src, cfg)][1] for k, src in _mtp_copies(cfg).items()}
    if cfg.tie_word_embeddings:
        optional["lm_head.weight"] = torch.Size([cfg.vocab_size, cfg.hidden_size])

    missing = [f"{k} (expected shape {list(s)})" for k, (_, s) in expected.items() if k not in hf_state]
    if missing:
        raise BundleError(f"missing tensor(s): {_names(missing)}")
    extra = [f"{k} (shape {list(t.shape)})" for k, t in hf_state.items() if k not in expected and k not in optional]
    if extra:
        raise BundleError(f"unexpected tensor(s) for this config.json: {_names(extra)}")
    wrong = [
        f"{k} has shape {list(t.shape)}, expected {list(shape)}"
        for k, t in hf_state.items()
        if (shape := expected[k][1] if k in expected else optional[k]) != t.shape
    ]
    if wrong:
        raise BundleError(f"wrongly shaped tensor(s): {_names(wrong)}")

    ours = {our_key: hf_state[k] for k, (our_key, _) in expected.items()}
    if cfg.tie_word_embeddings:
        ours["head.weight"] = ours["embed.weight"]
    return ours


# --------------------------------------------------------------------------------------------
# Files: atomic writes and checksums
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is; not every OS can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temp file next to `path`, fsync it, then rename it over `path`."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    # The mode open() gives a new file, 0666 less the umask, read from a file created so (no
    # umask call, which would race other threads). mkstemp's 0600, and safetensors' own, left a
    # bundle's config, manifest and weights unreadable to the account that serves them.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> dict[str, Any]:
    # Anything readable is read (a named pipe too); only what is missing is "not found".
    if not path.exists():
        raise BundleError(f"bundle file not found: {path}")
    if path.is_dir():
        raise BundleError(f"{path} is a folder, not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def _bundle_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest and our temp files."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel == MANIFEST_FILE or path.name.endswith(".tmp"):
            continue
        files[rel] = sha256_file(path)
    return files


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The bundle's `crosschip.json` (`path` is the bundle folder or the manifest itself)."""
    path = Path(path)
    return read_json(path / MANIFEST_FILE if path.is_dir() else path)


def weights_sha256(folder: str | Path) -> str | None:
    """The sha256 the manifest of `folder` records for its weights; None without a manifest."""
    try:
        return read_manifest(folder).get("files", {}).get(WEIGHTS_FILE)
    except BundleError:
        return None


def write_manifest(path: str | Path, extra: dict[str, Any], *, scan: bool = False) -> None:
    """Merge `extra` into the bundle's manifest and recompute the files' sha256.

    scan: list every file in the folder, for a folder the caller wrote whole (a checkpoint's
    or an export's staging folder, where it added files). Otherwise (verify recording its
    verdict) only the files already listed are hashed again: a file someone put beside the
    bundle was listed as the bundle's own, and a later `export --force` deleted it.
    """
    folder = Path(path)
    check_bundle_folder(folder)
    manifest_path = folder / MANIFEST_FILE
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    manifest.update(extra)
    manifest["format"] = MANIFEST_FORMAT
    listed = manifest.get("files")
    if scan or not isinstance(listed, dict):
        manifest["files"] = _bundle_files(folder)
    else:  # a listed file gone is not dropped from the record: the folder is no longer what it lists
        if missing := [name for name in listed if not (folder / name).is_file()]:
            raise BundleError(f"file {folder / missing[0]} is listed in {MANIFEST_FILE} but missing")
        manifest["files"] = {name: sha256_file(folder / name) for name in listed}
    write_json(manifest_path, manifest)


# What the loaders read: weights, graphs, configs, the tokenizer, a checkpoint's state. Where a
# manifest exists, each one present must be listed in it: one dropped from the table, or put in
# the folder after it was written, was read unchecked (a tampered checkpoint exported cleanly).
_READ_FILES = re.compile(r".+\.(safetensors|onnx)|.*config\.json|tokenizer.*\.json|trainer_state\.json")


def verify_manifest(path: str | Path) -> None:
    """Check every file listed in the manifest against its sha256, and that every file a loader
    reads is listed; BundleError names the first bad one."""
    folder = Path(path)
    manifest = read_manifest(folder)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{folder / MANIFEST_FILE}: no 'files' table")
    what = "checkpoint" if manifest.get("kind") == "checkpoint" else "bundle"
    unlisted = sorted(
        f.name for f in folder.iterdir() if _READ_FILES.fullmatch(f.name) and f.name not in files and f.is_file()
    )
    if unlisted:
        raise BundleError(
            f"{what} file {folder / unlisted[0]} is not in {MANIFEST_FILE}: it was added or changed after the "
            f"{what} was written"
        )
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{what} file {file} is listed in {MANIFEST_FILE} but missing")
        if sha256_file(file) != digest:
            raise BundleError(
                f"checksum mismatch for {what} file {file}: the file changed after the {what} was written"
            )


# --------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------

# HF keys kept in fp32 whatever the export dtype: RMSNorm weights (they scale normalised
# activations) and the router (selection is a top-k over small score differences; transformers
# keeps `gate.weight` and `e_score_correction_bias` in fp32 too).
_FP32_KEYS = re.compile(r"(norm\.weight|\.mlp\.gate\.weight|\.mlp\.gate\.e_score_correction_bias)$")


def _cast_for_export(key: str, t: Tensor, dtype: torch.dtype | None) -> Tensor:
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.float() if _FP32_KEYS.search(key) else t.to(dtype)
    return t.contiguous()


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).removeprefix("torch.")


def save_bundle(
    model: Transformer,
    out_dir: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and `tokenizer`) as an HF DeepseekV3 folder plus the crosschip manifest.

    dtype: cast floating weights to it, except norms and the router (kept fp32); None keeps
    the model's own dtype.
    """
    cfg = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = {
        "bos_token_id": getattr(tokenizer, "bos_id", None),
        "eos_token_id": getattr(tokenizer, "eos_id", None),
        "pad_token_id": getattr(tokenizer, "pad_id", None),
    }
    weights = {k: _cast_for_export(k, t, dtype) for k, t in to_hf(model.state_dict(), cfg).items()}
    stored = dtype or next(t.dtype for k, t in weights.items() if not _FP32_KEYS.search(k))

    write_json(out / CONFIG_FILE, hf_config(cfg, **ids, torch_dtype=_dtype_name(stored)))
    write_json(
        out / GENERATION_CONFIG_FILE,
        {
            "bos_token_id": ids["bos_token_id"],
            "eos_token_id": ids["eos_token_id"],
            "pad_token_id": ids["pad_token_id"],
            "do_sample": False,
        },
    )
    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_safetensors(weights, tmp, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(out)
    # A fresh manifest, written last: until it lands, an old one fails the new files' checksums.
    manifest = {"format": MANIFEST_FORMAT, "files": _bundle_files(out), **(manifest_extra or {})}
    write_json(out / MANIFEST_FILE, manifest)
    return out


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, whose write errors (a full disk, a quota) come as OSError
    naming `path`: safetensors raises its own SafetensorError ("I/O error: No space left on
    device (os error 28)"), which named no file and reached the terminal as a traceback."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        text = str(e).removeprefix("Error while serializing: ")
        m = re.search(r"(?:I/O error: )?(.*?) \(os error (\d+)\)$", text)
        if m is None:
            raise
        raise OSError(int(m.group(2)), m.group(1), str(path)) from None


def load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except SafetensorError as e:
        raise BundleError(f"{path}: not a readable safetensors file: {e}") from None


def _load_weights(folder: Path) -> dict[str, Tensor]:
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        # Sharded checkpoints (large HF models): the index maps each tensor to its shard.
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise BundleError(f"bundle file not found: {folder / shard} (listed in {index})")
            state.update(load_safetensors(folder / shard))
        return state
    raise BundleError(f"bundle file not found: {single}")


def _load_tokenizer(folder: Path) -> Tokenizer | None:
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        from crosschip.tokenizer import Tokenizer
    except ImportError:
        return None
    return Tokenizer.load(folder)


def _drop_absent_mtp(cfg: ModelConfig, weights: dict[str, Tensor]) -> ModelConfig:
    """transformers defaults `num_mtp_layers` to 1 but never saves MTP weights: such a
    checkpoint has no MTP block, whatever its config says."""
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers and not any(k.startswith(prefix) for k in weights):
        return dataclasses.replace(cfg, num_nextn_predict_layers=0)
    return cfg


def load_bundle(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify_checksums: bool = True,
) -> tuple[Transformer, Tokenizer | None]:
    """Load a bundle (ours or any HF DeepseekV3 folder) as an eval-mode Transformer.

    dtype: the model's parameter dtype (None = float32); the router bias stays fp32.
    Checksums are verified when the folder has a `crosschip.json`.
    """
    folder = Path(path)
    check_bundle_folder(folder)
    # Checksums first: a tampered config.json must fail as tampered, not as a strange model.
    if verify_checksums and (folder / MANIFEST_FILE).exists():
        verify_manifest(folder)
    cfg = model_config_from_hf(read_json(folder / CONFIG_FILE))
    return build_model(cfg, _load_weights(folder), device=device, dtype=dtype), _load_tokenizer(folder)


def build_model(
    cfg: ModelConfig,
    hf_state: dict[str, Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """An eval-mode Transformer from an HF-layout float state dict; the router bias stays fp32."""
    cfg = _drop_absent_mtp(cfg, hf_state)
    state = from_hf(hf_state, cfg)
    # Built on meta (no wasted random init); the loaded tensors then become the parameters.
    # They are copies in the model's dtypes: safetensors' tensors alias the memory-mapped file,
    # and a later write to the bundle must not change (or, truncated, crash) a running server.
    # (`to_empty` would allocate the same, but its meta kernels import torch's symbolic-shape
    # machinery and sympy: about 0.5 s of every serving and verify process's start.)
    with torch.device("meta"):
        model = Transformer(cfg)
    like = model.state_dict()
    owned = {k: v.to(device=device, dtype=like[k].dtype if k in like else None, copy=True) for k, v in state.items()}
    model.load_state_dict(owned, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    if dtype is not None:
        model.to(dtype)
        for moe in model.moe_layers():
            moe.gate.bias.data = moe.gate.bias.data.float()
    return model.eval()
