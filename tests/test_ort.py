"""ONNX export of the cached step and the ONNX Runtime executor, against torch on real files."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from crosschip import hf
from crosschip.backends import get_backend
from crosschip.handoff.export import export_bundle
from crosschip.handoff.onnx_export import (
    INPUT_NAMES,
    CachedStep,
    all_nodes,
    causal_mask,
    count_expert_weights,
    open_session,
    session_options,
    store_weights,
)
from crosschip.serve.executor import Chunk, TorchExecutor
from crosschip.serve.ort_executor import OrtExecutor

# With the other users of the conftest's ort_bundle_of, on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("ort_bundles")


@pytest.fixture(scope="module")
def fp32_bundle(ort_bundle_of):
    return ort_bundle_of("fp32")


@pytest.fixture(scope="module")
def model(fp32_bundle):
    return hf.load_bundle(fp32_bundle)[0]


@pytest.fixture(scope="module")
def session(fp32_bundle):
    return open_session(fp32_bundle / "model.onnx", get_backend("ort:cpu"))


@pytest.fixture(scope="module")
def decode_session(fp32_bundle):
    return open_session(fp32_bundle / "model.decode.onnx", get_backend("ort:cpu"))


def test_graph_passes_checker_and_keeps_every_expert(fp32_bundle, model):
    proto = onnx.load(str(fp32_bundle / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    cfg = model.cfg
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert count_expert_weights(proto) == 3 * moe_layers * cfg.n_routed_experts
    names = {t.name for t in proto.graph.initializer}
    for j in range(cfg.n_routed_experts):
        assert f"model.layers.1.ffn.experts.{j}.w2.weight" in names
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["input_ids"] == ["batch", "seq"] and dims["attention_mask"][0] == "batch"
    manifest = hf.read_manifest(fp32_bundle)
    assert manifest["onnx"]["expert_weights"] == 3 * moe_layers * cfg.n_routed_experts
    assert manifest["onnx"]["parity_fp32_max_abs"] < 1e-5
    # The exporter's per-node stack traces are dropped, inside the decode graph's If branches too.
    for graph in ("model.onnx", "model.decode.onnx"):
        nodes = list(all_nodes(onnx.load(str(fp32_bundle / graph)).graph))
        assert not [n.name for n in nodes if n.metadata_props or n.doc_string], graph
        assert graph == "model.onnx" or any(n.op_type == "If" for n in nodes)


@pytest.mark.parametrize("policy", ["fp32", "int8"])
def test_graphs_load_without_onnx_runtime_warnings(ort_bundle_of, policy, capfd):
    # ONNX Runtime warns on stderr, from C++, about what it must clean up when it loads a graph
    # (e.g. an initializer that no node reads); a served bundle should load silently.
    bundle = ort_bundle_of(policy)
    capfd.readouterr()
    for name in ("model.onnx", "model.decode.onnx"):
        open_session(bundle / name, get_backend("ort:cpu"), threads=1)
    err = capfd.readouterr().err
    assert "onnxruntime" not in err, err


def _random_step(cfg, B, T, S, P, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, S + 1, (B,), generator=g)
    lens[0] = S  # the longest row sets S; the others are ragged (masked padding)
    L = cfg.num_hidden_layers
    return (
        torch.randint(0, cfg.vocab_size, (B, T), generator=g),
        lens[:, None] + torch.arange(T),
        torch.randn(L, P, cfg.kv_lora_rank, generator=g),
        torch.randn(L, P, cfg.qk_rope_head_dim, generator=g),
        torch.randint(0, P, (B, S), generator=g),
        causal_mask(lens, T, S),
    )


STEPS = [(1, 1, 0, 4), (1, 1, 7, 16), (2, 1, 5, 16), (4, 1, 12, 64), (3, 9, 0, 8), (5, 6, 11, 70), (2, 33, 3, 9)]


@pytest.mark.parametrize("B,T,S,P", STEPS)
def test_ort_matches_torch_over_dynamic_batch_seq_and_cache(session, model, B, T, S, P):
    _check_step(session, model, B, T, S, P)


# The decode graph keeps the contract: 1-2 tokens take ONNX Runtime's fused MoE node, more run
# every expert densely. The executor sends it decode batches of up to experts x threads rows.
@pytest.mark.parametrize("B,T,S,P", [*STEPS, (24, 1, 9, 300), (70, 1, 4, 300)])
def test_decode_graph_matches_torch_over_the_same_contract(decode_session, model, B, T, S, P):
    _check_step(decode_session, model, B, T, S, P)


def _check_step(session, model, B: int, T: int, S: int, P: int) -> None:
    inputs = _random_step(model.cfg, B, T, S, P, seed=B * 100 + T)
    with torch.no_grad():
        want = CachedStep(model)(*inputs)
    got = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
    for w, g in zip(want, got):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


def test_ort_prefill_matches_naive_forward(session, model):
    """Against the model's naive (expanded, cache-free) path: absorbed + ONNX + ORT change nothing."""
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    feeds = {
        "input_ids": ids.numpy(),
        "positions": torch.arange(20).expand(2, 20).numpy(),
        "past_c_kv": np.zeros((cfg.num_hidden_layers, 1, cfg.kv_lora_rank), np.float32),
        "past_k_pe": np.zeros((cfg.num_hidden_layers, 1, cfg.qk_rope_head_dim), np.float32),
        "past_slots": np.zeros((2, 0), np.int64),
        "attention_mask": causal_mask(torch.zeros(2, dtype=torch.long), 20, 0).numpy(),
    }
    logits = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits, want.numpy(), rtol=1e-5, atol=1e-5)


