"""ONNX export (target harmonyos) and the onnxruntime backend, on the tiny random checkpoint.

The five graphs are lowered once per module (the dynamo exporter is the slow part) and every
quantization is derived from that one lowering through the real pipeline (atomic writer,
manifest, checksums), then opened through the bundle registry and gated by `parity`.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.onnx.bundle as onnx_bundle
from edge_runtime.backends.onnxruntime import session_options
from edge_runtime.bundle import open_bundle, open_bundle_session
from edge_runtime.checkpoint import load_checkpoint
from edge_runtime.cli import main
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.parity import SAMPLES_DIR, compare
from edge_runtime.runtime import open_checkpoint_session
from export.onnx.lower import lower_graphs
from export.onnx.quantize import (
    BLOCK,
    MIN_QUANT_N,
    dequant_int4,
    int4_blocks,
    int8_per_channel,
    quantize_model,
)
from export.pipeline import ExportRequest, export_bundle, register_exporter

MAX_CONTEXT = 512
CHUNK = 32
STEPS = 32
QUANTS = ("fp32", "fp16", "int8", "int4")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return init_checkpoint("minicpm-v-4.6", "tiny", tmp_path_factory.mktemp("onnx") / "ckpt", seed=3)


@pytest.fixture(scope="module")
def lowered(ckpt_dir):
    """Serialized graphs, fp32 and half precision, lowered once; each export gets fresh copies."""
    out = {}
    for half in (False, True):
        model = load_checkpoint(ckpt_dir).model
        graphs = lower_graphs(model, CHUNK, MAX_CONTEXT + CHUNK, lambda _m: None, half=half)
        out[half] = {name: proto.SerializeToString() for name, proto in graphs.items()}
    return out


def _export_from_lowered(mp: pytest.MonkeyPatch, lowered) -> None:
    """Exports under `mp` take their graphs from the `lowered` fixture instead of tracing again."""
    mp.setattr(
        onnx_bundle,
        "lower_graph",
        lambda _model, name, _chunk, _cache, half, *_rest: onnx.load_from_string(lowered[half][name]),
    )


@pytest.fixture(scope="module")
def bundles(ckpt_dir, lowered, tmp_path_factory):
    register_exporter("onnx", "export.onnx")
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _export_from_lowered(mp, lowered)
        for quant in QUANTS:
            request = ExportRequest(ckpt_dir, root / quant, "harmonyos", None, quant, MAX_CONTEXT, CHUNK)
            out[quant] = export_bundle(request)
    return out


@pytest.fixture(scope="module")
def reference(ckpt_dir):
    return open_checkpoint_session(ckpt_dir, max_context=MAX_CONTEXT, threads=1)


@pytest.mark.parametrize("quant", QUANTS)
def test_parity_gates(quant, bundles, reference, two_mode_cases):
    candidate = open_bundle_session(bundles[quant], threads=1)
    assert candidate.backend.name == f"onnxruntime:{quant}"
    report = compare(reference, candidate, two_mode_cases, quant, n_steps=STEPS)
    assert report.passed, "\n".join(report.summary_lines())
    if quant == "fp32":
        assert report.stages["greedy"]["identical_cases"] == 1
        assert report.stages["vision"]["min_cosine"] >= 0.99999


def test_weights_stored_once(bundles):
    """Both decoder graphs point into one weights.bin at the same offsets; quantized bundles shrink."""
    root = bundles["fp32"]

    def refs(name):
        model = onnx.load(str(root / name), load_external_data=False)
        return {
            (e["offset"], e["length"])
            for t in model.graph.initializer
            if (e := {x.key: x.value for x in t.external_data})
        }

    prefill, decode = refs("decoder_prefill.onnx"), refs("decoder_decode.onnx")
    assert decode and decode <= prefill
    manifest = json.loads((root / "manifest.json").read_text())
    assert {"weights.bin", "decoder_prefill.onnx", "decoder_decode.onnx", "vision_4x.onnx"} <= set(
        manifest["files"]
    )
    size = {q: (bundles[q] / "weights.bin").stat().st_size for q in QUANTS}
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"]
    int4 = json.loads((bundles["int4"] / "manifest.json").read_text())["onnx"]["quantized_weights"]
    assert int4["decoder_decode"].get("int4", 0) > 0 and int4["token_embedding"] == {"int4-embedding": 1}
    assert "int4" not in int4["vision_16x"]  # vision stays int8 by default


def test_int4_vision_weights_on_request(
    ckpt_dir, lowered, bundles, reference, two_mode_cases, tmp_path, monkeypatch
):
    """`--vision-quant int4`: the vision graphs' linears become MatMulNBits computing in fp32 (the
    SigLIP MLP's K = 136 padded), the text graphs keep the default bundle's bytes, the bundle
    shrinks, the manifest says so, and parity passes the int4 gates (vision cosine >= 0.98 among
    them)."""
    _export_from_lowered(monkeypatch, lowered)
    request = ExportRequest(
        ckpt_dir, tmp_path / "b", "harmonyos", None, "int4", MAX_CONTEXT, CHUNK, vision_quant="int4"
    )
    out = export_bundle(request)
    manifest = json.loads((out / "manifest.json").read_text())["onnx"]
    assert manifest["vision_quantization"] == "int4" and manifest["vision_matmulnbits_accuracy_level"] == 0
    for mode in ("vision_16x", "vision_4x"):
        assert set(manifest["quantized_weights"][mode]) == {"int4", "int8-embedding"}, mode
        nodes = onnx.load(str(out / f"{mode}.onnx"), load_external_data=False).graph.node
        ops = [n.op_type for n in nodes]
        assert "MatMulNBits" in ops and "DequantizeLinear" not in ops, mode
        levels = {
            helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "accuracy_level"
        }
        assert levels == {0}, mode  # fp32 compute, while the text graphs keep the default int8
    for name in ("token_embedding", "decoder_prefill", "decoder_decode"):
        assert _weight_blobs(out, f"{name}.onnx") == _weight_blobs(bundles["int4"], f"{name}.onnx"), name
    assert (out / "weights.bin").stat().st_size < (bundles["int4"] / "weights.bin").stat().st_size
    default = json.loads((bundles["int4"] / "manifest.json").read_text())["onnx"]
    assert default["vision_quantization"] == "int8" and default["vision_matmulnbits_accuracy_level"] is None
    report = compare(reference, open_bundle_session(out, threads=1), two_mode_cases, "int4", n_steps=STEPS)
    assert report.passed, "\n".join(report.summary_lines())
    assert report.stages["vision"]["min_cosine"] >= 0.98


@pytest.mark.parametrize(
    "target, quant",
    [("harmonyos", "int8"), ("android", "8da4w"), ("ios", "int4")],
    ids=["int8", "et", "coreml"],
)
def test_int4_vision_is_refused_where_it_does_not_exist(ckpt_dir, tmp_path, capsys, target, quant):
    """One line naming the option, before any work, and no bundle left behind."""
    args = ["export", "--checkpoint", str(ckpt_dir), "--target", target, "--quant", quant]
    assert main([*args, "--vision-quant", "int4", "--out", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vision-quant int4 needs" in err[0], err
    assert not (tmp_path / "b").exists()


def _weight_blobs(root, name: str) -> set[bytes]:
    """Every initializer's bytes, a weight the graph reads through Transpose taken transposed (as
    the in-memory export folds it)."""
    model = onnx.load(str(root / name))
    transposed = {n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    return {
        np.ascontiguousarray(a.T if t.name in transposed else a).tobytes()
        for t in model.graph.initializer
        if (a := numpy_helper.to_array(t)) is not None
    }


def test_large_checkpoint_streams_each_graph_in_a_child_process(
    ckpt_dir, bundles, reference, two_mode_cases, tmp_path, monkeypatch
):
    """Above ISOLATE_ABOVE_BYTES every graph is lowered, quantized and written by a fresh child
    process from the memory-mapped checkpoint (weights read one at a time from the file, their
    transposes never folded: export/onnx/mapped.py), appending to the shared weights.bin. Every
    graph holds the in-process bundle's bytes (the weights that stay fp32 read through a Transpose
    node instead of stored transposed; quantized ones are stored [K, N] either way, quantize.py);
    parity passes with the int4 gates."""
    monkeypatch.setattr(onnx_bundle, "ISOLATE_ABOVE_BYTES", 0)
    said: list[str] = []
    out = export_bundle(
        ExportRequest(ckpt_dir, tmp_path / "b", "harmonyos", None, "int4", MAX_CONTEXT, CHUNK), said.append
    )
    assert sum("in a child process" in line for line in said) == 5
    for name in ("vision_16x", "vision_4x", "token_embedding", "decoder_prefill", "decoder_decode"):
        assert _weight_blobs(out, f"{name}.onnx") == _weight_blobs(bundles["int4"], f"{name}.onnx"), name
    decode = onnx.load(str(out / "decoder_decode.onnx"), load_external_data=False)
    inits = {t.name: t for t in decode.graph.initializer}
    left = [inits[n.input[0]] for n in decode.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert left and all(t.dims[0] < MIN_QUANT_N for t in left)  # only the fp32 DeltaNet gate weights
    report = compare(reference, open_bundle_session(out, threads=1), two_mode_cases, "int4", n_steps=STEPS)
    assert report.passed, "\n".join(report.summary_lines())


def test_export_without_decoder_fusions_uses_standard_ops(ckpt_dir, bundles, tmp_path):
    """`--onnx-fusions none` (runtimes without the recent contrib ops): no contrib op in any graph,
    no in-place state, and the same logits as the fused bundle."""
    out = tmp_path / "plain"
    args = ["export", "--checkpoint", str(ckpt_dir), "--target", "harmonyos", "--quant", "fp32"]
    args += ["--max-context", str(MAX_CONTEXT), "--chunk-size", str(CHUNK), "--onnx-fusions", "none"]
    assert main([*args, "--out", str(out)]) == 0
    full = json.loads((out / "manifest.json").read_text())
    manifest = full["onnx"]
    assert manifest["fusions"] == [] and manifest["in_place_state"] == []
    assert manifest["decode_contrib_ops"] == {}
    for name in ("vision_16x.onnx", "vision_4x.onnx", "decoder_prefill.onnx", "decoder_decode.onnx"):
        graph = onnx.load(str(out / name), load_external_data=False)
        assert not {n.domain for n in graph.graph.node} - {"", "ai.onnx"}, name
    assert json.loads((bundles["fp32"] / "manifest.json").read_text())["onnx"]["decode_contrib_ops"]
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(CHUNK, full["model"]["hidden_size"])).astype(np.float32)
    logits = []
    for root in (out, bundles["fp32"]):
        backend = open_bundle_session(root, threads=1).backend
        state = backend.new_state()
        first, state = backend.prefill_chunk(embeds, CHUNK - 2, 0, state)
        logits.append([first, backend.decode_step(embeds[-1:], CHUNK - 2, state)[0]])
    for a, b in zip(*logits, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_killed_lowering_process_is_one_line(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_bundle, "ISOLATE_ABOVE_BYTES", 0)
    monkeypatch.setattr(onnx_bundle, "_child_job", _die)
    with pytest.raises(onnx_bundle.LoweringProcessError, match="lowering vision_16x died"):
        export_bundle(ExportRequest(ckpt_dir, tmp_path / "b", "harmonyos", None, "int4", MAX_CONTEXT, CHUNK))
    assert not (tmp_path / "b").exists()


def test_an_interrupted_export_stops_its_lowering_process(ckpt_dir, tmp_path, monkeypatch):
    """Ctrl-C (SIGTERM raises alike, cli.py) while a child lowers: the child is killed, not waited
    for (a full-size lowering takes minutes), and nothing is left behind. The signal is sent once
    the child runs its job (a fixed delay could land while a loaded machine is still spawning it)."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    started_file = tmp_path / "child-started"
    monkeypatch.setenv(HANG_STARTED_ENV, str(started_file))  # the spawned child inherits it
    monkeypatch.setattr(onnx_bundle, "ISOLATE_ABOVE_BYTES", 0)
    monkeypatch.setattr(onnx_bundle, "_child_job", _hang)
    sent: list[float] = []
    stop = threading.Event()

    def interrupt_when_the_child_runs() -> None:
        while not stop.wait(0.1):
            if started_file.exists():
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)  # a real signal
                return

    thread = threading.Thread(target=interrupt_when_the_child_runs, daemon=True)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            export_bundle(
                ExportRequest(ckpt_dir, tmp_path / "b", "harmonyos", None, "int4", MAX_CONTEXT, CHUNK)
            )
    finally:
        stop.set()
        thread.join()
    assert sent and time.monotonic() - sent[0] < 60  # the child would sleep HANG_S
    assert not multiprocessing.active_children()
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


