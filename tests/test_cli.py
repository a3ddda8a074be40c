"""The CLI as a user meets it: help texts, examples, one-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crosschip.backends import get_backend
from crosschip.cli import STAGES, main
from crosschip.config import load_config, to_dict
from crosschip.errors import CrosschipError
from crosschip.pipeline import STAGE_OUTPUTS
from light import cli_light


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosschip", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_stage():
    out = _cli("--help")
    assert out.returncode == 0
    for stage in ("probe", "qualify", "train", "export", "verify", "serve", "run", "bench"):
        assert stage in out.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_help_has_an_example_and_imports_no_runtime(stage):
    out, imported = cli_light(stage, "--help")
    assert out.returncode == 0, out.stderr
    assert "example:" in out.stdout and STAGES[stage].example in out.stdout
    assert imported == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "missing"], "crosschip serve: error: bundle folder not found: missing"),
        (["export", "missing", "--out", "b"], "crosschip export: error: export source not found: missing"),
        (["verify", "missing", "--target", "ort:cpu"], "crosschip verify: error: bundle folder not found: missing"),
        # A bundle's file given for its folder is named as a file (serve said "not found").
        (["serve", "model.onnx"], "crosschip serve: error: model.onnx is a file; give the bundle's folder"),
        (["verify", "model.onnx"], "crosschip verify: error: model.onnx is a file; give the bundle's folder"),
        (["qualify", "--backend", "emu:nope"], "crosschip qualify: error: unknown backend 'emu:nope'"),
        # It judged torch:cpu against a chip that plants NaNs, and called it SERVE-ONLY.
        (
            ["qualify", "--backend", "torch:cpu", "--reference", "emu:flaky"],
            "crosschip qualify: error: --reference emu:flaky is an emulated chip",
        ),
        (["run", "--config", "missing.toml"], "crosschip run: error: config file not found: missing.toml"),
        (["run", "--train-on", "torch:tpu"], "crosschip run: error: --train-on: unknown backend 'torch:tpu'"),
    ],
)
def test_a_mistyped_command_is_answered_before_any_runtime_is_imported(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"")
    out, imported = cli_light(*args)
    assert out.returncode == 1 and out.stderr.startswith(message) and len(out.stderr.splitlines()) == 1, out.stderr
    assert imported == []


def test_version_is_printed(capsys):
    import crosschip

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"crosschip {crosschip.__version__}\n"


def test_an_unknown_option_is_named_by_its_stage(capsys):
    """argparse reported a stage's unknown option with the top-level usage ("crosschip STAGE ...")."""
    for argv, says in ((["probe", "--bogus"], "crosschip probe"), (["--bogus"], "crosschip")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{says}: error: unrecognized arguments: --bogus" in err, err
        assert err.startswith(f"usage: {says} [-h]"), err


def test_no_stage_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "STAGE" in capsys.readouterr().out


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(CrosschipError, match="unknown backend 'torch:tpu'; known backends: torch:cpu"):
        get_backend("torch:tpu")


def test_unavailable_backend_says_why():
    with pytest.raises(CrosschipError, match="torch_npu is not installed"):
        get_backend("torch:npu").require()


def test_serve_takes_vllms_flags_for_the_model_name_batch_and_prefix_caching():
    from crosschip.cli import build_parser

    vllm = ["--served-model-name", "my-model", "--max-num-seqs", "4", "--no-enable-prefix-caching"]
    args = build_parser("serve").parse_args(["serve", "b", *vllm])
    assert (args.model_name, args.max_batch, args.prefix_caching) == ("my-model", 4, False)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--port", "70000", "--port must be between 0 and 65535, got 70000"),
        ("--block-size", "0", "--block-size must be at least 1, got 0"),
        ("--num-blocks", "1", "--num-blocks must be 0 (sized from max_batch) or at least 2, got 1"),
        ("--prefill-chunk", "0", "--prefill-chunk must be at least 1, got 0"),
        ("--max-queue", "0", "--max-queue must be at least 1, got 0"),
        ("--drain-timeout", "-1", "--drain-timeout must be >= 0 and finite, got -1.0"),
        # It printed "draining (up to infs)" at SIGTERM.
        ("--drain-timeout", "inf", "--drain-timeout must be >= 0 and finite, got inf"),
        ("--threads", "-1", "--threads must be >= 0"),
        ("--threads", "100000", "--threads 100,000 is more than this machine's"),  # a segfault
        ("--api-key", "", "--api-key is empty"),
        ("--model-name", " ", "--model-name is empty"),
    ],
)
def test_serve_refuses_values_it_cannot_run_with_before_starting(tmp_path, capsys, flag, value, message):
    """These used to end in tracebacks (ZeroDivisionError, bind()'s OverflowError, torch's
    RuntimeError) or be taken as they were (a prefill chunk of 0 never finishes a prompt; an
    empty --api-key served without a key)."""
    (tmp_path / "tokenizer.json").write_text("{}")
    assert main(["serve", str(tmp_path), "--port", "18999", flag, value]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_refuses_compile_on_onnx_runtime(tmp_path, capsys):
    """It was dropped silently: ONNX Runtime serves its own optimized graph."""
    (tmp_path / "tokenizer.json").write_text("{}")
    assert main(["serve", str(tmp_path), "--port", "18999", "--on", "ort:cpu", "--compile"]) == 1
    assert "--compile is torch.compile, for torch backends" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # Refused before the block tables list every free block: a million million of them was a
        # MemoryError caught too late to name the pool, a hundred million took seconds and gigabytes.
        (
            ["--num-blocks", "1000000000000"],
            r"the latent cache of 1,000,000,000,000 blocks \(--num-blocks\) of 16 tokens",
        ),
        (["--max-batch", "1000000000000"], r"blocks \(--max-batch 1,000,000,000,000 full-length sequences\)"),
        # 10^5 made a pool of 976.6 MiB for a model whose whole context is 256 tokens; 10^12 was refused
        # only for the machine's memory.
        (["--block-size", "100000"], r"--block-size 100,000 is larger than the model's context of 256 tokens"),
    ],
)
def test_serve_refuses_a_cache_larger_than_the_machine(debug_bundle, capsys, flags, message):
    """These ended in a MemoryError or numpy's allocation traceback (or, sized to fit the
    address space but not the memory, in the OOM killer)."""
    assert main(["serve", str(debug_bundle), "--port", "0", *flags]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("on", "damage", "message"),
    [
        ("ort:cpu", {"model.onnx": b"\x08\x07garbage"}, "model.onnx: ONNX Runtime cannot load it (InvalidProtobuf"),
        ("ort:cpu", {"model.onnx": b"\x08\x07garbage", "config.json": b"{bad"}, "config.json: not valid JSON"),
        ("torch:cpu", {"model.safetensors": b"\x00" * 100}, "model.safetensors: not a readable safetensors file"),
    ],
)
def test_a_damaged_bundle_without_its_manifest_is_one_line(debug_bundle, tmp_path, capsys, on, damage, message):
    """Without crosschip.json no checksum catches the damage: the file's reader did, with a
    traceback (ONNX Runtime's InvalidProtobuf, json's JSONDecodeError, a SafetensorError)."""
    bundle = tmp_path / "b"
    shutil.copytree(debug_bundle, bundle)
    (bundle / "crosschip.json").unlink()
    for name, data in damage.items():
        (bundle / name).write_bytes(data)
    assert main(["serve", str(bundle), "--on", on, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_engine_refuses_a_zero_prefill_chunk():
    from crosschip.serve.engine import Engine

    with pytest.raises(CrosschipError, match="prefill_chunk must be at least 1, got 0"):
        Engine(executor=None, tokenizer=None, prefill_chunk=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--problems", "0"], "--problems must be >= 1, got 0"),
        (["--corpus-docs", "-1"], "--corpus-docs must be >= 0, got -1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (["--top-k", "0", "--target-url", "http://127.0.0.1:1"], "--top-k must be >= 1, got 0"),
        (["--digits", "7"], "--digits must be 1, 2 or 3, got 7"),  # was "arith: digits must be ..."
        (["--problems", "100", "--digits", "1", "--ops", "+"], "--problems: arith: asked for 100 held-out problems"),
        (["--reference", "ort:cpu"], "--reference ort:cpu: the reference runs the trained weights in torch"),
        # These were accepted and did nothing (the bf16 gate judged an fp32 graph); an empty
        # --out wrote into the current folder, and one inside the bundle into the bundle.
        (["--target-dtype", "bf16"], "--target-dtype applies to a torch target; --target ort:cpu runs its own"),
        (["--target-weights", "w", "--target", "ort:cpu"], "--target-weights applies to a torch target"),
        (["--target-weights", "w", "--target-dtype", "bf16"], "--target-dtype and --target-weights apply to a torch"),
        # Asked only of a server: without --target-url they were dropped silently.
        (["--top-k", "5"], "--top-k applies to --target-url; --target ort:cpu runs here"),
        (["--api-key", "k", "--model-name", "m", "--target", "torch:cpu"], "--api-key and --model-name apply to"),
        (["--target-url", "http://127.0.0.1:1", "--target-dtype", "fp16"], "; --target-url http://127.0.0.1:1 runs"),
        (["--out", "{bundle}/verify"], "is inside the bundle it verifies"),
        # The target's worker found no graph after the reference side had run whole.
        ([], "has no model.onnx, which --target ort:cpu runs; export it with `crosschip export ... --to ort:cpu`"),
        # Empty (an unset variable): the default target ran, and the current folder was weights.
        (["--target", ""], "--target is empty; give a backend such as ort:cpu"),
        (["--reference-weights", " "], "--reference-weights is empty; give auto, bundle or a folder"),
        (["--model-name", "", "--target-url", "http://127.0.0.1:1"], "--model-name is empty"),  # the first model
    ],
)
def test_verify_refuses_numbers_it_cannot_run_with_before_either_side_runs(
    debug_bundle, tmp_path, capsys, args, message
):
    """--max-new-tokens -1 used to run the whole target side, then fail in the reference's
    latent cache with an internal error."""
    args = [a.format(bundle=debug_bundle) for a in args]
    assert main(["verify", str(debug_bundle), "--out", str(tmp_path / "v"), "--no-record", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "v" / "report.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "0"], "--nproc must be >= 1, got 0"),
        (["--nproc", "2", "--nnodes", "0"], "--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got '0'"),
        (["--nproc", "2", "--nnodes", "2:1"], "--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got '2:1'"),
        (["--nproc", "2", "--nnodes", "2", "--node-rank", "2"], "--node-rank must be between 0 and --nnodes - 1 (1)"),
        (["--nproc", "2", "--master-port", "70000"], "--master-port must be between 1 and 65535, got 70000"),
        (["--nproc", "2", "--max-restarts", "-1"], "--max-restarts must be >= 0, got -1"),
        (["--nproc", "3"], "train.batch_size 32 must be divisible by processes x grad_accum (3 x 1)"),
        (["--nproc", "2", "--backend", "ort:cpu"], "ort:cpu serves but does not train"),
        (["--backend", "ort:cpu"], "ort:cpu serves but does not train"),
        (["--backend", ""], "--backend is empty"),
        (["--resume"], "does not exist; there is no run to continue"),
        # It never fired, and the run exited 0 like one that survived it.
        (["--steps", "2", "--inject", "crash@step=1000"], "the run ends at step 2 (--steps), so it would never fire"),
        (["--inject", "nan@step=100000"], "(train.steps), so it would never fire"),
    ],
)
def test_train_refuses_launcher_numbers_before_torchrun(tmp_path, capsys, args, message):
    """torchrun answered these with AssertionError tracebacks, or waited on a port that
    cannot exist."""
    assert main(["train", "--out", str(tmp_path / "t"), "--quiet", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        # An empty string (an unset variable) was taken as not given: the default config ran,
        # `--resume ""` started a new run, `--out ""` made runs/run-DATE, the export of ""
        # exported the current folder, and `Path("")` made the others the current folder
        # (`qualify --workdir ""` wrote its children's files there).
        (["run", "--config", ""], "--config"),
        (["run", "--resume", " "], "--resume"),
        (["run", "--config", "configs/smoke.toml", "--out", ""], "--out"),
        (["train", "--config", "", "--out", "{tmp}/t"], "--config"),
        (["train", "--out", ""], "--out"),
        (["export", "", "--to", "ort:cpu", "--out", "{tmp}/b"], "SRC"),
        (["export", "{tmp}/configs", "--to", "ort:cpu", "--out", ""], "--out"),
        (["serve", ""], "bundle"),
        (["verify", ""], "bundle"),
        (["verify", "{tmp}/configs", "--out", ""], "--out"),
        (["verify", "{tmp}/configs", "--target", "torch:cpu", "--target-weights", ""], "--target-weights"),
        (["verify", "{tmp}/configs", "--corpus", ""], "--corpus"),  # read every .txt under here
        (["probe", "--json", ""], "--json"),
        (["qualify", "--json", ""], "--json"),
        (["qualify", "--workdir", ""], "--workdir"),
    ],
)
def test_an_empty_path_is_refused_not_taken_as_unset_or_as_here(tmp_path, capsys, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(Path(__file__).resolve().parent.parent / "configs" / "smoke.toml", tmp_path / "configs")
    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument {flag}: is empty; give a path" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]  # nothing made


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ('{"config": ', "JSONDecodeError: Expecting value"),
        # An edit by hand: this one was an AttributeError traceback after the probe ran again.
        ('{"finished": "serve"}', "ValueError: expected an object with a list of finished stages"),
        ("[]", "ValueError: expected an object"),
        # These were an AttributeError traceback, a TypeError after the serve stage had run, and
        # a whole run redone from the probe with the config's check skipped.
        ('{"finished": [], "config_values": "x"}', "ValueError: 'config_values' is not an object"),
        ('{"finished": [], "stages": [], "config_values": {}}', "ValueError: 'stages' is not an object"),
        ('{"finished": [1, 2], "config_values": {}}', "ValueError: unknown finished stages [1, 2]"),
        ('{"finished": ["probe"]}', "ValueError: 'config_values' is missing"),
    ],
)
def test_a_damaged_run_state_is_one_line(tmp_path, capsys, state, why):
    (tmp_path / "run_state.json").write_text(state)
    assert main(["run", "--resume", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"run_state.json: damaged ({why}" in err and "Traceback" not in err, err


def test_a_resume_takes_the_config_copy_in_its_folder_and_refuses_flags_it_would_ignore(tmp_path, capsys):
    """A moved run folder resumes (the state's absolute config path went stale: "config file not
    found" for a file that was there); --out and, once the serve stage is done, --serve and --port
    did nothing, silently."""
    run = tmp_path / "moved"
    run.mkdir()
    shutil.copy(Path(__file__).resolve().parent.parent / "configs" / "smoke.toml", run / "config.toml")
    stages = ["probe", "qualify", "assign", "train", "export", "verify", "serve", "report"]
    values = to_dict(load_config(run / "config.toml"))
    state = {"config": str(tmp_path / "before" / "config.toml"), "finished": stages, "config_values": values}
    (run / "run_state.json").write_text(json.dumps(state))
    for output in STAGE_OUTPUTS.values():  # what the stages left (a missing one is redone)
        (run / output).parent.mkdir(parents=True, exist_ok=True)
        (run / output).write_text("{}")
    for flags, says in [
        (["--serve"], "serve stage already finished, so --serve and --port do nothing here"),
        (["--port", "8123"], "serve stage already finished"),
        (["--out", str(tmp_path / "x")], "--out cannot be combined with --resume"),
        # These were taken and ignored (--train-on even recorded in the run state).
        (["--train-on", "torch:cpu"], f"--train-on is for the assign stage, which {run} has finished"),
        (["--candidates", "torch:cpu"], "--candidates is for the qualify stage"),
        (["--inject", "nan@step=3"], "--inject is for the train stage"),
    ]:
        assert main(["run", "--resume", str(run), *flags]) == 1
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((run / "run_state.json").read_text()) == state  # nothing recorded, nothing redone
    # A second `--resume` of a run that is still going is refused before any stage (the two redid
    # a stage side by side: one's export deleted the bundle the other verified).
    from crosschip.paths import lock_folder

    with lock_folder(run, "crosschip run"):
        assert main(["run", "--resume", str(run)]) == 1
    assert f"{run} is being written by another crosschip run (pid {os.getpid()})" in capsys.readouterr().err
    (run / "config.toml").unlink()
    assert main(["run", "--resume", str(run)]) == 1
    assert f"config file not found: {run / 'config.toml'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "args", "code", "message"),
    [
        ("train_throughput", ["--batch", "0"], 2, "argument --batch: must be at least 1, got 0"),
        ("train_throughput", ["--threads", "two"], 2, "argument --threads: expected an integer, got 'two'"),
        (
            "train_throughput",
            ["--preset", "nope", "--no-anchor"],
            1,
            "train_throughput.py: error: unknown model preset 'nope'",
        ),
        # A batch list used to reach the executor ("the latent cache needs at least 2 blocks") after an export.
        ("ort_decode", ["--batches", "1,0"], 2, "argument --batches: expected comma-separated integers >= 1"),
        ("graph_ab", ["a", "b", "--batches", "1,x"], 2, "got '1,x': expected an integer, got 'x'"),
        ("cuda_checks", ["--out", "unused", "--decode-batches", "8,-1"], 2, "must be at least 1, got -1"),
        ("prefix_caching", ["--turns", "9"], 2, "the last turn reaches 600 tokens; arith-tiny's context is 512"),
        ("train_step_ab", ["--b", "compile=true"], 1, "--b 'compile=true': expected TABLE.KEY=VALUE"),
        ("train_step_ab", ["--b", "train.dtype=bf16"], 1, "'bf16' is not a TOML value (quote strings"),
        ("train_step_ab", ["--a", "train.compiled=true"], 1, "--a: unknown key train.'compiled'; known keys:"),
        ("train_step_ab", ["--config", "missing.toml"], 1, "--config missing.toml: [Errno 2] No such file"),
        # Used to say only "server did not start"; the server's own error names the cause.
        ("serve_throughput", ["--on", "torch:npu"], 1, "the server did not start: crosschip serve: error: torch:npu"),
    ],
)
def test_a_benchmark_script_answers_bad_arguments_in_one_line(script, args, code, message, tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{script}.py"
    argv = [sys.executable, str(script), *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == code
    assert message in out.stderr and "Traceback" not in out.stderr


def test_graph_ab_names_a_graph_onnx_runtime_cannot_load(debug_bundle, tmp_path):
    """It ended in ONNX Runtime's InvalidProtobuf traceback."""
    shutil.copy(debug_bundle / "config.json", tmp_path / "config.json")
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / name).write_bytes(b"\x08\x07not a graph")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "graph_ab.py"
    out = subprocess.run(
        [sys.executable, str(script), "a.onnx", "b.onnx", "--steps", "1", "--batches", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 1 and "a.onnx: ONNX Runtime cannot load it (InvalidProtobuf" in out.stderr
    assert "Traceback" not in out.stderr


def test_train_step_ab_times_both_configs_in_turns(tmp_path):
    """Two trainers, each with its own settings over the base config, timed step by step."""
    (tmp_path / "base.toml").write_text('[model]\npreset = "debug"\n[train]\nbatch_size = 2\nseq_len = 64\n')
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "train_step_ab.py"
    argv = [sys.executable, str(script), "--config", "base.toml", "--b", "train.batch_size=4"]
    out = subprocess.run([*argv, "--steps", "2", "--warmup", "1", "--threads", "1"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    a, b, ratio = out.stdout.strip().splitlines()[-3:]
    assert a.startswith("A: the base config (64 hidden, batch 2 x 64): median step")
    assert b.startswith("B: train.batch_size=4 (64 hidden, batch 4 x 64): median step")
    assert re.fullmatch(
        r"B / A: [0-9.]+x wall, [0-9.]+x CPU; per-turn median [0-9.]+x \(2 steps each, 1 threads.*", ratio
    )


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path, capsys):
    """uvicorn's own bind failure is a SystemExit inside the event loop: a traceback, exit 3."""
    import socket

    (tmp_path / "tokenizer.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["train", "--out", "{file}"], "--out"),
        (["train", "--out", "{file}/run"], "--out"),
        (["verify", "{bundle}", "--out", "{file}"], "--out"),
        (["export", "{bundle}", "--out", "{file}/bundle"], "--out"),
        (["qualify", "--backend", "torch:cpu", "--workdir", "{file}"], "--workdir"),
        (["qualify", "--backend", "torch:cpu", "--json", "{file}/q.json"], "--json"),
        (["probe", "--json", "{file}/p.json"], "--json"),
        (["run", "--out", "{file}", "--train-on", "torch:cpu"], "--out"),
    ],
)
def test_an_output_path_through_a_file_is_refused_before_any_work(tmp_path, capsys, debug_bundle, argv, flag):
    """These were OSError tracebacks from deep inside the stage (or, for --json, an error after
    the whole measurement)."""
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    argv = [a.format(file=file, bundle=debug_bundle) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{flag} " in err and f"{file} is a file, not a folder" in err and "Traceback" not in err
    assert file.read_text() == "not a folder"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux procfs")
def test_a_path_the_checks_pass_but_the_filesystem_refuses_is_one_line(capsys):
    """procfs looks writable to os.access but creates nothing: the OSError from inside the
    stage becomes one line naming the path, exit 1."""
    assert main(["train", "--out", "/proc/crosschip-test/run", "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "crosschip train: error: cannot use /proc/crosschip-test" in err and "Traceback" not in err


@pytest.mark.parametrize("stage", ["probe", "qualify"])
def test_a_json_report_path_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, stage):
    argv = [stage, "--json", str(tmp_path)] + (["--backend", "torch:cpu"] if stage == "qualify" else [])
    assert main(argv) == 1
    assert f"--json {tmp_path} is a folder; give a file name" in capsys.readouterr().err


def test_each_cli_call_counts_its_own_ctrl_c(tmp_path, capsys):
    """A SIGINT an earlier in-process call saw (a test runner calls main() many times) must not
    turn a later call's error into "interrupted" (exit 130)."""
    import os
    import signal

    from crosschip import interrupts

    interrupts.install()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert interrupts.seen()
    assert main(["verify", str(tmp_path / "missing")]) == 1
    assert "bundle folder not found" in capsys.readouterr().err


def test_sigterm_stops_a_stage_like_ctrl_c_with_exit_143(tmp_path):
    """SIGTERM (what systemd, docker stop and Kubernetes send) used to end the process on the
    spot with no message and no cleanup; now a stage stops as on Ctrl-C and says why."""
    import signal

    from train_helpers import wait_for_first_step

    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "crosschip", "train", "--config", "configs/smoke.toml", "--steps", "100000"]
    argv += ["--out", str(tmp_path / "t"), "--quiet"]
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_step(proc, tmp_path / "t")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "crosschip train: interrupted (SIGTERM)" in err and "Traceback" not in err


def test_verify_into_a_read_only_bundle_is_refused_before_either_side_runs(debug_bundle, tmp_path, capsys, monkeypatch):
    """It used to run both sides, print PASS and then exit 1 naming a temporary file."""
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(debug_bundle) else real(p, mode))
    assert main(["verify", str(debug_bundle), "--out", str(tmp_path / "v")]) == 1
    err = capsys.readouterr().err
    assert "is read-only, so the verdict cannot be recorded" in err and "--no-record" in err
    assert not (tmp_path / "v").exists()


def test_a_second_qualify_in_one_workdir_is_refused(tmp_path, capsys):
    """It trained into the first one's folders, failed, and judged the backend SERVE-ONLY (exit 0)."""
    from crosschip.paths import lock_folder

    with lock_folder(tmp_path / "work", "crosschip qualify"):
        assert main(["qualify", "--backend", "torch:cpu", "--workdir", str(tmp_path / "work")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'work'} is being written by another crosschip qualify (pid {os.getpid()})" in err


@pytest.mark.parametrize("stage", ["probe", "qualify"])
def test_a_json_report_that_cannot_be_overwritten_is_refused_before_the_measurement(
    tmp_path, capsys, monkeypatch, stage
):
    """An existing read-only --json file was said after the whole probe or qualification."""
    import os

    report = tmp_path / "report.json"
    report.write_text("{}")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(report) else real(p, mode))
    assert main([stage, *(["--backend", "torch:cpu"] if stage == "qualify" else []), "--json", str(report)]) == 1
    err = capsys.readouterr().err
    assert f"--json {report} exists and is not writable" in err and "Traceback" not in err


def test_bench_runs_a_script_that_imports_its_neighbours(capsys):
    """prefix_caching imports serve_throughput from benchmarks/: under `crosschip bench` that
    was a ModuleNotFoundError traceback."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "prefix_caching", "--help"])
    # Its usage names the command typed (run_path had put the script's path back in argv[0]).
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: crosschip bench prefix_caching [-h]")
    # An empty name (an unset variable) listed the benchmarks and exited 0; an unknown one is named.
    assert main(["bench", ""]) == 1 and "the benchmark name is empty; available: " in capsys.readouterr().err
    assert main(["bench", "nope"]) == 1 and "unknown benchmark 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "but RANK and MASTER_ADDR and MASTER_PORT not: unset them"),
        (
            {"LOCAL_RANK": "0", "WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "p"},
            "MASTER_PORT='p'",
        ),
        ({"TORCHELASTIC_RESTART_COUNT": "abc"}, "TORCHELASTIC_RESTART_COUNT='abc' in the environment is not a whole"),
    ],
)
def test_torchruns_variables_left_in_a_shell_are_one_line(env, message, tmp_path, monkeypatch, capsys):
    """A cluster shell or a container can carry torchrun's variables: they were tracebacks (env://
    rendezvous refused, int() of a non-number)."""
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--config", "configs/smoke.toml", "--out", str(tmp_path / "run"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("crosschip train: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
