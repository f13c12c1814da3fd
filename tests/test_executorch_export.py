"""ExecuTorch (android) bundles: the .pte's methods and metadata, parity with the torch reference, state
handling, quantization fallbacks and the undelegated-operator gate.

Lowering the tiny model to XNNPACK takes ~2.5 min for fp32 on this 2-core machine (139 s measured)
and about twice that per quantized variant. The fp32 bundle is exported once per module and its tests
always run; the two quantized-parity tests re-export and run with `make test-slow`
(MINICPMV_EDGE_SLOW=1).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from edge_runtime.backends.executorch import ExecuTorchBackend  # noqa: E402
from edge_runtime.backends.torch_ref import TorchBackend  # noqa: E402
from edge_runtime.bundle import load_bundle, register_backend  # noqa: E402
from edge_runtime.checkpoint import load_checkpoint  # noqa: E402
from edge_runtime.errors import InputError  # noqa: E402
from edge_runtime.generation import decode_one, prefill, teacher_forced_logits  # noqa: E402
from export.executorch.lower import (  # noqa: E402
    DelegationReport,
    check_delegation,
    is_topologically_sorted,
    sort_only_when_needed,
)
from export.executorch.quantize import quantize_model  # noqa: E402

CHUNK = 16  # conftest.EXECUTORCH_TINY_CHUNK
MAX_CONTEXT = 128  # conftest.EXECUTORCH_TINY_CONTEXT
SLOW = os.environ.get("MINICPMV_EDGE_SLOW") == "1"
# Each quantized lowering takes ~5 min on this 2-core machine; `make test-slow` runs them.
needs_slow_export = pytest.mark.skipif(
    not SLOW, reason="quantized .pte export takes minutes; run make test-slow"
)


def _export(ckpt: Path, out: Path, quant: str) -> Path:
    from edge_runtime.backends.executorch import open_executorch_bundle
    from export.pipeline import ExportRequest, export_bundle, register_exporter

    register_exporter("executorch", "export.executorch")
    register_backend("executorch", open_executorch_bundle)
    request = ExportRequest(ckpt, out, "android", None, quant, MAX_CONTEXT, CHUNK)
    return export_bundle(request)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def fp32_bundle(executorch_tiny_fp32) -> Path:
    """Exported with CHUNK and MAX_CONTEXT (conftest.py), shared with the stock runner tests."""
    return executorch_tiny_fp32


def _open(bundle: Path) -> ExecuTorchBackend:
    b = load_bundle(bundle)
    return ExecuTorchBackend(b.file("model.pte"), b.manifest.to_dict())


def _reference(ckpt: Path) -> TorchBackend:
    return TorchBackend(load_checkpoint(ckpt), max_context=MAX_CONTEXT, chunk_size=CHUNK)


def _slice(seed: int, h: int, w: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random 8-bit slice of h x w patches: its pixels [3, H, W] and the host's patches and
    position ids for it (image.normalize + patches.slice_to_patches)."""
    from edge_runtime.processing.image import normalize
    from edge_runtime.processing.patches import slice_to_patches

    pixels = np.random.default_rng(seed).integers(0, 256, (3, 14 * h, 14 * w), dtype=np.uint8)
    return (pixels, *slice_to_patches(normalize(pixels.transpose(1, 2, 0)), mode))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _greedy(backend, embeds: np.ndarray, n_new: int) -> list[int]:
    """Greedy tokens; each fed-back token is embedded by the same backend that decodes."""
    state = backend.new_state()
    logits, state, _ = prefill(backend, embeds, state)
    out = [int(np.argmax(logits))]
    for i in range(n_new - 1):
        logits, state = decode_one(backend, out[-1], len(embeds) + i, state)
        out.append(int(np.argmax(logits)))
    return out


def _prompt(ref: TorchBackend, n: int = 37) -> np.ndarray:
    ids = np.random.default_rng(1).integers(10, ref.info.vocab_size - 10, n)
    return ref.token_embedding(ids)


