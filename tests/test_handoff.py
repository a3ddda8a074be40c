"""`crosschip export`: precision policies, the manifest, checksums, sources and CLI errors (real files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from crosschip import hf
from crosschip.cli import main
from crosschip.errors import BundleError
from crosschip.handoff import precision
from crosschip.handoff.export import export_bundle
from crosschip.train.checkpoint import list_checkpoints, verify_checkpoint


@pytest.fixture(scope="module")
def exported(debug_bundle, tmp_path_factory):
    """Every policy exported for a torch target (no ONNX: fast); the ONNX variants are in test_ort."""
    root = tmp_path_factory.mktemp("policies")
    return {
        p: export_bundle(debug_bundle, root / p, target="torch:cpu", policy=p, progress=False) and root / p
        for p in precision.POLICIES
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("policy", precision.POLICIES)
def test_every_policy_exports_and_reloads(debug_bundle, exported, policy):
    bundle = exported[policy]
    manifest = hf.read_manifest(bundle)
    assert manifest["precision"]["policy"] == policy
    assert manifest["target"]["spec"] == "torch:cpu"
    assert manifest["source"]["kind"] == "bundle" and manifest["source"]["path"].endswith("debug")
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert manifest["sizes"]["weights_bytes"] == (bundle / "model.safetensors").stat().st_size
    weights = load_file(bundle / "model.safetensors")
    # The router and norms stay fp32 under every policy.
    assert weights["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert weights["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert weights["model.norm.weight"].dtype == torch.float32
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}[policy]
    assert weights["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == expected
    if policy == "int8":
        assert weights["lm_head.weight_scale"].shape == (512,)

    reference, _ = hf.load_bundle(debug_bundle)
    served, tok = precision.load_for_serving(bundle)
    assert tok is not None
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    # Loading reproduces exactly the policy's rounding of the reference...
    torch.testing.assert_close(
        _logits(served, ids), _logits(precision.round_model(reference, policy), ids), rtol=1e-5, atol=1e-6
    )
    # ...which stays close to the fp32 model.
    band = {"fp32": 1e-6, "bf16": 2e-2, "fp16": 2e-3, "int8": 2e-2}[policy]
    assert (_logits(served, ids) - _logits(reference, ids)).abs().max() < band * _logits(
        reference, ids
    ).abs().max() + band


def test_transformers_refuses_an_int8_bundle_it_cannot_read(exported, tmp_path):
    """transformers loaded an int8 bundle without a word and ran the int8 values as fp32
    weights (logits off by 3.6e+3). config.json now says what the weights are, so it refuses;
    crosschip reads the same bundle, and refuses another tool's quantization it cannot read."""
    import transformers

    with pytest.raises(ValueError, match="quantization config"):
        transformers.AutoModelForCausalLM.from_pretrained(exported["int8"])
    assert hf.read_json(exported["int8"] / "config.json")["quantization_config"] == hf.INT8_MARK
    assert "quantization_config" not in hf.read_json(exported["fp32"] / "config.json")
    precision.load_for_serving(exported["int8"])
    fp8 = shutil.copytree(exported["fp32"], tmp_path / "fp8")
    config = hf.read_json(fp8 / "config.json")
    hf.write_json(fp8 / "config.json", {**config, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(BundleError, match=r"config.json: quantization_config \(fp8\) is not supported"):
        hf.load_bundle(fp8, verify_checksums=False)


def test_int8_weights_take_at_most_30_percent(exported):
    fp32 = precision.weight_bytes(exported["fp32"])
    int8 = precision.weight_bytes(exported["int8"])
    assert int8 <= 0.30 * fp32, (int8, fp32)
    sizes = {p: hf.read_manifest(b)["sizes"]["weights_bytes"] for p, b in exported.items()}
    assert sizes["fp16"] < 0.55 * sizes["fp32"] and sizes["bf16"] < 0.55 * sizes["fp32"]


def test_int8_bundle_is_refused_by_plain_loader(exported):
    # A loader that knows nothing of int8 must not silently read int8 as weights.
    with pytest.raises(BundleError, match="weight_scale"):
        hf.load_bundle(exported["int8"])


def test_quantize_roundtrip_per_output_channel():
    w = torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None]
    q, scale = precision.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses its full range
    err = (precision.dequantize_int8(q, scale) - w).abs().amax(dim=1)
    assert (err <= scale / 2 + 1e-9).all()


def test_fp16_overflow_report_catches_planted_weight(debug_bundle, tmp_path):
    model, tok = hf.load_bundle(debug_bundle)
    with torch.no_grad():
        model.layers[1].ffn.experts[2].w3.weight[3, 5] = 1e6
        model.layers[0].attn.wkv_a.weight[0, :4] = 1e-9  # flushes to zero in fp16
    src = hf.save_bundle(model, tmp_path / "planted", tokenizer=tok)
    with pytest.raises(precision.PrecisionError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight"):
        export_bundle(src, tmp_path / "out", target="torch:cpu", policy="fp16", progress=False)
    manifest = export_bundle(
        src, tmp_path / "out", target="torch:cpu", policy="fp16", fp16_overflow="warn", force=True, progress=False
    )
    report = manifest["precision"]["fp16_range"]
    assert [t["name"] for t in report["overflow"]] == ["model.layers.1.mlp.experts.2.up_proj.weight"]
    assert report["overflow"][0]["overflow"] == 1 and report["overflow"][0]["max_abs"] == 1e6
    flushed = {t["name"]: t["flush_to_zero"] for t in report["underflow"]}
    assert flushed["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] >= 4
    assert report["warnings"] and report["on_overflow"] == "warn"


def test_tampered_bundle_is_refused(exported, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported["int8"], bad)
    state = load_file(bad / "model.safetensors")
    state["lm_head.weight_scale"] = state["lm_head.weight_scale"] * 2
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(BundleError, match="checksum mismatch"):
        precision.load_for_serving(bad)
    with pytest.raises(BundleError, match="checksum mismatch"):
        hf.load_bundle(bad)


FINGERPRINT = {"backend": "torch:cpu", "device": "x86_64", "torch": torch.__version__}
TASK = {"task": "arith", "digits": 3, "ops": ["+"]}


def _checkpoints(bundle: Path, root: Path, steps: tuple[int, ...]) -> None:
    """Training checkpoints of `bundle`'s model under `root`, as the trainer writes them."""
    from crosschip.train.checkpoint import TrainState, save_checkpoint

    model, tok = hf.load_bundle(bundle)
    for step in steps:
        scalars = {"backend": FINGERPRINT, "dtype": "fp32", "task": TASK}
        state = TrainState(step, model.state_dict(), {}, {"torch_cpu": torch.get_rng_state()}, scalars)
        save_checkpoint(root, state, model.cfg, tokenizer=tok)


def test_export_from_checkpoint_root_takes_newest_verified(debug_bundle, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _checkpoints(debug_bundle, root, (10, 20))
    (root / "step_00000020" / "model.safetensors").write_bytes(b"corrupt")  # the newest no longer verifies
    # A torch target: the subject is which checkpoint is taken (ONNX graphs are tested elsewhere).
    manifest = export_bundle(tmp_path / "run", tmp_path / "b", target="torch:cpu", policy="int8", progress=False)
    assert manifest["source"]["kind"] == "checkpoint" and manifest["source"]["step"] == 10
    assert manifest["source"]["path"].endswith("step_00000010")
    assert manifest["training_backend"] == {**FINGERPRINT, "dtype": "fp32"} and manifest["task"] == TASK
    assert manifest["target"]["spec"] == "torch:cpu" and manifest["precision"]["policy"] == "int8"


def test_a_checkpoint_exported_by_its_own_folder_is_checked_as_the_trainer_checks_it(debug_bundle, tmp_path, capsys):
    """Named directly (not through its run folder), a checkpoint whose manifest was gone, or
    left its weights out, was exported with whatever weights it held."""
    _checkpoints(debug_bundle, tmp_path / "ckpts", (5,))
    ckpt = tmp_path / "ckpts" / "step_00000005"
    manifest = json.loads((ckpt / "crosschip.json").read_text())
    del manifest["files"]["model.safetensors"]
    (ckpt / "crosschip.json").write_text(json.dumps(manifest))
    rc, out = _cli(capsys, str(ckpt), "--to", "torch:cpu", "--out", str(tmp_path / "o"))
    assert rc == 1 and "model.safetensors is not in crosschip.json" in out.err, out.err
    (ckpt / "crosschip.json").unlink()
    rc, out = _cli(capsys, str(ckpt), "--to", "torch:cpu", "--out", str(tmp_path / "o"))
    assert rc == 1 and f"{ckpt}: no crosschip.json" in out.err and not (tmp_path / "o").exists(), out.err


def _cli(capsys, *argv):
    rc = main(["export", *argv])
    return rc, capsys.readouterr()


def test_cli_errors_are_one_line(debug_bundle, tmp_path, capsys):
    rc, out = _cli(capsys, str(tmp_path / "nope"), "--to", "ort:cpu", "--out", str(tmp_path / "o"))
    assert rc == 1 and "export source not found" in out.err and len(out.err.strip().splitlines()) == 1
    rc, out = _cli(capsys, str(debug_bundle / "config.json"), "--out", str(tmp_path / "o"))
    assert rc == 1 and "export source must be a checkpoint or bundle folder, got a file" in out.err
    rc, out = _cli(capsys, str(debug_bundle), "--to", "ort:tpu", "--out", str(tmp_path / "o"))
    assert rc == 1 and "unknown backend 'ort:tpu'" in out.err and "ort:cann" in out.err
    rc, out = _cli(capsys, str(debug_bundle), "--dtype", "fp8", "--out", str(tmp_path / "o"))
    assert rc == 1 and "unknown precision policy 'fp8'" in out.err and "int8" in out.err
    rc, out = _cli(capsys, str(debug_bundle), "--to", "emu:fp16-only", "--dtype", "bf16", "--out", str(tmp_path / "o"))
    assert rc == 1 and "refuses bf16" in out.err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    rc, out = _cli(capsys, str(debug_bundle), "--to", "torch:cpu", "--out", str(tmp_path / "full"))
    assert rc == 1 and "not empty" in out.err and (tmp_path / "full" / "x").exists()
    assert "Traceback" not in out.err
    # Without a tokenizer the bundle was written, and then refused by serve and verify.
    notok = shutil.copytree(debug_bundle, tmp_path / "notok")
    (notok / "tokenizer.json").unlink()
    (notok / "crosschip.json").unlink()
    rc, out = _cli(capsys, str(notok), "--to", "torch:cpu", "--out", str(tmp_path / "o"))
    assert rc == 1 and "has no tokenizer.json: a bundle without one cannot be served" in out.err, out.err
    assert not (tmp_path / "o").exists()
    # --measure-memory serves the bundle here: a target this machine lacks was a traceback
    # after the whole export.
    rc, out = _cli(capsys, str(debug_bundle), "--to", "torch:xpu", "--measure-memory", "--out", str(tmp_path / "o"))
    assert rc == 1 and "--measure-memory serves the bundle on this machine, and torch:xpu" in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    # A checkpoint whose trainer state is not what the trainer writes, checksums and all: a
    # traceback, where `train --resume` said one line.
    _checkpoints(debug_bundle, tmp_path / "ckpts", (5,))
    ckpt = tmp_path / "ckpts" / "step_00000005"
    for state in ("[1,2", "[1, 2]"):
        (ckpt / "trainer_state.json").write_text(state)
        hf.write_manifest(ckpt, {})
        rc, out = _cli(capsys, str(ckpt), "--to", "torch:cpu", "--out", str(tmp_path / "o"))
        assert rc == 1 and f"checkpoint {ckpt} matches its manifest but cannot be read" in out.err, out.err
        assert len(out.err.strip().splitlines()) == 1


def test_force_never_deletes_the_source_or_the_folder_it_runs_in(debug_bundle, tmp_path, capsys, monkeypatch):
    """--force replaces an old bundle, and nothing else: not a folder holding the source or
    the current folder, and not before a new bundle is finished."""
    run = tmp_path / "run"
    shutil.copytree(debug_bundle, run / "checkpoints" / "src")
    src = run / "checkpoints" / "src"
    for out in (run, run / "checkpoints", src):
        rc, err = _cli(capsys, str(src), "--to", "torch:cpu", "--out", str(out), "--force")
        assert rc == 1 and "holds the source" in err.err, err.err
    # A run folder as the source: its checkpoints are read, so --out may not be among them.
    ckpts = run / "train" / "checkpoints"
    _checkpoints(debug_bundle, ckpts, (4, 8))
    for out in (ckpts, ckpts / "step_00000004", ckpts / "step_00000008"):
        rc, err = _cli(capsys, str(run / "train"), "--to", "torch:cpu", "--out", str(out), "--force")
        assert rc == 1 and "is inside the source" in err.err, err.err
    # Nor inside the source: a bundle in a checkpoint's folder went with it when training pruned it.
    rc, err = _cli(
        capsys, str(ckpts / "step_00000004"), "--to", "torch:cpu", "--out", str(ckpts / "step_00000004" / "b")
    )
    assert rc == 1 and "is inside the source" in err.err, err.err
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000008", "step_00000004"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(ckpts))
    (tmp_path / "work" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "here")
    for out in (".", str(tmp_path / "work")):
        rc, err = _cli(capsys, str(src), "--to", "torch:cpu", "--out", out, "--force")
        assert rc == 1 and "holds the current folder" in err.err, err.err
    assert (tmp_path / "work" / "here").is_dir()
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(tmp_path / "work")
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in Path(debug_bundle).iterdir())
    # A folder that is not a bundle is not replaced: --force could have deleted a user's files.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a bundle")
    rc, err = _cli(capsys, str(src), "--to", "torch:cpu", "--out", str(tmp_path / "mine"), "--force")
    assert rc == 1 and "is not a bundle (no crosschip.json)" in err.err, err.err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a bundle"
    shutil.rmtree(tmp_path / "mine")
    # Nor a checkpoint (its optimizer and trainer state were replaced by a bundle), nor a
    # bundle no export wrote: their manifests list every file too.
    for other, what in ((ckpts / "step_00000004", "a checkpoint"), (Path(debug_bundle), "a bundle no export wrote")):
        theirs = shutil.copytree(other, tmp_path / "theirs")
        rc, err = _cli(capsys, str(src), "--to", "torch:cpu", "--out", str(theirs), "--force")
        assert rc == 1 and f"holds {what} (see its crosschip.json)" in err.err, err.err
        assert sorted(p.name for p in theirs.iterdir()) == sorted(p.name for p in other.iterdir())
        shutil.rmtree(theirs)
    # Nor a bundle beside which someone put files of their own: they would go with it, even
    # after verify recorded its verdict in the manifest (which then listed them as the bundle's).
    old = tmp_path / "old"
    assert _cli(capsys, str(src), "--to", "torch:cpu", "--out", str(old))[0] == 0
    (old / "notes").mkdir()
    (old / "notes" / "eval.txt").write_text("mine")
    hf.write_manifest(old, {"parity": {"passed": True}})  # as verify records its verdict
    rc, err = _cli(capsys, str(src), "--to", "torch:cpu", "--out", str(old), "--force")
    assert rc == 1 and "holds files the earlier export did not write (notes/eval.txt)" in err.err, err.err
    assert (old / "notes" / "eval.txt").read_text() == "mine"
    shutil.rmtree(old / "notes")
    # A failed export leaves the old bundle as it was, and no partial folder beside it.
    listing = {p.name: p.read_bytes() for p in old.iterdir()}
    rc, err = _cli(capsys, str(tmp_path / "missing"), "--to", "torch:cpu", "--out", str(old), "--force")
    assert rc == 1 and {p.name: p.read_bytes() for p in old.iterdir()} == listing
    monkeypatch.setattr("crosschip.handoff.export._write_hf", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_bundle(src, old, target="torch:cpu", force=True, progress=False)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == listing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "run"]
    monkeypatch.undo()
    rc, _ = _cli(capsys, str(src), "--to", "torch:cpu", "--out", str(old), "--force")
    assert rc == 0 and not (old / "keep").exists() and (old / "crosschip.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "run"]


def test_cli_exports_and_prints_summary(debug_bundle, tmp_path, capsys):
    rc, out = _cli(
        capsys,
        str(debug_bundle),
        "--to",
        "torch:cpu",
        "--dtype",
        "bf16",
        "--out",
        str(tmp_path / "b"),
        "--json",
        "--no-progress",
    )
    assert rc == 0
    manifest = json.loads(out.out)
    assert manifest["precision"]["policy"] == "bf16" and manifest["onnx"] is None


def test_cli_export_writes_no_progress_residue_where_stderr_is_no_terminal(debug_bundle, tmp_path, capsys):
    """A log file or a pipe gets the summary only: no bar, no empty line left by one."""
    rc, out = _cli(capsys, str(debug_bundle), "--to", "torch:cpu", "--out", str(tmp_path / "b"))
    assert rc == 0 and out.err == "", repr(out.err)
    assert out.out.startswith(f"bundle {tmp_path / 'b'}: fp32 for torch:cpu")


@pytest.mark.slow
@pytest.mark.xdist_group("ort_bundles")
def test_resident_memory_per_policy(exported, ort_bundle_of):
    from crosschip.handoff.memory import measure_serving_rss

    onnx_int8 = ort_bundle_of("int8")
    torch_rss = measure_serving_rss(exported["int8"], "torch:cpu")
    ort_rss = measure_serving_rss(onnx_int8, "ort:cpu")
    for r in (torch_rss, ort_rss):
        assert r["rss_after_decode_bytes"] >= r["rss_baseline_bytes"] > 50e6


# -- the export's second tracing process ---------------------------------------------------------
def _small_model():
    """One MoE layer of two experts: these tests are about the processes, not the graph, and
    tracing time grows with the layers and experts."""
    from dataclasses import replace

    from crosschip.config import model_preset
    from crosschip.model import Transformer

    cfg = replace(
        model_preset("debug"),
        num_hidden_layers=1,
        first_k_dense_replace=0,
        n_routed_experts=2,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
    )
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.usefixtures("no_trace_cache")
def test_an_error_in_the_decode_graph_process_names_the_file(tmp_path):
    from crosschip.errors import CrosschipError
    from crosschip.handoff.onnx_export import export_onnx

    (tmp_path / "model.decode.onnx").mkdir()  # the child cannot write its graph there
    with pytest.raises(CrosschipError, match=r"exporting model\.decode\.onnx failed: IsADirectoryError"):
        export_onnx(_small_model(), tmp_path / "model.onnx")


def test_export_goes_on_without_a_second_process_or_a_writable_trace_cache(tmp_path, monkeypatch):
    """Both graphs are traced here, and the manifest's facts name the cache folder that refused them."""
    from crosschip.handoff.onnx_export import export_onnx

    def no_shared_memory(self):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(torch.multiprocessing.get_context("spawn").Process, "start", no_shared_memory)
    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("CROSSCHIP_CACHE_DIR", str(tmp_path / "cache"))
    said = []
    info = export_onnx(_small_model(), tmp_path / "model.onnx", progress=said.append)
    assert any(m.startswith("no second process (RuntimeError") for m in said), said
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.decode.onnx").is_file()
    assert info["cache_unwritable"] == f"{tmp_path / 'cache' / 'onnx-traces'}: Not a directory", said


@pytest.mark.usefixtures("no_trace_cache")
def test_ctrl_c_while_the_second_process_starts_stops_both_without_a_traceback(debug_bundle, tmp_path):
    """Ctrl-C reaches the process group; the export stops its child and says `interrupted`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    cmd = [sys.executable, "-m", "crosschip", "export", str(debug_bundle), "--to", "ort:cpu", "--out", str(tmp_path)]
    # Started with SIGINT ignored, as a job in the background of a script is (and as pytest-xdist
    # workers start their children): `kill -INT` must stop it all the same.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        # Catch the child as early as it shows (it then imports torch for seconds): a Ctrl-C
        # then used to print its KeyboardInterrupt traceback, or leave it tracing alone. It
        # must hold SIGINT off from its first moment: blocked while it imports, then ignored.
        deadline, children = time.monotonic() + 120, []
        while not children and time.monotonic() < deadline and proc.poll() is None:
            children = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
            time.sleep(0.005)
        assert children, "the export never started its second process"
        assert _holds_off_sigint(children[0].pid)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "crosschip export: interrupted" in out and "Traceback" not in out, out
    try:  # gone, or dead and waiting to be reaped (this sandbox's init may not reap)
        assert children[0].status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass


def _holds_off_sigint(pid: int) -> bool:
    """Whether process `pid` blocks or ignores SIGINT (its /proc status masks)."""
    import signal

    with open(f"/proc/{pid}/status") as f:
        masks = {k: int(v, 16) for k, v in (line.split()[:2] for line in f if line.startswith(("SigBlk:", "SigIgn:")))}
    return bool((masks["SigBlk:"] | masks["SigIgn:"]) >> (signal.SIGINT - 1) & 1)


# -- the trace cache -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_export(tmp_path_factory):
    """The small model exported once into an empty trace cache of its own: the traces (about
    15 s of tracing) serve both tests below."""
    from crosschip.handoff.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("trace_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSCHIP_CACHE_DIR", str(root / "cache"))
        mp.delenv("CROSSCHIP_TRACE_CACHE", raising=False)
        model, said = _small_model(), []
        info = export_onnx(model, root / "b" / "model.onnx", progress=said.append)
    return SimpleNamespace(root=root, cache=root / "cache", model=model, said=said, info=info)


def test_a_cached_trace_binds_new_weights_and_writes_what_a_fresh_trace_writes(fresh_export, tmp_path, monkeypatch):
    """Model b traced fresh fills the cache; model a (other weights) and b again are served from
    it, with no second process: a's graphs compute a's model, b's files are byte for byte the
    fresh ones."""
    from crosschip.handoff.export import onnx_parity
    from crosschip.handoff.onnx_export import export_onnx

    monkeypatch.setenv("CROSSCHIP_CACHE_DIR", str(fresh_export.cache))
    b = fresh_export.model
    torch.manual_seed(1)
    a = type(b)(b.cfg).eval()
    runs, infos = {"b": fresh_export.said}, {"b": fresh_export.info}
    folders = {"b": fresh_export.root / "b", "a": tmp_path / "a", "b-again": tmp_path / "b-again"}
    for name, model in (("a", a), ("b-again", b)):
        said = []
        infos[name] = export_onnx(model, folders[name] / "model.onnx", progress=said.append)
        runs[name] = said
    assert not any("from the cache" in m for m in runs["b"]) and "traced graph kept in the cache" in runs["b"]
    assert infos["b"]["traced_from_cache"] == []
    for name in ("a", "b-again"):
        assert sum("from the cache" in m for m in runs[name]) == 2, runs[name]
        assert not any("second process" in m for m in runs[name]), runs[name]
        assert infos[name]["traced_from_cache"] == ["model.onnx", "model.decode.onnx"]
    for graph in ("model.onnx", "model.decode.onnx"):
        assert (folders["b"] / graph).read_bytes() == (folders["b-again"] / graph).read_bytes(), graph
        assert (folders["b"] / graph).read_bytes() != (folders["a"] / graph).read_bytes(), graph
        assert onnx_parity(a, folders["a"] / graph) < 1e-5, graph


def test_the_rewrite_rules_the_export_skips_change_no_byte_of_either_graph(fresh_export, monkeypatch):
    """The export optimizes without onnxscript's rewrite rules that never apply to our graphs
    (one of them is most of the optimizing time): both graphs must come out as the full
    default rule set makes them, and the default set must be whole again afterwards."""
    import onnx_ir as ir
    from onnxscript import rewriter

    from crosschip.handoff import trace_cache
    from crosschip.handoff.onnx_export import UNUSED_REWRITE_RULES, CachedStep, export_model, optimize_graph

    monkeypatch.setenv("CROSSCHIP_CACHE_DIR", str(fresh_export.cache))
    monkeypatch.delenv("CROSSCHIP_TRACE_CACHE", raising=False)
    default = rewriter._DEFAULT_REWRITE_RULES
    # Still rules of onnxscript's default set, under the name the export replaces: otherwise it skips nothing.
    assert UNUSED_REWRITE_RULES <= {r.name for r in default}
    model = fresh_export.model
    for kind in ("general", "decode"):
        step = CachedStep(export_model(model, decode=kind == "decode"))
        traced = trace_cache.load(trace_cache.trace_key(model, kind), step)
        assert traced is not None, kind
        written = []
        for skip in (frozenset(), UNUSED_REWRITE_RULES):
            graph = ir.serde.deserialize_model(traced)
            optimize_graph(graph, skip)
            written.append(ir.serde.serialize_model(graph).SerializeToString())
        assert written[0] == written[1], kind
    assert rewriter._DEFAULT_REWRITE_RULES is default


def test_the_trace_cache_keeps_no_captured_tensor_and_drops_a_broken_entry(tmp_path, monkeypatch):
    import onnx

    from crosschip.handoff import trace_cache

    monkeypatch.setenv("CROSSCHIP_CACHE_DIR", str(tmp_path))
    step = torch.nn.Linear(4, 3)
    weight = onnx.numpy_helper.from_array(step.weight.detach().numpy(), "weight")
    graph = onnx.helper.make_graph([], "g", [], [], initializer=[weight])
    traced = onnx.helper.make_model(graph)
    assert trace_cache.store("k", traced, step) and trace_cache.has("k")
    stored = onnx.load(str(tmp_path / "onnx-traces" / "k.onnx"))
    assert not stored.graph.initializer[0].raw_data  # kept without its weights
    with torch.no_grad():
        step.weight.add_(1)
    bound = trace_cache.load("k", step).graph.initializer[0]
    assert torch.equal(torch.from_numpy(onnx.numpy_helper.to_array(bound).copy()), step.weight.detach())
    assert trace_cache.load("k", torch.nn.Linear(5, 3)) is None  # another shape: not this graph
    assert trace_cache.load("k", torch.nn.Linear(4, 3).bfloat16()) is None  # no numpy dtype: traced instead
    # A tensor the trace captured that no parameter or buffer names: a later export could not rebind it.
    captured = onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [], [], initializer=[weight, _named(weight, "c")])
    )
    assert not trace_cache.store("captured", captured, step) and not trace_cache.has("captured")
    (tmp_path / "onnx-traces" / "k.onnx").write_bytes(b"not a graph")
    assert trace_cache.load("k", step) is None and not trace_cache.has("k")
    monkeypatch.setenv("CROSSCHIP_TRACE_CACHE", "0")
    assert not trace_cache.store("k", traced, step) and not trace_cache.has("k")
    monkeypatch.delenv("CROSSCHIP_TRACE_CACHE")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CROSSCHIP_CACHE_DIR", str(tmp_path / "file"))  # a file where the folder goes
    with pytest.raises(trace_cache.Unwritable, match=f"^{tmp_path / 'file' / 'onnx-traces'}: Not a directory$"):
        trace_cache.store("k", traced, step)


def _named(tensor, name):
    import onnx

    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def test_the_trace_key_follows_the_config_the_tensors_and_the_graph_kind():
    from dataclasses import replace

    from crosschip.handoff.trace_cache import trace_key

    model = _small_model()
    key = trace_key(model, "general")
    assert key == trace_key(model, "general") != trace_key(model, "decode")
    other = type(model)(replace(model.cfg, vocab_size=model.cfg.vocab_size + 1))
    assert trace_key(other, "general") != key
    model.register_buffer("extra", torch.zeros(2))  # same config, another tensor: another trace
    assert trace_key(model, "general") != key


def test_the_export_summary_names_the_graphs_reused_from_the_trace_cache():
    from crosschip.handoff.command import summary

    manifest = {
        "sizes": {"weights_bytes": 1e6, "onnx_bytes": 1e6, "total_bytes": 2e6},
        "precision": {"policy": "fp32"},
        "target": {"spec": "ort:cpu"},
        "source": {"kind": "bundle", "path": "src"},
        "onnx": {"expert_weights": 24, "parity_fp32_max_abs": 1e-7, "traced_from_cache": ["model.decode.onnx"]},
    }
    assert "traced graphs reused from the trace cache: model.decode.onnx" in summary("b", manifest)
    manifest["onnx"]["traced_from_cache"] = []
    assert "trace cache" not in summary("b", manifest)
    manifest["onnx"]["cache_unwritable"] = "/c/onnx-traces: Not a directory"
    assert "trace cache not written (/c/onnx-traces: Not a directory): every export traces again" in summary(
        "b", manifest
    )


def test_a_graph_that_departs_from_torch_is_not_shipped_and_a_bad_cache_entry_is_traced_again(
    debug_bundle, tmp_path, monkeypatch
):
    """Export measured its ONNX graph against torch and shipped it whatever the figure: a trace
    cache entry edited to skip RMSNorm's square root gave max |diff| 5.6e+2, and the bundle
    was written. Now a graph traced here that departs is an error, and a cached one that
    departs is traced again."""
    import onnx

    from crosschip.errors import CrosschipError
    from crosschip.handoff import onnx_export

    monkeypatch.setenv("CROSSCHIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CROSSCHIP_TRACE_CACHE", raising=False)
    trace = onnx_export._trace

    def without_sqrt(step, model) -> onnx.ModelProto:  # the general graph, traced in this process
        proto = trace(step, model)
        for node in proto.graph.node:
            if node.op_type == "Sqrt":
                node.op_type = "Identity"
        return proto

    monkeypatch.setattr(onnx_export, "_trace", without_sqrt)
    with pytest.raises(CrosschipError, match=r"model\.onnx departs from the torch model: max \|ORT - torch\| "):
        export_bundle(debug_bundle, tmp_path / "bad", target="ort:cpu", progress=False)
    assert not (tmp_path / "bad").exists()
    # The damaged trace stayed in the cache; the next export takes it, finds it wrong, traces again.
    monkeypatch.setattr(onnx_export, "_trace", trace)
    manifest = export_bundle(debug_bundle, tmp_path / "good", target="ort:cpu", progress=False)
    assert manifest["onnx"]["traced_from_cache"] == [] and manifest["onnx"]["parity_fp32_max_abs"] < 1e-5
    again = export_bundle(debug_bundle, tmp_path / "again", target="ort:cpu", progress=False)
    assert again["onnx"]["traced_from_cache"] == ["model.onnx", "model.decode.onnx"]  # the entries were replaced
