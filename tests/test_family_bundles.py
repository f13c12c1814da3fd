"""The resampler families (MiniCPM-V 4.0 and 2.0) through every command: init-checkpoint, chat, the
three exporters (ONNX, ExecuTorch with its in-graph preprocessing, Core ML through the MIL
executor) and parity against the torch reference, plus the full presets' shapes and the families'
bad-input lines. The model maths itself is checked against transformers / timm in
test_minicpm_v40_*.py and test_minicpm_v20_reference.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

import export.onnx.bundle as onnx_bundle
from edge_runtime.bundle import open_bundle_session
from edge_runtime.checkpoint import checkpoint_tensor_specs, load_checkpoint
from edge_runtime.cli import main
from edge_runtime.families import family_by_name
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.parity import SAMPLES_DIR, compare, load_cases
from edge_runtime.runtime import open_checkpoint_session
from export.pipeline import ExportRequest, export_bundle

FAMILIES = ("minicpm-v-4.0", "minicpm-v-2.0")
VERSIONS = {"minicpm-v-4.0": 4.0, "minicpm-v-2.0": 2.0}
MODES = {"minicpm-v-4.0": ["resampler"], "minicpm-v-2.0": ["adaptive"]}
MAX_CONTEXT = 384
STEPS = 6


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, family):
    return init_checkpoint(family, "tiny", tmp_path_factory.mktemp(family) / "ckpt", seed=1)


@pytest.fixture(scope="module")
def reference(ckpt_dir):
    return open_checkpoint_session(ckpt_dir, max_context=MAX_CONTEXT, threads=1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """A sliced image (3 slices) and two images; the shared cases' 16x / 4x fall back to the
    family's single vision variant."""
    path = tmp_path_factory.mktemp("cases") / "cases.json"
    entries = [
        {"name": "wide-sliced", "images": [str(SAMPLES_DIR / "wide.png")], "prompt": "Describe it."},
        {
            "name": "two-images-4x",
            "images": [str(SAMPLES_DIR / "square.png"), str(SAMPLES_DIR / "tiny.png")],
            "prompt": "Compare.",
            "downsample_mode": "4x",
        },
    ]
    path.write_text(json.dumps({"cases": entries}))
    return load_cases(path)


def test_config_round_trips_and_is_found_by_model_type_and_version(ckpt_dir, family):
    raw = json.loads((ckpt_dir / "config.json").read_text())
    expected = ("minicpmv", VERSIONS[family], ["MiniCPMV"])
    assert (raw["model_type"], raw["version"], raw["architectures"]) == expected
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.family.name == family
    assert type(ckpt.config).from_hf(ckpt.config.to_hf()) == ckpt.config
    assert sorted({k.split(".")[0] for k in ckpt.model.state_dict()}) == ["llm", "resampler", "vpm"]


def test_full_preset_of_4_0_has_the_released_shapes():
    """architectures.md §2: 32 Llama layers (DERIVED from the 3.6 B LLM), SigLIP 27 x 1152, a
    64-query resampler into 2560, untied head: about 4.1 B parameters in all."""
    family = family_by_name("minicpm-v-4.0")
    cfg = family.preset("full", family.full_vocab, {"<unk>": 0})
    specs = {name: shape for name, shape, _ in checkpoint_tensor_specs(cfg, torch.float32)}
    assert specs["llm.model.layers.31.self_attn.q_proj.weight"] == (4096, 2560)
    assert specs["llm.model.layers.31.self_attn.k_proj.weight"] == (256, 2560)
    assert specs["resampler.attn.in_proj_weight"] == (7680, 2560)
    assert specs["resampler.kv_proj.weight"] == (2560, 1152)
    assert specs["vpm.embeddings.position_embedding.weight"] == (4900, 1152)
    assert "llm.model.layers.32.mlp.up_proj.weight" not in specs
    llm = sum(math.prod(s) for n, s in specs.items() if n.startswith("llm."))
    total = sum(math.prod(s) for s in specs.values())
    assert 3.5e9 < llm < 3.7e9 and 4.0e9 < total < 4.2e9


def test_full_preset_of_2_0_has_the_released_shapes():
    """architectures.md §1: timm so400m with its last block dropped (26 run), a 64-query resampler
    into 2304 with the queries' own pos_embed, MiniCPM-2B (40 x 2304, MHA 36 heads, 122 753 tokens,
    untied head): about 3.4 B parameters."""
    family = family_by_name("minicpm-v-2.0")
    cfg = family.preset("full", family.full_vocab, {"<unk>": 0})
    specs = {name: shape for name, shape, _ in checkpoint_tensor_specs(cfg, torch.float32)}
    assert specs["vpm.pos_embed"] == (1, 729, 1152)
    assert specs["vpm.blocks.25.attn.qkv.weight"] == (3456, 1152)
    assert "vpm.blocks.26.attn.qkv.weight" not in specs
    assert specs["resampler.pos_embed"] == (64, 2304)
    assert specs["resampler.attn.in_proj_weight"] == (6912, 2304)
    assert specs["llm.model.layers.39.self_attn.k_proj.weight"] == (2304, 2304)
    assert specs["llm.lm_head.weight"] == (122753, 2304)
    total = sum(math.prod(s) for s in specs.values())
    assert 3.3e9 < total < 3.5e9