HANG_STARTED_ENV = "MINICPMV_EDGE_TEST_HANG_STARTED"
HANG_S = 300


def _hang(*_args):
    """Stands in for a long lowering; says it started by creating the file $HANG_STARTED_ENV names."""
    import os
    import time
    from pathlib import Path

    Path(os.environ[HANG_STARTED_ENV]).touch()
    time.sleep(HANG_S)


def _die(*_args):
    """Stands in for the child's job: the process exits as the kernel's OOM killer would leave it."""
    import os

    os._exit(137)


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_kv_cache_is_updated_in_place(quant, bundles):
    """The fused graphs' KV caches are listed as in-place state; the backend binds present to past's
    buffer (same data pointer after a step) and the logits equal those of fresh output buffers."""
    manifest = json.loads((bundles[quant] / "manifest.json").read_text())
    attention = [s["name"] for s in manifest["state"] if s["name"].endswith(("k_cache", "v_cache"))]
    assert attention and manifest["onnx"]["in_place_state"] == sorted(attention)
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(CHUNK + 6, manifest["model"]["hidden_size"])).astype(np.float32)

    def run(in_place: bool) -> tuple[list[np.ndarray], bool]:
        backend = open_bundle_session(bundles[quant], threads=1).backend
        if not in_place:
            backend._in_place = frozenset()
        state = backend.new_state()
        logits, state = backend.prefill_chunk(embeds[:CHUNK], CHUNK - 3, 0, state)
        out, shared = [logits], True
        for i in range(6):
            before = state.tensors[attention[0]].data_ptr()
            logits, state = backend.decode_step(embeds[CHUNK + i], CHUNK - 3 + i, state)
            out.append(logits)
            shared &= state.tensors[attention[0]].data_ptr() == before
        return out, shared

    (got, shared), (want, copied) = run(True), run(False)
    assert shared and not copied
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_fp16_bundle_computes_in_half_precision(bundles):
    """fp16 = fp16 weights *and* activations: MatMuls read fp16 weights directly (no Cast back to
    fp32), the KV cache is fp16, DeltaNet conv + recurrent state and the graph I/O stay fp32."""
    root = bundles["fp16"]
    model = onnx.load(str(root / "decoder_decode.onnx"), load_external_data=False)
    fp16_inits = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls
    assert sum(n.input[1] in fp16_inits for n in matmuls) >= len(matmuls) // 2
    assert not any(n.op_type == "Cast" and n.input[0] in fp16_inits for n in model.graph.node)
    dtypes = {
        s["name"].rsplit(".", 1)[1]: s["dtype"]
        for s in json.loads((root / "manifest.json").read_text())["state"]
    }
    assert dtypes == {
        "k_cache": "float16",
        "v_cache": "float16",
        "conv_state": "float32",
        "recurrent_state": "float32",
    }
    io = {i.name: i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.output)}
    assert io["embeds"] == io["logits"] == onnx.TensorProto.FLOAT


