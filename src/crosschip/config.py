"""Typed configuration: one dataclass per concern, loaded from TOML files (shipped ones in `configs/`).

A run config is a TOML file with one table per concern (`[model]`, `[data]`, `[train]`,
`[export]`, `[serve]`, `[verify]`, `[run]`). Every key is checked against the dataclass: an
unknown key or a value of the wrong type is a `ConfigError` that names the key, the file and
the line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosschip.errors import CrosschipError

# The default run, shipped inside the package (the repository's configs/ links to that folder)
# so that it is found from any directory and from an installed wheel. `crosschip run` and
# `crosschip train` take it when no --config is given.
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"


class ConfigError(CrosschipError, ValueError):
    """A config file or value that cannot be used; the message names the key and where it is."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """DeepSeek-V3-family model shape. Field names follow the HF `DeepseekV3Config`."""

    vocab_size: int = 1024
    """Tokens in the vocabulary (the tokenizer may use fewer; the rest are never produced)."""
    hidden_size: int = 256
    """Model width d."""
    intermediate_size: int = 768
    """SwiGLU width of the dense layers (the first `first_k_dense_replace`)."""
    moe_intermediate_size: int = 128
    """SwiGLU width of one routed (and one shared) expert."""
    num_hidden_layers: int = 4
    """Transformer blocks, not counting the MTP block."""
    num_attention_heads: int = 4
    """Attention heads of MLA."""
    q_lora_rank: int | None = 128
    """Rank of the low-rank query projection; None (0 in a TOML file, which has no null) gives
    a plain `q_proj`, as DeepSeek-V2-Lite has."""
    kv_lora_rank: int = 64
    """Width of the compressed latent `c_kv` that decode caches."""
    qk_nope_head_dim: int = 32
    """Per-head query/key dims without rotary embedding."""
    qk_rope_head_dim: int = 16
    """Per-head query/key dims with (interleaved) rotary embedding; the rope key is shared."""
    v_head_dim: int = 32
    """Per-head value dims."""
    n_routed_experts: int = 16
    """Fine-grained routed experts per MoE layer."""
    n_shared_experts: int = 1
    """Shared experts per MoE layer (fused into one SwiGLU of width n * moe_intermediate_size)."""
    num_experts_per_tok: int = 4
    """Routed experts chosen per token (top-k)."""
    n_group: int = 1
    """Expert groups for group-limited routing."""
    topk_group: int = 1
    """Groups a token may route into."""
    routed_scaling_factor: float = 1.0
    """Scale applied to the normalised routing weights."""
    norm_topk_prob: bool = True
    """Normalise the chosen experts' weights to sum to one before scaling."""
    first_k_dense_replace: int = 1
    """The first k layers use a dense SwiGLU instead of MoE."""
    num_nextn_predict_layers: int = 0
    """Multi-Token Prediction blocks (0 or 1)."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt plus generation) the model is used with."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""
    tie_word_embeddings: bool = False
    """Share the embedding and the output head (DeepSeek-V3 does not)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{key}: {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "max_position_embeddings",
        ):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(
            self.q_lora_rank is None or self.q_lora_rank > 0,
            "q_lora_rank",
            f"must be positive or null (0 in a run config, whose TOML has no null), got {self.q_lora_rank}",
        )
        need(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            "must be positive and even",
        )
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(
            self.n_routed_experts % self.n_group == 0,
            "n_group",
            f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})",
        )
        need(self.topk_group <= self.n_group, "topk_group", f"must be <= n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        need(
            self.n_group == 1 or per_group >= 2,
            "n_group",
            "group scores sum each group's top-2 experts, so every group needs at least 2 experts",
        )
        need(
            self.num_experts_per_tok <= self.topk_group * per_group,
            "num_experts_per_tok",
            f"top-k {self.num_experts_per_tok} exceeds the {self.topk_group * per_group} experts in the allowed groups",
        )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            "must be between 0 and num_hidden_layers",
        )
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers", "must be 0 or 1")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range", "routed_scaling_factor"):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, name, f"must be a positive number, got {value}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values the absorbed decode caches per token per layer: c_kv plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


# The DESIGN calibration shape: 6.65M parameters.
_ARITH_TINY: dict[str, Any] = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=768,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    max_position_embeddings=512,
)

