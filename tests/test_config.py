"""Configs: every shipped file loads; bad files get errors naming key, file and line."""

import re
from pathlib import Path

import pytest

from crosschip.config import ConfigError, RunConfig, load_config, model_preset

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_there_are_shipped_configs():
    assert CONFIGS, "configs/ has no TOML files"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    cfg.model.validate()


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = _write(tmp_path, '[model]\npreset = "debug"\n\n[train]\nsteps = 10\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "learning_rate" in msg and str(path) in msg and ":6" in msg


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = _write(tmp_path, '[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"run.toml:2: train.steps must be int, got str 'many'"):
        load_config(path)


def test_unknown_table_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"run.toml:1: unknown table \[trian\]"):
        load_config(_write(tmp_path, "[trian]\nsteps = 1\n"))


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("steps = 3\n", "steps is a key outside any table; put it under [train]"),
        ('dtype = "fp32"\n', "dtype is a key outside any table; put it under [train] or [export]"),
        ("stepz = 3\n", "stepz is a key outside any table; known tables: model, data, train"),
    ],
)
def test_a_key_above_every_table_says_where_it_belongs(tmp_path, toml, says):
    """It was "unknown table [steps]": a key, read as a table, with no word of where it goes."""
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(_write(tmp_path, toml))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_model_overrides_apply_on_top_of_preset(tmp_path):
    cfg = load_config(_write(tmp_path, '[model]\npreset = "debug"\nnum_hidden_layers = 3\nq_lora_rank = 16\n'))
    assert cfg.model.num_hidden_layers == 3 and cfg.model.q_lora_rank == 16
    # TOML has no null: 0 asks for a plain query projection (None), as DeepSeek-V2-Lite has.
    cfg = load_config(_write(tmp_path, '[model]\npreset = "debug"\nq_lora_rank = 0\n'))
    assert cfg.model.q_lora_rank is None
    with pytest.raises(ConfigError, match=r"q_lora_rank: must be positive or null \(0 in a run config"):
        load_config(_write(tmp_path, '[model]\npreset = "debug"\nq_lora_rank = -1\n'))
    assert cfg.model.hidden_size == model_preset("debug").hidden_size


def test_inconsistent_model_shape_is_explained(tmp_path):
    path = _write(tmp_path, '[model]\npreset = "debug"\nn_group = 3\n')
    with pytest.raises(ConfigError, match="divisible by n_group"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_preset("gpt-5")


def test_int_accepted_where_float_expected_but_not_bool(tmp_path):
    assert load_config(_write(tmp_path, "[train]\nlr = 1\n")).train.lr == 1
    with pytest.raises(ConfigError, match="train.lr must be float"):
        load_config(_write(tmp_path, "[train]\nlr = true\n"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("grad_accum = 0", "train.grad_accum: must be at least 1, got 0"),
        ("batch_size = 0", "train.batch_size: must be at least 1, got 0"),
        # Refused by the trainer, after `crosschip run` had probed and qualified (the run's
        # config can then not be edited for a --resume).
        ("batch_size = 30\ngrad_accum = 4", r"train.batch_size: must be divisible by train.grad_accum \(4\), got 30"),
        ("lr = -0.001", "train.lr: must be positive, got -0.001"),
        ("ckpt_every = 0", "train.ckpt_every: must be at least 1, got 0"),
        ("keep_checkpoints = 1", "train.keep_checkpoints: must be at least 2, got 1"),
        ("beta2 = 1.0", r"train.beta2: must be in \[0, 1\), got 1.0"),
        ("eval_every = -2", "train.eval_every: must be >= -1"),
        ("lr = inf", "train.lr: must be a finite number, got inf"),
        ("max_minutes = nan", "train.max_minutes: must be a finite number, got nan"),
        # torch.manual_seed's overflow, as a traceback
        ("seed = 18446744073709551616", "train.seed: must fit in a signed 64-bit integer"),
    ],
)
def test_out_of_range_training_values_are_named(tmp_path, line, message):
    """Each of these used to reach the trainer and end in a traceback (ZeroDivisionError,
    a reshape error, torch's own ValueError) or be silently changed."""
    path = _write(tmp_path, f"[train]\n{line}\n")
    with pytest.raises(ConfigError, match=f"{path.name}: {message}"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # These trained into NaNs, and the health guard then blamed the chip (exit 3).
        ("[model]\nrms_norm_eps = -1.0", "model.rms_norm_eps: must be a positive number, got -1.0"),
        ("[model]\nrope_theta = 0", "model.rope_theta: must be a positive number, got 0"),
        ("[model]\ninitializer_range = nan", "model.initializer_range: must be a positive number, got nan"),
        # This one trained every step, then failed in the final evaluation with a traceback.
        ("[data]\nheldout_size = 0", "data.heldout_size: must be at least 1, got 0"),
        # Refused only by the trainer, as for the batch size above.
        ("[data]\ndigits = 1", "data.heldout_size: arith: asked for 500 held-out problems, but only 23 distinct"),
    ],
)
def test_model_and_data_numbers_no_run_can_use_are_named(tmp_path, text, message):
    path = _write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=f"{path.name}: {message}"):
        load_config(path)


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give the TOML file"):
        load_config(tmp_path)


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"\xff\xfe[train]\n")
    with pytest.raises(ConfigError, match="latin1.toml: not UTF-8 text"):
        load_config(path)