def test_pte_methods_and_metadata_match_manifest(fp32_bundle):
    """ExecuTorch's own runtime loads the file; methods and constant methods agree with the manifest."""
    manifest = load_bundle(fp32_bundle).manifest.to_dict()
    backend = _open(fp32_bundle)
    graphs = manifest["graphs"]
    expected = {
        *graphs["vision_encoder"]["methods"].values(),
        graphs["token_embedding"]["method"],
        *graphs["text_decoder"]["methods"].values(),
        *manifest["executorch"]["metadata"],
    }
    assert expected == backend.method_names
    runner = {
        "vision_encoder",
        "token_embedding",
        "text_decoder",
        "forward",
        "get_max_seq_len",
        "get_eos_ids",
    }
    assert runner <= expected
    assert graphs["vision_encoder"]["methods"] == {"16x": "vision_encoder", "4x": "vision_encoder_4x"}
    meta = manifest["executorch"]["metadata"]
    assert backend.metadata("get_max_context_len") == manifest["max_context"] == meta["get_max_context_len"]
    assert backend.metadata("get_max_seq_len") == graphs["text_decoder"]["max_tokens"] == MAX_CONTEXT
    assert backend.metadata("enable_dynamic_shape") is True
    assert backend.metadata("get_vocab_size") == manifest["model"]["vocab_size"]
    eos = backend.metadata("get_eos_ids")
    assert sorted(eos if isinstance(eos, list) else [eos]) == sorted(manifest["prompt"]["stop_ids"])
    assert backend.metadata("get_bos_id") == meta["get_bos_id"]
    assert backend.metadata("get_chunk_size") == manifest["chunk_size"]
    assert manifest["format"] == "executorch" and manifest["target"] == "android"
    # ExecuTorch's kernels, as many calls per method as the manifest says: the gated delta rule once
    # per DeltaNet layer, the cache update twice (K, V) and SDPA once per attention layer
    et = manifest["executorch"]
    assert et["custom_ops"] == ["llama::custom_sdpa", "llama::gated_delta_rule", "llama::update_cache"]
    assert sorted(et["custom_op_methods"]["llama::custom_sdpa"]) == ["forward", "text_decoder"]
    assert et["metadata"]["use_sdpa_with_kv_cache"] is True
    kinds = manifest["model"]["layer_types"]
    per_layer = {
        "llama::gated_delta_rule": kinds.count("linear_attention"),
        "llama::custom_sdpa": kinds.count("full_attention"),
        "llama::update_cache": 2 * kinds.count("full_attention"),
    }
    for op, n in per_layer.items():
        for method, undelegated in et["delegation"]["per_method"].items():
            calls = undelegated["undelegated"].get(op.replace("::", "."), 0)
            assert calls == (n if method in et["custom_op_methods"][op] else 0), (op, method)
    # norms compute their means as linear layers (export/executorch/norms.py): none left to portable
    for method, counts in et["delegation"]["per_method"].items():
        left = counts["undelegated"]
        assert "aten.native_layer_norm" not in left and "aten.var_mean.correction" not in left, method
        if method in ("text_decoder", "forward"):
            assert "aten.mean.dim" not in left and "aten.sum.dim_IntList" not in left, (method, left)


@pytest.mark.parametrize("t", [1, 16, 37])
def test_delta_rule_kernel_matches_the_reference_maths(tiny, t):
    """The decoder with ExecuTorch's llama::gated_delta_rule swapped in (eager, its ATen kernel) gives
    the reference logits and state, padding rows included; outside the context the maths is ours."""
    from edge_runtime.models import qwen35_text
    from export.executorch.custom_ops import delta_rule_op

    model = load_checkpoint(tiny).model
    specs = qwen35_text.state_specs(model.cfg.text, 64)
    state = [torch.randn(s.shape, dtype=s.dtype) * 0.1 for s in specs]
    embeds = torch.randn(1, t, model.cfg.text.hidden_size)
    args = (embeds, torch.tensor([3]), torch.tensor([max(t - 2, 1)]))
    want, want_state = model.decode(*args, [x.clone() for x in state])
    with delta_rule_op(True):
        assert qwen35_text.delta_rule.__name__ == "_op_delta_rule"
        got, got_state = model.decode(*args, [x.clone() for x in state])
    assert qwen35_text.delta_rule.__name__ == "delta_rule"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(got_state, want_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("t", "start", "n_valid"), [(1, 3, 1), (1, 63, 1), (16, 3, 14), (16, 40, 16)])