# Named model sizes. `debug` is for tests, `arith-micro` is the default run's model,
# `arith-tiny` the calibration shape the benchmarks measure; the published sizes build on the
# meta device for planning and memory estimates.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        max_position_embeddings=256,
    ),
    "arith-tiny": _ARITH_TINY,
    # The default run's model: arith-tiny at three quarters of the width with 8 routed experts
    # (top-2) instead of 16 (top-4), 2.57M parameters. It learns the default task in fewer
    # seconds: on an avx2 CPU in fp32, 0.47 s a step against arith-tiny's 0.89 s, and 94-96%
    # held out after 380 steps (benchmarks/RESULTS.md, 2026-11-30).
    "arith-micro": {
        **_ARITH_TINY,
        "hidden_size": 192,
        "intermediate_size": 576,
        "moe_intermediate_size": 96,
        "q_lora_rank": 96,
        "kv_lora_rank": 48,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
    },
    # About 100M parameters, for accelerator throughput and MFU measurements.
    "small-100m": dict(
        vocab_size=16384,
        hidden_size=768,
        intermediate_size=2048,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        max_position_embeddings=2048,
    ),
    # Published config of deepseek-ai/DeepSeek-V2-Lite (routing switched to the V3 family's
    # sigmoid scoring; the parameter counts are the same).
    "deepseek-v2-lite": dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        max_position_embeddings=163840,
    ),
    # Published config of deepseek-ai/DeepSeek-V3.
    "deepseek-v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        first_k_dense_replace=3,
        num_nextn_predict_layers=1,
        max_position_embeddings=163840,
    ),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with `overrides` applied on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """What the model learns from."""

    task: str = "arith"
    """`arith` (the built-in verifiable arithmetic task) or `corpus` (the user's own text)."""
    digits: int = 2
    """Largest operand length of the arithmetic task, 1 to 3."""
    ops: list[str] = field(default_factory=lambda: ["+", "-"])
    """Arithmetic operations, a subset of `+` and `-`."""
    corpus: list[str] = field(default_factory=list)
    """Paths of `.txt`/`.jsonl` files (or folders of them) for `task = "corpus"`."""
    seed: int = 0
    """Seed of the task generator; the held-out split is disjoint from training for any seed."""
    heldout_size: int = 500
    """Held-out problems used for accuracy and parity."""
    mask_prompt: bool = True
    """Take the training loss only on the completion (the operands are random; predicting them teaches nothing)."""
    prefetch: bool | str = "auto"
    """Draw the next training batch on a background thread while the step runs: `true`,
    `false`, or `auto` (on where the model trains on a device beside the host CPU, whose
    cores are then free; off on the CPU itself, whose cores the step already uses)."""

    def __post_init__(self) -> None:
        if self.task not in ("arith", "corpus"):
            raise ConfigError(f"data.task: must be 'arith' or 'corpus', got {self.task!r}")
        if self.corpus and self.task != "corpus":  # else the run would learn arithmetic, silently
            raise ConfigError(
                f'data.corpus is set but data.task is {self.task!r}: set data.task = "corpus" to train on it'
            )
        if self.task == "corpus" and not self.corpus:  # said when the config loads, not when training starts
            raise ConfigError('data.corpus is empty: give paths of .txt/.jsonl files for data.task = "corpus"')
        if any(not str(path).strip() for path in self.corpus):  # "" is the current folder, read whole
            raise ConfigError(f"data.corpus: an empty path, got {self.corpus}")
        if not 1 <= self.digits <= 3:
            raise ConfigError(f"data.digits: must be 1, 2 or 3, got {self.digits}")
        if not self.ops or any(op not in ("+", "-") for op in self.ops):
            raise ConfigError(f"data.ops: must be a non-empty subset of ['+', '-'], got {self.ops}")
        if self.prefetch not in (True, False, "auto"):
            raise ConfigError(f"data.prefetch: must be true, false or 'auto', got {self.prefetch!r}")
        if self.heldout_size < 1:  # the final evaluation and the parity gate draw on them
            raise ConfigError(f"data.heldout_size: must be at least 1, got {self.heldout_size}")
        if self.task == "arith":  # more than exist was refused only when the trainer drew them
            from crosschip.data.arith import check_heldout_count

            try:
                check_heldout_count(self.heldout_size, self.digits, self.ops)
            except CrosschipError as e:
                raise ConfigError(f"data.heldout_size: {e}") from None

    def task_info(self) -> dict[str, Any]:
        """What a checkpoint and its bundles record of the task the model learned, so that
        `crosschip verify` scores held-out problems of that task without being told."""
        if self.task != "arith":
            return {"task": self.task}
        return {"task": "arith", "digits": self.digits, "ops": [op for op in ("+", "-") if op in self.ops]}


