"""MiniCPM-V 4.0 end to end: a whole chat turn against ground truth from outside our model code.

1. Prompt layout: the expected prompt text is rebuilt here from MiniCPM-V 4.0's remote-code
   processor (architectures.md §2.5): `chat()` writes each image as `(<image>./</image>)` and joins
   the content parts with "\\n", the ChatML template wraps it, and the processor swaps the i-th
   marker for `<image_id>i</image_id><image>` + `<unk>`*64 + `</image>` + (if sliced) the grid
   rows joined by "\\n", each row `cols` x (`<slice>` + `<unk>`*64 + `</slice>`). The ids are the
   `tokenizers` library's encoding of that text with the checkpoint's tokenizer.json (whose
   post-processor prepends `<s>`), as the remote `_convert` calls `tokenizer.encode`.
2. Logits: for a sliced image, every slice goes through transformers' Idefics2VisionTransformer
   (float64, the remote code's position-table ids injected) and a float64 numpy resampler written
   here; the features are scattered into the token embeddings over the remote code's
   `image_bound` (found from the `<image>` / `<slice>` bound tokens, not by matching `<unk>`), and
   transformers' LlamaForCausalLM in float64, built from config.json, decodes greedily with its own
   KV cache. Our session (TorchBackend, fp32, chunked prefill) must pick the same tokens with the
   same logits.

Only the slicing geometry (the grid and the normalised slices) is taken from our prepared image;
it is tested against the reference processor elsewhere. The random tiny checkpoint is re-drawn
with O(1) activations (the init's 0.02-std weights barely let images move the logits).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from resampler_reference import greedy, last_logits, max_rel, sincos_2d
from safetensors.torch import load_file, save_file

from edge_runtime import generation
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.runtime import open_session

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig  # noqa: E402
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "edge_runtime" / "data" / "samples"
QUESTION = "What is in this picture? Describe it."
MARKER = "(<image>./</image>)"  # what the remote chat() writes for each image
QUERY_NUM = 64  # image_feature_size: <unk> per image / slice placeholder
SIDE = 70  # vision_config.image_size 980 / patch 14
PATCH = 14
NEW_TOKENS = 8
RESAMPLER_HEAD_DIM = 128  # remote code: Resampler(num_heads=embed_dim // 128)
LN_EPS = 1e-6  # remote Resampler: partial(nn.LayerNorm, eps=1e-6)
# max |ours (fp32) - reference (float64)| / reference scale, for features, embeddings and logits
# (measured: ~5e-7 on the logits)
TOL = 1e-4


# --------------------------------------------------------------------------------------------
# fixtures


def _redraw_o1(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Same names and shapes, O(1) activations: matrices ~ N(0, 1 / fan_in), embedding tables and
    resampler queries ~ N(0, 1), norm weights 1 + N(0, 0.2), biases N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(weights):
        shape = weights[name].shape
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name or ".ln_" in name
        if len(shape) == 1 and is_norm and leaf == "weight":
            value = 1.0 + 0.2 * noise
        elif len(shape) == 1:
            value = 0.1 * noise
        elif "embed_tokens" in name or "position_embedding" in name or leaf == "query":
            value = noise
        elif name == "resampler.proj":  # used as x @ proj: fan_in is its first axis
            value = noise / shape[0] ** 0.5
        else:
            value = noise / noise[0].numel() ** 0.5
        out[name] = value.to(weights[name].dtype).contiguous()
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = init_checkpoint("minicpm-v-4.0", "tiny", tmp_path_factory.mktemp("v40e2e") / "tiny", seed=3)
    weights_file = path / "model.safetensors"
    save_file(_redraw_o1(load_file(weights_file), seed=3), weights_file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def session(checkpoint):
    return open_session(checkpoint=checkpoint)


@pytest.fixture(scope="module")
def config(checkpoint) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    return tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def special_ids(checkpoint) -> dict[str, int]:
    """Special-token ids as tokenizer.json itself lists them."""
    data = json.loads((checkpoint / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in data["added_tokens"]}


# --------------------------------------------------------------------------------------------
# 1. prompt layout (remote-code processor, written out)


def _image_placeholder(index: int, grid_cols_rows: list[int] | None) -> str:
    """MiniCPMVImageProcessor.get_slice_image_placeholder (use_image_id, slice_mode); the grid is
    the remote code's [cols, rows]."""
    unk = "<unk>" * QUERY_NUM
    text = f"<image_id>{index}</image_id>" + "<image>" + unk + "</image>"
    if grid_cols_rows is None:
        return text
    cols, rows = grid_cols_rows
    tile = "<slice>" + unk + "</slice>"
    return text + "\n".join("".join(tile for _ in range(cols)) for _ in range(rows))


