"""Render a run report in headless Chromium and read back what the browser built."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FIGURES = ["fig-loss", "fig-accuracy", "fig-layers"]
TABLES = ["table-stages", "table-roles", "table-qualify", "table-health", "table-parity", "table-serve"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed for the report test; `make test` installs Debian's chromium"
    return path


def render_dom(html_path: Path) -> str:
    """The DOM after the page's load handlers ran (they mark each decoded image)."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                html_path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def assert_report_complete(html_path: Path) -> None:
    """Every figure decoded as an image in the browser, and every table has rows."""
    dom = render_dom(html_path)
    for fig in FIGURES:
        m = re.search(rf'<figure id="{fig}"><img [^>]*>', dom)
        assert m, f"figure {fig} missing from the rendered report"
        assert 'data-rendered="yes"' in m.group(0), f"figure {fig} did not decode in the browser"
    for table in TABLES:
        m = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S)
        assert m, f"table {table} missing from the rendered report"
        assert "<tr>" in m.group(1), f"table {table} has no rows"
