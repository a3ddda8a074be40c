"""Several processes: a real `torchrun` with 2 CPU workers on gloo, FSDP2-sharded.

- 2 processes match 1 process with the same global batch;
- a checkpoint written by 2 processes resumes in 1 and continues the same losses;
- a checkpoint written by 1 process resumes in 2;
- a SIGTERM stops every worker after the same step, saved; so does one worker's time limit.
- under a time budget, every worker fits the schedule from one shared step time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosschip.pipeline import _free_port
from crosschip.train.checkpoint import latest_verified
from crosschip.train.distributed import Dist
from crosschip.train.launch import torchrun_log
from crosschip.train.trainer import Trainer
from train_helpers import (
    events,
    losses,
    processes_tagged,
    start_train,
    train,
    train_reporting_imports,
    wait_for_first_step,
    write_config,
)

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
    proc, imported = train_reporting_imports(cfg, run, "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    # The launcher only starts torchrun and relays it: no torch of its own (1.7 s before the
    # workers could start).
    assert imported == []
    assert events(run, "start")[0]["world"] == 2
    _close(losses(run), losses(one))
    # every worker ended its process group cleanly (barrier before destroy): no abort at exit
    assert "terminate called" not in proc.stderr
    assert json.loads((run / "train_summary.json").read_text())["world"] == 2


def test_two_nodes_meet_at_the_rendezvous_endpoint_without_node_ranks(one_proc, tmp_path):
    """The README's multi-node command, two "nodes" of one process each on loopback: no
    --node-rank, so the c10d rendezvous assigns the ranks (under torchrun's default, the static
    rendezvous, both nodes took rank 0 and the group never formed)."""
    cfg, one = one_proc
    run = tmp_path / "run"
    flags = ["--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "job"]
    nodes = [start_train(cfg, run, "--quiet", *flags, new_session=True) for _ in range(2)]
    try:
        outs = [node.communicate(timeout=180) for node in nodes]
    finally:  # a group that never forms waits for ever: stop each node's torchrun and workers too
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outs]
    assert events(run, "start")[0]["world"] == 2
    _close(losses(run), losses(one))


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


def test_a_hang_ends_the_group_and_its_restart_rolls_back_past_the_hung_batch(tmp_path):
    """Ranks blocked in a collective cannot roll back in place: the watchdog ends the group
    (exit 3), torchrun restarts it (--max-restarts), and the restart resumes from the newest
    checkpoint, skips the batch that hung and does not plant the hang again."""
    cfg = write_config(tmp_path, steps=10, ckpt_every=4, hang_timeout_s=4.0)
    run = tmp_path / "run"
    proc = train(cfg, run, "--nproc", "2", "--max-restarts", "1", "--inject", "hang@step=6")
    assert proc.returncode == 0, proc.stderr
    (hang,) = events(run, "hang")
    assert hang["step"] == 6 and 4.0 <= hang["elapsed_s"] < 4.0 + 2.0  # within the timeout, plus one poll
    (stuck,) = events(run, "give_up")
    assert stuck["step"] == 6 and stuck["batch"] == hang["batch"]
    (resume,) = events(run, "resume")
    assert resume["step"] == 4 and resume["world"] == 2
    (rollback,) = events(run, "rollback")
    assert (rollback["from_step"], rollback["to_step"], rollback["reason"]) == (6, 4, "hang")
    assert rollback["skipped_batches"] == [hang["batch"]] and rollback["lost_steps"] == 1
    assert [e["step"] for e in events(run, "inject")] == [6]  # planted once per run
    # The restart trains steps 5-10 on batches other than the one that hung.
    after = [e["batch"] for e in events(run, "step") if e["time"] > resume["time"]]
    assert len(after) == 6 and hang["batch"] not in after
    assert sorted(losses(run)) == list(range(1, 11))
    assert json.loads((run / "train_summary.json").read_text())["status"] == "done"


def test_a_hang_that_returns_after_each_restart_gives_up_at_the_rollback_cap(tmp_path):
    """Each restart skips the batch that hung, but the chip hangs at step 6 again: the hangs
    count against max_rollbacks across restarts, and past it the run gives up (exit 3) instead
    of using up torchrun's restarts."""
    cfg = write_config(tmp_path, steps=8, ckpt_every=4, hang_timeout_s=2.0, max_rollbacks=1)
    run = tmp_path / "run"
    proc = train(cfg, run, "--nproc", "2", "--max-restarts", "3", "--inject", "hang@step=6,times=99")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("health guard gave up") == 1 and "Traceback" not in proc.stderr, proc.stderr
    hangs = events(run, "hang")
    assert [h["step"] for h in hangs] == [6, 6] and hangs[0]["batch"] != hangs[1]["batch"]
    assert len(events(run, "resume")) == 2  # the second restart gives up before it trains
    assert [(r["from_step"], r["attempt"]) for r in events(run, "rollback")] == [(6, 1)]
    verdict = events(run, "give_up")[-1]
    assert (
        verdict["step"] == 6
        and "hang at step 6 (train.hang_timeout_s = 2) persisted through 1 rollbacks" in verdict["reason"]
    )
    assert json.loads((run / "train_summary.json").read_text())["status"] == "gave_up"


def test_a_worker_that_fails_is_one_line_and_the_fallout_goes_to_the_log(one_proc, tmp_path):
    """Rank 0 cannot write a checkpoint (a file-size limit, as a full disk): its one line, then
    one line naming the log. Rank 1's broken barrier and torchrun's ChildFailedError report were
    two tracebacks in the terminal; they are kept in the run folder's torchrun log."""
    cfg, _ = one_proc
    run = tmp_path / "run"
    proc = train(cfg, run, "--nproc", "2", file_size_limit=1_000_000)
    assert proc.returncode == 1
    log = torchrun_log(run)
    assert proc.stderr.splitlines() == [
        f"crosschip train: error: cannot write checkpoint step_00000004 in {run / 'checkpoints'}: File too large; "
        "the newest checkpoint, step_00000000, is intact: continue from it with --resume once the folder takes writes",
        f"crosschip train: the other processes stopped with it; torchrun's report: {log}",
    ]
    kept = log.read_text()
    assert "cannot write checkpoint step_00000004" in kept and "ChildFailedError" in kept


