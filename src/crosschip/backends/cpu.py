"""torch on the host CPU: always available, gloo for several processes."""

from __future__ import annotations

import os

from crosschip.backends.base import Backend


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

    def memory_bytes(self) -> int | None:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None

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
