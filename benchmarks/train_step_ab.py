"""One training step under two configs, A against B, in one process.

For a change that a config switch reaches (`train.compile`, `train.dtype`, a model shape,
activation checkpointing), or a code change put behind a temporary one:

    python benchmarks/train_step_ab.py --b train.compile=true
    python benchmarks/train_step_ab.py --a train.dtype='"fp32"' --b train.dtype='"bf16"' --steps 40

On a shared machine, two runs of `train_throughput.py` minutes apart differ by as much as a
small change does (on a 2-core VM, transformers' own tokens/s moved between 4,803 and 5,439
within an hour; benchmarks/RESULTS.md, 2026-12-01). Here the two trainers live side by side
and take single steps in turns (A B, then B A, ...), so slow spells of the machine fall on
both. Both draw the same batches: the same config and seed give the same data stream.

Each setting is `TABLE.KEY=VALUE`, VALUE in TOML syntax (strings quoted), applied over the
base config: `--config PATH`, or the benchmarks' arith-tiny at batch 32 x 128. The ratio
printed is B's median step time over A's (below 1: B is faster), and the median of the
per-turn ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

import torch

from crosschip.config import ConfigError, RunConfig, config_from_dict
from crosschip.scripts import positive_int, run_main
from train_throughput import ours

BASE = {"model": {"preset": "arith-tiny"}, "train": {"batch_size": 32, "seq_len": 128}}


def with_settings(base: dict, settings: list[str], arm: str) -> RunConfig:
    """`base` (parsed TOML tables) with each `TABLE.KEY=VALUE` applied, validated as a run config."""
    data = {table: dict(values) for table, values in base.items()}
    for setting in settings:
        name, sep, text = setting.partition("=")
        table, dot, key = name.strip().partition(".")
        if not sep or not dot or not table or not key:
            raise ConfigError(f"--{arm} {setting!r}: expected TABLE.KEY=VALUE, such as train.compile=true")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(
                f"--{arm} {setting!r}: {text.strip()!r} is not a TOML value (quote strings: train.dtype='\"bf16\"')"
            ) from None
        data.setdefault(table, {})[key] = value
    return config_from_dict(data, f"--{arm}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", action="append", default=[], metavar="TABLE.KEY=VALUE", help="a setting of A (repeatable)")
    p.add_argument("--b", action="append", default=[], metavar="TABLE.KEY=VALUE", help="a setting of B (repeatable)")
    p.add_argument("--config", type=Path, default=None, help="base run config (default: arith-tiny, batch 32 x 128)")
    p.add_argument("--steps", type=positive_int, default=30, help="timed steps per arm")
    p.add_argument("--warmup", type=positive_int, default=4, help="untimed steps per arm first (and compile)")
    p.add_argument("--threads", type=positive_int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = BASE
    if args.config is not None:
        try:
            base = tomllib.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"--config {args.config}: {e}") from None
    configs = {"A": with_settings(base, args.a, "a"), "B": with_settings(base, args.b, "b")}

    with tempfile.TemporaryDirectory() as tmp:
        arms = {name: ours(cfg, Path(tmp) / name) for name, cfg in configs.items()}
        try:
            for _ in range(args.warmup):
                for step, _trainer in arms.values():
                    step()
            wall: dict[str, list[float]] = {"A": [], "B": []}
            cpu: dict[str, list[float]] = {"A": [], "B": []}
            for i in range(args.steps):
                for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    t, c = time.perf_counter(), time.process_time()
                    arms[name][0]()
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
        finally:
            for _step, trainer in arms.values():
                trainer.close()

    med = statistics.median
    for name, settings in (("A", args.a), ("B", args.b)):
        cfg = configs[name]
        print(
            f"{name}: {', '.join(settings) or 'the base config'} ({cfg.model.hidden_size} hidden, batch "
            f"{cfg.train.batch_size} x {cfg.train.seq_len}): median step {med(wall[name]) * 1e3:.1f} ms wall, "
            f"{med(cpu[name]) * 1e3:.1f} ms CPU"
        )
    turns = [b / a for a, b in zip(wall["A"], wall["B"])]
    print(
        f"B / A: {med(wall['B']) / med(wall['A']):.3f}x wall, {med(cpu['B']) / med(cpu['A']):.3f}x CPU; "
        f"per-turn median {med(turns):.3f}x ({args.steps} steps each, {args.threads} threads; below 1: B is faster)"
    )


if __name__ == "__main__":
    run_main(main)
