"""tools/genai_compare.py: the Qwen3.5 conversion keeps every text tensor (name, shape, bytes) and is what
transformers' Qwen3_5ForConditionalGeneration expects; with onnxruntime-genai installed, the model builder's
fp32 output decodes the same greedy tokens as our torch reference, and its int4 build uses our settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import genai_compare as gc  # noqa: E402

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
needs_genai = pytest.mark.skipif(
    not HAS_GENAI, reason="onnxruntime-genai is not installed (pip install -e .[bench])"
)


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("genai") / gc.HF_DIR
    return out, gc.convert_checkpoint(tiny_checkpoint, out)


def test_conversion_round_trips_names_shapes_and_values(tiny_checkpoint, converted):
    from transformers.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    out, record = converted
    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as src:
        source_names = [n for n in src.keys() if n.startswith("model.language_model.")]  # noqa: SIM118
        with safe_open(str(out / "model.safetensors"), framework="pt") as dst:
            written = set(dst.keys())  # noqa: SIM118
            assert sorted(record["tensors"]) == sorted(source_names)  # tied head, no vision, no merger
            for name in source_names:
                target, shape = record["tensors"][name]
                assert target == name  # MiniCPM-V's text weights already use Qwen3.5's names
                assert torch.equal(dst.get_tensor(target), src.get_tensor(name).float())
                assert list(dst.get_tensor(target).shape) == shape

    config = Qwen3_5Config.from_pretrained(out)
    assert config.architectures == ["Qwen3_5ForConditionalGeneration"]
    text = json.loads((tiny_checkpoint / "config.json").read_text())["text_config"]
    rope = config.text_config.rope_parameters
    rotary_pairs = int(text["head_dim"] * text["rope_parameters"]["partial_rotary_factor"]) // 2
    assert (
        sum(rope["mrope_section"]) == rotary_pairs
        and rope["rope_theta"] == text["rope_parameters"]["rope_theta"]
    )
    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(config)
    expected = {
        k: list(v.shape)
        for k, v in model.state_dict().items()
        if not k.startswith("model.visual.") and not (k == "lm_head.weight" and config.tie_word_embeddings)
    }
    assert expected == {t: s for t, s in record["tensors"].values()}
    assert written == set(expected)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file()


def test_ours_is_exported_at_the_builders_accuracy_level(tiny_checkpoint, tmp_path, monkeypatch):
    """Equal settings: our int4 bundle gets the MatMulNBits accuracy_level that BUILDER_OPTIONS gives
    the builder, whatever our export default is (int8 compute since issue 33)."""
    import types

    import export.pipeline as pipeline
    from export.onnx.quantize import INT4_COMPUTE_LEVELS

    requests = []

    def fake_export(request, progress=None):
        requests.append(request)
        request.out.mkdir(parents=True)
        return request.out

    monkeypatch.setattr(
        gc, "convert_checkpoint", lambda _ckpt, out: out.mkdir(parents=True) or {"tensors": []}
    )
    monkeypatch.setattr(gc, "run_builder", lambda *_args, **_kwargs: {})
    monkeypatch.setattr(pipeline, "export_bundle", fake_export)
    settings = gc.Settings(
        checkpoint=tiny_checkpoint, out_dir=tmp_path, tokens=1, repeats=1, threads=1, warmup=0,
        check_steps=1, max_context=64, prompt="hi", bundle=None, verify_fp32=False, rebuild=True,
    )  # fmt: skip
    gc.prepare_models(settings, types.SimpleNamespace(__version__="0"), lambda _m: None)
    (request,) = requests
    assert INT4_COMPUTE_LEVELS[request.int4_compute] == int(gc.BUILDER_OPTIONS["accuracy_level"])


def test_missing_genai_is_one_line_error(monkeypatch, tiny_checkpoint, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        gc.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a),
    )
    rc = gc.main(["--checkpoint", str(tiny_checkpoint), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "error: onnxruntime-genai is not installed (install with pip install -e .[bench])"


@needs_genai
def test_builder_failure_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(gc.CompareError) as info:
        gc.run_builder(tmp_path / "empty", tmp_path / "genai-fp32", "fp32", lambda _m: None)
    message = str(info.value)
    assert message.startswith("the model builder failed (fp32, exit ") and "\n" not in message
    assert str(tmp_path / "genai-fp32.log") in message


@needs_genai
def test_builder_output_matches_our_reference(tiny_checkpoint, converted):
    """fp32: the same greedy tokens as our torch reference (the conversion is right); int4: our settings."""
    from edge_runtime.generation import teacher_forced_logits
    from edge_runtime.runtime import open_session

    og = gc.require_genai()
    hf, _ = converted
    fp32, int4 = hf.parent / gc.GENAI_FP32_DIR, hf.parent / gc.GENAI_INT4_DIR
    gc.run_builder(hf, fp32, "fp32", lambda _m: None)
    gc.run_builder(hf, int4, "int4", lambda _m: None)

    ops = gc.graph_summary(int4 / "model.onnx")
    assert ops["matmulnbits"] == [{"bits": 4, "block_size": 32, "accuracy_level": 0}]
    assert ops["ops"]["LinearAttention"] == 3 and ops["ops"]["GatherBlockQuantized"] == 1  # shared int4 table
    assert "MatMulNBits" not in gc.graph_summary(fp32 / "model.onnx")["ops"]

    steps = 4
    ref = open_session(checkpoint=tiny_checkpoint, max_context=256, threads=1)
    prepared = ref.prepare(gc.DEFAULT_PROMPT, [])
    prompt = [int(i) for i in prepared.prompt.ids]
    ours = ref.generate(prepared, ref.sampling(max_new_tokens=steps, stop_ids=())).generation.token_ids
    theirs = gc.Theirs(og, fp32, threads=1, max_length=256)
    run = theirs.run(prompt, steps - 1)
    assert gc.compare_tokens(ours, run.tokens, steps)["agree"], (ours, run.tokens)
    assert len(run.step_ms) == steps - 1 and run.tok_s > 0
    forced = gc.forced_path(ref, steps)
    assert len(set(forced)) > 1
    logits = gc.compare_logits(
        teacher_forced_logits(ref.backend, prepared.embeds, forced), theirs.forced_logits(prompt, forced)
    )
    assert logits["same_argmax"] == steps + 1
    assert logits["max_abs"] < 5e-3  # the builder's l2-norm has no epsilon: ~1e-3 on random weights
    assert json.loads((theirs.view / "genai_config.json").read_text())["model"]["eos_token_id"] == []
    assert json.loads((fp32 / "genai_config.json").read_text())["model"]["eos_token_id"] != []
    np.testing.assert_array_equal(run.tokens, ours)
