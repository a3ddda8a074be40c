"""torch on the host CPU: always available, gloo for several processes."""

from __future__ import annotations

import ctypes
import os
import platform

from crosschip.backends.base import Backend

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc takes on 64-bit
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc keep the memory a training step frees for the next step, instead of giving it
    back to the kernel: buffers up to 32 MiB come from the heap, and the heap is not trimmed.

    A training step allocates and frees the same activation and gradient buffers, megabytes
    each, every step. By default glibc maps the larger ones fresh and unmaps them when freed,
    and trims the heap when its free top grows, so every step faulted its buffers' pages in
    anew. arith-tiny, fp32, batch 32, 2 threads, steps 5-15, two pairs of processes (AMD EPYC
    VM; benchmarks/RESULTS.md, 2026-12-03): 19,673-28,604 minor faults a step against 4-288,
    kernel time 0.058-0.074 against 0.003-0.006 s a step, CPU time 1.71 against 1.60-1.62 s,
    wall 0.854-0.857 against 0.808-0.819 s. The peak resident memory is unchanged (1,095-1,109
    against 1,098-1,105 MiB): what is kept is what the next step allocates again. Returns
    whether it applied (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def cpu_share(n: int) -> int:
    """Threads for each of `n` processes that split this machine's cores between them."""
    return max(1, (os.cpu_count() or 1) // n)


def side_by_side_env() -> dict[str, str]:
    """The environment of a torch child process that runs beside another one on the same cores.

    OpenMP threads that wait for each other spin by default, and two processes of one thread
    per core each then take turns badly: two 40-step bf16 runs of the debug model side by side
    on 2 cores spent 5.7-32 s in their steps with spinning threads, 0.8-1.4 s with passive ones.
    The thread count is kept, so a run's arithmetic (how its reductions split) is unchanged."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


class CPUBackend(Backend):
    def __init__(self, spec: str = "torch:cpu", **kwargs):
        super().__init__(spec=spec, runtime="torch", device_type="cpu", dist_backend="gloo", **kwargs)

    def is_available(self) -> bool:
        return True

    def prepare_training_process(self) -> None:
        keep_freed_memory()

    def memory_bytes(self) -> int | None:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None

    def shares_host_memory(self) -> bool:
        return True

    def native_bf16(self) -> bool:
        # Without avx512_bf16 or AMX, oneDNN emulates bf16 and is slower than fp32.
        import torch

        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)

    def expert_row_multiple(self, dtype: str) -> int:
        # oneDNN builds and caches one kernel per low-precision matmul shape. The experts' row
        # counts change every step, so without rounding nearly every expert matmul builds a new
        # one: bf16 at 1,024 +- 250 rows x 256 x 256 on 2 threads ran at 168 GFLOP/s, against
        # 342 with rows rounded to 64 (and 376 at one fixed shape). fp32 takes MKL, which has
        # no such cost.
        return 1 if dtype == "fp32" else 64

    def device_name(self) -> str:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
        except OSError:
            pass
        return super().device_name()