@dataclass
class TrainConfig:
    """Optimisation, precision, checkpoints and the health guard."""

    backend: str = "torch:cpu"
    """Backend that trains, e.g. `torch:cpu`, `torch:cuda`, `torch:npu`."""
    steps: int = 600
    batch_size: int = 32
    """Sequences per optimizer step (global, across processes and accumulation)."""
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"
    """`auto` (bf16 autocast on accelerators and on CPUs with native bf16, fp16 where bf16 is
    refused, else fp32), `fp32`, `bf16` or `fp16`."""
    bias_update_speed: float = 1e-3
    """gamma of the auxiliary-loss-free balance update."""
    seq_aux_loss_alpha: float = 0.0
    """Weight of the sequence-level balance loss (0 disables it)."""
    mtp_loss_weight: float = 0.3
    """lambda of the MTP loss when the model has an MTP block."""
    seed: int = 0
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    """Newest verified checkpoints kept (at least 2: a save killed midway leaves the one before)."""
    eval_every: int = 100
    """Held-out accuracy every this many steps; 0 only at the end, -1 never."""
    eval_problems: int = 100
    """Held-out problems of each periodic evaluation: the first ones, at most data.heldout_size
    (the evaluation at the end takes them all)."""
    max_minutes: float = 0.0
    """Stop after this many minutes of training steps (0 = no time limit)."""
    fit_schedule: bool = True
    """With max_minutes, where train.steps would not fit the budget at the median step time: end
    the learning-rate schedule (and the run) at the steps that fit, refitted every 10 steps, so
    the run finishes annealed instead of being cut off at a higher learning rate."""
    spike_factor: float = 3.0
    """A loss this many times the running average is a spike."""
    grad_norm_limit: float = 100.0
    """A pre-clip gradient norm above this is an explosion."""
    hang_timeout_s: float = 120.0
    """The watchdog fires when one step has not finished in this many seconds. The first step
    after a start, a resume or a rollback gets ten times as long: it may compile
    (`compile = true`: 30-90 s on a 2-core CPU) and warm caches."""
    straggler_factor: float = 5.0
    """A step this many times slower than the running median is a straggler event."""
    max_rollbacks: int = 3
    """Rollbacks allowed at the same step before the run stops and asks for failover."""
    activation_checkpoint: str = "none"
    """`full`: keep only each block's input for the backward and recompute the rest there
    (torchtitan's full activation checkpointing): a block's forward runs twice, and activation
    memory drops to one block's worth plus the block inputs. `none`: keep everything."""
    compile: bool = False
    """torch.compile each attention, RMSNorm and SwiGLU activation for training
    (`trainer.compile_regions`); the MoE's routing and evaluation stay eager. Costs a warm-up
    of seconds in the first step; where the backend cannot compile, the run logs
    `compile_fallback` and trains eagerly."""

    def __post_init__(self) -> None:
        self.validate()
        # Checked where a config is written, not in validate(): a short run cut from a full
        # config (`crosschip train --steps 2` on the default run, a test that sets
        # train.steps) stops inside its warmup as asked.
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"train.warmup_steps {self.warmup_steps} is longer than train.steps {self.steps}: the learning "
                "rate would never reach train.lr; lower train.warmup_steps or raise train.steps"
            )

    def validate(self) -> None:
        """Raise a ConfigError naming the first field out of range (the trainer calls this
        again, for configs changed after construction)."""
        rules = [
            ("steps", self.steps >= 1, "must be at least 1"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("seq_len", self.seq_len >= 1, "must be at least 1"),
            ("grad_accum", self.grad_accum >= 1, "must be at least 1"),
            (  # every micro-batch the same number of rows (and every process, see check_batch_split)
                "batch_size",
                self.grad_accum < 1 or self.batch_size % self.grad_accum == 0,
                f"must be divisible by train.grad_accum ({self.grad_accum})",
            ),
            ("lr", self.lr > 0, "must be positive"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be between 0 and 1"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0: no clipping)"),
            ("bias_update_speed", self.bias_update_speed >= 0, "must be >= 0"),
            ("seq_aux_loss_alpha", self.seq_aux_loss_alpha >= 0, "must be >= 0"),
            ("mtp_loss_weight", self.mtp_loss_weight >= 0, "must be >= 0"),
            ("ckpt_every", self.ckpt_every >= 1, "must be at least 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 2, "must be at least 2"),
            ("eval_every", self.eval_every >= -1, "must be >= -1 (0: only at the end, -1: never)"),
            (
                "eval_problems",
                self.eval_problems >= 1 or self.eval_every <= 0,
                "must be at least 1 when eval_every > 0",
            ),
            ("max_minutes", self.max_minutes >= 0, "must be >= 0 (0: no limit)"),
            ("spike_factor", self.spike_factor > 1, "must be above 1"),
            ("grad_norm_limit", self.grad_norm_limit > 0, "must be positive"),
            ("hang_timeout_s", self.hang_timeout_s > 0, "must be positive"),
            ("straggler_factor", self.straggler_factor > 1, "must be above 1"),
            ("max_rollbacks", self.max_rollbacks >= 0, "must be >= 0"),
            ("activation_checkpoint", self.activation_checkpoint in ("none", "full"), 'must be "none" or "full"'),
            ("seed", -(2**63) <= self.seed < 2**63, "must fit in a signed 64-bit integer"),
        ]
        # A NaN passes no comparison, but an inf passes "positive": refuse both first.
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"train.{name}: must be a finite number, got {value}")
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"train.{name}: {rule}, got {getattr(self, name)}")


