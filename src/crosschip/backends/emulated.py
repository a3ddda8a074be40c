"""Emulated targets: real CPU compute with one measured weakness planted.

They let the qualification logic be tested and demonstrated on one CPU machine. Every
output names them as emulations (`Backend.emulation`).
"""

from __future__ import annotations

from crosschip.backends.cpu import CPUBackend


def fp16_only() -> CPUBackend:
    """A chip with fp16 but no bf16, like 310P-class Ascend parts and older GPUs."""
    return CPUBackend(
        "emu:fp16-only", emulation="fp16-only chip (no bf16)", emulated_refused_dtypes=frozenset({"bf16"})
    )


def flaky() -> CPUBackend:
    """A chip whose training steps intermittently produce NaNs and jitter in step time."""
    return CPUBackend(
        "emu:flaky",
        emulation="flaky chip (intermittent NaN, step-time jitter)",
        emulated_faults=["nan@p=0.05", "slow@p=0.2"],
    )


def slow_collectives() -> CPUBackend:
    """A chip with a slow interconnect: every collective pays a fixed extra delay."""
    return CPUBackend(
        "emu:slow-collectives", emulation="slow interconnect (+50 ms per collective)", emulated_collective_delay_s=0.05
    )
