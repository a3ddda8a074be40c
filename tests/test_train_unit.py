"""Training building blocks: LR schedule, balance bias, packing, checkpoints, faults, clear errors."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from crosschip.backends import BackendUnavailable, get_backend
from crosschip.backends.cpu import CPUBackend
from crosschip.config import ConfigError, DataConfig, RunConfig, model_preset
from crosschip.data.arith import generate_problems
from crosschip.errors import CrosschipError
from crosschip.model import DTYPES, MLA, RMSNorm, SwiGLU, Transformer, grouped_experts_run, grouped_mm_works
from crosschip.tokenizer import default_tokenizer
from crosschip.train import checkpoint as ckpt
from crosschip.train.data import IGNORE, ArithStream, BatchStream, shard_rows
from crosschip.train.faults import FaultInjector, check_faults, parse_fault
from crosschip.train.health import HealthGaveUp, HealthGuard
from crosschip.train.metrics import Progress
from crosschip.train.trainer import (
    Trainer,
    check_memory,
    estimate_memory,
    lr_at,
    resolve_dtype,
    update_balance_bias,
)
from train_helpers import events, losses, records


def debug_cfg(**train) -> RunConfig:
    cfg = RunConfig(model=model_preset("debug"), data=DataConfig(digits=2, heldout_size=20))
    for k, v in {"steps": 6, "batch_size": 4, "seq_len": 64, "ckpt_every": 3, "eval_every": 0, **train}.items():
        setattr(cfg.train, k, v)
    return cfg


# -- schedule and balance -----------------------------------------------------------------------


def test_lr_warmup_then_cosine_to_floor():
    kw = dict(lr=1e-3, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(1, **kw) == pytest.approx(1e-4)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way through the cosine
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "decay must be monotone"


def test_balance_bias_moves_against_the_load():
    model = Transformer(model_preset("debug"))
    moe = model.moe_layers()[0]
    loads = torch.tensor([[10.0, 0.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    update_balance_bias([moe], loads, gamma=0.01)
    bias = moe.gate.bias
    assert bias.dtype == torch.float32
    assert bias[0] == pytest.approx(-0.01)  # overloaded -> less attractive
    assert bias[1] == pytest.approx(0.01)  # starved -> more attractive
    assert torch.all(bias[2:] == 0)
    assert not any(b is moe.gate.bias for b in model.parameters()), "the bias must stay outside the optimizer"


def test_balance_bias_reduces_imbalance():
    """Routing with the updated bias sends fewer tokens to the overloaded expert."""
    torch.manual_seed(0)
    model = Transformer(model_preset("debug")).train()
    moe = model.moe_layers()[0]
    x = torch.randn(512, 64)
    with torch.no_grad():
        moe.gate.weight[0] += 0.5 * x.mean(0)  # make expert 0 popular
    first = None
    for _ in range(30):
        moe(x)
        if first is None:
            first = moe.last_load.clone()
        update_balance_bias([moe], moe.last_load[None].float(), gamma=0.01)
    assert moe.last_load.max() < first.max()


# -- data ---------------------------------------------------------------------------------------


def test_packed_rows_mask_attention_restart_positions_and_teach_only_completions():
    tok = default_tokenizer(512)
    stream = ArithStream(DataConfig(digits=2), tok, batch_size=2, seq_len=96)
    batch = stream.draw()
    problems = generate_problems(stream.problems, digits=2, ops=["+", "-"], seed=0)
    row_ids, row_docs, row_pos, row_lab = (
        t[0].tolist() for t in (batch.input_ids, batch.doc_ids, batch.positions, batch.labels)
    )
    n_docs = max(row_docs) + 1
    assert n_docs >= 2, "a row holds several problems"
    for doc in range(n_docs):
        at = [i for i, d in enumerate(row_docs) if d == doc]
        p = problems[doc]
        prompt = tok.encode(p.prompt, add_bos=True)
        assert [row_ids[i] for i in at] == prompt + tok.encode(p.completion) + [tok.eos_id]
        assert [row_pos[i] for i in at] == list(range(len(at)))
        taught = [row_lab[i] for i in at if row_lab[i] != IGNORE]
        assert taught == tok.encode(p.completion) + [tok.eos_id]
    # padding and the last token of each problem carry no loss
    assert all(lab == IGNORE for d, lab in zip(row_docs, row_lab) if d < 0)


def test_stream_cursor_resumes_exactly_and_skips():
    tok = default_tokenizer(512)
    a = BatchStream(DataConfig(digits=2), tok, 4, 64)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    _, want = a.next()
    b = BatchStream(DataConfig(digits=2), tok, 4, 64)
    b.load_state_dict(state)
    _, got = b.next()
    assert torch.equal(want.input_ids, got.input_ids) and torch.equal(want.labels, got.labels)
    c = BatchStream(DataConfig(digits=2), tok, 4, 64)
    c.load_state_dict({**state, "skip": [3]})
    index, _ = c.next()
    assert index == 4


def test_prefetching_stream_hands_out_the_same_batches_and_cursors():
    """Drawn ahead on a thread or not: the same batches, and a cursor that is always the last
    batch handed out's, through a rollback (load_state_dict) with a newly skipped batch."""
    tok = default_tokenizer(512)
    plain = BatchStream(DataConfig(digits=2), tok, 4, 64)
    ahead = BatchStream(DataConfig(digits=2), tok, 4, 64, prefetch=True)
    try:
        saved = None
        for i in range(6):
            (a_index, a), (b_index, b) = plain.next(), ahead.next()
            assert a_index == b_index == i and torch.equal(a.input_ids, b.input_ids)
            assert torch.equal(a.labels, b.labels) and torch.equal(a.doc_ids, b.doc_ids)
            assert plain.state_dict() == ahead.state_dict()
            if i == 2:
                saved = ahead.state_dict()
        for stream in (plain, ahead):  # a rollback to after batch 2 that skips batch 4
            stream.load_state_dict(saved)
            stream.skip.add(4)
        got = [ahead.next() for _ in range(3)]
        want = [plain.next() for _ in range(3)]
        assert [i for i, _ in got] == [i for i, _ in want] == [3, 5, 6]
        assert all(torch.equal(g.input_ids, w.input_ids) for (_, g), (_, w) in zip(got, want))
        assert ahead.state_dict() == plain.state_dict()
    finally:
        ahead.close()


