"""Shared fixtures (append-only: several helpers add fixtures here)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


def pytest_configure(config):
    """One ONNX trace cache for the session's exports, never the user's: in-process ones and
    those of the CLI processes tests start. Set before pytest-xdist starts its workers, which
    inherit it, so that a graph traced on one worker serves them all."""
    if hasattr(config, "workerinput"):
        return
    folder = tempfile.mkdtemp(prefix="crosschip-test-cache-")
    os.environ["CROSSCHIP_CACHE_DIR"] = folder
    os.environ.pop("CROSSCHIP_TRACE_CACHE", None)
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture
def no_trace_cache(monkeypatch):
    """Exports in the test trace every graph (tests of the tracing processes themselves)."""
    monkeypatch.setenv("CROSSCHIP_TRACE_CACHE", "0")


@pytest.fixture(scope="session")
def debug_bundle(tmp_path_factory):
    """A bundle on disk: a `debug`-preset model with random weights (seed 0) and `default_tokenizer(512)`."""
    import torch

    from crosschip.config import model_preset
    from crosschip.hf import save_bundle
    from crosschip.model import Transformer
    from crosschip.tokenizer import default_tokenizer

    torch.manual_seed(0)
    model = Transformer(model_preset("debug"))
    return save_bundle(model, tmp_path_factory.mktemp("debug_bundle") / "debug", tokenizer=default_tokenizer(512))


@pytest.fixture(scope="session")
def ort_bundle_of(debug_bundle, tmp_path_factory):
    """`ort_bundle_of(policy)`: `debug_bundle` exported for ort:cpu in that precision policy,
    once per session (an export takes ~15 s; the trace cache then serves the other policies).
    Tests that write into a bundle copy it first. Its users share the xdist group
    "ort_bundles", so that `make test` exports each policy once (a session fixture is per
    pytest-xdist worker)."""
    from crosschip.handoff.export import export_bundle

    root = tmp_path_factory.mktemp("ort_bundles")
    done: dict[str, object] = {}

    def get(policy: str):
        if policy not in done:
            export_bundle(debug_bundle, root / policy, target="ort:cpu", policy=policy, progress=False)
            done[policy] = root / policy
        return done[policy]

    return get
