"""The parity report as JSON (for machines) and text (for people), and its record in the bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crosschip.verify.bisect import render_table


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def _task(prompts: dict[str, Any]) -> str:
    """`, 3 digits, + -`: which problems the accuracy is over."""
    return f", {prompts['digits']} digit{'s' if prompts['digits'] > 1 else ''}, {' '.join(prompts['ops'])}"


def render_text(report: dict[str, Any]) -> str:
    m, g = report["metrics"], report["gate"]
    lines = [
        f"crosschip verify  {report['bundle']}",
        f"  reference  {report['reference']['spec']}  {report['reference'].get('weights', '')}",
        f"  target     {report['target']['spec']}  {report['target'].get('weights') or 'model ' + str(report['target'].get('model'))}",
        *(
            [f"             note: {report['target']['token_ids_note']}"]
            if report["target"].get("token_ids_note")
            else []
        ),
        f"  precision  {report['precision']['class']} (from {report['precision']['from']})",
        f"  prompts    {report['prompts']['scored']} scored texts ({m['positions']} positions), "
        f"{report['prompts']['greedy']} greedy prompts x {m['max_new_tokens']} tokens",
        "",
        f"  KL(ref||target)   mean {_fmt(m['kl_mean'])}   max {_fmt(m['kl_max'])}   over {m['kl_support']}"
        + (
            f"   (max at {at['kind']} text {at['prompt']}, position {at['position']})"
            if (at := m.get("kl_max_at"))
            else ""
        ),
        f"  top-1 agreement   {m['top1']:.2%}"
        + (f"   (on {m['top1_positions']} positions)" if m["top1_positions"] != m["positions"] else ""),
        f"  greedy            identical {m['greedy_identical']:.2%}   match length mean {m['match_length_mean']:.1f}"
        f"   min {m['match_length_min']}",
        f"  perplexity        corpus ref {_fmt(m['ppl_reference'])} / target {_fmt(m['ppl_target'])}"
        f"   arith ref {_fmt(m['ppl_arith_reference'])} / target {_fmt(m['ppl_arith_target'])}",
        (
            f"  task accuracy     ref {m['accuracy_reference']:.2%} / target {m['accuracy_target']:.2%}"
            f"   ({m['accuracy_problems']} held-out problems{_task(report['prompts'])})"
            if m["accuracy_problems"]
            else "  task accuracy     not scored: the model was trained on a corpus, which has no checker"
        ),
        f"  {m['tensor_on']:<17} cosine {m['cosine']:.8f}   max abs {_fmt(m['max_abs'])}   max rel {_fmt(m['max_rel'])}",
    ]
    if m.get("first_divergence"):
        d = m["first_divergence"]
        lines.append(
            f"  first divergence  prompt {d['prompt']} at token {d['at']}: ref {d['reference']!r} | target {d['target']!r}"
        )
    lines.append("")
    lines.append(f"  gate ({g['precision']}): {'PASS' if g['passed'] else 'FAIL'}")
    for c in g["checks"]:
        lines.append(
            f"    {'ok  ' if c['ok'] else 'FAIL'} {c['name']} = {_fmt(c['value'])} (needs {c['op']} {_fmt(c['threshold'])})"
        )
    lines += [f"    note: {n}" for n in g["notes"]]
    b = report.get("bisect")
    if b:
        lines += ["", f"  bisection: first departure: {b['first_departure'] or 'none'}"]
        if b.get("why"):
            lines.append(f"    {b['why']}")
        if b.get("note"):
            lines.append(f"    note: {b['note']}")
        if b.get("table"):
            lines += ["", *("    " + ln for ln in render_table(b).splitlines())]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, txt = out / "report.json", out / "report.txt"
    js.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    txt.write_text(render_text(report), encoding="utf-8")
    return js, txt


def parity_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the bundle's manifest keeps: the verdict and the headline figures."""
    keys = (
        "kl_mean",
        "kl_max",
        "kl_support",
        "top1",
        "greedy_identical",
        "match_length_mean",
        "ppl_reference",
        "ppl_target",
        "accuracy_reference",
        "accuracy_target",
        "cosine",
        "max_abs",
        "max_rel",
    )
    bisect = report.get("bisect") or {}
    return {
        "passed": report["gate"]["passed"],
        "precision": report["precision"]["class"],
        "reference": report["reference"]["spec"],
        "target": report["target"]["spec"],
        "metrics": {k: report["metrics"][k] for k in keys},
        "first_departure": bisect.get("first_departure"),
        "time": report["time"],
    }


def record_in_bundle(report: dict[str, Any], bundle: Path) -> None:
    """Attach the parity verdict to `crosschip.json` (latest, plus one entry per target)."""
    from crosschip.hf import read_manifest, write_manifest

    summary = parity_summary(report)
    previous = read_manifest(bundle).get("parity") or {}
    by_target = dict(previous.get("by_target") or {}) if isinstance(previous, dict) else {}
    by_target[summary["target"]] = summary
    write_manifest(bundle, {"parity": {**summary, "by_target": by_target}})
