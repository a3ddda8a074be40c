"""Resume is exact, survives SIGKILL (also mid-save), and skips corrupt checkpoints.

Every run is a real `crosschip train` process on the `debug` model; kills are real SIGKILLs.
"""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest

from crosschip import hf
from crosschip.train.checkpoint import latest_verified
from train_helpers import events, losses, start_train, train, wait_for_first_step, write_config

# One pytest-xdist worker for the module, so that the `reference` run is trained once.
pytestmark = pytest.mark.xdist_group("train_resume")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """12 uninterrupted steps, checkpoints every 4."""
    root = tmp_path_factory.mktemp("ref")
    cfg = write_config(root)
    proc = train(cfg, root / "run")
    assert proc.returncode == 0, proc.stderr
    return cfg, root / "run"


def test_reference_run_writes_every_output(reference):
    _, run = reference
    assert (run / "loss.png").stat().st_size > 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 12
    step = events(run, "step")[0]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "expert_load"} <= set(step)
    assert len(step["expert_load"]) == 1 and len(step["expert_load"][0]) == 8  # one MoE layer, 8 experts
    newest = latest_verified(run / "checkpoints")
    assert newest.name == "step_00000012"
    # The task it learned, for the bundles exported from it (`crosschip verify` scores that task).
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["task"] == {"task": "arith", "digits": 2, "ops": ["+", "-"]}