def test_chat_json_on_the_checkpoint(ckpt_dir, capsys):
    image = str(SAMPLES_DIR / "wide.png")
    code = main(
        [
            "chat",
            "--checkpoint",
            str(ckpt_dir),
            "--image",
            image,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "4",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["n_slices"] == 3 and out["n_image_tokens"] == 3 * 64
    assert out["prompt_token_ids"][0] == 1  # <s>, from the tokenizer's post-processor
    assert len(out["token_ids"]) == 4


@pytest.mark.parametrize(
    "target, quant",
    [("harmonyos", "fp32"), ("harmonyos", "int8"), ("android", "fp32"), ("ios", "fp16")],
    ids=["onnx-fp32", "onnx-int8", "executorch-fp32", "coreml-fp16"],
)
def test_bundle_passes_parity(ckpt_dir, reference, cases, tmp_path, target, quant, family, monkeypatch):
    if quant == "int8" and family != "minicpm-v-4.0":
        pytest.skip("the ONNX int8 path is the same for both Llama families; run once (test time)")
    if target == "harmonyos" and (quant == "int8" or family == "minicpm-v-2.0"):
        # the streaming path of full-size checkpoints (memory-mapped weights, child processes):
        # 4.0's int8 and 2.0's fp32 ONNX bundles go through it; 4.0's fp32 through the in-memory one
        monkeypatch.setattr(onnx_bundle, "ISOLATE_ABOVE_BYTES", 0)
    out = export_bundle(ExportRequest(ckpt_dir, tmp_path / "b", target, None, quant, MAX_CONTEXT))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["downsample_modes"] == MODES[manifest["family"]]
    candidate = open_bundle_session(out, threads=1)
    report = compare(reference, candidate, cases, quant, n_steps=STEPS)
    if quant == "int8":
        # random weights: near-uniform logits, so int8 may flip a near-tie while decoding (a trained
        # model's margins are far wider); vision and prefill must pass, decode stay close
        summary = "\n".join(report.summary_lines())
        assert report.stages["vision"]["passed"] and report.stages["prefill"]["passed"], summary
        assert report.stages["decode"]["kl_max"] < 1e-3, summary
        return
    assert report.passed, "\n".join(report.summary_lines())
    assert report.stages["greedy"]["identical_cases"] == 1.0


def test_missing_llm_tensor_and_mup_config_are_one_line(ckpt_dir, tmp_path, capsys, family):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(ckpt_dir, bad)
    weights = load_file(bad / "model.safetensors")
    del weights["llm.model.layers.1.mlp.up_proj.weight"]
    save_file(weights, bad / "model.safetensors")
    assert main(["chat", "--checkpoint", str(bad), "--prompt", "x"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llm.model.layers.1.mlp.up_proj.weight" in err[0]

    # 4.0 runs its LLM as plain Llama: a muP key is refused; 2.0's MiniCPM-2B needs all three
    mup = tmp_path / "mup"
    shutil.copytree(ckpt_dir, mup)
    raw = json.loads((mup / "config.json").read_text())
    if family == "minicpm-v-4.0":
        changed = {**raw, "scale_emb": 12}
    else:
        changed = {k: v for k, v in raw.items() if k != "scale_depth"}
    (mup / "config.json").write_text(json.dumps(changed))
    assert main(["chat", "--checkpoint", str(mup), "--prompt", "x"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("scale_emb" in err[0] or "scale_depth" in err[0])


def test_checkpoint_without_preprocessor_config_slices_as_the_family_does(ckpt_dir, tmp_path):
    """The 2.0 release ships no preprocessor_config.json (its modeling code slices): the family's
    own values stand in, so such a directory prompts exactly as one that has the file."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(ckpt_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    image = [SAMPLES_DIR / "wide.png"]
    with_file = open_checkpoint_session(ckpt_dir, max_context=MAX_CONTEXT, threads=1).prepare("Hi", image)
    without = open_checkpoint_session(bare, max_context=MAX_CONTEXT, threads=1).prepare("Hi", image)
    assert without.prompt.ids == with_file.prompt.ids and without.n_slices == with_file.n_slices == 3
