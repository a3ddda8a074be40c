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
    assert "roles: train on emu:flaky (emulated), serve on ort:cpu" in summary_lines(data)
    # A corpus run's smoke has no answers to score: its line gives no accuracy.
    served = {**data, "serve": {"backend": "ort:cpu", "requests": 16, "accuracy": None, "ttft_ms_median": 4.0}}
    assert "serving on ort:cpu: 16 requests, TTFT 4.0 ms" in summary_lines(served)
    page = render_html(data)
    assert "emu:flaky (emulated), torch:cpu" in page and "url (smoke run, stopped since)" in page