def test_backend_threads_and_padding(bundles):
    _, backend = open_bundle(bundles["fp32"], threads=2)
    assert backend.session("decoder_decode").get_session_options().intra_op_num_threads == 2
    embeds = backend.token_embedding(np.array([1, 2, 3]))
    logits, state = backend.prefill_chunk(embeds, 3, 0, backend.new_state())
    assert logits.shape == (backend.info.vocab_size,)
    logits2, _ = backend.decode_step(embeds[:1], 3, state.copy())
    assert np.isfinite(logits2).all()


def test_chat_inspect_cli(bundles, capsys):
    image = str(SAMPLES_DIR / "square.png")
    args = ["chat", "--bundle", str(bundles["int4"]), "--image", image, "--prompt", "Hi", "--json"]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    assert "text" in json.loads(capsys.readouterr().out)
    assert main(["inspect", "--bundle", str(bundles["int4"])]) == 0
    assert "int4" in capsys.readouterr().out


def test_int4_packing_matches_onnxruntime():
    """Our nibble layout is the one MatMulNBits and GatherBlockQuantized read, bit for bit."""
    rng = np.random.default_rng(0)
    n, k = 48, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    packed, scale = int4_blocks(w)
    x = rng.standard_normal((3, k)).astype(np.float32)
    ids = np.array([0, 5, 47], np.int64)
    nodes = [
        helper.make_node(
            "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK
        ),
        helper.make_node(
            "GatherBlockQuantized",
            ["t", "ids", "s"],
            ["e"],
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=BLOCK,
            bits=4,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n]),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, [3, k]),
        ],
        [
            numpy_helper.from_array(packed.reshape(n, k // BLOCK, BLOCK // 2), "b"),
            numpy_helper.from_array(packed, "t"),
            numpy_helper.from_array(scale, "s"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, e = sess.run(None, {"x": x, "ids": ids})
    deq = dequant_int4(packed, scale)
    np.testing.assert_allclose(y, x @ deq.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(e, deq[ids])
    # the scale search: never a larger squared error per block than the plain absmax scale
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    absmax = np.abs(blocks).max(axis=-1, keepdims=True) / 7
    plain = np.square(np.clip(np.rint(blocks / absmax), -7, 7) * absmax - blocks).sum(axis=-1)
    searched = np.square(deq.reshape(blocks.shape) - blocks).sum(axis=-1)
    assert (searched <= plain + 1e-6).all() and searched.sum() < plain.sum()


def test_int4_pads_k_to_whole_blocks():
    """A K = 136 linear (the tiny SigLIP MLP width; full SigLIP's is 4304) is zero-padded to 160 and
    read by MatMulNBits with K = 136, exactly the product of its dequantized blocks' first 136
    columns."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((64, 136)).astype(np.float32)
    w2 = rng.standard_normal((136, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    # fp32 compute (accuracy_level 0), so the graph is exactly the dequantized weights' product
    stats = quantize_model(model, "int4", vision=False, accuracy_level=0)
    assert stats.counts == {"int4": 2}
    ks = [next(a.i for a in n.attribute if a.name == "K") for n in model.graph.node]
    assert ks == [64, 136]
    x = rng.standard_normal((2, 64)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    padded = np.concatenate([w2.T, np.zeros((64, 24), np.float32)], axis=1)
    p1, s1 = int4_blocks(np.ascontiguousarray(w1.T))
    p2, s2 = int4_blocks(padded)
    want = (x @ dequant_int4(p1, s1).T) @ dequant_int4(p2, s2)[:, :136].T
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-3, atol=1e-3)


def test_vision_linears_take_int4_only_when_asked():
    """In an int4 export a vision graph keeps int8 linears unless `vision_quant="int4"`; its
    position table stays int8 either way."""
    rng = np.random.default_rng(3)

    def graph():
        nodes = [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node("MatMul", ["e", "w"], ["y"]),
        ]
        inits = [
            numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "w"),
        ]
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 48])]
        return helper.make_model(
            helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 18)]
        )

    assert quantize_model(graph(), "int4", vision=True).counts == {"int8": 1, "int8-embedding": 1}
    stats = quantize_model(graph(), "int4", vision=True, vision_quant="int4")
    assert stats.counts == {"int4": 1, "int8-embedding": 1}
    with pytest.raises(ValueError, match="vision quantization"):
        quantize_model(graph(), "int4", vision=True, vision_quant="int2")


def test_int8_weights_reach_onnxruntimes_fused_matmul(tmp_path):
    """A Transpose -> MatMul (the streaming export's form) is rewritten so the int8 weight feeds
    the MatMul directly, which onnxruntime fuses with its DequantizeLinear; a Gemm (the vision
    merger's form) stays DequantizeLinear + Gemm, the faster form at many rows (quantize.py). The
    product is unchanged."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((48, 64)).astype(np.float32)  # Gemm, transB = 1: [N, K]
    b1 = rng.standard_normal(48).astype(np.float32)
    w2 = rng.standard_normal((64, 48)).astype(np.float32)  # [N, K] read through Transpose
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
            helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
            helper.make_node("MatMul", ["h", "w2t"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 64])],
        [numpy_helper.from_array(w, name) for w, name in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_model(model, "int8", vision=True).counts == {"int8": 2}
    ops = sorted(n.op_type for n in model.graph.node)
    assert ops == ["DequantizeLinear", "DequantizeLinear", "Gemm", "MatMul"]
    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert fused.count("MatMulNBits") == 1 and fused.count("Gemm") == 1, fused
    assert "Transpose" not in fused, fused
    x = rng.standard_normal((5, 64)).astype(np.float32)
    q1, s1 = int8_per_channel(w1, 0)
    q2, s2 = int8_per_channel(w2, 0)
    want = (x @ (q1 * s1[:, None]).T + b1) @ (q2 * s2[:, None]).T
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-3, atol=1e-3)
