"""The CLI as a user meets it: help texts, examples, one-line errors."""

import subprocess
import sys

import pytest

from crosschip.backends import get_backend
from crosschip.cli import STAGES, main
from crosschip.errors import CrosschipError


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosschip", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_stage():
    out = _cli("--help")
    assert out.returncode == 0
    for stage in ("probe", "qualify", "train", "export", "verify", "serve", "run", "bench"):
        assert stage in out.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_help_has_an_example(stage):
    out = _cli(stage, "--help")
    assert out.returncode == 0, out.stderr
    assert "example:" in out.stdout and STAGES[stage].example in out.stdout


def test_no_stage_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "STAGE" in capsys.readouterr().out


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(CrosschipError, match="unknown backend 'torch:tpu'; known backends: torch:cpu"):
        get_backend("torch:tpu")


def test_unavailable_backend_says_why():
    with pytest.raises(CrosschipError, match="torch_npu is not installed"):
        get_backend("torch:npu").require()