def _greedy(executor, prompts: list[list[int]], n: int) -> list[list[int]]:
    seqs = [list(p) for p in prompts]
    for i, p in enumerate(prompts):
        assert executor.can_allocate(i, len(p) + n)
    logits = executor.step([Chunk(i, p, 0) for i, p in enumerate(prompts)])
    for _ in range(n):
        chunks = []
        for i, row in enumerate(logits):
            token = int(row.argmax())
            chunks.append(Chunk(i, [token], len(seqs[i])))
            seqs[i].append(token)
        logits = executor.step(chunks)
    return seqs


def test_executor_all_logits_and_release(fp32_bundle, model):
    ex = OrtExecutor(fp32_bundle, get_backend("ort:cpu"), max_batch=2, block_size=4)
    assert ex.can_allocate(7, 12)
    prompt = [5, 6, 7, 8, 9, 10]
    # Prefill in two chunks through the paged cache == one naive forward.
    first = ex.step([Chunk(7, prompt[:4], 0)], all_logits=True)[0]
    second = ex.step([Chunk(7, prompt[4:], 4)], all_logits=True)[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0]
    torch.testing.assert_close(torch.cat([first, second]), want, rtol=1e-5, atol=1e-5)
    usage = ex.cache_usage()
    assert usage["blocks_used"] == 3 and usage["bytes_per_token_per_layer"] == model.cfg.latent_dim * 4
    ex.release(7)
    assert ex.cache_usage()["blocks_used"] == 0


@pytest.mark.slow
def test_greedy_to_the_end_of_the_context_equals_torch_executor(tmp_path):
    """fp32 greedy continuations of a batch of 3 ragged prompts agree token for token.

    The weights are scaled up so that logits are peaked, as in a trained model (a random
    debug model's logits nearly tie, and any 1e-7 difference could flip an argmax).
    `commit=graph` drives the device-generic ScatterND commit path on CPU.
    """
    from crosschip.config import model_preset
    from crosschip.model import Transformer
    from crosschip.tokenizer import default_tokenizer

    torch.manual_seed(0)
    m = Transformer(model_preset("debug"))  # the debug bundles' graphs: from the trace cache
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5)
    hf.save_bundle(m, tmp_path / "src", tokenizer=default_tokenizer(m.cfg.vocab_size))  # export needs one
    export_bundle(tmp_path / "src", tmp_path / "b", target="ort:cpu", policy="fp32", progress=False)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(11, 30))]
    n = m.cfg.max_position_embeddings - len(prompts[-1]) - 1  # the longest row ends at the last position
    model, _ = hf.load_bundle(tmp_path / "b")
    want = _greedy(TorchExecutor(model, get_backend("torch:cpu"), max_batch=4), prompts, n)
    for commit in ("auto", "graph"):
        got = _greedy(OrtExecutor(tmp_path / "b", get_backend("ort:cpu"), max_batch=4, commit=commit), prompts, n)
        assert got == want, commit
    assert len(set(want[0][5:])) > 20  # a real continuation, not one repeated token


