"""The training loop: one backend, one or several processes, guarded by the health checks.

A step draws one global batch, runs `grad_accum` micro-batches forward and backward, agrees
on the global loss and gradient norm, lets the health guard judge them, then clips, steps
AdamW, updates the auxiliary-loss-free balance bias and logs. Faults roll back to the newest
verified checkpoint and skip the offending batch; past the cap the run gives up (exit 3).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from crosschip import interrupts
from crosschip.backends import Backend, get_backend
from crosschip.config import RunConfig, config_diff, to_dict
from crosschip.data.arith import heldout_set
from crosschip.errors import CrosschipError, first_line
from crosschip.model import (
    DTYPES,
    MLA,
    RMSNorm,
    SwiGLU,
    Transformer,
    count_params,
    grouped_experts_run,
    human_count,
)
from crosschip.paths import lock_folder
from crosschip.tokenizer import model_tokenizer
from crosschip.train import checkpoint as ckpt
from crosschip.train import distributed as D
from crosschip.train.data import IGNORE, Batch, BatchStream, shard_rows
from crosschip.train.evaluate import arith_accuracy
from crosschip.train.faults import SPIKE_FACTOR, FaultInjector, kill_self
from crosschip.train.health import HealthGaveUp, HealthGuard, StepHang, Watchdog
from crosschip.train.launch import check_batch_split
from crosschip.train.metrics import MetricsLog, Progress, kept_steps, plot_loss, saved_note

FIT_EVERY = 10
"""Steps between fits of the schedule to train.max_minutes."""
STUCK = "step hung and could not be interrupted"
# The setting each fault is judged by, named when the run stops on it: a threshold set tighter
# than the model's normal steps looks like a faulty chip.
THRESHOLDS = {"spike": "spike_factor", "grad_explosion": "grad_norm_limit", "hang": "hang_timeout_s"}
"""The give_up reason of a hang that ended the process (`Trainer._on_stuck`)."""


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `lr` over `warmup` steps, then cosine decay to `lr * min_ratio` at `total`."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class CompiledRegions:
    """The switch of a model's compiled regions: once `failed`, every region runs eagerly."""

    failed: bool = False


def compile_regions(model: Transformer, on_failure: Callable[[Exception], None]) -> CompiledRegions:
    """`torch.compile` each attention, RMSNorm and SwiGLU activation of `model` for training.

    Regional compilation, as torchtitan compiles per block rather than the whole step: the
    repeated modules share one compiled graph, and the MoE's routing, gathers and expert
    products stay eager (its expert row counts are data-dependent, a graph break and a
    recompile per count). Measured on arith-tiny, 2-core CPU, batch 32 x 128, one process,
    median of 10 interleaved steps: fp32 0.660 s eager, 0.629 s regional (6 s warm-up), 0.625 s
    for the whole loss compiled (111 s warm-up); bf16 0.516 s eager, 0.475 s regional. The
    SwiGLU activations joined later (the experts' row counts vary, so dynamo compiles them once
    with a dynamic size): on a 2-core avx2 CPU, fp32, a step with them eager took 1.053x the
    time (two trainers in one process, 30 alternating steps). Eval mode (the held-out decode
    through a latent cache, whose shapes grow every token) keeps the eager forward.

    A backend without a working compiler (a device inductor does not know, say) must not stop
    the run: the first failure to compile is passed to `on_failure` and every region runs
    eagerly from then on. A failure to compile the forward is caught here; the backward is
    compiled when it first runs, outside any region, so the trainer catches that one
    (`Trainer.train_step`). A real error in the model still surfaces: the eager call raises it.
    """
    regions = CompiledRegions()

    def regional(module: torch.nn.Module) -> Callable:
        eager, compiled = module.forward, torch.compile(module.forward)

        def forward(*args, **kwargs):
            if module.training and not regions.failed:
                try:
                    return compiled(*args, **kwargs)
                except torch._dynamo.exc.TorchDynamoException as e:
                    regions.failed = True
                    on_failure(e)
            return eager(*args, **kwargs)

        return forward

    # The routed experts' own activations stay eager. The expert loop (backends without
    # grouped_mm) calls them on row counts of 0, 1 and more, with routing weights that are
    # views at varying offsets: in 25 steps of arith-tiny dynamo specialised eight variants,
    # its default recompile limit. The grouped experts use the MoE's own SwiGLU instead.
    routed = {id(expert.act) for moe in model.moe_layers() for expert in moe.experts}
    for module in model.modules():
        if isinstance(module, (MLA, RMSNorm, SwiGLU)) and id(module) not in routed:
            module.forward = regional(module)
    return regions


def resolve_dtype(requested: str, backend: Backend) -> str:
    """The compute dtype. `auto` is bf16 on accelerators (fp16 where bf16 is refused); on a CPU
    it is bf16 where the cores compute bf16 natively, else fp32 (emulated bf16 is slower)."""
    if requested not in ("auto", *DTYPES):
        raise CrosschipError(f"train.dtype must be auto, fp32, bf16 or fp16, got {requested!r}")
    if requested == "auto":
        refused = "bf16" in backend.emulated_refused_dtypes
        if backend.device_type == "cpu":
            return "bf16" if backend.native_bf16() and not refused else "fp32"
        requested = "fp16" if refused else "bf16"
    if requested in backend.emulated_refused_dtypes:
        raise CrosschipError(f"{backend}: this backend refuses {requested} compute; use train.dtype = fp16 or fp32")
    return requested


