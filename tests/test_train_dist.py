"""Several processes: a real `torchrun` with 2 CPU workers on gloo, FSDP2-sharded.

- 2 processes match 1 process with the same global batch;
- a checkpoint written by 2 processes resumes in 1 and continues the same losses;
- a checkpoint written by 1 process resumes in 2.
"""

from __future__ import annotations

import json
import signal
import uuid

import pytest

from train_helpers import events, losses, processes_tagged, start_train, train, wait_for_first_step, write_config

# One pytest-xdist worker for the module, so that the `one_proc` run is trained once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_dist")]

BF16_RTOL = 1.6e-2
TAG = "CROSSCHIP_TEST_RUN"


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = write_config(root, steps=8, ckpt_every=4)
    proc = train(cfg, root / "one")
    assert proc.returncode == 0, proc.stderr
    return cfg, root / "one"


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=BF16_RTOL), f"step {step}"


def test_two_processes_match_one_with_the_same_global_batch(one_proc, tmp_path):
    cfg, one = one_proc
    run = tmp_path / "two"
    proc = train(cfg, run, "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert events(run, "start")[0]["world"] == 2
    _close(losses(run), losses(one))
    # every worker ended its process group cleanly (barrier before destroy): no abort at exit
    assert "terminate called" not in proc.stderr
    assert json.loads((run / "train_summary.json").read_text())["world"] == 2


def test_two_process_checkpoint_resumes_on_one(one_proc, tmp_path):
    cfg, one = one_proc
    run = tmp_path / "run"
    killed = train(cfg, run, "--nproc", "2", "--inject", "crash@step=6")
    assert killed.returncode != 0
    assert max(losses(run)) == 5
    resumed = train(cfg, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    (resume,) = events(run, "resume")
    assert resume["step"] == 4 and resume["world"] == 1
    _close(losses(run), losses(one))


def test_one_process_checkpoint_resumes_on_two(one_proc, tmp_path):
    cfg, one = one_proc
    run = tmp_path / "run"
    assert train(cfg, run, "--inject", "crash@step=6").returncode == -9
    resumed = train(cfg, run, "--resume", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert events(run, "resume")[0]["world"] == 2
    _close(losses(run), losses(one))


def test_sigterm_to_the_launcher_stops_torchrun_and_its_workers_in_one_line(tmp_path):
    """SIGTERM to `crosschip train --nproc 2` alone (as Kubernetes or `docker stop` send it):
    the workers stop with it, and the terminal gets one line, not torchrun's own traceback."""
    tag = uuid.uuid4().hex
    cfg = write_config(tmp_path, steps=100000, ckpt_every=1000)
    proc = start_train(cfg, tmp_path / "run", "--nproc", "2", **{TAG: tag})
    wait_for_first_step(proc, tmp_path / "run")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err
    assert err.strip() == "crosschip train: interrupted (SIGTERM)", err
    assert not processes_tagged(TAG, tag), "left running after the launcher stopped"
