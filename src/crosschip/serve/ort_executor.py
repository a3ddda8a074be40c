"""The ONNX Runtime executor: the same `Executor` seam as `TorchExecutor`, running the bundle's
`model.onnx` on an execution provider (CPU, CUDA, CANN).

A bundle may hold two graphs with the same contract (see `handoff.onnx_export`): `model.onnx`
for prefill and large batches, and `model.decode.onnx` (an MoE without data-dependent
shapes) for decode batches of at most n_routed_experts x threads rows. The graphs read past
latents from a paged pool through slot indices and return the new tokens' latents. The pool
lives on the execution provider's device as two OrtValues, bound once with IO binding; per
step only the small index tensors (ids, positions, past slots, mask) go in and the logits
come out. The new latents are committed into the pool where they are: on CPU by writing into
the pool's memory (a numpy view of the OrtValue, zero copy); on other devices by a one-node
ScatterND graph whose output is bound to the pool itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor

from crosschip import hf
from crosschip.errors import BundleError, first_line
from crosschip.handoff import ONNX_FILE
from crosschip.serve.executor import BlockTables, Chunk, PagedExecutor
from crosschip.serve.pool import pool_blocks


def _commit_graph() -> bytes:
    """pool (L, P, D), indices (L, B, T, 2) of (layer, slot), updates (L, B, T, D) -> pool with them written."""
    h, tp = onnx.helper, onnx.TensorProto
    graph = h.make_graph(
        [h.make_node("ScatterND", ["pool", "indices", "updates"], ["pool_out"])],
        "commit_latents",
        [
            h.make_tensor_value_info("pool", tp.FLOAT, ["L", "P", "D"]),
            h.make_tensor_value_info("indices", tp.INT64, ["L", "B", "T", 2]),
            h.make_tensor_value_info("updates", tp.FLOAT, ["L", "B", "T", "D"]),
        ],
        [h.make_tensor_value_info("pool_out", tp.FLOAT, ["L", "P", "D"])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]).SerializeToString()


def load_session(path: Path, backend: Any = None, threads: int | None = None) -> Any:
    """A bundle graph's InferenceSession (`open_session`); a graph ONNX Runtime cannot load
    (damaged, or not ONNX) is one BundleError naming the file."""
    from crosschip.handoff.onnx_export import open_session

    try:
        return open_session(path, backend, threads)
    except Exception as e:  # ONNX Runtime's own error types (InvalidProtobuf, Fail, ...)
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({first_line(e)}); export the bundle again") from None


class OrtExecutor(PagedExecutor):
    """Runs a bundle's `model.onnx` with ONNX Runtime behind the `Executor` protocol."""

    def __init__(
        self,
        bundle_dir: str | Path,
        backend: Any,
        *,
        max_batch: int = 32,
        block_size: int = 16,
        num_blocks: int = 0,
        threads: int | None = None,
        commit: str = "auto",
        **_torch_only: Any,
    ):
        """backend: an OrtBackend (`get_backend("ort:cpu")`); its providers() and options are used.
        threads: intra-op threads (default: torch's thread count, so `serve --threads` applies to both runtimes). commit: `auto` (numpy on CPU, graph
        elsewhere) or `graph` (force the device-generic ScatterND commit). Torch-only options
        (compile, dtype) are accepted and ignored."""
        from crosschip.handoff.onnx_export import decode_path

        folder = Path(bundle_dir)
        if not (folder / ONNX_FILE).is_file():
            raise BundleError(f"{folder} has no {ONNX_FILE}; export it with `crosschip export ... --to {backend.spec}`")
        if (folder / hf.MANIFEST_FILE).exists():
            hf.verify_manifest(folder)
        cfg = hf.model_config_from_hf(hf.read_json(folder / hf.CONFIG_FILE))
        self.cfg, self.backend = cfg, backend
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = cfg.max_position_embeddings
        self.cache_bytes_per_token_per_layer = cfg.latent_dim * 4  # fp32 latents
        threads = threads or torch.get_num_threads()
        self.session = load_session(folder / ONNX_FILE, backend, threads)
        # The small-batch decode graph, when the bundle has one (bundles exported before it still serve).
        small = decode_path(folder / ONNX_FILE)
        self.decode_session = load_session(small, backend, threads) if small.is_file() else None
        # Up to this many decode rows the decode graph wins. Its dense experts read each expert
        # once in two large products, whose FLOPs grow with the rows and spread over the threads;
        # the general graph's per-expert slices are small products that barely use a second
        # thread. Decode graph against general graph, benchmarks/graph_ab.py (arith-tiny, CPU,
        # 16 experts): 1 thread 0.95x at 8 rows, 0.96x at 12, 1.06x at 16, 1.13x at 24;
        # 2 threads 0.81x at 16, 0.92x at 32, 1.00x at 48. Experts x threads is at the
        # crossover on 1 thread and on the winning side on 2.
        self.decode_rows = cfg.n_routed_experts * threads
        self.device_type = "cpu" if backend is None else backend.device_type
        token_bytes = cfg.num_hidden_layers * self.cache_bytes_per_token_per_layer
        blocks = pool_blocks(
            num_blocks, block_size, max_batch, self.max_seq_len, token_bytes=token_bytes, device_type=self.device_type
        )
        self.blocks = BlockTables(blocks, block_size)
        self._alloc_pool(self.blocks.num_blocks * block_size)
        self.commit = "numpy" if commit == "auto" and self.device_type == "cpu" else "graph"
        if self.commit == "graph":
            import onnxruntime as ort

            self.commit_session = ort.InferenceSession(_commit_graph(), providers=backend.providers())

    def _alloc_pool(self, slots: int) -> None:
        import onnxruntime as ort

        L, C, R = self.cfg.num_hidden_layers, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim
        if self.device_type == "cpu":
            # Host memory: the numpy arrays *are* the OrtValues' buffers (zero copy both ways).
            self.host_pool = {"c_kv": np.zeros((L, slots, C), np.float32), "k_pe": np.zeros((L, slots, R), np.float32)}
            self.pool = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.host_pool.items()}
        else:
            self.pool = {
                k: ort.OrtValue.ortvalue_from_shape_and_type([L, slots, d], np.float32, self.device_type, 0)
                for k, d in (("c_kv", C), ("k_pe", R))
            }
        self.binding = self._bind_pool(self.session)
        self.decode_binding = self._bind_pool(self.decode_session) if self.decode_session is not None else None

    def _bind_pool(self, session: Any) -> Any:
        binding = session.io_binding()
        binding.bind_ortvalue_input("past_c_kv", self.pool["c_kv"])
        binding.bind_ortvalue_input("past_k_pe", self.pool["k_pe"])
        return binding

    # -- internals --------------------------------------------------------------------------
    def _batch(self, batch: list[Chunk]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Padded (B, T) inputs, past slots (B, S), mask (B, T, S+T), the (B, T) slots the new
        latents go to (padding -> scratch slot 0, never read unmasked) and each row's length.
        Per row only the slot copies loop in Python; the rest is whole-array numpy (this runs
        every decode step: at batch 8 the per-row version cost ~15% of a step)."""
        B = len(batch)
        lens = np.fromiter((len(c.token_ids) for c in batch), np.int64, B)
        starts = np.fromiter((c.start_pos for c in batch), np.int64, B)
        T, S = int(lens.max()), int(starts.max())
        ids = np.zeros((B, T), np.int64)
        past = np.zeros((B, S), np.int64)  # padding reads scratch slot 0, masked out
        write = np.zeros((B, T), np.int64)
        for b, c in enumerate(batch):
            n, start, slots = len(c.token_ids), c.start_pos, self.blocks.slot_map[c.seq_id]
            ids[b, :n] = c.token_ids
            past[b, :start] = slots[:start]
            write[b, :n] = slots[start : start + n]
        steps = np.arange(T)
        past_cols = np.broadcast_to(np.arange(S) < starts[:, None, None], (B, T, S))
        new_cols = (steps[:, None] >= steps) & (steps < lens[:, None, None])  # causal over the real new tokens
        feeds = {
            "input_ids": ids,
            "positions": starts[:, None] + steps,
            "past_slots": past,
            "attention_mask": np.concatenate([past_cols, new_cols], axis=-1),
        }
        return feeds, write, lens

    def _run(self, batch: list[Chunk], all_logits: bool) -> Tensor | list[Tensor]:
        feeds, write, lens = self._batch(batch)
        session, io = self.session, self.binding
        B, T = feeds["input_ids"].shape
        if self.decode_session is not None and T == 1 and B <= self.decode_rows:
            session, io = self.decode_session, self.decode_binding
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for name in ("logits", "present_c_kv", "present_k_pe"):
            io.bind_output(name, self.device_type)
        session.run_with_iobinding(io)
        logits, present_c_kv, present_k_pe = io.get_outputs()
        self._commit({"c_kv": present_c_kv, "k_pe": present_k_pe}, write)
        logits = logits.numpy()  # (B, T, V): the one device -> host copy per step
        if all_logits:
            return [torch.from_numpy(logits[b, :n]) for b, n in enumerate(lens)]
        return torch.from_numpy(logits[np.arange(B), lens - 1])  # each row's last token

    def _commit(self, present: dict[str, Any], write: np.ndarray) -> None:
        """Write the new tokens' latents (L, B, T, D) into pool slots `write` (B, T)."""
        L = self.cfg.num_hidden_layers
        if self.commit == "numpy":
            for key, value in present.items():
                new = value.numpy()
                self.host_pool[key][:, write.ravel()] = new.reshape(L, -1, new.shape[-1])
            return
        # (L, B, T, 2) (layer, slot) pairs: the present OrtValues go in as they are, on the device.
        layer = np.broadcast_to(np.arange(L)[:, None, None], (L, *write.shape))
        index = np.ascontiguousarray(np.stack([layer, np.broadcast_to(write, layer.shape)], axis=-1))
        for key, value in present.items():
            self._scatter(key, index, value)

    def _scatter(self, key: str, index: np.ndarray, updates: Any) -> None:
        # The output is bound to the pool itself: ScatterND skips its copy when input and
        # output are the same buffer, so only the B*T new rows are written, on the device.
        io = self.commit_session.io_binding()
        io.bind_ortvalue_input("pool", self.pool[key])
        io.bind_cpu_input("indices", index)
        io.bind_ortvalue_input("updates", updates)
        io.bind_ortvalue_output("pool_out", self.pool[key])
        self.commit_session.run_with_iobinding(io)
