"""The run report's figures from what the stages wrote."""

from __future__ import annotations

from crosschip.report import _health_detail, kept_steps, render_html, summary_lines


def _steps(*numbers: int) -> list[dict]:
    return [{"event": "step", "step": n, "loss": 1.0 / n} for n in numbers]


def test_a_rollback_counts_each_step_once_and_its_row_says_what_it_did():
    """A NaN at step 38 rolled back to 30: the run logged 47 step records for 40 steps, and
    the summary said "47 logged steps"; the health table showed the rollback with no step."""
    steps = _steps(*range(1, 38), *range(31, 41))
    assert len(steps) == 47 and [s["step"] for s in kept_steps(steps)] == list(range(1, 41))
    assert kept_steps(steps)[30] is steps[37]  # step 31 as trained the second time
    data = {
        "run": "r",
        "roles": None,
        "qualify": None,
        "train": {
            "summary": {"step": 40, "lost_steps": 7},
            "steps": steps,
            "evals": [{"step": 40, "accuracy": 0.5}],
        },
        "verify": None,
        "serve": None,
    }
    assert (
        "training: 40 steps (7 lost to rollbacks or restarts and trained again), held-out accuracy 50.0%"
        in summary_lines(data)
    )
    rollback = {"event": "rollback", "from_step": 38, "to_step": 30, "reason": "nan", "lost_steps": 7}
    assert _health_detail({**rollback, "skipped_batches": [37]}) == (
        "nan: back to step 30, 7 steps lost, batches [37] skipped"
    )


def test_an_emulated_trainer_is_named_as_one():
    data = {
        "run": "r",
        "state": {},
        "roles": {"train": ["emu:flaky", "torch:cpu"], "serve": "ort:cpu"},
        "qualify": None,
        "train": {"summary": None, "steps": [], "evals": [], "health": []},
        "verify": None,
        "serve": {"url": "http://127.0.0.1:1/v1"},
    }
    assert "roles: train on emu:flaky (emulated) then torch:cpu, serve on ort:cpu" in summary_lines(data)
    # With failover, the backend that trained is named (the summary named the first tried).
    trained = {**data, "train": {**data["train"], "summary": {"backend": {"backend": "torch:cpu"}}}}
    assert "roles: trained on torch:cpu (after emu:flaky (emulated) failed), serve on ort:cpu" in summary_lines(trained)
    # A corpus run's smoke has no answers to score: its line gives no accuracy.
    served = {**data, "serve": {"backend": "ort:cpu", "requests": 16, "accuracy": None, "ttft_ms_median": 4.0}}
    assert "serving on ort:cpu: 16 requests, TTFT median 4.0 ms" in summary_lines(served)
    page = render_html(data)
    assert "emu:flaky (emulated), torch:cpu" in page and "url (smoke run, stopped since)" in page
    # No health event is said, not an empty table (checkpoints filled it before, hiding that).
    assert "no rollback, fault, hang or straggler in the training log" in page


def test_missing_and_damaged_stage_outputs_are_named_not_a_traceback(tmp_path):
    """A null where a number was (verify's kl_max), a JSON list where an object was, a truncated
    file: the report and the run's summary ended in a traceback, and stages that had not run, or
    whose output was gone, were left out without a word."""
    import json

    from crosschip.report import collect, write_report

    def write(rel: str, value) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(value if isinstance(value, str) else json.dumps(value))

    write("run_state.json", {"finished": ["probe", "qualify", "assign", "train", "export", "verify"]})
    write("roles.json", {"train": ["torch:cpu"], "serve": "ort:cpu"})
    write("qualify.json", "[1, 2]")
    write("train/train_summary.json", {"status": "done", "step": 4, "backend": {"backend": "torch:cpu"}})
    steps = [{"event": "step", "step": 4, "loss": 0.5}, {"event": "checkpoint", "step": 4}]
    write(
        "train/metrics.jsonl",
        "\n".join(json.dumps(r) for r in [*steps, {"event": "eval", "step": 4, "accuracy": None}]),
    )
    write("verify/report.json", {"gate": {"precision": "fp32", "passed": True}, "metrics": {"kl_max": None}})
    write_report(tmp_path)
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert "roles: trained on torch:cpu, serve on ort:cpu" in lines
    assert "qualify.json: holds a JSON list, not an object" in lines
    assert any(
        line.startswith("train/metrics.jsonl or train_summary.json: a damaged value (TypeError") for line in lines
    )
    assert any(line.startswith("verify/report.json: a damaged value (TypeError") for line in lines), lines
    assert "serve: not run" in lines
    page = (tmp_path / "report.html").read_text()
    assert "serve: not run" in page and "qualify.json: holds a JSON list, not an object" in page
    assert collect(tmp_path)["train"]["health"] == []  # a checkpoint is the training's course, not its health
    write("verify/report.json", '{"gate": {"precis')
    (tmp_path / "serve.json").unlink(missing_ok=True)
    write("run_state.json", {"finished": ["probe", "qualify", "assign", "train", "export", "verify", "serve"]})
    write_report(tmp_path)
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert any(line.startswith("verify/report.json: unreadable (") for line in lines), lines
    assert "serve.json: missing, though the serve stage finished" in lines
