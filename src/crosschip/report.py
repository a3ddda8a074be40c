"""The run report: `report.json` for machines, `summary.txt` for terminals, `report.html` for people.

The HTML page is one self-contained file: the plots are matplotlib PNGs embedded as data
URIs, so it can be mailed or archived as is. Every section reads the JSON its stage wrote
and says plainly when that stage has not run yet.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from crosschip.train.metrics import kept_steps  # noqa: E402

# What each stage leaves, in the order of the run: a section that has none says whether the
# stage has not run yet or its output is gone.
OUTPUTS = {
    "probe": "probe.json",
    "qualify": "qualify.json",
    "roles": "roles.json",
    "train": "train/train_summary.json",
    "bundle": "bundle/crosschip.json",
    "verify": "verify/report.json",
    "serve": "serve.json",
}
STAGE_OF = {"roles": "assign", "bundle": "export"}


def _load(root: Path, name: str, problems: list[str]) -> dict | None:
    """The JSON object of the output `name` (a key of OUTPUTS), or None: missing, or unreadable
    or not an object, which `problems` then names."""
    path = root / OUTPUTS[name]
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        problems.append(f"{OUTPUTS[name]}: unreadable ({' '.join(str(e).split())[:120]})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{OUTPUTS[name]}: holds a JSON {type(value).__name__}, not an object")
        return None
    return value


def _jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash; the rest is still good
            if isinstance(row, dict):
                rows.append(row)
    except OSError:
        pass
    return rows


# Events of metrics.jsonl that are the training's course, not its health.
_COURSE = ("step", "eval", "start", "end", "checkpoint")


def collect(root: Path) -> dict[str, Any]:
    """Everything the stages wrote, in one dict (the body of report.json); `problems` names the
    outputs that could not be read."""
    problems: list[str] = []
    metrics = _jsonl(root / "train" / "metrics.jsonl")
    state = _load_state(root / "run_state.json")
    out = {name: _load(root, name, problems) for name in OUTPUTS}
    return {
        "run": str(root),
        "state": state,
        "probe": out["probe"],
        "qualify": out["qualify"],
        "roles": out["roles"],
        "train": {
            "summary": out["train"],
            "steps": [m for m in metrics if m.get("event") == "step"],
            "evals": [m for m in metrics if m.get("event") == "eval"],
            "health": [m for m in metrics if m.get("event") not in _COURSE],
        },
        "bundle": out["bundle"],
        "verify": out["verify"],
        "serve": out["serve"],
        "problems": problems,
    }


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _absent(data: dict[str, Any], name: str) -> str:
    """What to say for a stage output that is not there: damaged, gone, or not yet made."""
    file = OUTPUTS[name]
    for problem in data.get("problems") or []:
        if problem.startswith(file + ":"):
            return problem
    stage = STAGE_OF.get(name, name)
    if stage in ((data.get("state") or {}).get("finished") or []):
        return f"{file}: missing, though the {stage} stage finished"
    return f"{stage}: not run"


def _guarded(what: str, render: Any, fallback: Any) -> Any:
    """`render()`, or where a stage output holds a value of the wrong kind (a hand edit, a
    null where a number was), `fallback(reason)`: one line naming it, not a traceback."""
    try:
        return render()
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        return fallback(f"{what}: a damaged value ({type(e).__name__}: {' '.join(str(e).split())[:120]})")


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_loss(steps: list[dict], reached: int | None) -> str | None:
    steps = kept_steps(steps, reached)
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_accuracy(evals: list[dict]) -> str | None:
    if not evals:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot([e["step"] for e in evals], [100 * e["accuracy"] for e in evals], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out exact-answer accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    return _png(fig)


def _layer_rows(verify: dict | None) -> list[dict]:
    if not verify:
        return []
    return (verify.get("bisect") or {}).get("table") or []


def plot_layers(rows: list[dict]) -> str | None:
    if not rows:
        return None
    names = [r.get("label", r.get("key", "?")) for r in rows]
    errs = [float(r.get("max_abs", 0.0)) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.22 * len(rows))))
    ax.barh(range(len(rows)), errs)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    if max(errs) > 0:
        ax.set_xscale("log", nonpositive="clip")  # an exact 0 shows as no bar, not as a made-up 1e-12
    else:
        ax.set_xlim(0, 1)
        ax.set_title("every module output identical (max abs error 0)", fontsize=9)
    ax.set_xlabel("max abs error vs reference (per module output)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _table(table_id: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "; ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _figure(fig_id: str, png: str | None, caption: str) -> str:
    if png is None:
        return f'<p class="missing" id="{fig_id}-missing">{html.escape(caption)}: no data yet.</p>'
    return (
        f'<figure id="{fig_id}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _qualify_rows(qualify: dict | None, state: dict) -> list[list[Any]]:
    skipped = (state.get("stages") or {}).get("qualify", {}).get("skipped")
    if skipped:
        return [["(all)", "", "not run", None, [skipped]]]
    rows = []
    for spec, v in (qualify or {}).items():
        m = v.get("measurements", {})
        rows.append(
            [spec, v.get("emulation") or "", v.get("verdict"), m.get("train_tokens_per_s"), v.get("reasons", [])]
        )
    return rows


def _parity_rows(verify: dict | None) -> list[list[Any]]:
    if not verify:
        return []
    rows = [[k, v] for k, v in verify.get("metrics", {}).items() if isinstance(v, (int, float, str, bool))]
    for check in verify.get("gate", {}).get("checks", []):
        rows.append([f"gate: {check['name']} {check['op']} {check['threshold']}", "ok" if check["ok"] else "FAILED"])
    return rows


def _serve_rows(serve: dict | None) -> list[list[Any]]:
    # The smoke run's server is stopped once it has answered: its URL is a record, not a link.
    names = {"url": "url (smoke run, stopped since)"}
    return [[names.get(k, k), v] for k, v in (serve or {}).items() if isinstance(v, (int, float, str, bool))]


def _backend(spec: str | None) -> str:
    """A backend as the report names it: an emulated chip says so wherever it appears."""
    return f"{spec} (emulated)" if spec and spec.startswith("emu:") else str(spec)


def render_html(data: dict[str, Any]) -> str:
    train = data["train"]
    roles = data["roles"] or {}
    stages = ((data.get("state") or {}).get("stages") or {}).items()

    def section(title: str, name: str | None, render: Any) -> str:
        """A titled section; it names its stage output where that is missing or damaged."""
        absent = f'<p class="missing">{html.escape(_absent(data, name))}</p>' if name and data[name] is None else ""
        body = _guarded(title, render, lambda why: f'<p class="missing">{html.escape(why)}</p>')
        return f"<h2>{html.escape(title)}</h2>{absent}{body}"

    sections = [
        f"<h1>crosschip run</h1><p>{html.escape(data['run'])}</p>",
        "".join(f'<p class="missing">{html.escape(p)}</p>' for p in data.get("problems") or []),
        section(
            "Stages",
            None,
            lambda: _table("table-stages", ["stage", "seconds"], [[k, v.get("seconds")] for k, v in stages]),
        ),
        section(
            "Roles",
            "roles",
            lambda: _table(
                "table-roles",
                ["role", "backend"],
                [["train", ", ".join(map(_backend, roles.get("train", [])))], ["serve", _backend(roles.get("serve"))]],
            ),
        ),
        section(
            "Qualification",
            None,
            lambda: _table(
                "table-qualify",
                ["backend", "emulation", "verdict", "train tokens/s", "reasons"],
                _qualify_rows(data["qualify"], data.get("state") or {}),
            ),
        ),
        section(
            "Training",
            None,
            lambda: "".join(
                [
                    ""
                    if train["summary"] is not None
                    else f'<p class="missing">{html.escape(_absent(data, "train"))}</p>',
                    _figure(
                        "fig-loss", plot_loss(train["steps"], (train["summary"] or {}).get("step")), "Training loss"
                    ),
                    _figure("fig-accuracy", plot_accuracy(train["evals"]), "Held-out accuracy vs steps"),
                    _table(
                        "table-health",
                        ["event", "step", "detail"],
                        [
                            [h.get("event"), h.get("step", h.get("from_step")), _health_detail(h)]
                            for h in train["health"]
                        ]
                        # Said, not an empty table: checkpoints were listed here, which hid it.
                        or [["(none)", None, "no rollback, fault, hang or straggler in the training log"]],
                    ),
                ]
            ),
        ),
        section(
            "Parity",
            "verify",
            lambda: (
                _table("table-parity", ["metric", "value"], _parity_rows(data["verify"]))
                + _figure(
                    "fig-layers",
                    plot_layers(_layer_rows(data["verify"])),
                    "Per-layer error: the target's weights against the reference's, module by module (computed in torch)",
                )
            ),
        ),
        section("Serving", "serve", lambda: _table("table-serve", ["figure", "value"], _serve_rows(data["serve"]))),
    ]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
        "font-size:.9rem;text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}"
        ".missing{color:#a00}"
    )
    # After load, mark each plot with its decoded size, so a headless browser test can see it rendered.
    script = (
        "window.addEventListener('load',()=>{for(const i of document.images){"
        "i.setAttribute('data-rendered',i.complete&&i.naturalWidth>0?'yes':'no')}})"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>crosschip run report</title>"
        f"<style>{style}</style><script>{script}</script></head><body>{''.join(sections)}</body></html>"
    )


def _health_detail(event: dict) -> str:
    if event.get("event") == "rollback":
        return (
            f"{event.get('reason')}: back to step {event.get('to_step')}, {event.get('lost_steps')} steps lost, "
            f"batches {event.get('skipped_batches')} skipped"
        )
    return str(event.get("reason") or event.get("detail") or "")


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The run in a few lines; each part says when its stage has not run or its output is
    missing or damaged."""
    lines = [f"run folder: {data['run']}"]
    for name, part in (
        ("roles", _roles_lines),
        ("qualify", _qualify_lines),
        ("train", _train_lines),
        ("verify", _parity_lines),
        ("serve", _serve_lines),
    ):
        present = data["train"]["summary"] or data["train"]["evals"] if name == "train" else data[name]
        if not present:
            # Qualify is skipped when the roles are given (--train-on): only a damaged file is news.
            if name != "qualify" or OUTPUTS[name] in " ".join(data.get("problems") or []):
                lines.append(_absent(data, name))
            continue
        what = "train/metrics.jsonl or train_summary.json" if name == "train" else OUTPUTS[name]
        lines += _guarded(what, lambda part=part: part(data), lambda why: [why])
    said = " ".join(lines)
    return lines + [p for p in data.get("problems") or [] if p not in said]


