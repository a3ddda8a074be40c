"""ONNX Runtime execution providers: inference-only targets.

`ort:cpu`, `ort:cuda` and `ort:cann` (Ascend). Provider options pass through unchanged, so
a CANN deployment can set e.g. `device_id` or `precision_mode`.
"""

from __future__ import annotations

from typing import Any

from crosschip.backends.base import Backend

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cann": "CANNExecutionProvider",
}


class OrtBackend(Backend):
    def __init__(self, ep: str, provider_options: dict[str, Any] | None = None):
        super().__init__(spec=f"ort:{ep}", runtime="ort", device_type=ep)
        self.provider = PROVIDERS[ep]
        self.provider_options = dict(provider_options or {})

    def build_lacks(self) -> str | None:
        # The provider list is the build's, and onnxruntime's import is light (no torch).
        import onnxruntime as ort

        have = ort.get_available_providers()
        return None if self.provider in have else f"this onnxruntime build has {', '.join(have)}"

    def is_available(self) -> bool:
        return self.build_lacks() is None

    def why_unavailable(self) -> str:
        return f"{self.spec} is not available: {self.build_lacks()}"

    def providers(self) -> list[tuple[str, dict[str, Any]]]:
        """The provider list for an InferenceSession: this EP, then CPU for ops it lacks."""
        chain = [(self.provider, self.provider_options)]
        if self.provider != PROVIDERS["cpu"]:
            chain.append((PROVIDERS["cpu"], {}))
        return chain

    def fingerprint(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {**super().fingerprint(), "onnxruntime": ort.__version__, "provider": self.provider}