def test_attention_kernels_match_the_reference_maths(tiny, t, start, n_valid):
    """The decoder with ExecuTorch's llama::update_cache / llama::custom_sdpa swapped in (eager, their
    ATen kernels) on caches laid out [1, S, n_kv, D] gives the reference logits, and its caches,
    updated in place, hold the reference's new caches transposed."""
    from edge_runtime.models import qwen35_text
    from export.executorch.custom_ops import attention_ops

    model = load_checkpoint(tiny).model
    specs = qwen35_text.state_specs(model.cfg.text, 64)
    state = [torch.randn(s.shape, dtype=s.dtype) * 0.1 for s in specs]

    def seq_major(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        cache = [s.name.endswith(("k_cache", "v_cache")) for s in specs]
        return [
            x.transpose(1, 2).contiguous() if c else x.clone() for x, c in zip(tensors, cache, strict=True)
        ]

    args = (torch.randn(1, t, model.cfg.text.hidden_size), torch.tensor([start]), torch.tensor([n_valid]))
    want, want_state = model.decode(*args, [x.clone() for x in state])
    buffers = seq_major(state)
    with attention_ops(True):
        got, got_state = model.decode(*args, buffers)
    assert qwen35_text.cached_attention.__name__ == "cached_attention"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    caches = [i for i, s in enumerate(specs) if s.name.endswith("_cache")]
    assert all(got_state[i] is buffers[i] for i in caches)  # in place: nothing to write back
    for a, b in zip(got_state, seq_major(want_state), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fp32_parity_with_reference(tiny, fp32_bundle):
    """fp32 gates: vision cosine >= 0.99999, prefill logits within 1e-3, identical greedy tokens."""
    ref, et = _reference(tiny), _open(fp32_bundle)
    for mode, h, w in (("16x", 8, 8), ("16x", 16, 16), ("16x", 8, 24), ("4x", 8, 8), ("4x", 12, 4)):
        pixels, patches, pos = _slice(h * w, h, w, mode)
        a = ref.vision_encoder(patches, pos, mode)
        b = et.vision_encoder_pixels(pixels, mode)  # the method ExecuTorch's runner calls
        assert a.shape == b.shape and _cosine(a, b) >= 0.99999, mode
        np.testing.assert_array_equal(et.vision_encoder(patches, pos, mode), b)  # patches -> pixels
    ids = np.arange(5, 45)
    np.testing.assert_allclose(et.token_embedding(ids), ref.token_embedding(ids), atol=1e-6)
    embeds = _prompt(ref)
    forced = list(range(20, 28))
    for a, b in zip(
        teacher_forced_logits(ref, embeds, forced), teacher_forced_logits(et, embeds, forced), strict=True
    ):
        assert np.abs(a - b).max() <= 1e-3
    assert _greedy(et, embeds, 32) == _greedy(ref, embeds, 32)


def test_state_is_shared_between_prefill_and_decode_and_reset(tiny, fp32_bundle):
    """A second sequence after new_state() gives the same logits as the first; a stale state fails."""
    ref, et = _reference(tiny), _open(fp32_bundle)
    embeds = _prompt(ref, 20)
    first = teacher_forced_logits(et, embeds, [3, 4])
    stale = et.new_state()
    second = teacher_forced_logits(et, embeds, [3, 4])
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="older sequence"):
        et.decode_step(embeds[:1], 0, stale)


def test_vision_refuses_what_its_method_cannot_take(fp32_bundle):
    """Patches that are not normalised 8-bit pixels, and slices outside the method's sizes, are one
    InputError each, not a wrong answer."""
    et = _open(fp32_bundle)
    pixels, patches, pos = _slice(3, 8, 8, "16x")
    with pytest.raises(InputError, match="8-bit pixels"):
        et.vision_encoder(patches + 1e-3, pos, "16x")
    with pytest.raises(InputError, match="per side"):
        et.vision_encoder_pixels(pixels[:, :56, :], "16x")  # one 4-patch unit high
    side = et.max_side + 4
    with pytest.raises(InputError, match="exceeds"):
        et.vision_encoder_pixels(np.zeros((3, 14 * side, 56 * 2), np.uint8), "16x")


def test_a_call_at_position_zero_starts_a_new_sequence(tiny, fp32_bundle):
    """The program resets its DeltaNet state itself at start_pos 0 (what ExecuTorch's runners do
    after reset()): a second prefill at 0, with no new_state(), gives the first one's logits, while
    the same tokens at a later position do not."""
    ref, et = _reference(tiny), _open(fp32_bundle)
    embeds = _prompt(ref, 20)
    state = et.new_state()
    first, _ = et.prefill_chunk(embeds[:16], 16, 0, state)
    again, _ = et.prefill_chunk(embeds[:16], 16, 0, state)
    later, _ = et.prefill_chunk(embeds[:16], 16, 16, state)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - later).max() > 1e-3