def test_rows_longer_than_the_context_are_refused_when_the_config_loads(tmp_path):
    path = _write(tmp_path, '[model]\npreset = "debug"\n[train]\nseq_len = 257\n')
    message = "train.seq_len 257 is longer than the model's context (model.max_position_embeddings 256)"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_config(path)
    raised = _write(tmp_path, '[model]\npreset = "debug"\nmax_position_embeddings = 257\n[train]\nseq_len = 257\n')
    assert load_config(raised).train.seq_len == 257


def test_a_warmup_longer_than_the_run_is_refused_when_the_config_loads(tmp_path):
    """It was taken silently: the learning rate never reached train.lr."""
    path = _write(tmp_path, "[train]\nsteps = 6\nwarmup_steps = 100\n")
    message = "train.warmup_steps 100 is longer than train.steps 6: the learning rate would never reach train.lr"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_config(path)
    assert load_config(_write(tmp_path, "[train]\nsteps = 6\nwarmup_steps = 6\n")).train.warmup_steps == 6


def test_a_short_run_cut_from_a_full_config_keeps_its_warmup(tmp_path):
    """`crosschip train --steps 2` on the default run (warmup 30) is a smoke run, as
    benchmarks/cuda_checks.py runs it: the override is not refused."""
    import argparse

    from crosschip.train.command import _config

    args = argparse.Namespace(config=None, backend=None, steps=2, max_minutes=None)
    cfg = _config(args)
    cfg.train.validate()
    assert (cfg.train.steps, cfg.train.warmup_steps) == (2, 30)


def test_the_trainer_checks_a_config_changed_after_loading(tmp_path):
    from crosschip.train.trainer import Trainer

    cfg = RunConfig(model=model_preset("debug"))
    cfg.train.grad_accum = 0
    with pytest.raises(ConfigError, match="train.grad_accum: must be at least 1"):
        Trainer(cfg, tmp_path, verbose=False)


def test_no_periodic_evaluation_needs_no_evaluation_problems(tmp_path):
    """qualify's stability runs write eval_every = -1 with eval_problems = 0."""
    assert load_config(_write(tmp_path, "[train]\neval_every = -1\neval_problems = 0\n")).train.eval_problems == 0
    with pytest.raises(ConfigError, match="train.eval_problems: must be at least 1 when eval_every > 0, got 0"):
        load_config(_write(tmp_path, "[train]\neval_every = 50\neval_problems = 0\n"))