POLICIES = ("fp32", "bf16", "fp16", "int8")
"""The hand-off's precision policies (int8 is weight-only); handoff.precision applies them."""


@dataclass
class ExportConfig:
    """The hand-off: precision policy and target."""

    target: str = "ort:cpu"
    dtype: str = "fp32"
    """`fp32`, `bf16`, `fp16` or `int8` (weight-only)."""


@dataclass
class ServeConfig:
    """The serving engine and the HTTP server."""

    backend: str = "ort:cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_queue: int = 256
    block_size: int = 16
    num_blocks: int = 0
    """Cache blocks in the pool (0 = enough for max_batch full-length sequences)."""
    prefill_chunk: int = 256
    prefix_caching: bool = True
    """Reuse the cached latents of the full blocks a prompt shares with an earlier sequence
    (`crosschip serve --no-prefix-caching` turns it off)."""
    drain_timeout_s: float = 30.0
    api_key: str = ""

    def __post_init__(self) -> None:
        check_serve_limits(self, lambda name: f"serve.{name}:")


def check_serve_limits(values: Any, label: Callable[[str], str]) -> None:
    """The serving numbers of `values` (a ServeConfig, or `crosschip serve`'s arguments, which
    carry the same names) that no server can run with, as a ConfigError whose subject is
    `label(field)`: a port outside 0-65535, a limit below 1 (a prefill chunk of 0 never
    finishes a prompt), a pool of one block (block 0 is scratch), a negative or infinite drain time."""
    rules = [
        ("port", 0 <= values.port <= 65535, "must be between 0 and 65535"),
        ("max_batch", values.max_batch >= 1, "must be at least 1"),
        ("max_queue", values.max_queue >= 1, "must be at least 1"),
        ("block_size", values.block_size >= 1, "must be at least 1"),
        (
            "num_blocks",
            values.num_blocks == 0 or values.num_blocks >= 2,
            "must be 0 (sized from max_batch) or at least 2",
        ),
        ("prefill_chunk", values.prefill_chunk >= 1, "must be at least 1"),
        # inf passes ">= 0" (and NaN no comparison); as train's floats, it must be finite.
        (
            "drain_timeout_s",
            math.isfinite(values.drain_timeout_s) and values.drain_timeout_s >= 0,
            "must be >= 0 and finite",
        ),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{label(name)} {rule}, got {getattr(values, name)}")


@dataclass
class VerifyConfig:
    """The parity gate."""

    reference: str = "torch:cpu"
    prompts: int = 64
    """Held-out problems both sides continue greedily (`crosschip verify --problems`)."""
    max_new_tokens: int = 0
    """Greedy length (`--max-new-tokens`); 0: the longest worked completion plus 2."""

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise ConfigError(f"verify.prompts: must be at least 1, got {self.prompts}")
        if self.max_new_tokens < 0:
            raise ConfigError(
                f"verify.max_new_tokens: must be >= 0 (0: the longest completion plus 2), got {self.max_new_tokens}"
            )


@dataclass
class RunConfig:
    """A whole run: every stage's config."""

    model: ModelConfig = field(default_factory=lambda: model_preset("arith-tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """What one section's values mean for another's (each section checks its own fields)."""
        if self.train.seq_len > self.model.max_position_embeddings:
            # A packed corpus row's positions run to seq_len - 1: the model would learn positions
            # that its bundle (context max_position_embeddings) never serves.
            raise ConfigError(
                f"train.seq_len {self.train.seq_len} is longer than the model's context "
                f"(model.max_position_embeddings {self.model.max_position_embeddings}); lower train.seq_len "
                "or raise model.max_position_embeddings"
            )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _line_of(text: str, table: str, key: str) -> int | None:
    """Best-effort line number of `key` inside `[table]` (tomllib keeps no positions)."""
    current = ""
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            current = header.group(1)
            continue
        if current == table and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return no
    return None


def _check_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build_section(cls: type, values: dict[str, Any], where: str, text: str = "", table: str = "") -> Any:
    """Build dataclass `cls` from a TOML table, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        line = _line_of(text, table, key) if text else None
        at = f"{where}" + (f":{line}" if line else "")
        if key not in names:
            raise ConfigError(
                f"{at}: unknown key {table + '.' if table else ''}{key!r}; known keys: {', '.join(sorted(names))}"
            )
        if not _check_type(value, hints[key]):
            raise ConfigError(
                f"{at}: {table + '.' if table else ''}{key} must be {_type_name(hints[key])}, got {type(value).__name__} {value!r}"
            )
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _section_type(name: str) -> type:
    """The dataclass of the run config's table `name`."""
    return typing.get_type_hints(RunConfig)[name]


def config_from_dict(data: dict[str, Any], where: str = "<dict>", text: str = "") -> RunConfig:
    """A RunConfig from the parsed TOML tables; `[model] preset = NAME` starts from a preset."""
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    for table in data:
        if table not in sections and not isinstance(data[table], dict):  # `steps = 3` above every table
            owners = [name for name in sections if table in {f.name for f in dataclasses.fields(_section_type(name))}]
            where_to = (
                f"; put it under {' or '.join(f'[{o}]' for o in owners)}"
                if owners
                else f"; known tables: {', '.join(sections)}"
            )
            raise ConfigError(f"{where}: {table} is a key outside any table{where_to}")
        if table not in sections:
            line = None
            if text:
                for no, ln in enumerate(text.splitlines(), 1):
                    if re.match(rf"^\[\s*{re.escape(table)}\s*\]", ln.strip()):
                        line = no
                        break
            raise ConfigError(
                f"{where}{':' + str(line) if line else ''}: unknown table [{table}]; known tables: {', '.join(sections)}"
            )
        if not isinstance(data[table], dict):
            raise ConfigError(f"{where}: [{table}] must be a table")
    kwargs: dict[str, Any] = {}
    for name in sections:
        values = dict(data.get(name, {}))
        if name == "model":
            preset = values.pop("preset", "arith-tiny")
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ConfigError(f"{where}: model.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
            values = {**PRESETS[preset], **values}
            if type(values.get("q_lora_rank")) is int and values["q_lora_rank"] == 0:  # TOML has no null
                values["q_lora_rank"] = None
        kwargs[name] = build_section(_section_type(name), values, where, text, name)
    try:
        return RunConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | Path) -> RunConfig:
    """Load a run config from a TOML file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder; give the TOML file")
    if not path.exists():  # anything else that exists is read: a pipe too (`--config <(...)`)
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return config_from_dict(data, str(path), text)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        out |= _flat(value, name + ".") if isinstance(value, dict) else {name: value}
    return out


def config_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """ "TABLE.KEY OLD -> NEW" for each value of two `to_dict` configs that differs."""
    a, b = _flat(before), _flat(after)
    return [
        f"{k} {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


SECRETS = frozenset({"api_key"})
"""Config fields whose values no report, log or run state may hold."""


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass, for JSON reports, logs and run state; a secret
    (`serve.api_key`) says only whether it is set."""

    def redact(d: dict[str, Any]) -> dict[str, Any]:
        return {
            k: ("<set>" if v else "") if k in SECRETS else redact(v) if isinstance(v, dict) else v for k, v in d.items()
        }

    return redact(dataclasses.asdict(obj))