def test_prefetching_stream_rewinds_only_after_the_draw_ahead_is_over():
    """A rollback (load_state_dict) while the thread draws the next batch waits for it: the
    source is never used from two threads at once, and the stream restarts where it is told."""
    stream = BatchStream(DataConfig(digits=2), default_tokenizer(512), 4, 64, prefetch=True)
    busy, overlaps = threading.Lock(), []

    def exclusive(fn):
        def call(*args):
            if not busy.acquire(blocking=False):
                overlaps.append(fn.__name__)
                return fn(*args)
            try:
                time.sleep(0.05)  # a slow draw: the rollback arrives while it runs
                return fn(*args)
            finally:
                busy.release()

        return call

    stream.source.draw = exclusive(stream.source.draw)
    stream.source.load_state_dict = exclusive(stream.source.load_state_dict)
    try:
        start = stream.state_dict()
        assert stream.next()[0] == 0  # batch 1 is now being drawn ahead
        stream.load_state_dict(start)
        assert overlaps == []
        assert stream.next()[0] == 0 and stream.state_dict()["batches"] == 1
    finally:
        stream.close()


def test_prefetching_stream_raises_the_draws_error_at_next(monkeypatch):
    stream = BatchStream(DataConfig(digits=1, heldout_size=20), default_tokenizer(512), 2, 64, prefetch=True)

    def broken():
        raise CrosschipError("planted draw failure")

    monkeypatch.setattr(stream.source, "draw", broken)
    with pytest.raises(CrosschipError, match="planted draw failure"):
        stream.next()
    stream.close()


