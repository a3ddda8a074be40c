"""The health guard against planted faults: detection, rollback, bounded loss, give-up with exit 3.

Each run is a real `crosschip train` process with `--inject`; the hang is a real blocked step
that only the watchdog thread can end.
"""

from __future__ import annotations

import json
import signal

from train_helpers import events, losses, start_train, train, wait_for_first_step, write_config

CKPT_EVERY = 5


def test_nan_spike_and_hang_are_detected_and_rolled_back(tmp_path):
    # With batches drawn ahead on a thread (as on an accelerator): a rollback must drop the
    # batch drawn ahead and never hand out the skipped one.
    cfg = write_config(tmp_path, steps=20, ckpt_every=CKPT_EVERY, hang_timeout_s=4.0, prefetch=True)
    run = tmp_path / "run"
    proc = train(cfg, run, "--inject", "nan@step=7", "--inject", "spike@step=13", "--inject", "hang@step=17")
    assert proc.returncode == 0, proc.stderr

    (nan,) = [e for e in events(run, "nan") if e["step"] == 7]
    (spike,) = [e for e in events(run, "spike") if e["step"] == 13]
    assert spike["factor"] > 3
    (hang,) = [e for e in events(run, "hang") if e["step"] == 17]
    assert 4.0 <= hang["elapsed_s"] < 4.0 + 2.0, "the watchdog fires within its timeout (plus one poll)"

    rollbacks = {r["from_step"]: r for r in events(run, "rollback")}
    for step, reason in ((7, "nan"), (13, "spike"), (17, "hang")):
        r = rollbacks[step]
        assert r["reason"] == reason
        assert r["to_step"] == (step - 1) // CKPT_EVERY * CKPT_EVERY  # the newest checkpoint before it
        assert 0 <= r["lost_steps"] < CKPT_EVERY  # at most one checkpoint interval lost
    assert rollbacks[7]["skipped_batches"] == [nan["batch"]]  # the offending batch is never retried

    got = losses(run)
    assert sorted(got) == list(range(1, 21)) and all(v == v and v < 10 for v in got.values())
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 20 and summary["rollbacks"] >= 3


def test_faults_that_could_never_fire_are_refused_before_the_run_starts(tmp_path):
    """A spike inside the health guard's 10-step warm-up was trained on (exit 0, no rollback),
    and crash@save=99 on a run of 4 saves never fired: both passed for runs that survived them."""
    cfg = write_config(tmp_path, steps=6, ckpt_every=2)
    for spec, why in (
        ("spike@step=5", "the health guard judges spikes only after 10 good steps, so a spike at step 5 would"),
        ("crash@save=99", "the run saves 4 checkpoints (step 0, every 2 steps (train.ckpt_every) and step 6"),
    ):
        proc = train(cfg, tmp_path / "run", "--inject", spec)
        assert proc.returncode == 1 and proc.stderr.startswith(f"crosschip train: error: --inject {spec!r}: {why}")
        assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "run").exists(), proc.stderr


def test_repeated_failure_past_the_cap_gives_up_with_exit_code_3(tmp_path):
    cfg = write_config(tmp_path, steps=10, ckpt_every=CKPT_EVERY, max_rollbacks=2)
    run = tmp_path / "run"
    proc = train(cfg, run, "--inject", "nan@step=7,times=99")
    assert proc.returncode == 3, proc.stderr
    assert "health guard gave up" in proc.stderr and "Traceback" not in proc.stderr
    assert [r["attempt"] for r in events(run, "rollback")] == [1, 2]
    (give_up,) = events(run, "give_up")
    assert give_up["step"] == 7 and "2 rollbacks" in give_up["reason"]
    assert json.loads((run / "train_summary.json").read_text())["status"] == "gave_up"


def test_emulated_flaky_chip_trains_through_its_faults(tmp_path):
    """emu:flaky plants nan@p=0.05 and slow@p=0.2; the run still finishes, with events logged."""
    cfg = write_config(tmp_path, steps=30, ckpt_every=CKPT_EVERY)
    run = tmp_path / "run"
    proc = train(cfg, run, "--backend", "emu:flaky")
    assert proc.returncode in (0, 3), proc.stderr
    assert events(run, "start")[0]["backend"]["emulation"]
    if proc.returncode == 0:
        assert sorted(losses(run)) == list(range(1, 31))
    assert events(run, "nan") or events(run, "straggler"), "the flaky chip's faults show up in the log"


def test_planted_slow_steps_are_reported_as_stragglers(tmp_path):
    """slow@p=0.25: each planted step (logged as an `inject` event) past the guard's 10-step
    warm-up shows up as a straggler, with its factor over the running median."""
    cfg = write_config(tmp_path, steps=20, ckpt_every=10)
    run = tmp_path / "run"
    proc = train(cfg, run, "--inject", "slow@p=0.25")  # seed 0 plants steps 7, 16 and 18
    assert proc.returncode == 0, proc.stderr
    planted = {e["step"] for e in events(run, "inject") if e["faults"] == ["slow"]}
    judged = {s for s in planted if s > 10}
    assert judged, f"no slow step planted past the warm-up: {sorted(planted)}"
    stragglers = {e["step"]: e for e in events(run, "straggler")}
    assert judged <= set(stragglers), (sorted(judged), sorted(stragglers))
    assert all(stragglers[s]["factor"] > 5.0 for s in judged)  # straggler_factor's default
    assert sorted(losses(run)) == list(range(1, 21))  # logged, not rolled back


def test_a_fatal_signal_in_training_prints_the_python_stack(tmp_path):
    """A segfault in a kernel or a collective says where it happened, in each worker of a
    torchrun group too (torchrun's own report says only "Signal 11")."""
    run = tmp_path / "run"
    proc = start_train(write_config(tmp_path, steps=10_000), run)
    wait_for_first_step(proc, run)
    proc.send_signal(signal.SIGSEGV)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGSEGV, err
    assert "Fatal Python error: Segmentation fault" in err and "crosschip/train/trainer.py" in err, err