def test_bundle_session_chat(fp32_bundle):
    """The registry opens the bundle and a chat turn runs end to end."""
    from edge_runtime.bundle import open_bundle

    _, backend = open_bundle(fp32_bundle)
    assert backend.name == "executorch:fp32"
    assert backend.token_embedding(np.array([1, 2, 3])).shape == (3, backend.info.hidden_size)


def test_delegate_creation_resorts_only_out_of_order_graphs():
    """The fp32 bundle above is lowered with the shortcut and passes parity; here: a sorted graph is
    left as it is, an out-of-order one is relinked into order in place."""
    from executorch.exir import lowered_backend_module

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    nodes = list(gm.graph.nodes)
    assert is_topologically_sorted(gm)
    with sort_only_when_needed():
        assert lowered_backend_module.legalize_graph(gm).graph is gm.graph  # untouched
        nodes[1].prepend(nodes[2])  # tanh now before the relu it reads
        assert not is_topologically_sorted(gm)
        assert lowered_backend_module.legalize_graph(gm).graph is gm.graph  # relinked, not rebuilt
        assert list(gm.graph.nodes) == nodes  # back in the original order
        x = torch.randn(3)
        gm.recompile()
        assert torch.equal(gm(x), torch.tanh(torch.relu(x)))
    assert lowered_backend_module.legalize_graph.__name__ == "legalize_graph"  # restored


def test_undelegated_gate_is_one_line_listing_ops():
    report = DelegationReport(
        {"text_decoder": 10}, {"text_decoder": Counter({"aten.cumsum": 3, "aten.where": 7})}
    )
    check_delegation(report, 0.6)
    with pytest.raises(InputError) as err:
        check_delegation(report, 0.25)
    message = str(err.value)
    assert "\n" not in message and "aten.where x7" in message and "aten.cumsum x3" in message


def test_8da4w_is_for_text_linears_whose_width_divides_the_group(tiny):
    """Text linears whose in_features a group of 32 divides get 8da4w; the rest of the text and every
    vision / merger linear (the tiny SigLIP MLP is 136 wide) get per-channel int8."""
    model = load_checkpoint(tiny).model
    _, summary = quantize_model(model, "8da4w")
    kinds = Counter(
        (name.startswith("language_model.") or name == "lm_head") and m.in_features % 32 == 0
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    assert summary.linear_schemes == {"8da4w": kinds[True], "8da8w": kinds[False]}
    assert kinds[True] > 0 and kinds[False] > 0
    assert summary.decode_weight_bytes < quantize_model(model, "fp32")[1].decode_weight_bytes / 4


def test_8da4w_weights_use_the_searched_block_scales(tiny):
    """Every 8da4w linear holds int4_blocks' codes and scales (not torchao's absmax), so its
    dequantized weight equals the ONNX int4 rounding exactly."""
    from export.onnx.quantize import dequant_int4, int4_blocks

    model = load_checkpoint(tiny).model
    quantized, summary = quantize_model(model, "8da4w")
    fp32 = dict(model.named_modules())
    checked = 0
    for name, module in quantized.named_modules():
        text = name.startswith("language_model.") or name == "lm_head"
        if not isinstance(module, torch.nn.Linear) or not text or fp32[name].in_features % 32:
            continue
        w = fp32[name].weight.detach().float()
        searched = torch.from_numpy(dequant_int4(*int4_blocks(w.numpy())))
        got = module.weight.dequantize()
        torch.testing.assert_close(got, searched, atol=1e-6, rtol=0)
        checked += 1
    assert checked == summary.linear_schemes["8da4w"]


@needs_slow_export
@pytest.mark.parametrize("quant,top1", [("int8", 0.95), ("8da4w", 0.90)])
def test_quantized_parity(tiny, tmp_path, quant, top1):
    bundle = _export(tiny, tmp_path / quant, quant)
    ref, et = _reference(tiny), _open(bundle)
    pixels, patches, pos = _slice(0, 8, 8, "16x")
    cos = _cosine(ref.vision_encoder(patches, pos, "16x"), et.vision_encoder_pixels(pixels, "16x"))
    assert cos >= (0.99 if quant == "int8" else 0.98)
    embeds = _prompt(ref)
    forced = list(range(20, 52))
    a, b = teacher_forced_logits(ref, embeds, forced), teacher_forced_logits(et, embeds, forced)
    agree = np.mean([np.argmax(x) == np.argmax(y) for x, y in zip(a, b, strict=True)])
    assert agree >= top1