def test_rows_too_short_for_a_problem_are_refused_before_the_run_writes_anything(tmp_path):
    """This used to surface at the first step, after the run had written its log and a step-0
    checkpoint, so the corrected config then needed another --out."""
    with pytest.raises(CrosschipError, match=r"train.seq_len 16 is shorter than one problem \(\d+ tokens\)"):
        BatchStream(DataConfig(digits=3), default_tokenizer(512), 2, 16)
    with pytest.raises(CrosschipError, match="train.seq_len 16 is shorter than one problem"):
        Trainer(debug_cfg(seq_len=16), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_heldout_size_the_task_cannot_fill_is_refused_before_the_run_writes_anything(tmp_path):
    """It used to surface at the first evaluation (or the final one), after training."""
    cfg = debug_cfg(eval_every=-1)
    cfg.data.digits, cfg.data.heldout_size = 1, 50
    with pytest.raises(CrosschipError, match=r"asked for 50 held-out problems, but only \d+ distinct"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_shard_rows_partitions_the_global_batch():
    tok = default_tokenizer(512)
    batch = BatchStream(DataConfig(digits=1, heldout_size=20), tok, 8, 32).next()[1]
    parts = [mb for r in range(2) for mb in shard_rows(batch, r, 2, 2)]
    assert sum(mb.n_label_tokens for mb in parts) == batch.n_label_tokens
    with pytest.raises(CrosschipError, match="divisible"):
        shard_rows(batch, 0, 3, 1)


# -- checkpoints --------------------------------------------------------------------------------


def _state(step: int) -> ckpt.TrainState:
    model = Transformer(model_preset("debug"))
    return ckpt.TrainState(
        step, model.state_dict(), {"w/exp_avg": torch.ones(3)}, {"torch_cpu": torch.get_rng_state()}, {"x": 1}
    )


def test_checkpoint_round_trip_keep_k_and_hf_loadable(tmp_path):
    cfg = model_preset("debug")
    for step in (0, 5, 10, 15):
        ckpt.save_checkpoint(tmp_path, _state(step), cfg, tokenizer=default_tokenizer(512), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000015", "step_00000010"]
    state, got_cfg = ckpt.read_checkpoint(tmp_path / "step_00000015")
    assert state.step == 15 and state.scalars == {"x": 1} and got_cfg == cfg
    model, tok = ckpt.load_model(tmp_path / "step_00000015")
    assert tok is not None
    for k, v in _state(15).model.items():
        assert v.shape == model.state_dict()[k].shape


def test_corrupt_checkpoint_is_reported_and_skipped(tmp_path):
    cfg = model_preset("debug")
    for step in (5, 10):
        ckpt.save_checkpoint(tmp_path, _state(step), cfg)
    weights = tmp_path / "step_00000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    reports = []
    found = ckpt.latest_verified(tmp_path, report=lambda p, why: reports.append((p.name, why)))
    assert found == tmp_path / "step_00000005"
    assert reports and reports[0][0] == "step_00000010" and "checksum" in reports[0][1]
    with pytest.raises(CrosschipError, match="corrupt"):
        ckpt.read_checkpoint(tmp_path / "step_00000010")


def test_a_second_writer_of_a_run_folder_is_refused_until_the_first_closes(tmp_path):
    """Two runs on one --out (two --resume started at once) once ran side by side: each save
    removed the other's half-written checkpoint, and both appended to one metrics log."""
    first = Trainer(debug_cfg(steps=2), tmp_path, verbose=False)
    try:
        first.fit()
        with pytest.raises(CrosschipError, match=rf"is being written by another crosschip train \(pid {os.getpid()}\)"):
            Trainer(debug_cfg(steps=4), tmp_path, resume=True)
        assert [r["event"] for r in records(tmp_path)].count("resume") == 0
    finally:
        first.close()
    second = Trainer(debug_cfg(steps=4), tmp_path, resume=True, verbose=False)
    try:
        assert second.fit()["status"] == "done"
    finally:
        second.close()
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_a_save_killed_before_the_rename_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL inside save_checkpoint (a real process, a real kill)."""
    code = f"""
import torch
from crosschip.config import model_preset
from crosschip.model import Transformer
from crosschip.train import checkpoint as ckpt
from crosschip.train.faults import kill_self
cfg = model_preset("debug")
m = Transformer(cfg)
st = lambda s: ckpt.TrainState(s, m.state_dict(), {{}}, {{"torch_cpu": torch.get_rng_state()}}, {{}})
ckpt.save_checkpoint({str(tmp_path)!r}, st(5), cfg)
ckpt.save_checkpoint({str(tmp_path)!r}, st(10), cfg, before_rename=kill_self)
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9
    assert ckpt.latest_verified(tmp_path) == tmp_path / "step_00000005"
    assert list(tmp_path.glob(".tmp-step_00000010-*")), "the half-written save stays hidden under a temp name"
    ckpt.save_checkpoint(tmp_path, _state(15), model_preset("debug"))
    assert not list(tmp_path.glob(".tmp-*")), "the next save cleans temp folders"


# -- faults and health --------------------------------------------------------------------------


def test_fault_specs():
    f = parse_fault("nan@step=40")
    assert (f.kind, f.step, f.times) == ("nan", 40, 1)
    assert parse_fault("slow@p=0.1").p == 0.1
    assert parse_fault("crash@save=2").save == 2
    assert parse_fault("nan@step=3,times=5").times == 5
    for bad in ("nan", "boom@step=3", "nan@step=0", "slow@p=2", "hang@save=1", "nan@step=2,times=0"):
        with pytest.raises(CrosschipError, match="--inject"):
            parse_fault(bad)


def test_a_spike_in_the_health_guards_warm_up_is_refused():
    """The guard judges spikes only after WARMUP_STEPS (10) good steps: spike@step=5 was
    trained on, with no rollback, and the run exited 0 like one that had caught it."""
    with pytest.raises(CrosschipError) as e:
        check_faults(["spike@step=10"], 40, "train.steps")
    assert str(e.value) == (
        "--inject 'spike@step=10': the health guard judges spikes only after 10 good steps, so a spike at "
        "step 10 would be trained on, not rolled back; plant it after step 10"
    )
    check_faults(["spike@step=11", "nan@step=2", "spike@p=0.5"], 40, "train.steps")


def test_a_save_fault_past_the_runs_last_save_is_refused():
    """crash@save=99 on a run that saves 4 checkpoints (steps 0, 2, 4 and 6) never fired."""
    check_faults(["crash@save=4"], 6, "train.steps", ckpt_every=2)
    with pytest.raises(CrosschipError) as e:
        check_faults(["crash@save=5"], 6, "--steps", ckpt_every=2)
    assert str(e.value) == (
        "--inject 'crash@save=5': the run saves 4 checkpoints (step 0, every 2 steps (train.ckpt_every) and "
        "step 6 (--steps)), so it would never fire"
    )
    check_faults(["crash@save=99"], 6, "train.steps")  # a resume: the trainer counts its saves


def test_a_resume_refuses_the_faults_it_could_never_fire():
    """A step fault at or before the step a resume starts from is never trained again, and a
    save fault names the run's N-th save: one among the saves made, or past the saves the
    resume makes, never fires. One that fired before the resume is done, not refused."""
    log = [
        {"event": "checkpoint", "step": 0},
        {"event": "checkpoint", "step": 4},
        {"event": "inject", "step": 6, "faults": ["nan"], "batch": 5},
        {"event": "inject", "step": 8, "save": 3, "faults": ["crash"]},  # killed inside the 3rd save
    ]
    # Resuming from step 4 of 12 (saves at 8 and 12: the run's 4th and 5th).
    for fine in (["nan@step=6", "crash@save=3"], ["nan@step=5"], ["crash@save=4"], ["crash@save=5"]):
        injector = FaultInjector(fine)
        injector.replay(log)
        injector.check_resume(4, 12, 4)
    for spec, why in (
        ("nan@step=4", "the run resumes from step 4, past step 4, so it would never fire"),
        ("crash@save=2", "the run has made 3 checkpoint saves and this resume makes 2 more, so it would never fire"),
        ("crash@save=6", "the run has made 3 checkpoint saves and this resume makes 2 more, so it would never fire"),
    ):
        injector = FaultInjector([spec])
        injector.replay(log)
        with pytest.raises(CrosschipError) as e:
            injector.check_resume(4, 12, 4)
        assert str(e.value) == f"--inject {spec!r}: {why}"
    # A save fault's event names the step it saved too: crash@step=8 is not taken as fired.
    injector = FaultInjector(["crash@step=8"])
    injector.replay(log)
    assert injector.at_step(8) == {"crash"}


def test_health_guard_verdicts():
    cfg = debug_cfg().train
    guard = HealthGuard(cfg)
    assert guard.check(float("nan"), 1.0)[0] == "nan"
    assert guard.check(1.0, math.inf)[0] == "nan"
    for _ in range(12):
        assert guard.check(2.0, 1.0) is None
        guard.accept(2.0)
    assert guard.check(2.0 * cfg.spike_factor + 1, 1.0)[0] == "spike"
    assert guard.check(2.0, cfg.grad_norm_limit + 1)[0] == "grad_explosion"
    for _ in range(12):
        assert guard.straggler(0.1) is None
    assert guard.straggler(0.1 * cfg.straggler_factor * 2)["factor"] > cfg.straggler_factor


# -- clear errors -------------------------------------------------------------------------------


def test_unknown_backend_is_a_clear_error(tmp_path):
    cfg = debug_cfg(backend="torch:tpu9")
    with pytest.raises(CrosschipError, match="unknown backend 'torch:tpu9'; known backends"):
        Trainer(cfg, tmp_path)


def test_unavailable_backend_is_a_clear_error(tmp_path):
    cfg = debug_cfg(backend="torch:npu")
    with pytest.raises(BackendUnavailable, match="torch:npu"):
        Trainer(cfg, tmp_path)


def test_too_big_config_is_refused_before_allocating(tmp_path):
    cfg = debug_cfg()
    cfg.model = model_preset("deepseek-v3")
    with pytest.raises(CrosschipError, match=r"does not fit in memory: 684B parameters need about"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # a refused run writes nothing
    # A mistyped expert count is refused as promptly: the count used to build every expert
    # on the meta device first (10^12 of them: no answer after minutes).
    cfg.model = model_preset("debug", n_routed_experts=10**12)
    with pytest.raises(CrosschipError, match=r"does not fit in memory: 6,210T parameters need about"):
        Trainer(cfg, tmp_path / "run")


def test_processes_that_share_the_hosts_memory_must_fit_in_it_together(monkeypatch):
    """`--nproc 2` at batch 12288 on a 23.5 GiB host: each CPU worker checked its own 12.9 GiB
    and passed, though the two need 25.8 GiB of the one memory. The check itself is tested:
    such a run would allocate it."""
    cfg = debug_cfg(batch_size=12288)
    each = estimate_memory(cfg, 2)["total"]  # the states and the batch split in two
    monkeypatch.setattr(CPUBackend, "memory_bytes", lambda self: int(each / 0.6))
    cpu = get_backend("torch:cpu")
    check_memory(cfg, cpu, world=2, local_world=1)  # one process on each of two hosts
    with pytest.raises(CrosschipError, match=r"GiB per process, [0-9.]+ GiB for the 2 processes on this host") as e:
        check_memory(cfg, cpu, world=2, local_world=2)
    assert "--nproc" not in str(e.value)  # more processes on the host would not help
    with pytest.raises(CrosschipError, match="does not fit in memory") as e:
        check_memory(cfg, cpu, world=1, local_world=1)
    assert "--nproc" not in str(e.value)
    # A device of its own for each process (an accelerator): each needs to fit only in its own.
    monkeypatch.setattr(CPUBackend, "shares_host_memory", lambda self: False)
    check_memory(cfg, cpu, world=2, local_world=2)
    with pytest.raises(CrosschipError, match=r"or more processes \(--nproc\)$"):
        check_memory(cfg, cpu, world=1, local_world=1)


def test_rows_longer_than_the_models_context_are_refused(tmp_path):
    """A corpus row's positions run to seq_len - 1: past the context, the model would learn
    positions its bundle never serves (this used to train without a word)."""
    cfg = debug_cfg(seq_len=2 * model_preset("debug").max_position_embeddings)
    with pytest.raises(
        CrosschipError,
        match=r"train.seq_len 512 is longer than the model's context \(model.max_position_embeddings 256\)",
    ):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate_counts_attention_scores_only_where_the_backend_keeps_them(tmp_path, monkeypatch):
    """A fused-attention backend (cuda) is not refused for the (heads, T, T) scores that only
    torch's math path keeps: on an H200 the estimate with them refused a batch that fits."""
    cfg = debug_cfg()
    cfg.model = model_preset("small-100m")
    cfg.train.batch_size, cfg.train.seq_len = 16, 1024
    with_scores, without = (estimate_memory(cfg, 1, keeps)["total"] for keeps in (True, False))
    assert with_scores > 2 * without
    assert get_backend("torch:cpu").attention_keeps_scores() and not get_backend("torch:cuda").attention_keeps_scores()
    monkeypatch.setattr(CPUBackend, "memory_bytes", lambda self: int((with_scores + without) / 2 / 0.9))
    with pytest.raises(CrosschipError, match="does not fit in memory"):
        Trainer(cfg, tmp_path / "math")
    monkeypatch.setattr(CPUBackend, "attention_keeps_scores", lambda self: False)
    Trainer(cfg, tmp_path / "fused").close()


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    cfg = debug_cfg()
    cfg.data = DataConfig(task="corpus", corpus=[str(tmp_path / "empty.txt")])
    with pytest.raises(CrosschipError, match="no non-empty documents"):
        Trainer(cfg, tmp_path / "run")
    # A text the rows cannot hold two tokens of: the cause is seq_len, not the text.
    (tmp_path / "text.txt").write_text("the quick brown fox\n" * 20)
    cfg = debug_cfg(seq_len=1)
    cfg.data = DataConfig(task="corpus", corpus=[str(tmp_path / "text.txt")])
    with pytest.raises(CrosschipError, match='train.seq_len 1 is too short for data.task = "corpus"'):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_refuses_a_folder_that_holds_another_runs_log(tmp_path):
    """It appended to it: that run's steps went into this one's summary (lost_steps)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"event": "step", "step": 9}\n')
    with pytest.raises(CrosschipError, match="already holds a metrics.jsonl of a run that saved no checkpoint"):
        Trainer(debug_cfg(steps=2), tmp_path / "run", verbose=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"event": "step", "step": 9}\n'


def test_a_resume_into_another_data_task_names_the_task_not_a_damaged_checkpoint(tmp_path):
    """It used to say the checkpoint "cannot be read (KeyError: 'rows')" and advise removing
    it, which would only have made the next checkpoint fail the same way."""
    t = Trainer(debug_cfg(steps=2), tmp_path / "run", verbose=False)
    try:
        t.fit()
    finally:
        t.close()
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    cfg = debug_cfg(steps=4)
    cfg.data = DataConfig(task="corpus", corpus=[str(tmp_path / "text.txt")])
    with pytest.raises(CrosschipError, match="not one of a data.task = 'corpus' run") as e:
        Trainer(cfg, tmp_path / "run", resume=True)
    assert "remove it" not in str(e.value)
    assert ckpt.latest_verified(tmp_path / "run" / "checkpoints").name == "step_00000002"


def test_a_resume_with_nothing_to_resume_is_refused_and_writes_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(CrosschipError, match="--resume: no verified checkpoint under"):
        Trainer(debug_cfg(), tmp_path / "run", resume=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_giving_up_names_the_threshold_the_fault_was_judged_by(tmp_path):
    """A grad-norm limit below this model's normal norms gives up as a faulty chip would: the
    verdict names the setting, so that the user can tell which."""
    t = Trainer(debug_cfg(grad_norm_limit=1e-9, max_rollbacks=0), tmp_path, verbose=False)
    try:
        with pytest.raises(HealthGaveUp, match=r"grad_explosion at step 1 \(train.grad_norm_limit = 1e-09\) persisted"):
            t.fit()
    finally:
        t.close(ok=False)


def test_refused_dtype_on_an_emulated_chip(tmp_path):
    cfg = debug_cfg(backend="emu:fp16-only", dtype="bf16")
    with pytest.raises(CrosschipError, match="refuses bf16"):
        Trainer(cfg, tmp_path)


def test_the_summary_and_the_plot_end_at_the_step_reached(tmp_path, monkeypatch):
    """A hard stop after step 4 saved nothing (here its checkpoint is removed, as it would
    not exist); `--resume --steps 3` then had nothing to train, and train_summary.json gave
    step 3 with the loss of the lost step 4, which loss.png plotted too."""
    import shutil

    import matplotlib.pyplot as plt

    run = tmp_path / "run"
    figures = []  # loss.png's figure, kept from plt.close
    for steps, resume in ((4, False), (3, True)):
        if resume:
            shutil.rmtree(run / "checkpoints" / "step_00000004")
            monkeypatch.setattr(plt, "close", figures.append)
        t = Trainer(debug_cfg(steps=steps, eval_every=-1), run, resume=resume, verbose=False)
        try:
            summary = t.fit()
        finally:
            t.close()
    step_loss = {r["step"]: r["loss"] for r in records(run) if r["event"] == "step"}
    assert summary["step"] == 3 and summary["final_loss"] == step_loss[3] != step_loss[4]
    assert json.loads((run / "train_summary.json").read_text())["final_loss"] == step_loss[3]
    (figure,) = figures
    assert list(figure.axes[0].lines[0].get_xdata()) == [1, 2, 3]


def test_existing_run_needs_resume(tmp_path):
    cfg = debug_cfg(steps=1)
    t = Trainer(cfg, tmp_path, verbose=False)
    t.close()
    with pytest.raises(CrosschipError, match="--resume"):
        Trainer(cfg, tmp_path, verbose=False)


class StepClock:
    """The trainer module's `time`, whose perf_counter only the training steps move: step n
    takes exactly `step_s(n)` seconds of the budget, whatever the machine is doing."""

    def __init__(self, step_s: Callable[[int], float]):
        self.now, self.step_s = 0.0, step_s

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)

    def train(self, cfg: RunConfig, out: Path, **kw) -> dict:
        t = Trainer(cfg, out, **kw)
        step = t.train_step

        def timed(n: int):
            self.now += self.step_s(n)
            return step(n)

        t.train_step = timed
        try:
            return t.fit()
        finally:
            t.close()


@pytest.fixture
def step_clock(monkeypatch) -> StepClock:
    import crosschip.train.trainer as trainer_module

    clock = StepClock(lambda n: 0.125)  # binary fractions: their sums are exact
    monkeypatch.setattr(trainer_module, "time", clock)
    return clock


def test_the_time_budget_ends_training_short_of_its_steps_and_says_so(tmp_path, capsys, step_clock):
    from crosschip.report import collect, summary_lines

    cfg = debug_cfg(steps=100, max_minutes=0.01, eval_every=-1, fit_schedule=False)  # 0.6 s: 5 steps
    summary = step_clock.train(cfg, tmp_path / "train")
    assert summary["status"] == "done" and summary["step"] == 5 and summary["train_time_s"] == 0.625
    note = "the 0.01-minute budget (train.max_minutes) ended training at step 5 of 100"
    assert summary["reason"] == note
    (event,) = events(tmp_path / "train", "time_budget")
    assert event["step"] == 5 and event["steps"] == 100 and event["budget_s"] == pytest.approx(0.6)
    assert note in capsys.readouterr().out
    lines = summary_lines(collect(tmp_path))
    assert f"training: done at step 5, final loss {summary['final_loss']:.4f}" in lines
    assert f"  {note}" in lines
    # A run that reaches its last step within the budget has nothing to say.
    summary = step_clock.train(debug_cfg(steps=2, max_minutes=5.0, eval_every=-1), tmp_path / "whole", verbose=False)
    assert summary["step"] == 2 and summary["reason"] is None
    assert not events(tmp_path / "whole", "time_budget") and not events(tmp_path / "whole", "schedule_fit")


def test_the_schedule_is_fitted_to_the_time_budget_and_a_resume_keeps_it(tmp_path, step_clock):
    import shutil

    # A 3 s budget at 0.125 s a step holds 24 of the 100 steps. The fit comes at the end of
    # warmup (step 5): 5 + int(0.97 * (3 - 5 * 0.125) / 0.125) = 23.
    cfg = debug_cfg(steps=100, max_minutes=0.05, warmup_steps=5, ckpt_every=3, eval_every=-1)
    run = tmp_path / "run"
    summary = step_clock.train(cfg, run, verbose=False)
    note = (
        "at 0.12 s a step, 100 steps do not fit the 0.05-minute budget (train.max_minutes): "
        "the learning-rate schedule ends at step 23"
    )
    assert summary["step"] == 23 and summary["reason"] == note and summary["train_time_s"] < 3
    (fit,) = events(run, "schedule_fit")
    assert (fit["step"], fit["steps"], fit["previous"], fit["step_time_s"]) == (5, 23, 100, 0.125)
    assert not events(run, "time_budget")  # it ended where the fitted schedule ends, not cut off
    lrs = {e["step"]: e["lr"] for e in events(run, "step")}
    assert lrs[23] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)  # annealed to the floor
    assert all(lrs[s] >= lrs[s + 1] for s in range(5, 23))

    # A resume continues the fitted schedule (from the checkpoint before the last): the same
    # steps, bit for bit, and no other fit (the later ones, every 10 steps, found no change).
    before = losses(run)
    shutil.rmtree(run / "checkpoints" / "step_00000023")
    summary = step_clock.train(cfg, run, resume=True, verbose=False)
    assert summary["step"] == 23 and len(events(run, "schedule_fit")) == 1
    after = losses(run)
    assert after[22] == before[22] and after[23] == before[23]


def test_steps_that_slow_down_move_the_end_of_the_schedule_earlier(tmp_path, step_clock, capsys):
    # 0.125 s a step, then 0.25 s from step 11. The fit at step 5 ends the schedule at 23; the
    # one at step 15 (the median of steps 1-15 is still 0.125 s, 0.5 s are left) at
    # 15 + int(0.97 * 0.5 / 0.125) = 18. The 3 s are spent at step 17: the budget cuts the run
    # one step short of that end, with the learning rate near its floor (instead of at step 17
    # of 23, at a third of the peak learning rate).
    step_clock.step_s = lambda n: 0.125 if n <= 10 else 0.25
    cfg = debug_cfg(steps=100, max_minutes=0.05, warmup_steps=5, eval_every=-1)
    summary = step_clock.train(cfg, tmp_path)
    fits = [(e["step"], e["steps"], e["previous"]) for e in events(tmp_path, "schedule_fit")]
    assert fits == [(5, 23, 100), (15, 18, 23)]
    # The console says when the plan stops fitting, and how the run ended; not every move.
    out = capsys.readouterr().out
    assert "the learning-rate schedule ends at step 23" in out and "ends at step 18" not in out
    assert "ended training at step 17 of 18" in out
    assert summary["step"] == 17 and summary["train_time_s"] == 3.0
    assert summary["reason"] == "the 0.05-minute budget (train.max_minutes) ended training at step 17 of 18"
    lrs = [e["lr"] for e in events(tmp_path, "step")]
    floor = cfg.train.lr * cfg.train.min_lr_ratio
    assert lrs[-1] == pytest.approx(lr_at(17, lr=cfg.train.lr, warmup=5, total=18, min_ratio=0.1))
    assert lrs[-1] < 1.15 * floor
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])), "slower steps may only lower the learning rate"


def test_steps_that_speed_up_move_the_end_of_the_schedule_later(tmp_path, step_clock):
    # 0.25 s a step, then 0.125 s from step 11, in a 6 s budget. Step 5: 5 + int(0.97 * 4.75 / 0.25)
    # = 23. Step 15 (median of steps 1-15 still 0.25 s, 2.875 s left): 26. Step 25 (median now
    # 0.125 s, 1.625 s left): 37, where the budget is spent: slow first steps do not leave the
    # rest of it unused.
    step_clock.step_s = lambda n: 0.25 if n <= 10 else 0.125
    cfg = debug_cfg(steps=100, max_minutes=0.1, warmup_steps=5, eval_every=-1)
    summary = step_clock.train(cfg, tmp_path, verbose=False)
    fits = [(e["step"], e["steps"], e["previous"]) for e in events(tmp_path, "schedule_fit")]
    assert fits == [(5, 23, 100), (15, 26, 23), (25, 37, 26)]
    assert summary["step"] == 37 and summary["train_time_s"] == 5.875 and not events(tmp_path, "time_budget")
    lrs = {e["step"]: e["lr"] for e in events(tmp_path, "step")}
    assert lrs[37] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)


# -- greedy evaluation --------------------------------------------------------------------------


def test_cached_greedy_decoding_matches_full_recomputation():
    """The absorbed-MLA cache path gives the same greedy tokens as re-running the whole prefix."""
    from crosschip.train.evaluate import greedy_generate

    torch.manual_seed(0)
    model = Transformer(model_preset("debug")).eval()
    prompts = [[0, 5, 6, 7], [0, 9, 8, 7], [0, 3, 4]]  # two lengths -> two buckets
    got = greedy_generate(model, prompts, max_new_tokens=6, stop_ids={1})
    for prompt, out in zip(prompts, got):
        ids = list(prompt)
        for _ in range(len(out)):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert ids[len(prompt) :] == out


def test_trains_on_a_text_corpus(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(f'{{"text": "document {i} says hello to the trainer"}}' for i in range(40)))
    cfg = debug_cfg(steps=3)
    cfg.data = DataConfig(task="corpus", corpus=[str(docs)])
    t = Trainer(cfg, tmp_path / "run", verbose=False)
    summary = t.fit()
    t.close()
    assert summary["status"] == "done" and summary["step"] == 3 and summary["final_loss"] < 7


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_a_cpu_takes_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(CPUBackend, "native_bf16", lambda self: native)
    assert resolve_dtype("auto", get_backend("torch:cpu")) == ("bf16" if native else "fp32")
    # A chip that refuses bf16 trains fp32 on the host, native or not.
    assert resolve_dtype("auto", get_backend("emu:fp16-only")) == "fp32"
    assert resolve_dtype("fp32", get_backend("torch:cpu")) == "fp32"


@pytest.mark.parametrize(("dtype", "multiple"), [("fp32", 1), ("bf16", 64)])
def test_low_precision_on_a_cpu_pads_expert_rows(tmp_path, dtype, multiple):
    t = Trainer(debug_cfg(steps=1, dtype=dtype), tmp_path, verbose=False)
    t.close()
    assert {moe.row_multiple for moe in t.model.moe_layers()} == {multiple}


@pytest.mark.parametrize(("backend", "dtype"), [("torch:cpu", "bf16"), ("emu:fp16-only", "fp16")])
def test_mixed_precision_keeps_fp32_master_weights(tmp_path, backend, dtype):
    """bf16 autocast, or fp16 with dynamic loss scaling where bf16 is refused; weights stay fp32."""
    cfg = debug_cfg(steps=3, backend=backend, dtype=dtype)
    t = Trainer(cfg, tmp_path, verbose=False)
    summary = t.fit()
    t.close()
    assert summary["status"] == "done" and summary["dtype"] == dtype and math.isfinite(summary["final_loss"])
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert (t.scaler is not None) == (dtype == "fp16")


# The two tests that run inductor share a pytest-xdist worker: the second finds its kernels
# (attention, norms, experts' activations) in the on-disk cache the first filled, instead of
# compiling them with g++ on the other core at the same time. On a cold cache (as in CI) each
# took 45-49 s alone; run after the first, the second took 2 s.
INDUCTOR = pytest.mark.xdist_group("inductor")


@INDUCTOR
def test_compiled_regions_train_like_eager_and_evaluation_stays_eager(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compiled in (False, True):
        cfg = debug_cfg(steps=3, dtype="fp32", compile=compiled, eval_every=-1)  # -1: no final evaluation
        t = Trainer(cfg, tmp_path / str(compiled), verbose=False)
        try:
            assert t.fit()["status"] == "done"
            # The training steps sent the attention and norm forwards through dynamo (and
            # only the compiled run did).
            traced = counters["frames"]["ok"]
            assert (traced > 0) == compiled
            # Every region kind went through dynamo: the attention, the norms and the
            # experts' SwiGLU activation (shared, dense and grouped routed experts alike).
            for region in (MLA, RMSNorm, SwiGLU):
                assert bool(_debug_get_cache_entry_list(region.forward.__code__)) == compiled, region
            # Held-out decoding (eval mode, a latent cache growing every token) runs eagerly.
            t.evaluate(3, 4)
            assert counters["frames"]["ok"] == traced
        finally:
            t.close()
        runs[compiled] = losses(tmp_path / str(compiled))
    assert sorted(runs[True]) == [1, 2, 3]
    for step, loss in runs[False].items():
        assert runs[True][step] == pytest.approx(loss, rel=1e-4)


@INDUCTOR
def test_the_expert_loop_keeps_its_activations_eager_under_compile(tmp_path):
    """Backends without grouped_mm run the experts in a loop, on row counts of 0, 1 and more:
    compiled, each expert's activation would take a variant of its own up to dynamo's
    recompile limit. Only the shared and dense MLPs' activations are compiled then."""
    torch._dynamo.reset()
    t = Trainer(debug_cfg(steps=4, dtype="fp32", compile=True, eval_every=-1), tmp_path, verbose=False)
    for moe in t.model.moe_layers():
        moe.grouped = False
    try:
        assert t.fit()["status"] == "done"
    finally:
        t.close()
    variants = len(_debug_get_cache_entry_list(SwiGLU.forward.__code__))
    assert 1 <= variants <= 2  # the shared experts' (N, 2I) rows and the dense layer's (B, T, 2I)
    assert events(tmp_path, "compile_fallback") == []


def test_activation_checkpointing_trains_the_same_losses_and_shrinks_the_estimate(tmp_path):
    runs = {}
    for mode in ("none", "full"):
        t = Trainer(debug_cfg(steps=3, activation_checkpoint=mode, eval_every=-1), tmp_path / mode, verbose=False)
        try:
            assert t.model.checkpoint_blocks == (mode == "full")
            t.fit()
        finally:
            t.close()
        runs[mode] = losses(tmp_path / mode)
    assert runs["full"] == runs["none"] and sorted(runs["full"]) == [1, 2, 3]
    cfg = debug_cfg(activation_checkpoint="full")
    cfg.model = model_preset("small-100m")
    cfg.train.batch_size, cfg.train.seq_len = 16, 1024
    full = estimate_memory(cfg, 1)["activations"]
    cfg.train.activation_checkpoint = "none"
    assert full < estimate_memory(cfg, 1)["activations"] / 4
    with pytest.raises(ConfigError, match='train.activation_checkpoint: must be "none" or "full"'):
        cfg.train.activation_checkpoint = "selective"
        cfg.train.validate()


def _failing_backend(where: str):
    """A torch.compile backend whose compiler raises for the forward graph, or only for the
    backward graph (compiled when the backward first runs, after a compiled forward)."""

    def no_compiler(gm, example_inputs):
        raise RuntimeError(f"no {where} compiler for this device")

    if where == "forward":
        return no_compiler
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=no_compiler)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_compiler_that_fails_leaves_training_eager_and_says_so(tmp_path, monkeypatch, capsys, where):
    backend = _failing_backend(where)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: real_compile(fn, backend=backend))
    torch._dynamo.reset()
    t = Trainer(debug_cfg(steps=2, dtype="fp32", compile=True, eval_every=-1), tmp_path / "c", verbose=False)
    try:
        assert t.fit()["status"] == "done"
    finally:
        t.close()
    fallback = events(tmp_path / "c", "compile_fallback")
    assert len(fallback) == 1 and f"no {where} compiler for this device" in fallback[0]["error"]
    assert "training eagerly" in capsys.readouterr().err
    monkeypatch.undo()
    torch._dynamo.reset()
    e = Trainer(debug_cfg(steps=2, dtype="fp32", eval_every=-1), tmp_path / "e", verbose=False)
    try:
        e.fit()
    finally:
        e.close()
    # Eager from the first step (a step whose backward failed is redone from the start):
    # bit-identical to an eager run.
    assert losses(tmp_path / "c") == losses(tmp_path / "e")


def test_a_model_error_under_compile_is_raised_not_hidden(tmp_path, monkeypatch):
    """The eager redo of a failed compiled step raises the model's own error: a fault in the
    model is not mistaken for a compiler that cannot run here."""
    real_compile = torch.compile  # dynamo's tracing without inductor's code generation: seconds less
    monkeypatch.setattr(torch, "compile", lambda fn: real_compile(fn, backend="eager"))
    torch._dynamo.reset()
    t = Trainer(debug_cfg(steps=2, dtype="fp32", compile=True, eval_every=-1), tmp_path / "c", verbose=False)

    def broken_backward(self, *args, **kwargs):
        raise ValueError("a model bug in backward")

    monkeypatch.setattr(torch.Tensor, "backward", broken_backward)
    try:
        with pytest.raises(ValueError, match="a model bug in backward"):
            t.fit()
    finally:
        t.close()
    assert events(tmp_path / "c", "compile_fallback") == []


def test_mtp_and_sequence_balance_losses_train_their_parameters(tmp_path):
    """With an MTP block, its loss (lambda = mtp_loss_weight) is the only one that reaches the
    block's own parameters: they move only when the weight is above zero."""
    moved = {}
    for weight in (0.0, 0.3):
        cfg = debug_cfg(steps=2, dtype="fp32", eval_every=-1, mtp_loss_weight=weight, seq_aux_loss_alpha=1e-3)
        cfg.model.num_nextn_predict_layers = 1
        t = Trainer(cfg, tmp_path / str(weight), verbose=False)
        before = {n: p.detach().clone() for n, p in t.model.mtp.named_parameters()}
        try:
            summary = t.fit()
        finally:
            t.close()
        assert summary["status"] == "done" and math.isfinite(summary["final_loss"])
        moved[weight] = [n for n, p in t.model.mtp.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved[0.0] == []
    assert any(n.startswith("block.") for n in moved[0.3]) and "eh_proj.weight" in moved[0.3]


def test_the_mtp_loss_of_packed_rows_is_the_sum_over_documents_alone(tmp_path):
    """MTP position i predicts token i+2 from h_i and token i+1, inside one document. On packed
    rows (several problems per row) the MTP logits of each problem must be those of the problem
    run on its own, unpacked; the trainer's MTP loss their summed cross-entropy; and
    `micro_loss` must add it with weight lambda over the global label count. Labels on the
    whole problem (`mask_prompt` off), so that a label crossing into the next problem exists
    to be masked."""
    weight = 0.3
    cfg = debug_cfg(steps=1, dtype="fp32", eval_every=-1, mtp_loss_weight=weight, seq_len=128)
    cfg.data.mask_prompt = False
    cfg.model.num_nextn_predict_layers = 1
    t = Trainer(cfg, tmp_path / "run", verbose=False)
    try:
        _, mb = t.stream.next()
        model = t.model
        assert (mb.doc_ids.amax(1) >= 2).all(), "every row should pack several problems"
        with torch.no_grad():
            h = model.hidden(mb.input_ids, mb.positions, mb.doc_ids)
            packed_logits = model.mtp_logits(h, mb.input_ids, mb.positions, mb.doc_ids)
            packed = t._mtp_loss(h, mb)
            alone, worst = torch.zeros(()), 0.0
            for row in range(mb.input_ids.shape[0]):
                for doc in mb.doc_ids[row].unique().tolist():
                    if doc < 0:
                        continue  # padding
                    cols = (mb.doc_ids[row] == doc).nonzero().squeeze(1)
                    ids, labels = mb.input_ids[row, cols][None], mb.labels[row, cols]
                    logits = model.mtp_logits(model.hidden(ids, mb.positions[row, cols][None]), ids)[0]
                    worst = max(worst, (packed_logits[row, cols[:-1]] - logits).abs().max().item())
                    alone += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE, reduction="sum")
            loss, ce = t.micro_loss(mb, mb.n_label_tokens, mb.label_positions())
    finally:
        t.close()
    assert worst < 1e-5
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    mtp_part = (loss.item() - ce.item() / mb.n_label_tokens) * mb.n_label_tokens / weight
    assert mtp_part == pytest.approx(alone.item(), rel=1e-4)


def test_gradient_accumulation_matches_one_micro_batch(tmp_path):
    """grad_accum splits the same global batch into micro-batches; losses are sums over the
    global batch's label tokens and the sequence-wise balance loss a mean over the global
    batch's rows, so the steps agree with one micro-batch up to rounding."""
    runs = {}
    for alpha in (0.0, 0.1):
        for accum in (1, 2, 4):
            cfg = debug_cfg(
                steps=4, batch_size=8, dtype="fp32", eval_every=-1, grad_accum=accum, seq_aux_loss_alpha=alpha
            )
            t = Trainer(cfg, tmp_path / f"{alpha}-{accum}", verbose=False)
            try:
                assert t.fit()["status"] == "done"
            finally:
                t.close()
            runs[alpha, accum] = losses(tmp_path / f"{alpha}-{accum}")
    assert sorted(runs[0.0, 1]) == [1, 2, 3, 4]
    for alpha in (0.0, 0.1):
        for accum in (2, 4):
            for step, loss in runs[alpha, 1].items():
                assert runs[alpha, accum][step] == pytest.approx(loss, rel=1e-5), (alpha, accum, step)
    assert runs[0.0, 1][4] < runs[0.0, 1][1]  # and it trains
    # The balance loss reaches the weights: from the second step on, the losses differ.
    assert runs[0.1, 1][1] == runs[0.0, 1][1] and runs[0.1, 1][4] != pytest.approx(runs[0.0, 1][4], rel=1e-5)


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_gradients_are_clipped_to_grad_clip_and_the_pre_clip_norm_is_reported(tmp_path, clip):
    t = Trainer(debug_cfg(grad_clip=clip), tmp_path, verbose=False)
    t.close()
    params = list(t.model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    before = math.sqrt(sum(p.numel() for p in params))
    assert t._clip() == pytest.approx(before, rel=1e-5)
    after = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    assert after == pytest.approx(clip if clip > 0 else before, rel=1e-4)  # 0: no clipping


class _Terminal(io.StringIO):
    """A captured stdout that says it is a terminal, as an interactive shell's is."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_shows_loss_tokens_per_second_and_eta(monkeypatch, terminal):
    """On a terminal a rich bar (step count, loss, tok/s, time remaining); elsewhere (a log
    file, CI) a line every 5% with the same fields and an ETA at the pace so far."""
    out = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    progress = Progress(total=40, start=0, enabled=True)
    for step in range(1, 41):
        time.sleep(0.005)
        progress.update(step, loss=2.5 - step / 100, tokens_per_s=12_345.6)
    progress.close()
    text = out.getvalue()
    assert "loss 2.1000" in text and "12,346 tok/s" in text
    if terminal:
        assert "\x1b[" in text and "40/40" in text  # drawn with ANSI codes, complete
        assert re.search(r"\d:\d\d:\d\d", text)  # rich's time-remaining column
    else:
        lines = text.splitlines()
        assert len(lines) == 20 and lines[-1].startswith("step 40/40")
        etas = [re.search(r"ETA (\d+):(\d\d):(\d\d)$", line) for line in lines]
        assert all(etas) and etas[-1].groups() == ("0", "00", "00")


def test_progress_eta_is_the_pace_so_far(monkeypatch):
    clock = iter([100.0, 130.0])  # created at t=100; 10 steps done 30 s later
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    progress = Progress(total=110, start=0, enabled=False)
    assert progress.eta(10) == "0:05:00"  # 100 steps left at 3 s a step


@pytest.mark.parametrize(("width", "dtype"), [(68, "bf16"), (65, "fp32")])
def test_expert_widths_the_grouped_kernel_cannot_take_train_on_the_loop(tmp_path, width, dtype):
    """torch._grouped_mm wants 16-byte row strides: hidden_size 68 in bf16 (136 bytes) or 65 in
    fp32 was a RuntimeError at the first step, after the config had been accepted."""
    cfg = debug_cfg(steps=1, dtype=dtype)
    cfg.model.hidden_size = width
    trainer = Trainer(cfg, tmp_path / "run", verbose=False)
    try:
        trainer.fit()
        assert not trainer.grouped_experts
    finally:
        trainer.close()
    cfg.model.hidden_size = 64  # the aligned neighbour still takes the kernel, where there is one
    assert grouped_experts_run(cfg.model, "cpu", DTYPES[dtype], backward=True) == grouped_mm_works("cpu", DTYPES[dtype])


def test_the_api_key_of_a_config_is_written_nowhere(tmp_path):
    """The run's config goes into its metrics log (and the pipeline's run state and report);
    a serve.api_key there was written out in plain text."""
    cfg = debug_cfg(steps=1)
    cfg.serve.api_key = "sk-SECRET-12345"
    Trainer(cfg, tmp_path / "run", verbose=False).fit()
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and not [p for p in files if b"sk-SECRET-12345" in p.read_bytes()]
    (start,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][:1]
    assert start["config"]["serve"]["api_key"] == "<set>"


_HEAP_SCRIPT = """
import ctypes, sys
from crosschip.backends.cpu import CPUBackend

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
if sys.argv[1] == "prepared":
    CPUBackend().prepare_training_process()
buffer = libc.malloc(20 << 20)  # an activation of a training step, 20 MiB
top = libc.sbrk(0)
from_heap = buffer < top  # glibc maps a large buffer of its own far above the heap
libc.free(buffer)
print(from_heap, libc.sbrk(0) == top)  # kept: the heap was not trimmed back
"""


def test_a_cpu_training_process_keeps_freed_memory_for_the_next_step(tmp_path, monkeypatch):
    """By default glibc maps a large buffer fresh and unmaps it when freed, and trims the
    heap's free top: every training step faulted its buffers' pages in again (arith-tiny fp32,
    batch 32: ~20,000 minor faults and ~65 ms of kernel time a step). The trainer prepares its
    process through the backend; on the CPU that takes buffers up to 32 MiB from the heap and
    keeps the heap. Each process of its own: the setting is process-wide and cannot be undone."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's allocator only")
    for mode, expected in [("default", "False True"), ("prepared", "True True")]:
        r = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, mode], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == expected, (mode, r.stdout, r.stderr[-2000:])
    calls = []
    monkeypatch.setattr(CPUBackend, "prepare_training_process", lambda self: calls.append(self.spec))
    Trainer(debug_cfg(steps=1), tmp_path, verbose=False).close()
    assert calls == ["torch:cpu"]
