"""`crosschip run`: the whole trip, one stage after another, each role in its own process.

probe -> qualify -> assign roles -> train -> export -> verify -> serve -> report

The orchestrator imports no accelerator runtime: every stage is a `python -m crosschip`
subprocess bound to one backend, and stages talk through the files they write into the run
folder. `run_state.json` records finished stages, so `--resume RUN_DIR` continues from the
last one that finished, and Ctrl-C stops the running child cleanly.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosschip import interrupts
from crosschip.config import DEFAULT_CONFIG, POLICIES, RunConfig, ServeConfig, config_diff, load_config, to_dict
from crosschip.errors import CrosschipError, first_line, flag
from crosschip.paths import check_output_dir, lock_folder, path_arg
from crosschip.qualify.command import UNFIT_EXIT
from crosschip.serve.command import API_KEY_ENV, check_listen, client_url
from crosschip.serve.pool import pool_blocks
from crosschip.train import step_dir
from crosschip.train.faults import check_faults, parse_fault
from crosschip.verify.gate import GATE_FAILED_EXIT

GIVE_UP_EXIT = 3  # the training health guard's "fail me over" exit code
STAGES = ["probe", "qualify", "assign", "train", "export", "verify", "serve", "report"]
# What each stage leaves for the stages after it (a stage that was skipped leaves nothing).
STAGE_OUTPUTS = {
    "probe": "probe.json",
    "qualify": "qualify.json",
    "assign": "roles.json",
    "train": "train/train_summary.json",
    "export": "bundle/crosschip.json",
    "verify": "verify/report.json",
    "serve": "serve.json",
    "report": "report.html",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=path_arg,
        default=None,
        help="run config (TOML); default: the built-in default run, configs/default.toml",
    )
    p.add_argument("--out", type=path_arg, default=None, help="run folder (default runs/run-YYYYmmdd-HHMMSS)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", type=path_arg, default=None, help="continue a run from its last finished stage"
    )
    p.add_argument(
        "--candidates",
        nargs="*",
        default=None,
        help="backends to qualify for training (default: every usable torch backend the probe found)",
    )
    p.add_argument(
        "--train-on",
        default=None,
        metavar="A,B",
        help="skip probe and qualify and train on these backends in this order (failover left to right)",
    )
    p.add_argument(
        "--serve", action="store_true", help="keep the server up after its smoke run, until Ctrl-C (which drains it)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=0,
        help="port of the serve stage's server (default: a free one for the smoke run; with --serve, the config's serve.port)",
    )
    p.add_argument("--inject", action="append", default=[], help="fault injection passed to the first training backend")


@dataclass
class Run:
    """A run folder and what its stages have decided so far."""

    root: Path
    config_path: Path
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        return self.root / "run_state.json"

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_path)

    def done(self, stage: str) -> bool:
        return stage in self.state.get("finished", [])

    def finish(self, stage: str, **facts: Any) -> None:
        self.state.setdefault("finished", []).append(stage)
        self.state.setdefault("stages", {})[stage] = {"seconds": facts.pop("seconds", None), **facts}
        self.save()

    def redo_from_missing_output(self) -> str | None:
        """A finished stage whose output is gone (deleted since) is redone, with every stage
        after it: a resume trusted the list of finished stages, and served without the
        verdict of a verify whose report was gone. Returns the first such stage, if any."""
        for i, stage in enumerate(STAGES):
            facts = self.state.get("stages", {}).get(stage, {})
            if self.done(stage) and "skipped" not in facts and not (self.root / STAGE_OUTPUTS[stage]).is_file():
                redo = set(STAGES[i:])
                self.state["finished"] = [s for s in self.state["finished"] if s not in redo]
                self.save()
                return stage
        return None


ECHO_CHARS = 400
"""A stage's output line longer than this is cut on the terminal (a qualify verdict's reasons
run to ~250 characters and are shown whole); its log keeps it whole."""


def _shown(line: str, log: Path) -> str:
    if len(line) <= ECHO_CHARS:
        return line
    return f"{line[:ECHO_CHARS]} ... (cut; the whole line is in {log})"


class Child:
    """A stage subprocess in its own process group, so Ctrl-C can stop all of it."""

    current: subprocess.Popen | None = None

    @classmethod
    def run(cls, args: list[str], log: Path, env: dict[str, str] | None = None, echo: bool = True) -> int:
        cmd = [sys.executable, "-m", "crosschip", *args]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w", encoding="utf-8") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = cls.start(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    f.write(line)
                    if echo:
                        print("    " + _shown(line.rstrip(), log), flush=True)
                return proc.wait()
            except KeyboardInterrupt:
                # Stop the stage before this frame forgets it; an orphaned stage would keep
                # writing into the run folder that --resume is about to redo.
                cls.stop()
                raise
            finally:
                cls.current = None

    @classmethod
    def start(cls, cmd: list[str], **popen: Any) -> subprocess.Popen:
        """Start a stage process in its own session and make it `current`. A Ctrl-C between
        the fork and `current` would leave it running unseen by `stop` (an export kept
        writing into the run folder after the run exited 130): it is held until then."""
        with interrupts.held():
            proc = subprocess.Popen(cmd, stderr=subprocess.STDOUT, start_new_session=True, **popen)
            cls.current = proc
        return proc

    @classmethod
    def stop(cls) -> None:
        proc = cls.current
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def stage_failed(what: str, rc: int, log: Path, exit_code: int | None = None) -> CrosschipError:
    """The error of a stage whose process failed, naming that process's own error line (a
    `... error: ...` line of its log) rather than only the log to read."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [line.strip() for line in lines if "error:" in line or "Error:" in line]
    cause = f": {errors[-1]}" if errors else ""
    return CrosschipError(f"{what} failed (exit {rc}){cause}; see {log}", exit_code)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CrosschipError(f"expected {path} from the previous stage, but it is missing")
    return json.loads(path.read_text())


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def stage_probe(run: Run) -> dict:
    """Probe the real backends. Emulated chips are demos and test targets: a run uses one only
    when it is named (`--train-on`, which skips this stage), so probing them here would only
    cost time (a process each)."""
    from crosschip.backends import REGISTRY, get_backend

    out = run.root / "probe.json"
    argv = ["probe", "--json", str(out)]
    for spec in REGISTRY:
        if not get_backend(spec).emulation:
            argv += ["--backend", spec]
    rc = Child.run(argv, run.root / "logs" / "probe.log")
    if rc != 0:
        raise CrosschipError(f"probe failed (exit {rc}); see {run.root / 'logs' / 'probe.log'}")
    return {"file": out.name}