def test_a_corpus_without_its_task_is_refused(tmp_path):
    """Without data.task = "corpus" the files were ignored and the run learned arithmetic."""
    path = _write(tmp_path, '[data]\ncorpus = ["docs.txt"]\n')
    with pytest.raises(ConfigError, match=r'data.corpus is set but data.task is \'arith\': set data.task = "corpus"'):
        load_config(path)
    assert load_config(_write(tmp_path, '[data]\ntask = "corpus"\ncorpus = ["docs.txt"]\n')).data.corpus == ["docs.txt"]
    with pytest.raises(ConfigError, match=r"data.corpus is empty: give paths"):
        load_config(_write(tmp_path, '[data]\ntask = "corpus"\n'))
    # An empty path was the current folder: the run trained on every .txt under it, silently.
    with pytest.raises(ConfigError, match=r"data.corpus: an empty path"):
        load_config(_write(tmp_path, '[data]\ntask = "corpus"\ncorpus = ["docs.txt", ""]\n'))


def test_verify_table_is_checked_when_loaded(tmp_path):
    assert load_config(_write(tmp_path, "[verify]\nmax_new_tokens = 40\n")).verify.max_new_tokens == 40
    with pytest.raises(ConfigError, match="verify.prompts: must be at least 1, got 0"):
        load_config(_write(tmp_path, "[verify]\nprompts = 0\n"))
    with pytest.raises(ConfigError, match="verify.max_new_tokens: must be >= 0"):
        load_config(_write(tmp_path, "[verify]\nmax_new_tokens = -1\n"))
    with pytest.raises(ConfigError, match="serve.block_size: must be at least 1, got 0"):
        load_config(_write(tmp_path, "[serve]\nblock_size = 0\n"))


def test_data_prefetch_takes_true_false_or_auto(tmp_path):
    assert load_config(_write(tmp_path, "[data]\nprefetch = true\n")).data.prefetch is True
    assert load_config(_write(tmp_path, "[data]\nprefetch = false\n")).data.prefetch is False
    with pytest.raises(ConfigError, match="data.prefetch: must be true, false or 'auto', got 'yes'"):
        load_config(_write(tmp_path, '[data]\nprefetch = "yes"\n'))
    with pytest.raises(ConfigError, match=r"run.toml:2: data.prefetch must be bool \| str, got int 1"):
        load_config(_write(tmp_path, "[data]\nprefetch = 1\n"))


def test_train_without_a_config_takes_the_default_run(monkeypatch, tmp_path):
    """`crosschip train` used the dataclass defaults (lr 3e-3, 600 steps, no time limit), which
    are not the default run's recipe (`crosschip run` takes configs/default.toml); now both
    take the shipped file, from any directory."""
    import argparse

    from crosschip.config import to_dict
    from crosschip.train.command import _config

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config=None, backend=None, steps=None, max_minutes=None)
    assert to_dict(_config(args)) == to_dict(load_config(CONFIGS[0].parent / "default.toml"))


def test_a_config_from_a_pipe_is_read(tmp_path, capsys):
    """`crosschip train --config <(...)`: a pipe exists but is no regular file, and was
    "config file not found". (`crosschip run` refuses it by name: it keeps a copy of its config.)"""
    import os
    import threading

    from crosschip.cli import main

    regular = tmp_path / "regular.toml"
    regular.write_text((Path(__file__).resolve().parent.parent / "configs" / "smoke.toml").read_text())
    fifo = tmp_path / "piped.toml"

    def piped(read):
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda: fifo.write_text(regular.read_text()), daemon=True)
        writer.start()
        try:
            return read(fifo)
        finally:
            writer.join(10)
            fifo.unlink()

    assert piped(load_config) == load_config(regular)
    assert piped(lambda path: main(["run", "--config", str(path), "--out", str(tmp_path / "run")])) == 1
    assert "is not a regular file: a run keeps a copy, so save it to one" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
