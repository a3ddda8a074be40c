"""The parity gate: does the model served on the target behave like the one that was trained?

`crosschip verify BUNDLE --reference torch:cpu --target ort:cpu` runs each side in its own
process (`crosschip.verify.worker`) on the same prompts, compares what comes back
(`metrics`), judges it by the bundle's precision class (`gate`) and, when the gate fails,
names the first module that departs from the reference (`bisect`). A remote
OpenAI-compatible server (vLLM, vllm-ascend, MindIE, `crosschip serve`) can stand in for
the target (`remote`).
"""