def _roles_lines(data: dict[str, Any]) -> list[str]:
    roles = data["roles"]
    order = list(roles.get("train") or [])
    # With failover the backends are tried left to right: name the one that trained.
    trained = ((data["train"]["summary"] or {}).get("backend") or {}).get("backend")
    if trained:
        before = order[: order.index(trained)] if trained in order else []
        train = f"trained on {_backend(trained)}" + (
            f" (after {', '.join(map(_backend, before))} failed)" if before else ""
        )
    else:
        train = "train on " + " then ".join(map(_backend, order))
    return [f"roles: {train}, serve on {_backend(roles.get('serve'))}"]


def _qualify_lines(data: dict[str, Any]) -> list[str]:
    return [f"  {spec}: {v.get('verdict')}" for spec, v in (data["qualify"] or {}).items()]


def _train_lines(data: dict[str, Any]) -> list[str]:
    summary = data["train"]["summary"] or {}
    evals = data["train"]["evals"]
    lines = []
    if evals:
        trained = summary.get("step") or len(kept_steps(data["train"]["steps"]))
        lost = (
            f" ({summary['lost_steps']} lost to rollbacks or restarts and trained again)"
            if summary.get("lost_steps")
            else ""
        )
        lines.append(f"training: {trained} steps{lost}, held-out accuracy {100 * evals[-1]['accuracy']:.1f}%")
    else:  # a corpus run: no held-out problems to score
        loss = summary.get("final_loss")
        tail = f", final loss {loss:.4f}" if loss is not None else ""
        lines.append(f"training: {summary.get('status')} at step {summary.get('step')}{tail}")
    if summary.get("reason"):  # why it ended where it did: the time budget, a give-up
        lines.append(f"  {summary['reason']}")
    return lines