def test_executor_refuses_tampered_graph(fp32_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fp32_bundle, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(hf.BundleError, match="checksum mismatch.*model.onnx"):
        OrtExecutor(bad, get_backend("ort:cpu"))


def test_executor_needs_an_onnx_graph(debug_bundle):
    with pytest.raises(hf.BundleError, match="no model.onnx"):
        OrtExecutor(debug_bundle, get_backend("ort:cpu"))


def test_executor_refuses_a_pool_larger_than_the_machine_before_listing_its_blocks(fp32_bundle):
    from crosschip.errors import CrosschipError

    with pytest.raises(CrosschipError, match=r"latent cache of 1,000,000,000,000 blocks \(--num-blocks\)"):
        OrtExecutor(fp32_bundle, get_backend("ort:cpu"), num_blocks=10**12)


def test_session_uses_backend_providers(fp32_bundle):
    session = open_session(fp32_bundle / "model.onnx", get_backend("ort:cpu"))
    assert session.get_providers() == ["CPUExecutionProvider"]
    cann = get_backend("ort:cann")
    cann.provider_options["precision_mode"] = "allow_fp32_to_fp16"
    assert cann.providers()[0] == ("CANNExecutionProvider", {"precision_mode": "allow_fp32_to_fp16"})


@pytest.mark.slow
def test_ort_executor_reuses_a_cached_prefix_with_the_same_output(fp32_bundle, model):
    from crosschip.serve.engine import Engine
    from crosschip.serve.sampling import SamplingParams
    from crosschip.tokenizer import Tokenizer

    tok = Tokenizer.load(fp32_bundle)
    prompt = "The quick brown fox jumps over the lazy dog, " * 4
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = Engine(OrtExecutor(fp32_bundle, get_backend("ort:cpu"), max_batch=2, block_size=8), tok, max_batch=2)
    first, again = (engine.generate([prompt], greedy)[0] for _ in range(2))
    assert engine.prefix_hit_tokens == (len(first.prompt_token_ids) - 1) // 8 * 8 > 0
    expected = Engine(TorchExecutor(model, max_batch=2), tok, max_batch=2, prefix_caching=False).generate(
        [prompt], greedy
    )[0]
    assert first.token_ids == again.token_ids == expected.token_ids


def test_serve_on_ort_cpu_matches_torch_engine(fp32_bundle, model, debug_bundle):
    """`crosschip serve BUNDLE` of a bundle exported for ort:cpu serves it there (it served it
    through torch, its graphs unused, unless --on said otherwise): same scheduler and HTTP API;
    greedy text equals the torch engine's."""
    from crosschip.serve.command import exported_for

    assert exported_for(fp32_bundle) == "ort:cpu" and exported_for(debug_bundle) == "torch:cpu"
    import openai

    from crosschip.serve.engine import Engine
    from crosschip.serve.sampling import SamplingParams
    from crosschip.tokenizer import Tokenizer
    from serve_helpers import ServerProcess

    prompts = ["12+34=", "Once upon a time", "7-3="]
    tok = Tokenizer.load(fp32_bundle)
    expected = Engine(TorchExecutor(model, max_batch=4), tok, max_batch=4).generate(
        prompts, SamplingParams(max_tokens=24, temperature=0)
    )
    srv = ServerProcess(fp32_bundle, "--max-batch", "4")  # no --on: the bundle's export target
    try:
        assert any("crosschip serve: ort:cpu, model" in line for line in srv.lines), srv.lines
        client = openai.OpenAI(base_url=srv.api, api_key="unused", max_retries=0)
        for prompt, exp in zip(prompts, expected):
            got = client.completions.create(model="fp32", prompt=prompt, max_tokens=24, temperature=0)
            assert got.choices[0].text == exp.text
        stream = client.completions.create(model="fp32", prompt=prompts[0], max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == expected[0].text
    finally:
        assert srv.stop() == 0


def optimized_ops(graph: Path, out: Path) -> collections.Counter:
    """Op counts of `graph` as an ONNX Runtime session built with our options runs it."""
    so = session_options(1)
    so.optimized_model_filepath = str(out.with_suffix(".onnx"))
    ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fp16", "bf16", "int8"])
def test_low_precision_graphs_store_small_weights_and_match_torch(
    debug_bundle, fp32_bundle, ort_bundle_of, policy, tmp_path
):
    """Each policy's graph stores its weights in that dtype (int8 + scales for int8) and, computing
    in fp32 on CPU, reproduces the torch model with the same rounding to fp32 accuracy."""
    from crosschip.handoff import precision

    bundle = ort_bundle_of(policy)
    manifest = hf.read_manifest(bundle)
    assert manifest["onnx"]["parity_fp32_max_abs"] < 1e-5
    proto = onnx.load(str(bundle / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert count_expert_weights(proto) == manifest["onnx"]["expert_weights"] == 24
    stored = {onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer if len(t.dims) >= 2}
    want = {"fp16": "FLOAT16", "bf16": "BFLOAT16", "int8": "INT8"}[policy]
    assert want in stored
    # The router stays fp32 in the graph too.
    router = next(t for t in proto.graph.initializer if t.name.endswith("layers.1.ffn.gate.weight"))
    assert router.data_type == onnx.TensorProto.FLOAT
    ratio = manifest["sizes"]["onnx_bytes"] / hf.read_manifest(fp32_bundle)["sizes"]["onnx_bytes"]
    assert ratio < {"fp16": 0.6, "bf16": 0.6, "int8": 0.4}[policy]
    # Decoding the stored weights is folded when the session loads, not run every step: the
    # optimized graphs are the fp32 bundle's, node for node (an int8 graph used to keep a
    # DequantizeLinear per weight).
    for graph in ("model.onnx", "model.decode.onnx"):
        assert optimized_ops(bundle / graph, tmp_path / policy) == optimized_ops(fp32_bundle / graph, tmp_path / "fp32")
    # Served through the executor: logits of a prefill equal the rounded torch model's.
    rounded = precision.round_model(hf.load_bundle(debug_bundle)[0], policy)
    ex = OrtExecutor(bundle, get_backend("ort:cpu"))
    ex.can_allocate(0, 16)
    got = ex.step([Chunk(0, list(range(3, 19)), 0)], all_logits=True)[0]
    with torch.no_grad():
        torch.testing.assert_close(got, rounded(torch.arange(3, 19)[None])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["fp16", "bf16"])
def test_half_policies_keep_fp32_what_they_cannot_store_exactly(policy):
    """A graph constant the policy would round stays fp32: the exported step folds the float
    positions 0..511 of its RoPE tables into one, and bf16 cannot hold 257."""
    h, tp = onnx.helper, onnx.TensorProto
    rounded = torch.randn(4, 8).to(torch.bfloat16).float().numpy()  # exact in both policies
    positions = np.arange(512, dtype=np.float32)[:, None]  # exact in fp16, not in bf16
    graph = h.make_graph(
        [h.make_node("Identity", ["w"], ["y"]), h.make_node("Identity", ["p"], ["z"])],
        "g",
        [],
        [h.make_tensor_value_info("y", tp.FLOAT, [4, 8]), h.make_tensor_value_info("z", tp.FLOAT, [512, 1])],
        [onnx.numpy_helper.from_array(rounded, "w"), onnx.numpy_helper.from_array(positions, "p")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    stats = store_weights(model, policy)
    assert stats == ({"converted": 2, "kept_fp32": 0} if policy == "fp16" else {"converted": 1, "kept_fp32": 1})
    y, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    np.testing.assert_array_equal(y, rounded)
    np.testing.assert_array_equal(z, positions)


def test_general_graph_splits_the_pairs_by_the_counts_tensor(fp32_bundle, model):
    """Each MoE layer's two Splits (inputs and routing weights, sorted by expert) read the
    per-expert counts as one tensor, not rebuilt element by element (`feed_splits_whole_sizes`)."""
    graph = onnx.load(str(fp32_bundle / "model.onnx"), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    experts = model.cfg.n_routed_experts
    splits = [n for n in graph.node if n.op_type == "Split" and len(n.output) == experts and len(n.input) > 1]
    assert len(splits) == 2 * len(model.moe_layers())
    for split in splits:
        assert producers[split.input[1]].op_type == "ScatterElements", split.name  # the counts themselves


def test_no_graph_sums_through_a_scatter_nd(fp32_bundle):
    """ONNX Runtime's CPU ScatterND with reduction="add" races on duplicate indices when it runs
    on more than one thread; the MoE gathers its outputs back to the tokens instead."""

    def nodes(graph):
        for node in graph.node:
            yield node
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(a.g)

    for name in ("model.onnx", "model.decode.onnx"):
        graph = onnx.load(str(fp32_bundle / name), load_external_data=False).graph
        reducing = [
            n.name
            for n in nodes(graph)
            if n.op_type == "ScatterND" and any(a.name == "reduction" and a.s != b"none" for a in n.attribute)
        ]
        assert reducing == [], (name, reducing)


def _split_graph(order: list[int]) -> onnx.ModelProto:
    """Split(x, Concat(Squeeze(Slice(counts, i, i+1)) for i in order)), the traced MoE's pattern."""
    h = onnx.helper
    nodes, parts = [], []
    inits = [onnx.numpy_helper.from_array(np.array([0], np.int64), "zero")]
    for i in order:
        inits += [onnx.numpy_helper.from_array(np.array([i + k], np.int64), f"b{i}_{k}") for k in (0, 1)]
        nodes.append(h.make_node("Slice", ["counts", f"b{i}_0", f"b{i}_1", "zero"], [f"s{i}"]))
        nodes.append(h.make_node("Squeeze", [f"s{i}", "zero"], [f"q{i}"]))
        nodes.append(h.make_node("Unsqueeze", [f"q{i}", "zero"], [f"u{i}"]))
        parts.append(f"u{i}")
    nodes.append(h.make_node("Concat", parts, ["sizes"], axis=0))
    nodes.append(h.make_node("Split", ["x", "sizes"], [f"y{i}" for i in order], axis=0))
    tp = onnx.TensorProto
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", tp.FLOAT, [6, 2]), h.make_tensor_value_info("counts", tp.INT64, [3])],
        [h.make_tensor_value_info(f"y{i}", tp.FLOAT, None) for i in order],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


@pytest.mark.parametrize("order,changed", [([0, 1, 2], 1), ([0, 2, 1], 0)])
def test_split_sizes_are_fed_whole_only_when_they_are_the_tensor_in_order(order, changed):
    import onnx_ir as ir

    from crosschip.handoff.onnx_export import feed_splits_whole_sizes

    model = ir.from_proto(_split_graph(order))
    assert feed_splits_whole_sizes(model) == changed
    proto = ir.to_proto(model)
    x, counts = np.arange(12, dtype=np.float32).reshape(6, 2), np.array([1, 2, 3], np.int64)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "counts": counts}
    )
    sizes = counts[order]
    want = np.split(x, np.cumsum(sizes)[:-1])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_the_run_serves_with_its_config_serve_table(fp32_bundle, tmp_path):
    """`crosschip run`'s serve stage used to start the server with the backend and port only:
    a [serve] api_key was sent by the smoke client but never required by the server, and the
    limits were the defaults. The key travels in the environment, not on the command line."""
    import signal

    import httpx
    import psutil

    from crosschip.config import ServeConfig
    from crosschip.pipeline import _free_port, _start_server

    serve = ServeConfig(backend="ort:cpu", max_batch=3, prefill_chunk=64, prefix_caching=False, api_key="sekret")
    port = _free_port()
    proc = _start_server(fp32_bundle, serve, port, serve.api_key, tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer sekret"}).status_code == 200
        cmdline = " ".join(psutil.Process(proc.pid).cmdline())
        assert "--max-batch 3" in cmdline and "--prefill-chunk 64" in cmdline and "sekret" not in cmdline
        assert "--no-prefix-caching" in cmdline
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