def test_kill_then_resume_is_bit_identical(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "run"
    killed = train(cfg, run, "--inject", "crash@step=7")
    assert killed.returncode == -9
    assert max(losses(run)) == 6
    # Lines that are not events (added by hand) are skipped: an AttributeError ended the resume.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('[1, 2]\n{"note": "mine"}\n')
    resumed = train(cfg, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    (resume,) = events(run, "resume")
    assert resume["step"] == 4 and resume["lost_steps"] == 2  # at most one checkpoint interval
    assert losses(run) == losses(ref), "2N steps and N steps + resume must give bit-identical losses"


def test_the_summary_counts_the_steps_lost_before_a_restart_too(reference, tmp_path):
    """The summary counted only the steps its own process lost: a rollback before a crash was
    forgotten by the resumed process."""
    cfg, _ = reference
    run = tmp_path / "run"
    killed = train(cfg, run, "--inject", "nan@step=6", "--inject", "crash@step=10")
    assert killed.returncode == -9
    assert train(cfg, run, "--resume").returncode == 0
    (rollback,) = events(run, "rollback")
    (resume,) = events(run, "resume")
    assert (rollback["lost_steps"], resume["lost_steps"]) == (1, 1)  # step 5, then step 9
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 12 and summary["lost_steps"] == 2


def test_kill_during_checkpoint_save_resumes_from_the_previous_one(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "run"
    # saves: 1st = step 0, 2nd = step 4, 3rd = step 8 (killed before its rename)
    killed = train(cfg, run, "--inject", "crash@save=3")
    assert killed.returncode == -9
    assert latest_verified(run / "checkpoints").name == "step_00000004"
    resumed = train(cfg, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert events(run, "resume")[0]["step"] == 4
    assert events(run, "resume")[0]["lost_steps"] == 4
    assert losses(run) == losses(ref)


def test_a_save_fault_is_logged_and_a_resume_does_not_plant_it_again(reference, tmp_path):
    """crash@save=N logged no `inject` event and was planted again in every resumed process:
    `--resume` with the same command crashed at each one's N-th save. N is the run's N-th save."""
    cfg, ref = reference
    run = tmp_path / "run"
    fault = ("--inject", "crash@save=2")  # step 4's save; the resume from step 0 saves step 4 again
    assert train(cfg, run, *fault).returncode == -9
    (inject,) = events(run, "inject")
    assert (inject["step"], inject["save"], inject["faults"]) == (4, 2, ["crash"])
    resumed = train(cfg, run, "--resume", *fault)
    assert resumed.returncode == 0, resumed.stderr
    assert len(events(run, "inject")) == 1 and events(run, "resume")[0]["step"] == 0
    assert losses(run) == losses(ref)
    # Faults this run can no longer fire are refused, before anything is logged.
    for spec, why in (
        ("nan@step=12", "the run resumes from step 12, past step 12, so it would never fire"),
        ("crash@save=5", "the run has made 5 checkpoint saves and this resume makes 1 more, so it would never fire"),
    ):
        refused = train(cfg, run, "--resume", "--steps", "14", "--inject", spec)
        assert refused.returncode == 1 and refused.stderr.splitlines() == [
            f"crosschip train: error: --inject {spec!r}: {why}"
        ], refused.stderr
    assert len(events(run, "resume")) == 1


def test_a_checkpoint_the_disk_refuses_is_one_line_and_the_previous_one_resumes(reference, tmp_path):
    """A write that fails (here a file-size limit, as a full disk or a quota fails one) was
    safetensors' SafetensorError and a traceback. Step 0's checkpoint fits under 1 MB; step
    4's optimizer state does not."""
    cfg, ref = reference
    run = tmp_path / "run"
    refused = train(cfg, run, file_size_limit=1_000_000)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"crosschip train: error: cannot write checkpoint step_00000004 in {run / 'checkpoints'}: File too large; "
        "the newest checkpoint, step_00000000, is intact: continue from it with --resume once the folder takes writes"
    )
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000000"]  # nothing half-written
    resumed = train(cfg, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(ref)


def test_corrupt_checkpoint_is_reported_and_the_previous_one_used(reference, tmp_path):
    """Also with the batches drawn ahead on a thread (`data.prefetch`, on by default on
    accelerators): the same losses as the reference, and a checkpoint's cursor is the last
    batch handed out, so the resume continues them bit-identically."""
    _, ref = reference
    cfg = write_config(tmp_path, prefetch=True)
    run = tmp_path / "run"
    assert train(cfg, run).returncode == 0
    weights = run / "checkpoints" / "step_00000012" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(100, 110):
        data[-i] ^= 0x5A
    weights.write_bytes(bytes(data))
    resumed = train(cfg, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping corrupt checkpoint" in resumed.stderr and "step_00000012" in resumed.stderr
    (bad,) = events(run, "corrupt_checkpoint")
    assert bad["checkpoint"].endswith("step_00000012") and "checksum" in bad["reason"]
    assert events(run, "resume")[0]["step"] == 8
    assert losses(run) == losses(ref)


def test_a_resume_with_a_changed_config_says_what_changed_and_logs_it(reference, tmp_path):
    """transformers' Trainer warns when resumed arguments differ; a changed lr or data seed
    used to be taken silently, and metrics.jsonl kept only the first config."""
    cfg, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    changed = tmp_path / "changed.toml"
    changed.write_text(
        cfg.read_text().replace("[train]", "[train]\nlr = 0.01", 1).replace("[data]", "[data]\nseed = 7", 1)
    )
    resumed = train(changed, run, "--resume", "--steps", "14")
    assert resumed.returncode == 0, resumed.stderr
    (warning,) = [line for line in resumed.stderr.splitlines() if "warning" in line]
    assert "data.seed 0 -> 7" in warning and "train.lr" in warning and "train.steps" not in warning
    (resume,) = events(run, "resume")
    assert resume["config"]["train"]["lr"] == 0.01 and resume["config"]["train"]["steps"] == 14
    assert any(c.startswith("train.steps 12 -> 14") for c in resume["changed"])
    again = train(changed, run, "--resume", "--steps", "14")  # the changed config is now the run's
    assert again.returncode == 0 and "warning" not in again.stderr
    assert "already at step 14 of 14: nothing to train" in again.stderr


@pytest.mark.parametrize("damage", ["state", "weights"])
def test_a_checkpoint_that_matches_its_manifest_but_cannot_be_read_is_one_clear_error(reference, tmp_path, damage):
    """A file replaced along with its checksum (or written by another version) used to end the
    resume in a KeyError or SafetensorError traceback."""
    cfg, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    newest = run / "checkpoints" / "step_00000012"
    if damage == "state":
        (newest / "trainer_state.json").write_text("{}")
    else:
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    hf.write_manifest(newest, {})  # the checksums now match the damaged files
    resumed = train(cfg, run, "--resume", "--steps", "16")
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr, resumed.stderr
    assert f"checkpoint {newest} matches its manifest but cannot be read" in resumed.stderr


def test_sigterm_saves_the_step_reached_and_resume_is_bit_identical(tmp_path):
    """A preempted job gets SIGTERM: it finishes the step under way, saves it, and --resume
    continues from there with nothing lost and the losses of an uninterrupted run."""
    cfg = write_config(tmp_path, steps=30, ckpt_every=1000)
    ref = train(cfg, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = start_train(cfg, run)
    wait_for_first_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    reached = max(losses(run))
    assert reached < 30, "the run ended before the signal; nothing was tested"
    assert f"saved step {reached} before stopping" in err
    assert latest_verified(run / "checkpoints").name == f"step_{reached:08d}"
    resumed = train(cfg, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    (resume,) = events(run, "resume")
    assert resume["step"] == reached and resume["lost_steps"] == 0
    assert losses(run) == losses(tmp_path / "ref")


def test_a_second_signal_stops_a_hung_step_at_once_and_saves_nothing(tmp_path):
    """The first signal waits for the step to end; a step that hangs would keep it waiting
    until the watchdog fires (a minute here), so a second one stops the run inside the step,
    whose half-made state is not saved."""
    cfg = write_config(tmp_path, steps=30, ckpt_every=1000, hang_timeout_s=60)
    run = tmp_path / "run"
    proc = start_train(cfg, run, "--inject", "hang@step=3")
    wait_for_first_step(proc, run)
    while max(losses(run)) < 2:
        time.sleep(0.05)
    time.sleep(0.5)  # inside step 3, which sleeps until the watchdog fires
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None, "the first signal did not wait for the step"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.monotonic() - t0 < 20, err
    assert "saved step" not in err and "Traceback" not in err
    assert latest_verified(run / "checkpoints").name == "step_00000000"