def _parity_lines(data: dict[str, Any]) -> list[str]:
    gate, m = data["verify"]["gate"], data["verify"]["metrics"]
    return [
        f"parity gate ({gate['precision']}): {'PASSED' if gate['passed'] else 'FAILED'}; "
        f"KL max {m['kl_max']:.2e}, top-1 {100 * m['top1']:.2f}%, greedy identical {100 * m['greedy_identical']:.0f}%"
    ]


def _serve_lines(data: dict[str, Any]) -> list[str]:
    serve = data["serve"]
    accuracy = serve.get("accuracy")  # None for a corpus run: free text has no answer to score
    scored = f"accuracy {100 * accuracy:.1f}% over " if accuracy is not None else ""
    return [
        f"serving on {serve['backend']}: {scored}{serve['requests']} requests, "
        f"TTFT median {serve['ttft_ms_median']:.1f} ms"
    ]


def write_report(root: Path) -> Path:
    """Write report.json, summary.txt and report.html into the run folder; return the HTML path."""
    root = Path(root)
    data = collect(root)
    (root / "report.json").write_text(json.dumps(data, indent=2, default=str))
    (root / "summary.txt").write_text("\n".join(summary_lines(data)) + "\n")
    path = root / "report.html"
    path.write_text(render_html(data), encoding="utf-8")
    return path


def print_summary(root: Path, wall_s: float, stages_s: float | None = None) -> None:
    """The run's closing lines; `stages_s`, for a resumed run: the seconds of all its stages."""
    data = collect(Path(root))
    wall = f"wall time: {wall_s:.0f} s"
    if stages_s is not None:
        wall += f" (this resume; the run's stages took {stages_s:.0f} s in all)"
    print("\n".join(["", "crosschip run finished", *summary_lines(data), wall]))
    print(f"report: {Path(root) / 'report.html'}")