def _usable_torch_backends(probe: dict) -> list[str]:
    rows = probe.get("backends", [])
    return [r["backend"] for r in rows if r.get("available") and r.get("runtime") == "torch" and not r.get("emulation")]


def stage_qualify(run: Run, candidates: list[str] | None) -> dict:
    probe = _read_json(run.root / "probe.json")
    candidates = candidates or _usable_torch_backends(probe)
    if not candidates:
        raise CrosschipError("the probe found no usable torch backend to train on")
    verdicts = {}
    for spec in candidates:
        out = run.root / "qualify" / f"{spec.replace(':', '_')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        rc = Child.run(["qualify", "--backend", spec, "--json", str(out)], run.root / "logs" / f"qualify_{spec}.log")
        if rc not in (0, UNFIT_EXIT) or not out.is_file():
            raise stage_failed(f"qualify {spec}", rc, run.root / "logs" / f"qualify_{spec}.log")
        verdicts[spec] = _read_json(out)
    (run.root / "qualify.json").write_text(json.dumps(verdicts, indent=2))
    return {"candidates": candidates}


def _throughput(verdict: dict) -> float:
    return float(verdict.get("measurements", {}).get("train_tokens_per_s") or 0.0)


def stage_assign(run: Run) -> dict:
    """Training goes to the best TRAIN backend by measured throughput; serving to the target."""
    cfg = load_config(run.config_path)
    verdicts = _read_json(run.root / "qualify.json")
    trainers = sorted(
        (spec for spec, v in verdicts.items() if v.get("verdict") == "TRAIN"),
        key=lambda s: _throughput(verdicts[s]),
        reverse=True,
    )
    if not trainers:
        reasons = "; ".join(f"{s}: {v.get('verdict')} ({', '.join(v.get('reasons', []))})" for s, v in verdicts.items())
        raise CrosschipError(f"no backend qualified to train: {reasons}")
    roles = {"train": trainers, "serve": cfg.serve.backend, "reference": cfg.verify.reference}
    (run.root / "roles.json").write_text(json.dumps(roles, indent=2))
    _say(f"  train on {trainers[0]}" + (f" (failover: {', '.join(trainers[1:])})" if trainers[1:] else ""))
    _say(f"  serve on {cfg.serve.backend}")
    return roles