def estimate_memory(cfg: RunConfig, world: int, attention_scores: bool = True) -> dict[str, int]:
    """Bytes one process needs: fp32 params + grads + AdamW moments (sharded over `world`) + activations.

    attention_scores: whether attention keeps its (heads, T, T) scores for the backward, as
    torch's math path does (`Backend.attention_keeps_scores`); fused kernels keep O(T). With
    full activation checkpointing each block keeps only its input, and one block's
    activations exist at a time, while it is recomputed.
    """
    m, t = cfg.model, cfg.train
    total = count_params(m).total
    state = total * (4 + 4 + 8) // world
    micro = max(1, t.batch_size // (world * t.grad_accum))
    T = t.seq_len
    moe_width = m.num_experts_per_tok * m.moe_intermediate_size * 3
    scores = 5 * m.num_attention_heads * T if attention_scores else 0
    per_layer = 4 * (34 * m.hidden_size + moe_width + scores)
    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    if t.activation_checkpoint == "full":
        blocks = layers * 4 * m.hidden_size + per_layer  # every block's input + the one recomputed
    else:
        blocks = layers * per_layer
    activations = micro * T * (blocks + 3 * 4 * m.vocab_size)
    return {"params": total, "states": state, "activations": activations, "total": state + activations}


def check_memory(cfg: RunConfig, backend: Backend, world: int, local_world: int) -> None:
    """Refuse a run that does not fit in memory: `world` processes, `local_world` of them on
    this host. Where they all share the host's memory (`Backend.shares_host_memory`, the CPU)
    what they need together must fit in it, and more processes would not help; on an
    accelerator each process has a device of its own, and more of them shard the states thinner."""
    need = estimate_memory(cfg, world, backend.attention_keeps_scores())
    have = backend.memory_bytes()
    shared = backend.shares_host_memory()
    procs = local_world if shared else 1
    if have is None or procs * need["total"] <= 0.9 * have:
        return
    gib = 2**30
    together = f", {procs * need['total'] / gib:,.1f} GiB for the {procs} processes on this host" if procs > 1 else ""
    # Processes that share the host's memory would only split it: more of them are no fix.
    fixes = "a smaller model preset or a smaller batch"
    if not shared:
        fixes = "a smaller model preset, a smaller batch, or more processes (--nproc)"
    raise CrosschipError(
        f"the config does not fit in memory: {human_count(need['params'])} parameters need about "
        f"{need['total'] / gib:,.1f} GiB per process{together} (weights, grads and AdamW states "
        f"{need['states'] / gib:,.1f} GiB + activations {need['activations'] / gib:,.1f} GiB) but "
        f"{backend.spec} has {have / gib:,.1f} GiB; use {fixes}"
    )


@torch.no_grad()
def update_balance_bias(moes: list, loads: Tensor, gamma: float) -> None:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean_load - load_i).

    loads: (n_moe_layers, n_routed_experts) token counts of the global batch. An overloaded
    expert's bias drops, so selection (which uses scores + bias) routes fewer tokens to it;
    the bias is an fp32 buffer outside the optimizer and never touches the gating weights.
    """
    for moe, load in zip(moes, loads):
        moe.gate.bias += gamma * torch.sign(load.mean() - load).to(moe.gate.bias.dtype)


class Trainer:
    """Trains `cfg.model` on `cfg.data` with `cfg.train`, writing everything into `out_dir`."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        inject: list[str] | tuple[str, ...] = (),
        verbose: bool = True,
    ):
        self.cfg, self.t = cfg, cfg.train
        self.t.validate()
        cfg.validate()  # fields set after the config was built (CLI overrides, tests) are checked here
        self.out = Path(out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.backend = get_backend(self.t.backend, to_train=True).require()
        self.backend.prepare_training_process()
        self.faults = FaultInjector([*inject, *self.backend.emulated_faults], seed=self.t.seed)
        self.dtype = resolve_dtype(self.t.dtype, self.backend)
        self.dist = D.init_distributed(self.backend)
        self.device = self.backend.device(self.dist.local_rank)
        # On a device beside the host CPU the host must run ahead of it: no read-back mid-step
        # (`MoE.static_rows`) and the next batch drawn on a thread (`data.prefetch = "auto"`).
        # On the CPU itself a read-back costs nothing and the step already uses every core.
        self.host_runs_ahead = self.device.type != "cpu"
        self.verbose = verbose and self.dist.is_main
        # What can refuse the run is checked before anything is written: a refused run leaves
        # no metrics.jsonl behind.
        check_memory(self.cfg, self.backend, self.dist.world, self.dist.local_world)
        check_batch_split(self.t.batch_size, self.dist.world, self.t.grad_accum)
        # Drawn now, so that a held-out size the task cannot fill is refused before training.
        self.heldout = heldout_set(cfg.data) if cfg.data.task == "arith" else []
        self.tokenizer = model_tokenizer(self.cfg.model.vocab_size)
        prefetch = self.host_runs_ahead if cfg.data.prefetch == "auto" else cfg.data.prefetch
        self.stream = BatchStream(cfg.data, self.tokenizer, self.t.batch_size, self.t.seq_len, prefetch=prefetch)
        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=self.dist.is_main)
        self._lock = None
        try:
            # Rank 0 writes the run (its log, its checkpoints), and holds it against other runs.
            self._lock = lock_folder(self.out, "crosschip train") if self.dist.is_main else None
            self.model = self._build_model()
            # The MoE layers a training step runs, whose loads drive the balance update and the
            # sequence-wise loss: an MTP block's only when its loss is on (it never runs otherwise).
            mtp_idle = self.model.mtp is not None and self.t.mtp_loss_weight <= 0
            idle = set(self.model.mtp.modules()) if mtp_idle else set()
            self.step_moes = [m for m in self.model.moe_layers() if m not in idle]
            self.optimizer = self._build_optimizer()
            self.scaler = torch.amp.GradScaler(self.backend.device_type) if self.dtype == "fp16" else None
            self.guard = HealthGuard(self.t)
            self.step = 0
            self.train_time_s = 0.0
            self.train_cpu_s = 0.0
            self.tokens_seen = 0
            # Optimizer steps taken over the whole run, its earlier processes included (their
            # `step` events): those a rollback or a restart discarded are the ones past `step`.
            self.steps_run = 0
            self.stopped = False  # True once a signal stopped fit() after saving the step reached
            self.budget_note: str | None = None  # how train.max_minutes shaped the run, if it did
            self.schedule_steps: int | None = None  # train.steps fitted to train.max_minutes (kept in checkpoints)
            self._start(resume)
        except BaseException:
            self.close(ok=False)  # the batch thread and the log; a failed start is not a finished run
            raise

    # -- setup ------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.t.seed)
        model = Transformer(self.cfg.model).to(self.device)
        model.train()
        model.checkpoint_blocks = self.t.activation_checkpoint == "full"
        # One grouped GEMM over the experts where this device and dtype have the kernel (see
        # `MoE.grouped`), else the loop over experts; both compute the same values.
        self.grouped_experts = grouped_experts_run(self.cfg.model, self.device, DTYPES[self.dtype], backward=True)
        for moe in model.moe_layers():
            moe.row_multiple = self.backend.expert_row_multiple(self.dtype)
            moe.grouped = self.grouped_experts
            moe.static_rows = self.host_runs_ahead
        self.regions = compile_regions(model, self._compile_failed) if self.t.compile else None
        if self.dist.enabled:
            D.shard_model(model)
        return model

    def _compile_failed(self, error: Exception) -> None:
        # The compiler's own exception, not dynamo's wrapper around it (whose first line only
        # names the backend).
        cause = getattr(error, "inner_exception", None) or error.__cause__ or error
        reason = first_line(cause)
        self.log.event("compile_fallback", error=reason)
        if self.dist.is_main:
            print(f"crosschip train: torch.compile failed ({reason}); training eagerly", file=sys.stderr)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        kwargs = dict(lr=self.t.lr, betas=(self.t.beta1, self.t.beta2))
        # fused where the backend has it (one kernel for every tensor), foreach otherwise.
        if not self.dist.enabled:
            with contextlib.suppress(RuntimeError, TypeError, ValueError):
                return torch.optim.AdamW(groups, fused=True, **kwargs)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)

    def _start(self, resume: bool) -> None:
        # Rank 0 looks and decides for everyone: another rank could otherwise already see the
        # step-0 checkpoint rank 0 is about to write.
        log = self.out / "metrics.jsonl"
        existing, logged = self.dist.broadcast_object(
            (bool(ckpt.list_checkpoints(self.ckpt_root)), log.is_file() and log.stat().st_size > 0)
            if self.dist.is_main
            else None
        )
        if existing and not resume:
            raise CrosschipError(
                f"{self.out} already holds checkpoints; pass --resume to continue that run or choose another --out"
            )
        if logged and not resume:
            # Appended to, it mixed another run's steps into this one's summary (lost_steps).
            raise CrosschipError(
                f"{self.out} already holds a metrics.jsonl of a run that saved no checkpoint; remove it or "
                "choose another --out"
            )
        fingerprint = self.backend.fingerprint()
        if resume:
            found = ckpt.latest_verified(self.ckpt_root, report=self._report_corrupt) if self.dist.is_main else None
            found = self.dist.broadcast_object(str(found) if found else None)
            if found is None:
                raise CrosschipError(f"--resume: no verified checkpoint under {self.ckpt_root}")
            path = Path(found)
            self._restore(path)
            records = _read_all(self.out / "metrics.jsonl")
            self.faults.replay(records)
            self.faults.check_resume(self.step, self.t.steps, self.t.ckpt_every)
            done = [r["step"] for r in records if r["event"] == "step"]
            lost = max(0, max(done, default=0) - self.step)
            self.steps_run = len(done)
            changed = config_changes(records, to_dict(self.cfg))
            self.log.event(
                "resume",
                step=self.step,
                checkpoint=str(path),
                backend=fingerprint,
                world=self.dist.world,
                lost_steps=lost,
                config=to_dict(self.cfg),
                changed=changed,
            )
            # Continuing for more steps, for longer, or on another backend is what a resume is
            # for; anything else makes the run's steps before and after differ, so say so.
            surprising = [c for c in changed if c.split(" ")[0] not in RESUME_CHANGES]
            if surprising and self.dist.is_main:
                print(
                    "crosschip train: warning: resuming with a config that differs from the run's: "
                    + "; ".join(surprising),
                    file=sys.stderr,
                )
            self._carry_over_hangs(records)
        else:
            self.log.event(
                "start",
                config=to_dict(self.cfg),
                backend=fingerprint,
                dtype=self.dtype,
                world=self.dist.world,
                params=count_params(self.cfg.model).total,
                experts="grouped_mm" if self.grouped_experts else "loop",
            )
            self.save()  # step 0: a rollback target from the very first step

    def _report_corrupt(self, path: Path, reason: str) -> None:
        self.log.event("corrupt_checkpoint", checkpoint=str(path), reason=reason)
        if self.dist.is_main:
            print(f"crosschip train: skipping corrupt checkpoint {path}: {reason}", file=sys.stderr)

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self) -> ckpt.TrainState:
        msd, osd = D.full_state(self.model, self.optimizer, self.dist.enabled)
        tensors, groups = ckpt.flatten_optimizer(osd)
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.backend.device_type != "cpu":
            rng["device"] = torch.get_device_module(self.backend.device_type).get_rng_state()
        py = random.getstate()
        scalars = {
            "data": self.stream.state_dict(),
            "param_groups": groups,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "python_rng": [py[0], list(py[1]), py[2]],
            "health": {"loss_avg": self.guard.loss_avg, "good_steps": self.guard.good_steps},
            "train_time_s": self.train_time_s,
            "tokens_seen": self.tokens_seen,
            "schedule_steps": self.schedule_steps,
            "world": self.dist.world,
            "backend": self.backend.fingerprint(),
            "dtype": self.dtype,
            "task": self.cfg.data.task_info(),
        }
        return ckpt.TrainState(self.step, msd, tensors, rng, scalars)

    def save(self) -> Path | None:
        state = self._state()  # a collective when distributed: every rank takes part
        path = None
        if self.dist.is_main:
            t0 = time.perf_counter()
            path = ckpt.save_checkpoint(
                self.ckpt_root,
                state,
                self.cfg.model,
                tokenizer=self.tokenizer,
                keep=self.t.keep_checkpoints,
                before_rename=self._at_save,
            )
            self.log.event("checkpoint", step=self.step, path=str(path), seconds=time.perf_counter() - t0)
        self.dist.barrier()
        return path

    def _at_save(self) -> None:
        """Inside every checkpoint save, before its rename: where `crash@save=N` fires."""
        if self.faults.at_save():
            self.log.event("inject", step=self.step, save=self.faults.saves, faults=["crash"])
            kill_self()

    def _save_unless_saved(self) -> Path | None:
        """Save the step reached unless the newest checkpoint holds it already."""
        latest = ckpt.list_checkpoints(self.ckpt_root)
        if latest and latest[0].name == ckpt.step_dir(self.ckpt_root, self.step).name:
            return None
        return self.save()

    def _restore(self, path: Path) -> None:
        state, cfg = ckpt.read_checkpoint(path)
        if asdict(cfg) != asdict(self.cfg.model):
            raise CrosschipError(f"checkpoint {path} holds a different model shape than the config's [model]")
        with ckpt.unreadable_as_error(path):
            self._load_state(state)

    def _load_state(self, state: ckpt.TrainState) -> None:
        s = state.scalars
        osd = ckpt.unflatten_optimizer(state.optimizer, s["param_groups"])
        D.load_full_state(self.model, self.optimizer, state.model, osd, self.dist.enabled)
        if self.scaler is not None and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        torch.set_rng_state(state.rng["torch_cpu"])
        if "device" in state.rng and self.backend.device_type != "cpu":
            torch.get_device_module(self.backend.device_type).set_rng_state(state.rng["device"])
        v, internal, gauss = s["python_rng"]
        random.setstate((v, tuple(internal), gauss))
        self.stream.load_state_dict(s["data"])
        self.guard.loss_avg, self.guard.good_steps = s["health"]["loss_avg"], s["health"]["good_steps"]
        self.train_time_s, self.tokens_seen = s["train_time_s"], s["tokens_seen"]
        # A rollback to a checkpoint older than the fit keeps the fitted schedule.
        self.schedule_steps = s.get("schedule_steps") or self.schedule_steps
        self.step = state.step

    # -- one step ---------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.backend.device_type, dtype=DTYPES[self.dtype])

    def micro_loss(self, mb: Batch, n_global: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(loss to backpropagate, summed token CE) for one micro-batch.

        Losses are sums over tokens divided by the global number of label tokens (the
        sequence-wise balance loss: a sum over rows divided by the global number of rows), so
        micro-batches and processes add up to the global-batch mean exactly; the factor
        `world` undoes FSDP's averaging of gradients over processes. `rows`: the batch's
        `label_positions()` on the model's device (found on the host, where they cost the
        device no sync).
        """
        model = self.model
        with self._autocast():
            h = model.hidden(mb.input_ids, mb.positions, mb.doc_ids)
            # The head and the softmax only where a label is: prompts and padding carry none
            # (30% of the positions of a default-config batch), and their logits would be
            # computed only to be ignored. index_select, whose backward is an index_add.
            logits = model.logits(h.flatten(0, 1).index_select(0, rows)).float()
            ce = F.cross_entropy(logits, mb.labels.flatten().index_select(0, rows), reduction="sum")
            loss = ce / n_global
            if model.mtp is not None and self.t.mtp_loss_weight > 0:
                loss = loss + self.t.mtp_loss_weight * self._mtp_loss(h, mb) / n_global
            if self.t.seq_aux_loss_alpha > 0:
                # shard_rows gives every micro-batch of every process the same number of rows.
                global_rows = mb.input_ids.shape[0] * self.t.grad_accum * self.dist.world
                loss = loss + self.t.seq_aux_loss_alpha * self._seq_balance_loss() / global_rows
        return loss * self.dist.world, ce.detach()

    def _mtp_loss(self, h: Tensor, mb: Batch) -> Tensor:
        # MTP position i predicts token i+2, i.e. the main label of position i+1, and mixes
        # tokens i and i+1, so both must be in the same document.
        labels = mb.labels[:, 1:].masked_fill(mb.doc_ids[:, 1:] != mb.doc_ids[:, :-1], IGNORE)
        logits = self.model.mtp_logits(h, mb.input_ids, mb.positions, mb.doc_ids).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")

    def _seq_balance_loss(self) -> Tensor:
        """DeepSeek-V3's sequence-wise balance loss, sum_i f_i P_i per row, summed over the
        micro-batch's rows and the MoE layers."""
        total = 0.0
        for moe in self.step_moes:
            scores, indices = moe.last_scores, moe.last_indices  # (B, T, E), (B, T, K)
            E, K, T = scores.shape[-1], indices.shape[-1], scores.shape[1]
            counts = torch.zeros(scores.shape[0], E, device=scores.device).scatter_add_(
                1, indices.flatten(1), torch.ones_like(indices.flatten(1), dtype=torch.float32)
            )
            f = counts * E / (K * T)
            p = (scores / scores.sum(-1, keepdim=True)).mean(1)
            total = total + (f * p).sum()
        return total

    def train_step(self, step: int) -> dict[str, Any] | tuple[str, dict]:
        """Run one optimizer step; a (fault event, details) pair when the guard refuses it."""
        index, batch = self.stream.next()
        self._batch_index = index
        faults = self.faults.at_step(step)
        if faults:  # planted by --inject (or an emulated chip): the log says what was planted where
            self.log.event("inject", step=step, faults=sorted(faults), batch=index)
        if "crash" in faults:
            kill_self()
        if "hang" in faults:
            time.sleep(10 * self.t.hang_timeout_s + 60)  # the watchdog interrupts this
        if "slow" in faults:
            time.sleep(max(0.05, 2 * self.t.straggler_factor * self.guard.median_step_time()))
        n_global = batch.n_label_tokens
        micros = shard_rows(batch, self.dist.rank, self.dist.world, self.t.grad_accum)
        try:
            ce_sum, loads = self._forward_backward(micros, n_global, faults)
        except (StepHang, CrosschipError):
            raise
        except Exception as error:
            # The backward of a compiled region is compiled when it first runs; a compiler
            # that fails there raises out of backward() as a plain error. Redo the step
            # eagerly: if that works, the compiler was at fault; if not, the eager error is
            # the model's own and propagates.
            if self.regions is None or self.regions.failed:
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self.regions.failed = True
            ce_sum, loads = self._forward_backward(micros, n_global, faults)
            self._compile_failed(error)
        self.dist.all_reduce_sum(ce_sum)
        loss_value = float(ce_sum) / n_global  # float() syncs with the device
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        fault = self.guard.check(loss_value, grad_norm)
        if fault is not None and not (self.scaler is not None and math.isfinite(loss_value) and fault[0] == "nan"):
            self.optimizer.zero_grad(set_to_none=True)
            return fault[0], {**fault[1], "batch": index}
        lr = lr_at(
            step, lr=self.t.lr, warmup=self.t.warmup_steps, total=self.total_steps, min_ratio=self.t.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.accept(loss_value)
        self.dist.all_reduce_sum(loads)
        update_balance_bias(self.step_moes, loads, self.t.bias_update_speed)
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": batch.input_ids.numel(), "loads": loads}

    def _forward_backward(self, micros: list[Batch], n_global: int, faults: set[str]) -> tuple[Tensor, Tensor]:
        """Accumulate the gradients of one global batch; (summed token CE, per-expert loads)."""
        ce_sum = torch.zeros((), device=self.device)
        moes = self.step_moes
        loads = torch.zeros(len(moes), self.cfg.model.n_routed_experts, device=self.device)
        for i, mb in enumerate(micros):
            rows = mb.label_positions().to(self.device, non_blocking=True)
            mb = mb.to(self.device)
            if self.dist.enabled:
                self.model.set_requires_gradient_sync(i == len(micros) - 1)
            loss, ce = self.micro_loss(mb, n_global, rows)
            if "nan" in faults:
                loss = loss * float("nan")
                ce = ce * float("nan")
            if "spike" in faults:
                loss, ce = loss * SPIKE_FACTOR, ce * SPIKE_FACTOR
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            ce_sum += ce
            loads += torch.stack([m.last_load.float() for m in moes]) if moes else 0
        return ce_sum, loads

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # -- faults -----------------------------------------------------------------------------
    def rollback(self, step: int, reason: str, details: dict) -> None:
        """Back to the newest verified checkpoint, skipping the offending batch; give up past the cap."""
        n = self._count_rollback(step, reason)
        found = ckpt.latest_verified(self.ckpt_root, report=self._report_corrupt) if self.dist.is_main else None
        path = self.dist.broadcast_object(str(found) if found else None)
        if path is None:
            self.give_up(f"{reason} at step {step} and no verified checkpoint to roll back to", step)
        skip = set(self.stream.skip)
        if details.get("batch") is not None:
            skip.add(details["batch"])
        self._restore(Path(path))
        self.stream.skip |= skip
        self.log.event(
            "rollback",
            from_step=step,
            to_step=self.step,
            reason=reason,
            checkpoint=path,
            attempt=n,
            skipped_batches=sorted(skip),
            lost_steps=step - 1 - self.step,
        )
        if self.verbose:
            self.progress.note(f"{reason} at step {step}: rolled back to step {self.step} ({path}), attempt {n}")

    def _count_rollback(self, step: int, reason: str) -> int:
        """This rollback's attempt number at `step`; past max_rollbacks the run gives up."""
        n = self.guard.count_rollback(step)
        if n > self.t.max_rollbacks:
            self.give_up(
                f"{reason} at step {step}{self._threshold(reason)} persisted through {self.t.max_rollbacks} rollbacks",
                step,
            )
        return n

    def _threshold(self, reason: str) -> str:
        name = THRESHOLDS.get(reason)
        return f" (train.{name} = {getattr(self.t, name):g})" if name else ""

    def give_up(self, message: str, step: int) -> None:
        self.log.event("give_up", step=step, reason=message, rollbacks=self.guard.rollbacks)
        self._write_summary("gave_up", message)
        raise HealthGaveUp(
            f"health guard gave up: {message}; fail over to another backend (see {self.out / 'metrics.jsonl'})"
        )

    def _on_hang(self, elapsed: float) -> None:
        self.log.event(
            "hang", step=self.step + 1, elapsed_s=elapsed, timeout_s=self.t.hang_timeout_s, batch=self._batch_index
        )
        if self.dist.enabled:
            # Other ranks wait inside collectives and cannot roll back with us: the process
            # ends, and its restart (torchrun --max-restarts, or --resume) is the rollback.
            self._on_stuck()

    def _on_stuck(self) -> None:
        """A hang this process cannot roll back from in place: log it (`_carry_over_hangs`
        finishes the rollback when the run restarts) and exit 3."""
        self.log.event("give_up", step=self.step + 1, reason=STUCK, batch=self._batch_index)
        self._write_summary("gave_up", STUCK)
        print(
            f"crosschip train: error: a step hung past the watchdog timeout{self._threshold('hang')}; "
            "restart with --resume",
            file=sys.stderr,
        )
        os._exit(3)

    def _carry_over_hangs(self, records: list[dict]) -> None:
        """On resume: a hang that ended an earlier process of this run (`_on_stuck`) is rolled
        back as a hang in one process is: its batch is skipped and it counts against
        max_rollbacks at its step (past it, the run gives up, exit 3). The hangs since the
        last start or resume ended the process this one replaces: their rollback is logged."""
        last_start = max((i for i, r in enumerate(records) if r["event"] in ("start", "resume")), default=-1)
        for i, r in enumerate(records):
            if r["event"] != "give_up" or r.get("reason") != STUCK:
                continue
            if r.get("batch") is not None:
                self.stream.skip.add(r["batch"])
            n = self._count_rollback(r["step"], "hang")
            if i < last_start:
                continue
            self.log.event(
                "rollback",
                from_step=r["step"],
                to_step=self.step,
                reason="hang",
                attempt=n,
                skipped_batches=sorted(self.stream.skip),
                lost_steps=r["step"] - 1 - self.step,
            )

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, steps: int | None = None) -> dict[str, Any]:
        """Train until `steps` (default train.steps) or train.max_minutes; returns the summary.

        A SIGTERM (a preempted job) or Ctrl-C is held and acted on between steps: the state it
        leaves is a whole step's, which is saved before the KeyboardInterrupt goes on, so
        `--resume` loses nothing. On one process a second signal stops at once (a hung step,
        say) and nothing is saved. Several processes get the signal during different steps
        (torchrun forwards it, a terminal sends it to each), and a save is a collective: they
        agree before each step (`_agree`) and all stop after the same one; there torchrun's
        shutdown timeout, which kills the workers, is the hard stop.
        """
        self.total_steps = steps or self.schedule_steps or self.t.steps
        if self.step >= self.total_steps and self.dist.is_main:  # a resume asked for no more steps
            print(
                f"crosschip train: the run is already at step {self.step} of {self.total_steps}: nothing to train "
                "(raise train.steps or --steps to continue it)",
                file=sys.stderr,
            )
        self.progress = Progress(self.total_steps, self.step, self.verbose)
        # The schedule is first fitted to the time budget after a few steps of this process, by
        # the end of warmup where the cosine has not started; then again every FIT_EVERY steps.
        fitting = self.t.fit_schedule and self.t.max_minutes > 0 and not steps
        self._planned_steps = self.t.steps
        self._fit_at = self.step + max(5, min(self.t.warmup_steps, 20)) if fitting else None
        watchdog = Watchdog(self.t.hang_timeout_s, self._on_hang, self._on_stuck)
        grace = 10.0  # the first step after a (re)start may compile or warm caches
        try:
            with interrupts.held(second_stops=not self.dist.enabled) as signals:
                while True:
                    stop, done = self._agree(bool(signals), self.step >= self.total_steps or self._out_of_time())
                    if stop or done:
                        break
                    step = self.step + 1
                    t0, c0 = time.perf_counter(), time.process_time()
                    self._batch_index = None
                    watchdog.arm(grace)
                    try:
                        result = self.train_step(step)
                    except StepHang:
                        watchdog.disarm()
                        self.optimizer.zero_grad(set_to_none=True)
                        self.rollback(step, "hang", {"batch": self._batch_index})
                        grace = 10.0
                        continue
                    watchdog.disarm()
                    if isinstance(result, tuple):
                        event, details = result
                        self.log.event(event, step=step, **details)
                        self.rollback(step, event, details)
                        grace = 10.0
                        continue
                    grace = 1.0
                    self.train_cpu_s += time.process_time() - c0  # CPU seconds: robust on a shared machine
                    self._after_step(step, result, time.perf_counter() - t0)
                if stop:
                    self._save_before_stopping()
                    if not signals:
                        raise KeyboardInterrupt  # another process's signal: stop with it
                elif self.step < self.total_steps:  # done short of the last step: the time budget
                    self._budget_spent()
                # Leaving held() raises the signal held here as a KeyboardInterrupt.
        finally:
            watchdog.close()
            self.progress.close()
        return self.finish()

    def _agree(self, signalled: bool, done: bool) -> tuple[bool, bool]:
        """(stop for a signal, done) as every process sees them: true when true on any. Ranks
        keep their own clocks, so on `train.max_minutes` they could otherwise end one step
        apart, and the one still training would wait in a collective for a peer that left."""
        if not self.dist.enabled:
            return signalled, done
        flags = torch.tensor([float(signalled), float(done)], device=self.device)
        stop, done = self.dist.all_reduce_sum(flags).tolist()
        return stop > 0, done > 0

    def _save_before_stopping(self) -> None:
        """Save the step reached, when no checkpoint holds it yet, and say so in the log."""
        path = self._save_unless_saved()
        self.stopped = True
        self.log.event("stopped", step=self.step, checkpoint=str(path) if path else None)
        if path is not None and self.verbose and self.dist.is_main:
            print(f"crosschip train: {saved_note(self.step, path)}", file=sys.stderr)

    def _out_of_time(self) -> bool:
        return self.t.max_minutes > 0 and self.train_time_s >= 60 * self.t.max_minutes

    def _budget_spent(self) -> None:
        """train.max_minutes ended the run before its last step: the log, the summary and the
        console say so (a run cut short learns less, and nothing else would tell why)."""
        self.budget_note = (
            f"the {self.t.max_minutes:g}-minute budget (train.max_minutes) ended training at step "
            f"{self.step} of {self.total_steps}"
        )
        self.log.event(
            "time_budget",
            step=self.step,
            steps=self.total_steps,
            budget_s=60 * self.t.max_minutes,
            train_time_s=self.train_time_s,
            detail=self.budget_note,
        )
        if self.dist.is_main:
            self.progress.note(self.budget_note)

    def _fit_schedule(self) -> None:
        """End the schedule at the steps that fit train.max_minutes at the median step time, up
        to the planned steps. A run the budget cuts off stops at whatever learning rate the
        cosine had reached (on a 2-core avx2 CPU in fp32 the default run was cut at step 316-324
        of 380). Fitted, it ends annealed; the held-out accuracy of single runs at similar steps
        varied by a few points either way (benchmarks/RESULTS.md, 2026-11-30).

        Called every FIT_EVERY steps, since the step time drifts on a shared machine, and the
        end moves either way: the first steps run slow (one default run here took 0.94 s a step
        over its first 50, 0.85 s after), and an end that could only move earlier left 10% of the
        budget unused. The median is of the last 50 step times (`HealthGuard.median_step_time`). A
        move changes the learning rate by a little at that step. If the last steps
        run slower than the median, the budget cuts the run a few steps short of the end, where
        the learning rate has all but reached its floor."""
        self._fit_at = self.step + FIT_EVERY
        dt = self.guard.median_step_time()  # the running median the straggler check keeps
        if self.dist.enabled:  # every process must end at the same step: one shared step time
            dt = float(self.dist.all_reduce_sum(torch.tensor([dt], device=self.device))) / self.dist.world
        budget = 60 * self.t.max_minutes
        fits = self.step + max(0, int(0.97 * (budget - self.train_time_s) / dt))  # 3% of slack
        fits = min(fits, self._planned_steps)
        if fits == self.total_steps:
            return
        self.budget_note = (
            f"at {dt:.2f} s a step, {self._planned_steps} steps do not fit the {self.t.max_minutes:g}-minute "
            f"budget (train.max_minutes): the learning-rate schedule ends at step {fits}"
            if fits < self._planned_steps
            else None
        )
        note = self.budget_note or f"at {dt:.2f} s a step, the {fits} planned steps fit the budget again"
        self.log.event(
            "schedule_fit", step=self.step, steps=fits, previous=self.total_steps, step_time_s=dt, detail=note
        )
        # The console hears when the planned steps stop (or start again) to fit; the moves in
        # between, every FIT_EVERY steps, are in the log and the progress total.
        crossing = self._planned_steps in (fits, self.total_steps)
        self.total_steps = self.schedule_steps = fits
        if self.dist.is_main:
            self.progress.retotal(fits)
            if crossing:
                self.progress.note(note)

    def _after_step(self, step: int, r: dict[str, Any], dt: float) -> None:
        self.step = step
        self.steps_run += 1
        self.train_time_s += dt
        self.tokens_seen += r["tokens"]
        tps = r["tokens"] / dt
        slow = self.guard.straggler(dt)
        if slow is not None:
            self.log.event("straggler", step=step, **slow)
        loads = r["loads"].long().tolist()
        self.log.event(
            "step",
            step=step,
            batch=self._batch_index,  # which global batch it trained on (rollbacks skip by this index)
            loss=r["loss"],
            lr=r["lr"],
            grad_norm=r["grad_norm"],
            tokens_per_s=tps,
            step_time_s=dt,
            expert_load=loads,
        )
        self.progress.update(step, r["loss"], tps)
        if self._fit_at is not None and step >= self._fit_at:
            self._fit_schedule()
        if step % self.t.ckpt_every == 0 and step < self.total_steps:
            self.save()
        if (
            self.cfg.data.task == "arith"
            and self.t.eval_every > 0
            and step % self.t.eval_every == 0
            and step < self.total_steps
        ):
            self.evaluate(step, self.t.eval_problems)

    def evaluate(self, step: int, n: int) -> float | None:
        """Held-out exact-answer accuracy on rank 0 (a full-weights copy when sharded)."""
        model = self.model
        if self.dist.enabled:
            msd = D.full_model_state(self.model, True)
            if self.dist.is_main:
                model = Transformer(self.cfg.model).to(self.device)
                model.load_state_dict(msd)
        acc = None
        if self.dist.is_main:
            problems = self.heldout[:n]
            t0 = time.perf_counter()
            acc, _ = arith_accuracy(model, self.tokenizer, problems)
            self.log.event("eval", step=step, accuracy=acc, n=len(problems), seconds=time.perf_counter() - t0)
            self.progress.note(f"step {step}: held-out accuracy {acc:.1%} on {len(problems)} problems")
        self.dist.barrier()
        return acc

    def finish(self) -> dict[str, Any]:
        self._save_unless_saved()
        acc = None
        if self.cfg.data.task == "arith" and self.t.eval_every >= 0:
            acc = self.evaluate(self.step, self.cfg.data.heldout_size)
        return self._write_summary("done", self.budget_note, accuracy=acc)

    def _write_summary(self, status: str, reason: str | None, **extra: Any) -> dict[str, Any]:
        records = _read_all(self.out / "metrics.jsonl") if self.dist.is_main else self.log.records
        steps = kept_steps(records, self.step)
        counts: dict[str, int] = {}
        for r in records:
            counts[r["event"]] = counts.get(r["event"], 0) + 1
        summary = {
            "status": status,
            "reason": reason,
            "step": self.step,
            "final_loss": steps[-1]["loss"] if steps else None,
            "train_time_s": self.train_time_s,
            "train_cpu_s": self.train_cpu_s,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": self.tokens_seen / self.train_time_s if self.train_time_s else None,
            "events": counts,
            "rollbacks": counts.get("rollback", 0),
            "lost_steps": max(0, self.steps_run - self.step),  # a step line cut by a kill is not read back
            "backend": self.backend.fingerprint(),
            "dtype": self.dtype,
            "world": self.dist.world,
            "latest_checkpoint": str(p)
            if (p := ckpt.latest_verified(self.ckpt_root, report=lambda *a: None))
            else None,
            **extra,
        }
        if self.dist.is_main:
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            plot_loss(records, self.out / "loss.png", self.step)
        return summary

    def close(self, ok: bool = True) -> None:
        self.stream.close()
        self.log.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if ok:
            D.shutdown(self.dist)


# Config keys a resume is expected to change.
RESUME_CHANGES = {"train.steps", "train.max_minutes", "train.backend"}


def config_changes(records: list[dict[str, Any]], now: dict[str, Any]) -> list[str]:
    """`config_diff` against the config the run last logged (its start, or the latest resume
    that logged one)."""
    logged = [r["config"] for r in records if r["event"] in ("start", "resume") and "config" in r]
    return config_diff(logged[-1], now) if logged else []


def _read_all(path: Path) -> list[dict[str, Any]]:
    from crosschip.train.metrics import read_metrics

    return read_metrics(path) if path.exists() else []
