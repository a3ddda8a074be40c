"""torch on the host CPU: always available, gloo for several processes."""

from __future__ import annotations

import os

from crosschip.backends.base import Backend


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

    def device_name(self) -> str:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
        except OSError:
            pass
        return super().device_name()