def _expected_prompt(question: str, grids: list[list[int] | None]) -> str:
    """chat(): images first as markers, parts joined by "\\n"; ChatML with generation prompt; then
    the processor splits on the marker and inserts the i-th image's placeholder."""
    content = "\n".join([MARKER] * len(grids) + [question])
    text = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    chunks = re.split(re.escape(MARKER), text)
    assert len(chunks) == len(grids) + 1
    out = ""
    for i, grid in enumerate(grids):
        out += chunks[i] + _image_placeholder(i, grid)
    return out + chunks[-1]


def _remote_grid(image) -> list[int] | None:
    """Our PreparedImage.grid is (rows, cols); the remote processor's grid is [cols, rows]."""
    if image.grid is None:
        return None
    rows, cols = image.grid
    assert len(image.slices) == 1 + rows * cols
    return [cols, rows]


@pytest.mark.parametrize("names", [("square",), ("wide", "tall")], ids=lambda n: "+".join(n))
def test_prompt_text_and_ids_follow_remote_processor(session, hf_tokenizer, special_ids, names):
    prepared = session.prepare(QUESTION, [SAMPLES / f"{n}.png" for n in names])
    grids = [_remote_grid(im) for im in prepared.images]
    # the cases cover an unsliced image, a one-row grid, a multi-row grid and a second image id
    expected_grids = {"square": None, "wide": [2, 1], "tall": [1, 3]}
    assert grids == [expected_grids[n] for n in names]
    expected = _expected_prompt(QUESTION, grids)
    assert prepared.prompt.text == expected
    ids = prepared.prompt.ids
    assert ids[0] == special_ids["<s>"] == 1
    assert ids == hf_tokenizer.encode(expected, add_special_tokens=True).ids
    # every placeholder token is the single <unk> id, one 64-run per slice
    n_slices = sum(len(im.slices) for im in prepared.images)
    assert ids.count(special_ids["<unk>"]) == QUERY_NUM * n_slices
    assert prepared.n_image_tokens == QUERY_NUM * n_slices


# --------------------------------------------------------------------------------------------
# 2. reference model: transformers vision tower + numpy resampler + transformers Llama, float64


def _remote_position_ids(h: int, w: int) -> torch.Tensor:
    """SiglipVisionEmbeddings.forward of the 4.0 remote code for one unpadded slice; tgt_sizes is
    an int32 tensor there, so 1 / nb_patches is a float32 step."""
    boundaries = torch.arange(1 / SIDE, 1.0, 1 / SIDE)
    tgt = torch.tensor([h, w], dtype=torch.int32)
    frac_h = torch.arange(0, 1 - 1e-6, 1 / tgt[0])
    frac_w = torch.arange(0, 1 - 1e-6, 1 / tgt[1])
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)
    return (bucket_h[:, None] * SIDE + bucket_w).flatten()


def _vision_tower(config: dict, weights: dict[str, torch.Tensor]) -> Idefics2VisionTransformer:
    vc = config["vision_config"]
    hf_cfg = Idefics2VisionConfig(
        hidden_size=vc["hidden_size"],
        intermediate_size=vc["intermediate_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"],
        num_channels=vc["num_channels"],
        image_size=vc["image_size"],
        patch_size=vc["patch_size"],
        hidden_act=vc["hidden_act"],
        layer_norm_eps=vc["layer_norm_eps"],
        attn_implementation="eager",
    )
    tower = Idefics2VisionTransformer(hf_cfg)
    state = {k.removeprefix("vpm."): v for k, v in weights.items() if k.startswith("vpm.")}
    tower.load_state_dict(state, strict=True)
    return tower.double().eval()


def _tower_features(tower: Idefics2VisionTransformer, pixels: np.ndarray) -> np.ndarray:
    """[h*w, D_vision] float64 for one normalised [3, H, W] slice, position ids = the remote ones."""
    h, w = pixels.shape[1] // PATCH, pixels.shape[2] // PATCH
    ids = _remote_position_ids(h, w)

    def hook(_module, inputs):
        assert inputs[0].shape == (1, h * w)
        return (ids.reshape(1, -1),)

    handle = tower.embeddings.position_embedding.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = tower(
                pixel_values=torch.from_numpy(pixels).double()[None],
                patch_attention_mask=torch.ones(1, h, w, dtype=torch.bool),
            )
    finally:
        handle.remove()
    return out.last_hidden_state[0].numpy()


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * weight + bias