def parse_train_on(train_on: str) -> list[str]:
    """`--train-on A,B`: backends in failover order."""
    trainers = [s.strip() for s in train_on.split(",") if s.strip()]
    if not trainers:
        raise CrosschipError("--train-on needs at least one backend, e.g. --train-on torch:cpu")
    return trainers


def assign_by_user(run: Run, train_on: str) -> dict:
    """Roles named on the command line; probe and qualify are skipped and the report says so."""
    cfg = load_config(run.config_path)
    trainers = parse_train_on(train_on)
    roles = {"train": trainers, "serve": cfg.serve.backend, "reference": cfg.verify.reference, "assigned_by": "user"}
    (run.root / "roles.json").write_text(json.dumps(roles, indent=2))
    return roles


def stage_train(run: Run, inject: list[str]) -> dict:
    """Train on the first TRAIN backend; when its health guard gives up, fail over to the next.

    Every attempt after the first resumes from the newest verified checkpoint, whichever
    backend wrote it (checkpoints are in the HF layout with full state dicts). Attempts are
    recorded in the run state, so `--resume` does not return to a backend that gave up.
    """
    roles = _read_json(run.root / "roles.json")
    out = run.root / "train"
    attempts = run.state.setdefault("train_attempts", [])
    gave_up = {a["backend"] for a in attempts if a["exit"] == GIVE_UP_EXIT}
    for spec in roles["train"]:
        if spec in gave_up:
            continue
        args = ["train", "--config", str(run.config_path), "--out", str(out), "--backend", spec]
        if (out / "checkpoints").is_dir():
            args.append("--resume")
        if not attempts:
            for fault in inject:
                args += ["--inject", fault]
        _say(f"  training on {spec}")
        rc = Child.run(args, run.root / "logs" / f"train_{spec}.log")
        if interrupts.stopped_by_signal(rc):
            raise KeyboardInterrupt
        attempts.append({"backend": spec, "exit": rc})
        run.save()
        if rc == 0:
            return {"backend": spec, "attempts": list(attempts)}
        if rc != GIVE_UP_EXIT:
            raise stage_failed(f"training on {spec}", rc, run.root / "logs" / f"train_{spec}.log")
        _say(f"  the health guard gave up on {spec}; failing over from its last verified checkpoint")
    raise CrosschipError(f"every training backend gave up: {attempts}", exit_code=GIVE_UP_EXIT)


def stage_export(run: Run) -> dict:
    cfg = load_config(run.config_path)
    bundle = run.root / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    # The checkpoint the train stage finished at, not the newest that verifies: a damaged final
    # checkpoint gave a bundle of an older step, which the run reported as the trained model.
    step = _read_json(run.root / "train" / "train_summary.json").get("step")
    final = step_dir(run.root / "train" / "checkpoints", step) if isinstance(step, int) else None
    if final is None or not final.is_dir():
        raise CrosschipError(
            f"the train stage's final checkpoint ({final or 'no step in train/train_summary.json'}) is missing; "
            "nothing of another step is exported in its place"
        )
    args = ["export", str(final), "--to", cfg.export.target, "--dtype", cfg.export.dtype]
    rc = Child.run([*args, "--out", str(bundle)], run.root / "logs" / "export.log")
    if rc != 0:
        raise stage_failed("export", rc, run.root / "logs" / "export.log")
    return {"bundle": bundle.name, "target": cfg.export.target, "dtype": cfg.export.dtype}


def _verify_settings(cfg: RunConfig) -> dict[str, Any]:
    """What the verify stage asks of `crosschip verify` (by its option names): the held-out
    problems of the task the model was trained on, or for a corpus run its own text (verify
    reads which task from the bundle)."""
    settings = {"max_new_tokens": cfg.verify.max_new_tokens or None}  # 0: verify's own default
    if cfg.data.task == "corpus":
        return settings | {"corpus": list(cfg.data.corpus)}
    return settings | {"problems": cfg.verify.prompts, "digits": cfg.data.digits, "ops": list(cfg.data.ops)}


# How a run config names the settings `_verify_settings` hands on.
_VERIFY_KEYS = {
    "problems": "verify.prompts",
    "max_new_tokens": "verify.max_new_tokens",
    "digits": "data.digits",
    "ops": "data.ops",
    "corpus": "data.corpus",
}


