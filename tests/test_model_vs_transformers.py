"""Our MiniCPM-V 4.6 against transformers' own implementation, through a checkpoint on disk.

transformers builds the tiny model with random weights (norms, A_log and dt_bias perturbed so
conventions such as 1 + w matter), saves it with save_pretrained, and our loader reads it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime.checkpoint import load_checkpoint
from edge_runtime.models.minicpm_ocr import preset as ocr_preset
from edge_runtime.models.minicpm_v46 import preset
from edge_runtime.processing.patches import position_ids, row_major_patches, window_order

transformers = pytest.importorskip("transformers")

SLICE_GRIDS = [(8, 8), (4, 12), (16, 4), (12, 20), (32, 32)]  # square, wide, tall, 448x448


# family -> (our preset, transformers' config and model classes); MiniCPM-OCR is 4.6's modeling
# under its own config (model_type minicpm_ocr, 4x by default, tied embeddings)
FAMILIES = {
    "minicpm-v-4.6": (preset, "MiniCPMV4_6Config", "MiniCPMV4_6ForConditionalGeneration"),
    "minicpm-ocr-1.0": (ocr_preset, "MiniCPMOcrConfig", "MiniCPMOcrForConditionalGeneration"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, our loaded checkpoint) with identical weights, saved by transformers."""
    make_preset, config_class, model_class = FAMILIES[request.param]
    torch.manual_seed(0)
    cfg = make_preset("tiny", vocab_size=512, image_token_id=500, video_token_id=501)
    hf_cfg = getattr(transformers, config_class).from_dict(cfg.to_hf())
    hf = getattr(transformers, model_class)(hf_cfg).eval()
    with torch.no_grad():
        for name, value in hf.state_dict().items():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                value.add_(0.3 * torch.randn_like(value))
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    ckpt = load_checkpoint(path)
    assert ckpt.family.name == request.param and ckpt.config.to_hf()["model_type"] == hf_cfg.model_type
    return hf, ckpt


def _hf_packed(pixels: list[torch.Tensor]) -> torch.Tensor:
    """transformers' NaViT packing: each slice as [3, 14, L*14], concatenated on the last axis."""
    strips = []
    for p in pixels:
        c, height, width = p.shape
        h, w = height // 14, width // 14
        strips.append(p.reshape(c, h, 14, w, 14).permute(0, 2, 1, 3, 4).reshape(c, 14, h * w * 14))
    return torch.cat(strips, dim=-1)[None]


def _our_inputs(p: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    h, w = p.shape[1] // 14, p.shape[2] // 14
    order = window_order(h, w, mode)
    patches = row_major_patches(p.numpy())[order]
    return torch.from_numpy(patches), torch.from_numpy(position_ids(h, w)[order]), order


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_vision_tower_and_merger_match(pair, mode):
    hf, ckpt = pair
    torch.manual_seed(1)
    pixels = [torch.randn(3, h * 14, w * 14) for h, w in SLICE_GRIDS]
    sizes = torch.tensor(SLICE_GRIDS)
    with torch.no_grad():
        out = hf.model.get_image_features(_hf_packed(pixels), sizes, downsample_mode=mode)
    ref_tower = out.last_hidden_state[0]
    start = 0
    for (h, w), p, ref_merged in zip(SLICE_GRIDS, pixels, out.pooler_output, strict=True):
        patches, pos, order = _our_inputs(p, mode)
        with torch.no_grad():
            tower = ckpt.model.vision_tower(patches, pos, use_vit_merger=(mode == "16x"))[0]
            merged = ckpt.model.encode_slice(patches, pos, mode)
        n = tower.shape[0]
        ref = ref_tower[start : start + n]
        start += n
        if mode == "4x":  # tower rows are in our window-major order; upstream's are row-major
            ref = ref[torch.from_numpy(order)]
        else:  # after the window merger: 2x2 blocks of the half-resolution grid, row-major
            ref = ref[torch.from_numpy(window_order(h // 2, w // 2, "4x"))]
        assert torch.allclose(tower, ref, atol=1e-5), (mode, h, w, (tower - ref).abs().max())
        assert merged.shape == ref_merged.shape
        assert torch.allclose(merged, ref_merged, atol=1e-5), (mode, h, w, (merged - ref_merged).abs().max())


def test_prefill_logits_match(pair):
    hf, ckpt = pair
    ids = torch.randint(0, 500, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
        emb = ckpt.model.embed(ids[0])[None]
        ours, _ = ckpt.model.decode(
            emb, torch.tensor([0]), torch.tensor([150]), ckpt.model.new_state(256), all_logits=True
        )
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_chunked_prefill_and_decode_match_full_forward_and_generate(pair):
    hf, ckpt = pair
    model = ckpt.model
    prompt = torch.randint(0, 500, (1, 100), generator=torch.Generator().manual_seed(3))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        generated = hf.generate(input_ids=prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    ref_tokens = generated[0, 100:].tolist()
    assert len(ref_tokens) == 32

    chunk = 64
    state = model.new_state(256)
    tokens: list[int] = []
    step_logits = []
    with torch.no_grad():
        emb = model.embed(prompt[0])
        for start in range(0, 100, chunk):
            part = emb[start : start + chunk]
            n = part.shape[0]
            padded = torch.nn.functional.pad(part, (0, 0, 0, chunk - n))[None]
            logits, state = model.decode(padded, torch.tensor([start]), torch.tensor([n]), state)
        for i in range(32):
            step_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            logits, state = model.decode(model.embed(torch.tensor(tokens[-1:]))[None], torch.tensor([100 + i]),
                                         torch.tensor([1]), state)  # fmt: skip
        full = hf(input_ids=generated[:, :-1]).logits[0, 99:]
    assert tokens == ref_tokens
    assert torch.allclose(torch.stack(step_logits), full, atol=1e-4)


def test_full_preset_parameter_count():
    from edge_runtime.models.minicpm_v46 import MiniCPMV46

    cfg = preset("full", vocab_size=248094, image_token_id=248056, video_token_id=248057)
    with torch.device("meta"):
        model = MiniCPMV46(cfg)
    unique = {id(p): p.numel() for p in model.parameters()}
    total = sum(unique.values())
    assert abs(total - 1.30e9) / 1.30e9 < 0.01, total
    assert model.lm_head.weight is model.language_model.embed_tokens.weight


def test_config_without_tie_key_reads_as_transformers_does(tmp_path):
    """transformers' 4.6 config defaults tie_word_embeddings to False and OCR's to True: a
    config.json that omits the key must give the same head as transformers builds."""
    import json

    for make_preset, config_class, _ in FAMILIES.values():
        raw = make_preset("tiny", vocab_size=512, image_token_id=500, video_token_id=501).to_hf()
        del raw["tie_word_embeddings"]
        hf_cfg = getattr(transformers, config_class).from_dict(raw)
        path = tmp_path / config_class
        path.mkdir()
        (path / "config.json").write_text(json.dumps(raw))
        from edge_runtime.checkpoint import read_config

        ours, _ = read_config(path)
        assert ours.tie_word_embeddings == hf_cfg.tie_word_embeddings, config_class