def test_a_group_whose_guard_gave_up_is_not_restarted(tmp_path):
    """Past the rollback cap every worker reaches the same verdict; torchrun must not restart
    the group (--max-restarts) to give up again. One report, exit 3, no resume."""
    cfg = write_config(tmp_path, steps=10, ckpt_every=4, max_rollbacks=1)
    run = tmp_path / "run"
    proc = train(cfg, run, "--nproc", "2", "--max-restarts", "2", "--inject", "nan@step=6,times=99")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("health guard gave up") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert events(run, "resume") == [] and len(events(run, "start")) == 1
    assert [e["step"] for e in events(run, "give_up")] == [6]
    assert json.loads((run / "train_summary.json").read_text())["status"] == "gave_up"


def test_sigterm_to_the_launcher_saves_the_step_all_workers_reached_and_stops_them(tmp_path):
    """SIGTERM to `crosschip train --nproc 2` alone (as Kubernetes or `docker stop` send it):
    torchrun forwards it, the workers agree on a step, save it together (a verified checkpoint,
    which resumes as test_two_process_checkpoint_resumes_on_one shows) and stop; the terminal
    gets two lines, not torchrun's own traceback."""
    tag = uuid.uuid4().hex
    cfg = write_config(tmp_path, steps=100000, ckpt_every=1000)
    run = tmp_path / "run"
    proc = start_train(cfg, run, "--nproc", "2", **{TAG: tag})
    wait_for_first_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err
    reached = max(losses(run))
    checkpoint = latest_verified(run / "checkpoints")
    assert checkpoint.name == f"step_{reached:08d}"
    assert [line for line in err.splitlines() if line.strip()] == [
        f"crosschip train: saved step {reached} before stopping: {checkpoint}",
        "crosschip train: interrupted (SIGTERM)",
    ], err
    assert not processes_tagged(TAG, tag), "left running after the launcher stopped"
    (stopped,) = events(run, "stopped")
    assert stopped["step"] == reached


def test_ctrl_c_in_a_terminal_saves_the_step_and_says_so_once(tmp_path):
    """A terminal's Ctrl-C reaches the launcher, torchrun and both workers at once (one process
    group), and torchrun sends its own SIGINT on: still one save and our two lines. (torchrun
    logs a few warnings of its own before the launcher hears of it; no traceback.)"""
    tag = uuid.uuid4().hex
    cfg = write_config(tmp_path, steps=100000, ckpt_every=1000)
    run = tmp_path / "run"
    proc = start_train(cfg, run, "--nproc", "2", new_session=True, **{TAG: tag})
    wait_for_first_step(proc, run)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    reached = max(losses(run))
    assert [line for line in err.splitlines() if line.startswith("crosschip")] == [
        f"crosschip train: saved step {reached} before stopping: {latest_verified(run / 'checkpoints')}",
        "crosschip train: interrupted",
    ], err
    assert "Traceback" not in err
    assert not processes_tagged(TAG, tag), "left running after the launcher stopped"


def _agree_on_two_ranks(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rank_view = SimpleNamespace(dist=Dist(rank=rank, world=2), device=torch.device("cpu"))
    # A signal that reached rank 1 alone; a time limit that rank 0 alone has passed (ranks keep
    # their own clocks); neither.
    seen = [Trainer._agree(rank_view, rank == 1, False), Trainer._agree(rank_view, False, rank == 0)]
    seen.append(Trainer._agree(rank_view, False, False))
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_ranks_agree_to_stop_when_any_of_them_must(tmp_path):
    """Each condition that ends the loop on one rank ends it on all, after the same step: one
    that went on would wait in a collective for a peer that had left."""
    mp.spawn(_agree_on_two_ranks, args=(_free_port(), tmp_path), nprocs=2)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == [[True, False], [False, True], [False, False]], rank


def _fit_on_two_ranks(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fits = []
    rank_view = SimpleNamespace(
        dist=Dist(rank=rank, world=2),
        device=torch.device("cpu"),
        # Each rank's own running median: rank 1 is three times slower (a straggler, or a
        # noisy neighbour on its host).
        guard=SimpleNamespace(median_step_time=lambda: (0.5, 1.5)[rank]),
        t=SimpleNamespace(max_minutes=1.0),
        step=20,
        train_time_s=10.0,
        _planned_steps=1000,
        total_steps=1000,
        log=SimpleNamespace(event=lambda name, **details: fits.append(details)),
        progress=SimpleNamespace(retotal=lambda steps: None, note=lambda text: None),
    )
    Trainer._fit_schedule(rank_view)
    (out / f"rank{rank}.json").write_text(json.dumps([rank_view.total_steps, fits[0]["step_time_s"]]))
    dist.destroy_process_group()


def test_ranks_fit_the_schedule_to_one_shared_step_time(tmp_path):
    """Under train.max_minutes, each rank fits the schedule from the mean of the ranks' median
    step times: from its own, ranks would end at different steps (here 117 and 52), and the
    one still training would wait in a collective for a peer that had left."""
    mp.spawn(_fit_on_two_ranks, args=(_free_port(), tmp_path), nprocs=2)
    # 1.0 s a step on both: step 20 + int(0.97 * (60 s - 10 s spent) / 1.0 s) = 68.
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[68, 1.0], [68, 1.0]]
