"""`crosschip run` end to end: the real stages as real processes, on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from report_helpers import assert_report_complete
from train_helpers import processes_tagged

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crosschip", "run", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_state.json").read_text())


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines() if line]


def _resumes_on_cpu(run_dir: Path) -> list[dict]:
    return [e for e in _events(run_dir) if e["event"] == "resume" and e["backend"]["backend"] == "torch:cpu"]


RUN_TAG = "CROSSCHIP_TEST_RUN"


def _tagged(tag: str) -> list[str]:
    """A run and everything it started (other tests' processes carry other tags)."""
    return processes_tagged(RUN_TAG, tag)


def test_failover_interrupt_and_resume(tmp_path):
    """The R2 story on one machine: the flaky chip gives up, training fails over to the CPU
    from the flaky chip's last verified checkpoint; Ctrl-C during the export then stops the
    run cleanly and --resume finishes it from the last finished stage."""
    run_dir = tmp_path / "run"
    # Addition only: the task must reach every stage (verify once scored + and - whatever the
    # model was trained on).
    config = tmp_path / "add.toml"
    config.write_text((ROOT / "configs" / "smoke.toml").read_text().replace('ops = ["+", "-"]', 'ops = ["+"]'))
    cmd = [sys.executable, "-m", "crosschip", "run", "--config", str(config), "--out", str(run_dir)]
    cmd += ["--train-on", "emu:flaky,torch:cpu", "--inject", "nan@step=15,times=20"]
    log = tmp_path / "run.log"  # a file, not a pipe: nobody reads the pipe while we wait
    tag = uuid.uuid4().hex
    env = {**os.environ, RUN_TAG: tag}
    with log.open("w") as out:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    # Interrupt once training is done and the export (tens of seconds of ONNX work) runs.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "run_state.json").exists() and "train" in _state(run_dir).get("finished", []):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + log.read_text()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 130, out
    # The interrupted export was stopped with the run, and so was its second tracing process.
    # (Seconds of grace: multiprocessing's resource tracker exits once it reads its pipe's end.)
    deadline = time.monotonic() + 5
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _tagged(tag), _tagged(tag)
    assert f"crosschip run --resume {run_dir}" in out
    state = _state(run_dir)
    assert state["finished"] == ["probe", "qualify", "assign", "train"]
    assert state["train_attempts"] == [{"backend": "emu:flaky", "exit": 3}, {"backend": "torch:cpu", "exit": 0}]
    assert any(e["event"] == "give_up" for e in _events(run_dir)), "the health guard on emu:flaky did not give up"

    # Resumed from where the folder was moved to (the run state's paths once went stale).
    run_dir = run_dir.rename(tmp_path / "moved")
    resumed = _run("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[train] already finished" in resumed.stdout
    state = _state(run_dir)
    # Its wall time is this resume's; the closing line also gives what every stage took.
    line = re.search(r"wall time: (\d+) s \(this resume; the run's stages took (\d+) s in all\)", resumed.stdout)
    assert line, resumed.stdout[-2000:]
    wall, total = map(int, line.groups())
    assert total == round(sum(s["seconds"] for s in state["stages"].values())) and total > wall - 5
    assert state["stages"]["train"]["seconds"] > 0
    assert state["finished"] == ["probe", "qualify", "assign", "train", "export", "verify", "serve", "report"]
    assert state["train_attempts"][-1] == {"backend": "torch:cpu", "exit": 0}
    # The CPU continued from a checkpoint the flaky chip wrote, not from scratch.
    first_cpu = _resumes_on_cpu(run_dir)[0]
    assert 0 < first_cpu["step"] <= 15 and "step_" in first_cpu["checkpoint"]
    verify = json.loads((run_dir / "verify" / "report.json").read_text())
    assert verify["gate"]["passed"] and verify["prompts"]["ops"] == ["+"]
    serve = json.loads((run_dir / "serve.json").read_text())
    assert serve["backend"] == "ort:cpu" and serve["requests"] == 16
    assert_report_complete(run_dir / "report.html")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`make run`'s command, once for the tests below: probe, qualify, train arith-micro on
    torch:cpu, export to ONNX Runtime, verify, serve."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    t0 = time.monotonic()
    out = _run("--config", "configs/default.toml", "--out", str(run_dir), timeout=900)
    return run_dir, out, time.monotonic() - t0


# The default run's training is capped at 5 minutes of wall time: it runs with the machine to
# itself (see the Makefile), and so do the tests that use its model.
@pytest.mark.solo
def test_default_run_finishes_in_ten_minutes_and_learns(default_run):
    run_dir, out, wall = default_run
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert wall <= 600, f"default run took {wall:.0f} s"
    assert "report: " in out.stdout and "wall time" in out.stdout
    final = [e for e in _events(run_dir) if e["event"] == "eval"][-1]
    assert final["n"] >= 500 and final["accuracy"] >= 0.90, final
    verify = json.loads((run_dir / "verify" / "report.json").read_text())
    assert verify["gate"]["passed"] and verify["metrics"]["greedy_identical"] == 1.0
    assert json.loads((run_dir / "serve.json").read_text())["accuracy"] >= 0.8
    # The run probes the real backends only: emulated chips are used when named (--train-on).
    probed = json.loads((run_dir / "probe.json").read_text())["backends"]
    assert "torch:cpu" in [r["backend"] for r in probed]
    assert not [r["backend"] for r in probed if r.get("emulation")]
    assert_report_complete(run_dir / "report.html")


@pytest.mark.solo
def test_the_real_cpu_qualifies_to_train(default_run):
    """The run's qualify stage, on the real CPU against itself (test_qualify judges the emulated chips)."""
    from crosschip.backends import get_backend

    run_dir, out, _ = default_run
    assert out.returncode == 0, "the default run failed; see the test above"
    cpu = json.loads((run_dir / "qualify.json").read_text())["torch:cpu"]
    assert cpu["verdict"] == "TRAIN", cpu["reasons"]
    native = get_backend("torch:cpu").native_bf16()
    assert cpu["train_dtype"] == ("bf16" if native else "fp32") and cpu["measurements"]["train_tokens_per_s"] > 0
    assert cpu["checks"]["stability"]["ok"] and cpu["checks"]["collectives"]["ok"]
    assert cpu["measurements"]["deterministic"]  # two same-seed CPU runs agree bit for bit
    assert any("loss gap" in r for r in cpu["reasons"]) and any("communication" in r for r in cpu["reasons"])
    assert "torch:cpu: TRAIN" in out.stdout


@pytest.mark.solo
def test_trained_model_passes_low_precision_gates_on_ort(default_run, tmp_path):
    """The hand-off in fp16 and in int8, on the model the default run trained.

    The two policies are independent, so they run side by side (one core each)."""
    run_dir, out, _ = default_run
    assert out.returncode == 0, "the default run failed; see the test above"
    policies = ("fp16", "int8")
    cmd = [sys.executable, "-m", "crosschip"]
    exports = [
        [*cmd, "export", str(run_dir / "train"), "--to", "ort:cpu", "--dtype", p, "--out", str(tmp_path / p)]
        for p in policies
    ]
    for p, proc in zip(policies, _side_by_side(exports, tmp_path / "export", timeout=300)):
        assert proc.returncode == 0, f"{p} export: " + proc.stdout[-3000:]
    verifies = [
        [*cmd, "verify", str(tmp_path / p), "--reference", "torch:cpu", "--target", "ort:cpu", "--problems", "200"]
        + ["--out", str(tmp_path / f"verify-{p}")]
        for p in policies
    ]
    for p, proc in zip(policies, _side_by_side(verifies, tmp_path / "verify", timeout=600)):
        report = json.loads((tmp_path / f"verify-{p}" / "report.json").read_text())
        assert report["gate"]["precision"] == p
        assert proc.returncode == 0 and report["gate"]["passed"], f"{p}: " + proc.stdout[-3000:]
        assert report["metrics"]["accuracy_reference"] >= 0.85


def _side_by_side(commands: list[list[str]], logs: Path, timeout: float) -> list[subprocess.CompletedProcess]:
    """Run commands at once, one torch thread each (logged to files, so no pipe fills up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    files = [logs.with_name(f"{logs.name}-{i}.log") for i in range(len(commands))]
    codes = []
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(f.open("w")) for f in files]
        procs = [
            subprocess.Popen(c, stdout=o, stderr=subprocess.STDOUT, cwd=ROOT, env=env) for c, o in zip(commands, outs)
        ]
        codes = [p.wait(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(c, rc, f.read_text(), "") for c, rc, f in zip(commands, codes, files)]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[train]\nstepz = 3\n", "unknown key train.'stepz'"),
        ('[export]\ndtype = "int4"\n', "export.dtype: must be one of fp32, bf16, fp16, int8, got 'int4'"),
        ('[serve]\nbackend = "ort:tpu"\n', "serve.backend: unknown backend 'ort:tpu'"),
        ("[serve]\nprefill_chunk = 0\n", "serve.prefill_chunk: must be at least 1, got 0"),
        # These four reached the serve stage, after training, export and verify, and failed there.
        ('[serve]\nhost = "no-such-host.invalid"\n', "serve.host no-such-host.invalid: "),
        ("[serve]\nblock_size = 100000\n", "serve.block_size 100,000 is larger than the model's context of 512"),
        ("[serve]\nnum_blocks = 1000000000000\n", "blocks (serve.num_blocks) of 16 tokens (serve.block_size) needs"),
        ("[serve]\nmax_batch = 1000000000000\n", "(serve.max_batch 1,000,000,000,000 full-length sequences)"),
        ("[verify]\nprompts = 3000\n", "verify.prompts: arith: asked for 3000 held-out problems, but only 2049"),
        ("[verify]\nmax_new_tokens = 1000\n", "exceed the model's context of 512 tokens; give verify.max_new_tokens"),
        ("[model]\nvocab_size = 200\n", "model.vocab_size 200 is below the tokenizer's minimum of 263"),
        (
            '[export]\ntarget = "emu:fp16-only"\ndtype = "bf16"\n',
            "refuses bf16; set export.dtype to fp16, int8 or fp32",
        ),
        ('[serve]\nbackend = "ort:cann"\n', "serve.backend: ort:cann is not available: this onnxruntime build has"),
        (
            '[verify]\nreference = "ort:cpu"\n',
            "verify.reference ort:cpu: the reference runs the trained weights in torch",
        ),
        ('[verify]\nreference = "torch:xpu"\n', "verify.reference: torch:xpu is not available: this torch ("),
        ('[data]\ntask = "corpus"\n', "data.corpus is empty: give paths of .txt/.jsonl files"),
        # Found missing by the train stage, after the probe and qualify; verify reads the text too.
        ('[data]\ntask = "corpus"\ncorpus = ["no-such-docs.jsonl"]\n', "corpus: path not found: no-such-docs.jsonl"),
        # Trained and exported, then refused by verify: the bundle had no ONNX graphs.
        ('[export]\ntarget = "torch:cpu"\n', "serve.backend ort:cpu runs the bundle's ONNX graphs, which export"),
    ],
)
def test_bad_config_fails_before_any_stage(tmp_path, capsys, toml, message):
    """A setting only a late stage reads (the export's, the server's) is refused before the
    first stage too, not after minutes of training."""
    from crosschip.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(toml)
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_resume_redoes_a_finished_stage_whose_output_is_gone(tmp_path):
    """A resume trusted the list of finished stages: with verify/report.json deleted, it served
    a bundle with no verdict, and the summary left the parity line out without a word."""
    from crosschip.pipeline import STAGE_OUTPUTS, STAGES, Run

    run = Run(root=tmp_path, config_path=tmp_path / "config.toml")
    for stage in STAGES:
        if stage != "probe":  # skipped (roles given with --train-on): it leaves no probe.json
            (tmp_path / STAGE_OUTPUTS[stage]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / STAGE_OUTPUTS[stage]).write_text("{}")
        run.finish(stage, **({"skipped": "roles given with --train-on"} if stage == "probe" else {}))
    assert run.redo_from_missing_output() is None
    (tmp_path / "verify" / "report.json").unlink()
    assert run.redo_from_missing_output() == "verify"
    assert run.state["finished"] == ["probe", "qualify", "assign", "train", "export"]
    assert _state(tmp_path)["finished"] == run.state["finished"]  # saved


def test_the_export_stage_takes_the_checkpoint_training_finished_at(tmp_path, debug_bundle):
    """With the final checkpoint damaged, the export took the newest one that verified (an older
    step), and the run reported that bundle as the model it had trained and evaluated."""
    from crosschip.config import load_config, to_dict
    from crosschip.errors import CrosschipError
    from crosschip.hf import load_bundle
    from crosschip.pipeline import Run, stage_export
    from crosschip.train.checkpoint import TrainState, save_checkpoint

    config = tmp_path / "config.toml"
    config.write_text(
        (ROOT / "configs" / "smoke.toml").read_text().replace('target = "ort:cpu"', 'target = "torch:cpu"')
    )
    run = Run(root=tmp_path, config_path=config, state={"config_values": to_dict(load_config(config))})
    model, tok = load_bundle(debug_bundle)
    for step in (4, 8):
        state = TrainState(step, model.state_dict(), {}, {}, {"step": step})
        save_checkpoint(tmp_path / "train" / "checkpoints", state, model.cfg, tokenizer=tok)
    (tmp_path / "train" / "train_summary.json").write_text(json.dumps({"status": "done", "step": 8}))
    final = tmp_path / "train" / "checkpoints" / "step_00000008"
    (final / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(CrosschipError, match=r"export failed \(exit 1\): .*checksum mismatch for checkpoint file"):
        stage_export(run)
    assert not (tmp_path / "bundle").exists()
    shutil.rmtree(final)
    with pytest.raises(CrosschipError, match=r"final checkpoint \(.*step_00000008\) is missing"):
        stage_export(run)


def test_a_corpus_run_is_verified_on_its_own_text():
    """The verify stage scored a corpus run on arithmetic problems (and an int8 bundle's gate
    on two accuracies of 0); it now hands verify the run's corpus, and no problems."""
    from crosschip.config import DataConfig, RunConfig
    from crosschip.pipeline import _verify_settings

    cfg = RunConfig(data=DataConfig(task="corpus", corpus=["docs.jsonl", "more/"]))
    assert _verify_settings(cfg) == {"max_new_tokens": None, "corpus": ["docs.jsonl", "more/"]}
    cfg = RunConfig()
    assert _verify_settings(cfg) == {"max_new_tokens": None, "problems": 64, "digits": 2, "ops": ["+", "-"]}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--train-on", "torch:gpu"], "--train-on: unknown backend 'torch:gpu'"),
        (["--train-on", " , "], "--train-on needs at least one backend"),
        (["--candidates"], "--candidates needs at least one backend"),
        (["--candidates", "torch:cpu", "tpu"], "--candidates: unknown backend 'tpu'"),
        (["--candidates", "torch:cpu", "torch:cpu"], "--candidates names torch:cpu more than once"),
        (["--train-on", "torch:cpu", "--inject", "boom@step=3"], "--inject 'boom@step=3': expected KIND@step=N"),
        (["--inject", "crash@step=100000"], "(train.steps), so it would never fire"),
        (["--resume", "runs/x", "--config", "configs/smoke.toml"], "--config cannot be combined with --resume"),
    ],
)
def test_bad_flags_fail_before_any_stage(tmp_path, capsys, flags, message):
    """Each of these used to start the run (an empty --train-on or --candidates even ran the
    default probe and qualify); a bad backend or fault was refused only by the train stage."""
    from crosschip.cli import main

    assert main(["run", *flags, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_port_in_use_and_a_non_empty_out_are_refused_before_any_stage(tmp_path, capsys):
    """A taken --port used to surface after training, export and verify, as "the server exited
    with 1"; a folder that was not a run was used as one (its bundle/ replaced, its train/
    resumed)."""
    import socket

    from crosschip.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["run", "--config", "configs/smoke.toml", "--port", str(port), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and not (tmp_path / "r").exists()
    (tmp_path / "full" / "bundle").mkdir(parents=True)
    assert main(["run", "--config", "configs/smoke.toml", "--out", str(tmp_path / "full")]) == 1
    assert "--out" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "full").iterdir()) == ["bundle"]


def test_a_resume_after_the_runs_config_was_edited_is_refused_naming_the_change(tmp_path):
    """The stages already done used the config the run started with; an edited one would mix
    two runs (a model trained on 2 digits verified on 3)."""
    run = tmp_path / "r"
    started = _run("--config", "configs/smoke.toml", "--train-on", "torch:npu", "--out", str(run))
    assert (
        started.returncode == 1 and "training on torch:npu failed (exit 1): crosschip train: error:" in started.stderr
    )
    config = run / "config.toml"
    config.write_text(config.read_text().replace("digits = 2", "digits = 3"))
    resumed = _run("--resume", str(run))
    assert resumed.returncode == 1 and "changed since the run started (data.digits 2 -> 3)" in resumed.stderr


def test_the_default_run_is_found_from_any_directory(tmp_path):
    """Without --config, `crosschip run` takes the default run shipped in the package: it used to
    look for configs/default.toml under the working directory, which only a checkout has.
    (torch_npu is not installed here, so the train stage stops the run at once.)"""
    argv = [sys.executable, "-m", "crosschip", "run", "--train-on", "torch:npu", "--out", "r"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 1 and "training on torch:npu failed" in out.stderr, out.stderr
    assert (tmp_path / "r" / "config.toml").read_text() == (ROOT / "configs" / "default.toml").read_text()


def test_resume_of_a_non_run_folder_is_a_clear_error(tmp_path):
    out = _run("--resume", str(tmp_path))
    assert out.returncode == 1 and "not a crosschip run folder" in out.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_as_a_stage_process_starts_leaves_no_orphan(tmp_path, monkeypatch, signum):
    """A Ctrl-C that lands after the stage's process is forked but before the run has recorded
    it must still stop it: this is how an export outlived a run that exited 130. SIGTERM, what
    a supervisor stops `crosschip run` with, takes the same path: it used to end the run at
    once and leave the stage's process (in its own session: the server, say) running."""
    from crosschip import interrupts, pipeline

    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []

    def popen_then_signal(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        os.kill(os.getpid(), signum)  # handled at the next bytecode: still inside Popen's call
        return proc

    monkeypatch.setattr(pipeline.subprocess, "Popen", popen_then_signal)
    args = ["train", "--config", "configs/smoke.toml", "--out", str(tmp_path / "t"), "--quiet"]
    monkeypatch.chdir(ROOT)
    previous = interrupts.install()  # as `crosschip run` does
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.Child.run(args, tmp_path / "stage.log", echo=False)
        assert interrupts.exit_code() == 128 + signum
    finally:
        interrupts.restore(previous)
        pipeline.Child.stop()  # what `crosschip run` does with a KeyboardInterrupt
        leftover = [p for p in started if p.poll() is None]
        for p in leftover:
            os.killpg(p.pid, signal.SIGKILL)
    assert len(started) == 1 and leftover == []


def test_a_stage_line_is_echoed_whole_up_to_its_limit_and_cut_visibly_past_it(tmp_path, capsys):
    """A qualify verdict's reasons (~250 characters) were cut at 160 mid-word with no mark, the
    worst gradient's error lost from the terminal. Lines stay whole to ECHO_CHARS; past it the
    cut says so and names the log, which keeps the line whole."""
    from crosschip import pipeline

    shown = {}
    for name_len in (200, 600):
        # One line, "config file not found: <path>" (folders of 50: a name has at most 255 bytes).
        missing = tmp_path.joinpath(*["x" * 50] * (name_len // 50))
        log = tmp_path / f"stage{name_len}.log"
        assert pipeline.Child.run(["run", "--config", str(missing)], log) != 0
        logged = next(line for line in log.read_text().splitlines() if "not found" in line)
        shown[name_len] = (capsys.readouterr().out.strip(), logged, log)
    out, logged, _ = shown[200]
    assert 160 < len(logged) < 400 and out == logged
    out, logged, log = shown[600]
    assert len(logged) > pipeline.ECHO_CHARS
    assert out == f"{logged[: pipeline.ECHO_CHARS]} ... (cut; the whole line is in {log})"


def test_ctrl_c_stops_a_run_that_serves_and_the_run_finishes(tmp_path, debug_bundle):
    """`run --serve` says "Ctrl-C to stop", and a Ctrl-C then ended the run as interrupted: exit
    130, "continue with --resume", the serve stage unrecorded and no report. It now drains the
    server (as a SIGTERM to `crosschip serve` does) and the run finishes."""
    from crosschip.config import load_config, to_dict
    from crosschip.pipeline import STAGE_OUTPUTS, STAGES, _free_port

    run = tmp_path / "run"
    shutil.copytree(debug_bundle, run / "bundle")
    config = (ROOT / "configs" / "smoke.toml").read_text().replace('"ort:cpu"', '"torch:cpu"')
    (run / "config.toml").write_text(config)
    before_serve = STAGES[: STAGES.index("serve")]
    for stage in before_serve:  # what those stages left: the bundle, and their reports
        if not (run / STAGE_OUTPUTS[stage]).exists():
            (run / STAGE_OUTPUTS[stage]).parent.mkdir(parents=True, exist_ok=True)
            (run / STAGE_OUTPUTS[stage]).write_text("{}")
    values = to_dict(load_config(run / "config.toml"))
    (run / "run_state.json").write_text(json.dumps({"finished": before_serve, "config_values": values}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "crosschip", "run", "--resume", str(run), "--serve", "--port", str(_free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        url = re.search(r"on (http://\S+/v1);", lines[-1])
        assert url, "".join(lines)
        proc.send_signal(signal.SIGINT)
        out = "".join(lines) + proc.stdout.read()
        assert proc.wait(timeout=60) == 0, out
    finally:
        proc.kill()
    assert "the server stopped (exit 0)" in out and "interrupted" not in out, out
    assert _state(run)["finished"] == STAGES
    assert (run / "report.html").exists() and json.loads((run / "serve.json").read_text())["requests"] == 16
    import httpx

    with pytest.raises(httpx.ConnectError):  # the server is gone with the run
        httpx.get(url.group(1) + "/models", timeout=5)