def stage_verify(run: Run) -> dict:
    cfg = load_config(run.config_path)
    out = run.root / "verify"
    args = ["verify", str(run.root / "bundle"), "--reference", cfg.verify.reference, "--target", cfg.serve.backend]
    for name, value in _verify_settings(cfg).items():
        if value is not None:
            args += [flag(name), *(map(str, value) if isinstance(value, list) else [str(value)])]
    rc = Child.run([*args, "--layers", "--out", str(out)], run.root / "logs" / "verify.log")
    if rc not in (0, GATE_FAILED_EXIT):  # verify itself failed: there is no verdict to read
        raise stage_failed("verify", rc, run.root / "logs" / "verify.log")
    report = _read_json(out / "report.json")
    passed = bool(report.get("gate", {}).get("passed"))
    if rc != 0 or not passed:
        raise CrosschipError(
            f"the parity gate failed (exit {rc}); nothing is served. See {out / 'report.txt'}", rc or 4
        )
    return {"passed": passed, "precision": report.get("precision", {}).get("class")}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(bundle: Path, serve: ServeConfig, port: int, api_key: str, log: Path) -> subprocess.Popen:
    """`crosschip serve` with every setting of the config's [serve] table; the key goes
    through the environment, not the command line that `ps` shows."""
    cmd = [sys.executable, "-m", "crosschip", "serve", str(bundle), "--on", serve.backend, "--host", serve.host]
    cmd += ["--port", str(port), "--max-batch", str(serve.max_batch), "--max-queue", str(serve.max_queue)]
    cmd += ["--block-size", str(serve.block_size), "--num-blocks", str(serve.num_blocks)]
    cmd += ["--prefill-chunk", str(serve.prefill_chunk), "--drain-timeout", str(serve.drain_timeout_s)]
    if not serve.prefix_caching:
        cmd.append("--no-prefix-caching")
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if api_key:
        env[API_KEY_ENV] = api_key
    log.parent.mkdir(parents=True, exist_ok=True)  # as Child.run makes it (a resume after logs/ was removed)
    with open(log, "w", encoding="utf-8") as f:  # the server writes through its own copy of the descriptor
        proc = Child.start(cmd, stdout=f, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise stage_failed("the server", proc.returncode, log)
        if "ready on http" in log.read_text(encoding="utf-8", errors="replace"):
            return proc
        time.sleep(0.2)
    proc.kill()
    raise CrosschipError(f"the server did not become ready in 120 s; see {log}")


def _smoke_prompts(data: Any) -> list[tuple[str, Any]]:
    """16 (prompt, checker) pairs of the run's task: held-out problems, each with the task
    checker; or for a corpus run, the first words of its first documents, with none (a
    continuation of free text has no right answer to score)."""
    if data.task == "arith":
        from crosschip.data.arith import check, heldout_set

        return [(p.prompt, functools.partial(check, p)) for p in heldout_set(data)[:16]]
    from crosschip.data.corpus import load_texts

    return [(" ".join(text.split()[:8]), None) for text in load_texts(data.corpus, limit=16)]


def _smoke(base_url: str, cfg, api_key: str) -> dict:
    """A short run through the real HTTP API with the official client: the task's prompts, greedy."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=60)
    model = client.models.list().data[0].id
    rows, ttfts, rates = [], [], []
    for prompt, checker in _smoke_prompts(cfg.data):
        t0 = time.perf_counter()
        first = None
        text = ""
        n_tokens = 0
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=96,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter()
                text += chunk.choices[0].text
            if chunk.usage:
                n_tokens = chunk.usage.completion_tokens
        done = time.perf_counter()
        ttfts.append((first or done) - t0)
        if n_tokens > 1 and first:
            rates.append((n_tokens - 1) / max(done - first, 1e-9))
        rows.append({"prompt": prompt, "completion": text, "correct": checker(text) if checker else None})
    ttfts.sort()
    rates.sort()
    scored = [r["correct"] for r in rows if r["correct"] is not None]
    return {
        "requests": len(rows),
        "accuracy": sum(scored) / len(scored) if scored else None,  # None: nothing to score (a corpus run)
        "ttft_ms_median": 1000 * ttfts[len(ttfts) // 2],
        "decode_tokens_per_s_median": rates[len(rates) // 2] if rates else None,
        "samples": rows[:4],
    }


def stage_serve(run: Run, keep: bool, port: int) -> dict:
    """Serve the verified bundle on the target: a smoke run through the real server, or stay up."""
    cfg = load_config(run.config_path)
    port = port or (cfg.serve.port if keep else _free_port())
    # The config's key, else the one `crosschip serve` itself would take from the environment.
    api_key = cfg.serve.api_key or os.environ.get(API_KEY_ENV, "")
    proc = _start_server(run.root / "bundle", cfg.serve, port, api_key, run.root / "logs" / "serve.log")
    base_url = client_url(cfg.serve.host, port) + "/v1"
    from openai import OpenAIError

    try:
        try:
            facts = {"backend": cfg.serve.backend, "url": base_url, **_smoke(base_url, cfg, api_key)}
        except OpenAIError as e:
            raise CrosschipError(f"the serving smoke run failed: {e}; see {run.root / 'logs' / 'serve.log'}") from None
        (run.root / "serve.json").write_text(json.dumps(facts, indent=2))
        if keep:
            # Ctrl-C is how this stage is meant to end: the server drains, and the run goes
            # on to its report. It used to end the run as interrupted, the report unwritten.
            with interrupts.forwarded_to(proc) as stops:
                _say(f"  serving {run.root / 'bundle'} on {base_url}; Ctrl-C to stop")
                code = proc.wait()
            if not stops and code != 0:
                raise stage_failed("the server", code, run.root / "logs" / "serve.log")
            if stops:
                _say(f"  the server stopped (exit {code})")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the server drains in-flight requests, then exits 0
            try:
                proc.wait(timeout=cfg.serve.drain_timeout_s + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        Child.current = None
    return {k: v for k, v in facts.items() if k != "samples"}


def stage_report(run: Run) -> dict:
    from crosschip.report import write_report

    path = write_report(run.root)
    return {"report": str(path)}


# ---------------------------------------------------------------------------------------------


def _check_backend_names(named: dict[str, list[str]], to_train: tuple[str, ...] = ()) -> None:
    """Every backend spec is one crosschip knows, and those named under a `to_train` key train;
    the error names where the spec came from."""
    from crosschip.backends import get_backend

    for where, specs in named.items():
        for spec in specs:
            try:
                get_backend(spec, to_train=where in to_train)
            except CrosschipError as e:
                raise CrosschipError(f"{where}: {e}") from None


def _check_stage_settings(cfg: RunConfig, path: Path) -> None:
    """What the stages after training would only refuse when they start (the server starts
    minutes after the training it serves), said before the first stage, naming the config."""
    try:
        _check_late_stages(cfg)
    except CrosschipError as e:
        raise CrosschipError(f"{path}: {e}") from None


def _check_late_stages(cfg: RunConfig) -> None:
    from crosschip.backends import get_backend
    from crosschip.handoff import check_target_policy
    from crosschip.tokenizer import model_tokenizer
    from crosschip.verify.parity import VerifyOptions, check_reference, plan_prompts

    serve, export, model = cfg.serve, cfg.export, cfg.model
    keys = {"train.backend": cfg.train.backend, "export.target": export.target}
    keys |= {"serve.backend": serve.backend, "verify.reference": cfg.verify.reference}
    _check_backend_names({key: [spec] for key, spec in keys.items()}, to_train=("train.backend",))
    if export.dtype not in POLICIES:
        raise CrosschipError(f"export.dtype: must be one of {', '.join(POLICIES)}, got {export.dtype!r}")
    check_target_policy(get_backend(export.target), export.dtype, label=lambda name: f"export.{name}")
    # Verify and serve run here: a backend this install cannot have at all (torch built without
    # cuda, ONNX Runtime without the CUDA provider) is said now.
    for key in ("serve.backend", "verify.reference"):
        try:
            get_backend(keys[key]).check_build()
        except CrosschipError as e:
            raise CrosschipError(f"{key}: {e}") from None
    check_reference(cfg.verify.reference, label="verify.reference")
    # They run the bundle the export wrote: an ONNX Runtime target needs its graphs.
    if get_backend(serve.backend).runtime == "ort" and get_backend(export.target).runtime != "ort":
        raise CrosschipError(
            f"serve.backend {serve.backend} runs the bundle's ONNX graphs, which export.target {export.target} "
            f"does not write; set export.target to an ort backend (such as {serve.backend})"
        )
    pool_blocks(  # the pool `crosschip serve` will size: fp32 latents (every policy serves in fp32)
        serve.num_blocks,
        serve.block_size,
        serve.max_batch,
        model.max_position_embeddings,
        token_bytes=model.num_hidden_layers * model.latent_dim * 4,
        device_type=get_backend(serve.backend).device_type,
        label=lambda name: f"serve.{name}",
    )
    # The verify stage's prompts, built as it will build them: the tokenizer is the one the
    # trainer will give the model, and the context the model's.
    plan_prompts(
        VerifyOptions(bundle=Path(), out=Path(), task=cfg.data.task, **_verify_settings(cfg)),
        model_tokenizer(model.vocab_size),
        model.max_position_embeddings,
        label=lambda name: _VERIFY_KEYS.get(name, name),
    )


def _check_flags(args: argparse.Namespace) -> None:
    """The command line's backends, faults and port, refused before any stage (or run folder)
    is made, not when the stage that uses them starts."""
    if args.resume and args.config is not None:
        raise CrosschipError(
            f"--config cannot be combined with --resume: a run continues with the config it started with "
            f"({Path(args.resume) / 'config.toml'})"
        )
    if args.resume and args.out is not None:
        raise CrosschipError(f"--out cannot be combined with --resume: the run continues in {args.resume}")
    if args.port and not 1 <= args.port <= 65535:
        raise CrosschipError(f"--port must be between 1 and 65535, got {args.port}")
    if args.candidates is not None and not args.candidates:
        raise CrosschipError("--candidates needs at least one backend, e.g. --candidates torch:cpu torch:cuda")
    if args.candidates and len(set(args.candidates)) < len(args.candidates):  # each would be qualified again
        twice = sorted({c for c in args.candidates if args.candidates.count(c) > 1})
        raise CrosschipError(f"--candidates names {', '.join(twice)} more than once")
    named = {"--candidates": args.candidates or []}
    if args.train_on is not None:
        named["--train-on"] = parse_train_on(args.train_on)
    _check_backend_names(named, to_train=("--train-on",))
    for spec in args.inject:
        parse_fault(spec)


def _open_run(args: argparse.Namespace) -> Run:
    if args.resume:
        root = Path(args.resume)
        state_path = root / "run_state.json"
        if not state_path.is_file():
            raise CrosschipError(f"{root} is not a crosschip run folder (no run_state.json)")
        try:
            state = json.loads(state_path.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("finished", []), list):
                raise ValueError("expected an object with a list of finished stages")
            if unknown := [s for s in state.get("finished", []) if s not in STAGES]:
                raise ValueError(f"unknown finished stages {unknown}")
            # Read by the resume as objects: an edit by hand ended in a traceback, or after a stage.
            for key in ("stages", "config_values"):
                if not isinstance(state.get(key, {}), dict):
                    raise ValueError(f"{key!r} is not an object")
            if "config_values" not in state:  # what _check_unchanged compares the config with
                raise ValueError("'config_values' is missing")
        except ValueError as e:  # a truncated write, or an edit by hand
            raise CrosschipError(f"{state_path}: damaged ({first_line(e)}); the run cannot be resumed") from None
        # The copy the run made when it started, found where the folder is now (the state's
        # absolute path went stale when a run folder was moved).
        run = Run(root=root, config_path=root / "config.toml", state=state)
        _check_unchanged(run)
        if run.done("serve") and (args.serve or args.port):
            raise CrosschipError(
                f"{root}'s serve stage already finished, so --serve and --port do nothing here; serve its "
                f"bundle with `crosschip serve {root / 'bundle'} --port N`"
            )
        if not run.done("serve"):
            _check_port(args, load_config(run.config_path).serve)
        return run
    config_path = Path(args.config or DEFAULT_CONFIG)
    cfg = load_config(config_path)
    if not config_path.is_file():  # read once above; the copy below would read it again
        raise CrosschipError(f"--config {config_path} is not a regular file: a run keeps a copy, so save it to one")
    _check_stage_settings(cfg, config_path)  # fail before any stage starts
    check_faults(args.inject, cfg.train.steps, "train.steps")
    _check_port(args, cfg.serve)
    root = Path(args.out or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output_dir(root, "--out")
    if (root / "run_state.json").exists():
        raise CrosschipError(f"{root} already holds a run; use --resume {root} or another --out")
    if root.is_dir() and any(root.iterdir()):  # its stages would replace what is there, or train on
        raise CrosschipError(f"--out {root} is not empty; choose a new folder (or --resume a run)")
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_path, root / "config.toml")
    path = (root / "config.toml").resolve()
    run = Run(root=root, config_path=path, state={"config": str(path), "config_values": to_dict(cfg)})
    run.save()
    return run


def _check_resume_flags(args: argparse.Namespace, run: Run) -> None:
    """Flags for stages a resumed run has finished would do nothing: refused, not ignored (a
    resume recorded --train-on in the run state, though training had run elsewhere)."""
    for flag_name, value, stage in (
        ("--candidates", args.candidates, "qualify"),
        ("--train-on", args.train_on, "assign"),
        ("--inject", args.inject, "train"),
    ):
        if value and run.done(stage):
            raise CrosschipError(
                f"{flag_name} is for the {stage} stage, which {run.root} has finished; it would do nothing here"
            )


def _check_unchanged(run: Run) -> None:
    """A run continues with the config it started with: an edit to its config.toml since then
    is refused, naming the values (the stages already done used the old ones)."""
    cfg = load_config(run.config_path)
    before = run.state.get("config_values")
    changed = config_diff(before, to_dict(cfg)) if before is not None else []
    if changed:
        raise CrosschipError(
            f"{run.config_path} changed since the run started ({'; '.join(changed)}); a run continues with the "
            "config it started with: undo the edit, or start a new run with --config"
        )


def _check_port(args: argparse.Namespace, serve: ServeConfig) -> None:
    """A host or port the serve stage could not bind, said before the stages before it run for
    minutes: bound once as its server will bind it (port 0, the smoke run's free port, checks
    the host alone)."""
    check_listen(serve.host, 0, host_label="serve.host")
    port = args.port or (serve.port if args.serve else 0)
    if port:
        try:
            check_listen(serve.host, port)
        except CrosschipError as e:
            raise CrosschipError(f"--port {port}: {e}; choose another port") from None


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    run_ = _open_run(args)
    # Held until this process ends: a second `--resume` of this run is refused, not run alongside.
    lock = lock_folder(run_.root, "crosschip run")  # noqa: F841 - the open file is the lock
    if missing := run_.redo_from_missing_output():
        _say(f"{STAGE_OUTPUTS[missing]} is gone: redoing the {missing} stage and the stages after it")
    _check_resume_flags(args, run_)
    started = time.perf_counter()
    train_on = args.train_on or run_.state.get("train_on")
    if train_on:
        run_.state["train_on"] = train_on
    steps = {
        "probe": lambda: {"skipped": "roles given with --train-on"} if train_on else stage_probe(run_),
        "qualify": lambda: (
            {"skipped": "roles given with --train-on"} if train_on else stage_qualify(run_, args.candidates)
        ),
        "assign": lambda: assign_by_user(run_, train_on) if train_on else stage_assign(run_),
        "train": lambda: stage_train(run_, args.inject),
        "export": lambda: stage_export(run_),
        "verify": lambda: stage_verify(run_),
        "serve": lambda: stage_serve(run_, args.serve, args.port),
        "report": lambda: stage_report(run_),
    }
    _say(f"crosschip run -> {run_.root}")
    resumed = any(run_.done(name) for name in STAGES)
    try:
        for name in STAGES:
            if run_.done(name):
                _say(f"[{name}] already finished")
                continue
            _say(f"[{name}]")
            t0 = time.perf_counter()
            facts = steps[name]()
            run_.finish(name, seconds=round(time.perf_counter() - t0, 1), **facts)
    except KeyboardInterrupt:
        Child.stop()
        _say(f"\ninterrupted; continue with: crosschip run --resume {run_.root}")
        return interrupts.exit_code()
    except CrosschipError:
        # The report still shows how far the run got.
        try:
            stage_report(run_)
        except Exception:  # noqa: BLE001 - the original error is the one the user needs
            pass
        raise
    from crosschip.report import print_summary

    # A resumed run's own wall time leaves out the stages finished before: say what they all took.
    stages_s = sum(st.get("seconds") or 0 for st in run_.state.get("stages", {}).values()) if resumed else None
    print_summary(run_.root, wall_s=time.perf_counter() - started, stages_s=stages_s)
    return 0
