"""Start a real `crosschip serve` process on a free loopback port (used by tests/test_serve_*.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


class ServerProcess:
    """`python -m crosschip serve BUNDLE --port 0 ...`; `url` is known once it prints `ready on`."""

    def __init__(self, bundle: Path, *args: str, timeout: float = 120.0, port: int = 0, on_start=None):
        """`on_start(proc)`, when given, runs as soon as the process is started (before it is
        ready): a test can watch the loading phase on a `port` it chose."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "crosschip", "serve", str(bundle), "--port", str(port), "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"ready on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if on_start is not None:
            on_start(self.proc)
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise RuntimeError("server did not become ready:\n" + "".join(self.lines))

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def metric(self, sample: str, default: float | None = None) -> float:
        """A sample as /metrics writes it (`name`, or `name{label="v"}`); `default` when it is
        absent (a labelled counter before its first count), else absent fails."""
        text = httpx.get(self.url + "/metrics").text
        m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        assert m or default is not None, f"metric {sample} not found"
        return float(m.group(1)) if m else default

    def wait_metric(self, name: str, value: float, timeout: float = 5.0, default: float | None = None) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = self.metric(name, default)
            if v == value or time.monotonic() > deadline:
                return v
            time.sleep(0.02)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)  # it reads to the end of the output, then the pipe can close
        self.proc.stdout.close()
        return self.proc.returncode


def tokenizer_with(source: Path, dest: Path, **config) -> Path:
    """A copy of the tokenizer folder (or bundle) `source` in `dest`, with `config`'s entries
    set in its tokenizer_config.json."""
    dest.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, dest)
    path = dest / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dest