def _resampler(p: dict[str, np.ndarray], x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Remote Resampler.forward for one slice, float64: keys ln_kv(kv_proj(x)) + sincos, values
    without, queries ln_q(query); nn.MultiheadAttention maths (packed [q; k; v]); ln_post; @ proj."""
    dim = p["query"].shape[1]
    heads = dim // RESAMPLER_HEAD_DIM
    kv = _layer_norm(x @ p["kv_proj.weight"].T, p["ln_kv.weight"], p["ln_kv.bias"])
    query = _layer_norm(p["query"], p["ln_q.weight"], p["ln_q.bias"])
    w_q, w_k, w_v = np.split(p["attn.in_proj_weight"], 3)
    b_q, b_k, b_v = np.split(p["attn.in_proj_bias"], 3)

    def split_heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(t.shape[0], heads, dim // heads).transpose(1, 0, 2)

    q = split_heads(query @ w_q.T + b_q)
    k = split_heads((kv + sincos_2d(dim, h, w)) @ w_k.T + b_k)
    v = split_heads(kv @ w_v.T + b_v)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(dim // heads)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(-1, dim)
    out = out @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
    return _layer_norm(out, p["ln_post.weight"], p["ln_post.bias"]) @ p["proj"]


def _reference_features(config, weights, slices: list[np.ndarray]) -> list[np.ndarray]:
    tower = _vision_tower(config, weights)
    res = {
        k.removeprefix("resampler."): v.double().numpy()
        for k, v in weights.items()
        if k.startswith("resampler.")
    }
    assert "kv_proj.bias" not in res
    feats = []
    for pixels in slices:
        h, w = pixels.shape[1] // PATCH, pixels.shape[2] // PATCH
        feats.append(_resampler(res, _tower_features(tower, pixels), h, w))
    return feats


def _image_bounds(ids: np.ndarray, special_ids: dict[str, int]) -> np.ndarray:
    """The remote processor's image_bound: [start + 1, end) of every <image>/<slice> ... </image>/</slice>."""
    starts = np.flatnonzero(np.isin(ids, [special_ids["<image>"], special_ids["<slice>"]])) + 1
    ends = np.flatnonzero(np.isin(ids, [special_ids["</image>"], special_ids["</slice>"]]))
    assert len(starts) == len(ends)
    return np.stack([starts, ends], axis=1)


def _splice(
    embed_table: np.ndarray, ids: np.ndarray, bounds: np.ndarray, feats: list[np.ndarray]
) -> np.ndarray:
    """get_vllm_embedding: token embeddings, features scattered over the bounds in order."""
    embeds = embed_table[ids].copy()
    assert len(bounds) == len(feats)
    for (start, end), f in zip(bounds, feats, strict=True):
        assert end - start == f.shape[0]
        embeds[start:end] = f
    return embeds


def _llama(config: dict, weights: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """transformers' Llama in float64 from the remote config.json (top-level Llama fields)."""
    keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
        "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    )  # fmt: skip
    rope = {**config["rope_scaling"], "rope_theta": config["rope_theta"]}
    hf_cfg = LlamaConfig(**{k: config[k] for k in keys}, rope_parameters=rope, attn_implementation="eager")
    model = LlamaForCausalLM(hf_cfg)
    assert model.model.rotary_emb.rope_type == "longrope"  # the checkpoint's LongRoPE, not plain RoPE
    state = {k.removeprefix("llm."): v for k, v in weights.items() if k.startswith("llm.")}
    model.load_state_dict(state, strict=True)
    return model.double().eval()


@pytest.fixture(scope="module")
def e2e(session, config, weights, special_ids, hf_tokenizer):
    """Our session's run and the reference's, for wide.png (sliced) and the question."""
    prepared = session.prepare(QUESTION, [SAMPLES / "wide.png"])
    (image,) = prepared.images
    grid = _remote_grid(image)
    assert grid is not None  # a sliced image: source + tiles
    # the reference's own prompt ids: the remote layout, tokenized by the `tokenizers` library
    ids = np.array(hf_tokenizer.encode(_expected_prompt(QUESTION, [grid]), add_special_tokens=True).ids)
    assert ids.tolist() == prepared.prompt.ids

    feats = _reference_features(config, weights, image.slices)
    bounds = _image_bounds(ids, special_ids)
    table = weights["llm.model.embed_tokens.weight"].double().numpy()
    ref_embeds = _splice(table, ids, bounds, feats)
    llm = _llama(config, weights)
    ref_tokens, ref_logits = greedy(llm, ref_embeds, NEW_TOKENS)

    chat = session.generate(prepared, session.sampling(max_new_tokens=NEW_TOKENS, stop_ids=()))
    recorded = generation.generate(
        session.backend, prepared.embeds, session.sampling(max_new_tokens=NEW_TOKENS, stop_ids=()),
        prompt_ids=prepared.prompt.ids, record_logits=True,
    )  # fmt: skip
    return {
        "prepared": prepared,
        "ids": ids,
        "bounds": bounds,
        "feats": feats,
        "table": table,
        "ref_embeds": ref_embeds,
        "llm": llm,
        "ref_tokens": ref_tokens,
        "ref_logits": ref_logits,
        "chat": chat,
        "recorded": recorded,
    }


def test_image_bounds_are_the_unk_runs(e2e, special_ids):
    """The remote bounds (from <image>/<slice> tokens) cover exactly the <unk> rows, source first."""
    ids, bounds = e2e["ids"], e2e["bounds"]
    assert len(bounds) == len(e2e["prepared"].images[0].slices) == 3
    covered = np.concatenate([np.arange(s, e) for s, e in bounds])
    assert np.array_equal(covered, np.flatnonzero(ids == special_ids["<unk>"]))
    assert ids[bounds[0, 0] - 1] == special_ids["<image>"]
    assert all(ids[s - 1] == special_ids["<slice>"] for s, _ in bounds[1:])


def test_slice_features_match_reference(e2e):
    ours = e2e["prepared"].slice_embeds
    assert len(ours) == len(e2e["feats"])
    for i, (o, r) in enumerate(zip(ours, e2e["feats"], strict=True)):
        assert np.abs(r).max() > 0.5  # O(1) features, not collapsed
        err = max_rel(o, r)
        assert err < TOL, f"slice {i}: max |diff| / scale = {err:.3g}"


def test_spliced_embeddings_match_reference(e2e):
    err = max_rel(e2e["prepared"].embeds, e2e["ref_embeds"])
    assert err < TOL, err


def test_greedy_tokens_match_reference(e2e):
    ref_tokens = e2e["ref_tokens"]
    assert e2e["chat"].generation.token_ids == ref_tokens
    assert e2e["recorded"].token_ids == ref_tokens
    assert len(set(ref_tokens)) > 1  # not a degenerate repeat of one token
    # each greedy pick is clear of the runner-up by 10x the logit tolerance below
    for logits in e2e["ref_logits"]:
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 10 * TOL * max(np.abs(logits).max(), 1.0)


def test_prefill_and_decode_logits_match_reference(e2e):
    recorded = e2e["recorded"].logits
    assert recorded is not None and len(recorded) == NEW_TOKENS
    ref = e2e["ref_logits"]
    assert np.abs(ref[0]).max() > 1.0
    assert len(e2e["recorded"].timings.prefill_chunk_ms) > 1  # a chunked prefill
    prefill_err = max_rel(recorded[0], ref[0])
    assert prefill_err < TOL, f"prefill: max |diff| / scale = {prefill_err:.3g}"
    for step in range(1, NEW_TOKENS):
        err = max_rel(recorded[step], ref[step])
        assert err < TOL, f"decode step {step}: max |diff| / scale = {err:.3g}"


def test_reference_is_sensitive_to_images_and_their_order(e2e):
    """The comparison above is not vacuous: dropping the image features or swapping the two tiles
    moves the reference's last logits far beyond its tolerance."""
    ids, bounds, feats, table, llm = e2e["ids"], e2e["bounds"], e2e["feats"], e2e["table"], e2e["llm"]
    ref = e2e["ref_logits"][0]
    text_only = last_logits(llm, table[ids])
    swapped = last_logits(llm, _splice(table, ids, bounds, [feats[0], feats[2], feats[1]]))
    assert max_rel(text_only, ref) > 1e-2
    assert max_rel(swapped, ref) > 1e-2
