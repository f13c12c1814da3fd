"""Fused graphs (export/onnx/fuse.py): contrib ops present, same I/O, same logits / embeddings as the plain graphs.

Tolerance: 1e-4 absolute on logits and state. The fused kernels reassociate fp32 sums (sequential vs
chunked delta rule, one-pass RMS norm vs the rsqrt chain, GQA's softmax over the valid prefix vs the
masked full cache); measured differences are ~3e-7 on the tiny checkpoint (|logits| < 1) and ~1e-5 on
a 1024-wide model (|logits| ~ 7). A semantic slip (state layout, decay sign, an off-by-one position or
cache row, the conv state at a padded chunk) moves logits by 1e-2 or more. The fp32 parity gate
against the checkpoint is 1e-3 (edge_runtime/parity.py), so 1e-4 keeps the fused graphs well inside it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from edge_runtime.backends.onnxruntime import session_options
from edge_runtime.checkpoint import load_checkpoint
from edge_runtime.models.minicpm_v46 import MiniCPMV46, preset
from edge_runtime.models.qwen35_text import (
    GatedAttention,
    GatedDeltaNet,
    chunked_delta_rule,
    l2norm,
    recurrent_delta_rule,
    state_specs,
)
from export.graphs import (
    TextDecoderGraph,
    VisionEncoderGraph,
    decoder_example_inputs,
    decoder_signature,
    vision_position_example,
)
from export.onnx.fuse import MS, contrib_op_counts, fused_decoder
from export.onnx.lower import _export, lower_graph
from export.onnx.quantize import quantize_model

CHUNK = 16
CACHE = 48
TOL = 1e-4


def _decoders(model, fused: bool) -> dict[str, onnx.ModelProto]:
    """Both decoder graphs, exported as lower_graphs does (with the fusion hook when `fused`)."""
    sig = decoder_signature(model, CACHE)
    out = {}
    with torch.no_grad():
        for name, c in (("prefill", CHUNK), ("decode", 1)):
            args = decoder_example_inputs(model, c, CACHE)
            if fused:
                with fused_decoder(model, CACHE):
                    out[name] = _export(TextDecoderGraph(model), args, sig.input_names, sig.output_names)
            else:
                out[name] = _export(TextDecoderGraph(model), args, sig.input_names, sig.output_names)
    return out


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(
        model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )


def _cache_rows(start: int, count: int) -> np.ndarray:
    """position_ids of a call when positions are the cache index: start + i in all three rows."""
    return np.repeat(np.arange(start, start + count, dtype=np.int64)[None], 3, axis=0)


def _run_prompt(sessions, cfg, embeds: np.ndarray, prompt: int, steps: int, rope=None):
    """Chunked prefill of `prompt` rows, then `steps` decode steps: logits after each call + final
    state. `rope(start, count)`: the position rows of a call (default: the cache index)."""
    specs = state_specs(cfg, CACHE)
    state = [np.zeros(s.shape, np.float32) for s in specs]
    rope = rope or _cache_rows

    def call(graph, rows, start, n_valid):
        feeds = {
            "embeds": rows,
            "start_pos": np.array([start], np.int64),
            "n_valid": np.array([n_valid], np.int64),
            "position_ids": rope(start, rows.shape[1]),
        }
        feeds.update({f"past.{s.name}": v for s, v in zip(specs, state, strict=True)})
        outs = sessions[graph].run(None, feeds)
        return outs[0], outs[1:]

    logits, pos = [], 0
    while pos < prompt:
        n = min(CHUNK, prompt - pos)
        rows = np.zeros((1, CHUNK, cfg.hidden_size), np.float32)
        rows[0, :n] = embeds[pos : pos + n]
        lg, state = call("prefill", rows, pos, n)
        pos += n
    logits.append(lg)
    for i in range(steps):
        lg, state = call("decode", embeds[None, prompt + i : prompt + i + 1], prompt + i, 1)
        logits.append(lg)
    return logits, dict(zip((s.name for s in specs), state, strict=True))


def _reference(model, embeds: np.ndarray, prompt: int, steps: int, rope=None) -> list[np.ndarray]:
    logits, pos = [], 0
    state = model.new_state(CACHE)
    extra = (
        (lambda start, count: {})
        if rope is None
        # noqa: E731
        else (lambda start, count: {"rope_positions": torch.from_numpy(rope(start, count))})
    )
    with torch.no_grad():
        while pos < prompt:
            n = min(CHUNK, prompt - pos)
            rows = torch.zeros(1, CHUNK, embeds.shape[1])
            rows[0, :n] = torch.from_numpy(embeds[pos : pos + n])
            lg, state = model.decode(rows, torch.tensor([pos]), torch.tensor([n]), state, **extra(pos, CHUNK))
            pos += n
        logits.append(lg.numpy())
        for i in range(steps):
            row = torch.from_numpy(embeds[None, prompt + i : prompt + i + 1])
            lg, state = model.decode(
                row, torch.tensor([prompt + i]), torch.tensor([1]), state, **extra(prompt + i, 1)
            )
            logits.append(lg.numpy())
    return logits


def _io(model: onnx.ModelProto) -> list:
    def spec(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, [d.dim_value or d.dim_param for d in t.shape.dim]

    return [[spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]]


@pytest.fixture(scope="module")
def tiny_graphs(tiny_checkpoint):
    torch.manual_seed(0)
    model = load_checkpoint(tiny_checkpoint).model.eval()
    return model, _decoders(model, fused=False), _decoders(model, fused=True)


def test_fused_graphs_hold_contrib_ops_and_keep_io(tiny_graphs):
    _, plain, fused = tiny_graphs
    decode, prefill = contrib_op_counts(fused["decode"]), contrib_op_counts(fused["prefill"])
    for op in (
        "SimplifiedLayerNormalization",
        "LinearAttention",
        "LinearAttentionGate",
        "GroupQueryAttention",
    ):
        assert decode.get(op) and prefill.get(op), (op, decode, prefill)
    assert decode.get("CausalConvWithState") and not prefill.get("CausalConvWithState")  # decode only
    assert not contrib_op_counts(plain["decode"]) and not contrib_op_counts(plain["prefill"])
    assert any(o.domain == MS for o in fused["decode"].opset_import)
    for name in ("prefill", "decode"):
        assert _io(fused[name]) == _io(plain[name])
        assert len(fused[name].graph.node) < len(plain[name].graph.node) / 2


@pytest.mark.parametrize("quant", ["fp32", "int4"])
@pytest.mark.parametrize("prompt", [5, 2 * CHUNK + 3])  # one padded chunk; two full chunks + a padded one
def test_fused_logits_match_plain(tiny_graphs, quant, prompt):
    model, plain, fused = tiny_graphs
    cfg = model.cfg.text
    runs = {}
    for label, graphs in (("plain", plain), ("fused", fused)):
        graphs = {k: onnx.ModelProto.FromString(m.SerializeToString()) for k, m in graphs.items()}
        for m in graphs.values():
            quantize_model(m, quant, vision=False)
        runs[label] = _run_prompt(
            {k: _session(m) for k, m in graphs.items()}, cfg, _embeds(cfg, prompt + 4), prompt, 4
        )
    (plain_logits, plain_state), (fused_logits, fused_state) = runs["plain"], runs["fused"]
    for a, b in zip(plain_logits, fused_logits, strict=True):
        assert np.abs(a - b).max() < TOL
    if quant == "fp32":  # and both match the PyTorch reference
        for a, b in zip(_reference(model, _embeds(cfg, prompt + 4), prompt, 4), fused_logits, strict=True):
            assert np.abs(a - b).max() < TOL
    valid = prompt + 4
    for name, a in plain_state.items():
        b = fused_state[name]
        if name.endswith(("k_cache", "v_cache")):  # rows past the last token are never read
            a, b = a[:, :, :valid], b[:, :, :valid]
        assert np.abs(a - b).max() < TOL, name


def _embeds(cfg, rows: int) -> np.ndarray:
    return (np.random.default_rng(rows).standard_normal((rows, cfg.hidden_size)) * 0.5).astype(np.float32)


def _canvas_like_rows(start: int, count: int) -> np.ndarray:
    """Position rows unlike the cache index (t / h / w apart, behind it, repeating): what 4.7's
    canvas rows look like to the decoder. A graph that rotated by the cache index fails on them."""
    i = np.arange(start, start + count, dtype=np.int64)
    return np.stack([i // 2, i // 3 + (i % 4), np.maximum(i - 7, 0)])


@pytest.mark.parametrize("mrope", [False, True], ids=["1d-rope", "mrope"])
@pytest.mark.parametrize("canvas", [False, True], ids=["cache-rows", "other-rows"])
def test_rotary_inside_gqa_matches_reference(mrope, canvas):
    """head_dim 64 -> rotary width 16: the CPU kernel takes RoPE (do_rotary), the RoPE tables and
    the graph's position rows (GroupQueryAttention's position_ids input): row 0 into the static
    table under 1-D RoPE, the chunk's own M-RoPE cos / sin rows with mrope_section. Also 2
    DeltaNet key heads for 4 value heads (q / k repeated per value head, as the reference)."""
    cfg = preset("tiny", 64, 62, 63)
    cfg.text.head_dim = 64
    cfg.text.linear_num_key_heads = 2
    cfg.text.num_hidden_layers = 2
    cfg.text.layer_types = ["linear_attention", "full_attention"]
    cfg.text.mrope_section = [2, 3, 3] if mrope else None
    torch.manual_seed(0)
    model = MiniCPMV46(cfg).eval()
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if "norm" in name or p.dim() >= 2:
                p.normal_(0, 0.1 if p.dim() == 1 else 0.2)
    fused = _decoders(model, fused=True)
    for m in fused.values():
        (gqa,) = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
        assert helper.get_attribute_value(next(a for a in gqa.attribute if a.name == "do_rotary")) == 1
        assert len(gqa.input) == 10  # ..., cos_cache, sin_cache, position_ids
    prompt = CHUNK + 5
    embeds = _embeds(cfg.text, prompt + 3)
    rope = _canvas_like_rows if canvas else None
    got, _ = _run_prompt({k: _session(m) for k, m in fused.items()}, cfg.text, embeds, prompt, 3, rope)
    for a, b in zip(_reference(model, embeds, prompt, 3, rope or _cache_rows), got, strict=True):
        assert np.abs(a - b).max() < TOL


def test_fused_decoder_leaves_the_model_as_it_was(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint).model.eval()
    classes = {name: type(m) for name, m in model.named_modules()}
    args = decoder_example_inputs(model, 3, CACHE)
    embeds = torch.randn(1, 3, model.cfg.text.hidden_size)
    with torch.no_grad():
        want, _ = model.decode(embeds, args[1], args[2], list(args[4:]))
        with fused_decoder(model, CACHE):
            assert type(model.language_model.layers[0].linear_attn) is not GatedDeltaNet
            assert type(model.language_model.layers[3].self_attn) is not GatedAttention
            inside, _ = model.decode(embeds, args[1], args[2], list(args[4:]))  # eager: the reference path
    assert torch.equal(want, inside)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    with pytest.raises(ValueError, match="unknown decoder fusions"), fused_decoder(model, CACHE, ["flash"]):
        pass


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_fused_vision_attention_matches_plain_and_torch(tiny_checkpoint, mode):
    """`mha`: every SigLIP attention (the encoder layers' and, in 16x, the window merger's over its
    2x2 windows as a batch) is one MultiHeadAttention node; the graph's embeddings equal the plain
    graph's and torch's at lengths other than the traced one (L is dynamic)."""
    model = load_checkpoint(tiny_checkpoint).model.eval()
    classes = {name: type(m) for name, m in model.named_modules()}
    plain = lower_graph(model, f"vision_{mode}", CHUNK, CACHE, False, fusions=())
    fused = lower_graph(model, f"vision_{mode}", CHUNK, CACHE, False)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    layers = len(model.vision_tower.encoder.layers) + (mode == "16x")
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops
    assert "MultiHeadAttention" not in [n.op_type for n in plain.graph.node]
    rng = np.random.default_rng(0)
    for length in (32, 80):
        feeds = {
            "patches": rng.standard_normal((length, model.cfg.vision.patch_dim)).astype(np.float32),
            "position_ids": vision_position_example(model.cfg, mode, length),
        }
        got, base = (_session(g).run(None, feeds)[0] for g in (fused, plain))
        with torch.no_grad():
            want = VisionEncoderGraph(model, mode)(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        assert np.abs(got - base).max() < 1e-5 and np.abs(got - want).max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# the contrib kernels themselves, against our reference math (guards an onnxruntime upgrade)


def _one_node(node, inputs: dict[str, np.ndarray], n_out: int) -> list[np.ndarray]:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output[:n_out]],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return _session(model).run(None, inputs)


@pytest.mark.parametrize("t", [1, 20])
def test_linear_attention_kernel_is_our_gated_delta_rule(t):
    torch.manual_seed(t)
    h, dk, dv = 3, 8, 12
    q, k = l2norm(torch.randn(1, h, t, dk)), l2norm(torch.randn(1, h, t, dk))
    v, state = torch.randn(1, h, t, dv), torch.randn(1, h, dk, dv)
    valid = (torch.arange(t) < max(t - 4, 1)).float()  # padded tail: beta = g = 0
    g, beta = -torch.rand(1, h, t) * valid, torch.rand(1, h, t) * valid
    rule = recurrent_delta_rule if t == 1 else chunked_delta_rule
    want_out, want_state = rule(q * dk**-0.5, k, v, g, beta, state)
    pack = lambda x: x.transpose(1, 2).reshape(1, t, -1).numpy()  # noqa: E731
    node = helper.make_node(
        "LinearAttention",
        ["q", "k", "v", "s", "g", "b"],
        ["o", "s2"],
        domain=MS,
        q_num_heads=h,
        kv_num_heads=h,
        update_rule="gated_delta",
        scale=dk**-0.5,
    )
    feeds = {
        "q": pack(q),
        "k": pack(k),
        "v": pack(v),
        "s": state.numpy(),
        "g": pack(g[..., None]),
        "b": pack(beta[..., None]),
    }
    out, new_state = _one_node(node, feeds, 2)
    assert np.abs(out - pack(want_out)).max() < 1e-5
    assert np.abs(new_state - want_state.numpy()).max() < 1e-5


def test_causal_conv_kernel_is_conv_silu_with_carried_state():
    torch.manual_seed(0)
    channels, kernel = 10, 4
    x, w, state = (
        torch.randn(1, channels, 1),
        torch.randn(channels, 1, kernel),
        torch.randn(1, channels, kernel - 1),
    )
    window = torch.cat([state, x], dim=-1)
    node = helper.make_node(
        "CausalConvWithState", ["x", "w", "", "s"], ["y", "s2"], domain=MS, activation="silu"
    )
    y, new_state = _one_node(node, {"x": x.numpy(), "w": w.numpy(), "s": state.numpy()}, 2)
    assert np.abs(y - F.silu(F.conv1d(window, w, groups=channels)).numpy()).max() < 1e-5
    assert np.array_equal(new_state, window[..., 1:].numpy())
