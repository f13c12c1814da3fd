"""MiniCPM-V 2.0 against references from outside this project's model code (architectures.md §1).

1. Vision tower (`vpm`) vs timm's own `vit_so400m_patch14_siglip_384` at the tiny sizes, built as
   the remote code builds it (`create_model(..., num_classes=0, dynamic_img_size=True,
   dynamic_img_pad=True)`, `attn_pool` -> Identity, `blocks = blocks[:-1]`), our weights loaded by
   name, compared on `forward_features` of whole slices: timm resamples its 27 x 27 position table
   itself (`resample_abs_pos_embed`, antialiased bicubic). Square, 27 x 27 (no resampling),
   up- and down-sampled non-square grids. timm 1.0.31 builds this model with exact (erf) GELU,
   the ViT default, as timm 0.9.10 (the release's pin) does; the test asserts that rather than
   forcing the activation, and shows that a gelu_tanh tower would fail the comparison.
2. LLM (MiniCPM-1 muP) vs transformers, two ways: MiniCPM3ForCausalLM (same muP scalings:
   embeddings x scale_emb, residual branches x scale_depth / sqrt(L), hidden / (hidden_size /
   dim_model_base) before the head) with its MLA attention swapped for LlamaAttention, and a plain
   LlamaForCausalLM with the scalings folded into its weights (exact: each residual branch ends in
   a bias-free o_proj / down_proj, and the head scale follows the final norm). One-call logits and
   chunked prefill (chunk 16, padded) + greedy decode.
3. Resampler vs a float64 one written here from §1.2 (adaptive sin-cos of the slice grid on the
   keys, column in the first half; the stored 8 x 8 `pos_embed` on the queries; torch's
   nn.MultiheadAttention with the packed in_proj; ln_post; @ proj), and a whole chat turn: slices
   from PIL as the remote `slice_image` makes them, the prompt written out from §1.5 / §1.6 and
   tokenized by the `tokenizers` library, timm tower + reference resampler, text embeddings x
   scale_emb BEFORE the features are scattered over each `<image>` ... `</image>` (remote
   `image_bound`), and the folded Llama in float64 decoding greedily with transformers' KV cache.

The tiny checkpoint is edited in two places: dim_model_base 64 (hidden 256; at the preset's 256 the
head scale is 1 and would go untested), and resampler.proj x scale_emb, so that the image features
are not dwarfed by the text rows they sit among (the init draws both tables at O(1), and text rows
are multiplied by scale_emb = 12), which would leave the images almost no say in the logits.

timm is installed without its dependencies (`pip install --no-deps timm==1.0.31`, the `timm-ref`
extra): it imports torchvision at load, which has no working build for the pinned CPU torch here;
tests/torchvision_standin.py supplies the few names timm reads. Without timm, the tests that need
its tower skip and the others run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from resampler_reference import check_sincos_layout, greedy, last_logits, max_rel, rows_cols, sincos_2d
from safetensors.torch import load_file, save_file
from torch import nn

from edge_runtime import generation
from edge_runtime.checkpoint import load_checkpoint
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.models.minicpm_v20 import MiniCPMV20, MiniCPMV20Config
from edge_runtime.runtime import open_session

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from torchvision_standin import import_timm  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, MiniCPM3Config, MiniCPM3ForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention  # noqa: E402

try:
    timm = import_timm()
except ImportError:  # tests that need the timm tower skip; the rest run
    timm = None

SAMPLES = Path(__file__).resolve().parents[1] / "edge_runtime" / "data" / "samples"
TIMM_MODEL = "vit_so400m_patch14_siglip_384"
PATCH = 14
QUERY_NUM = 64
RESAMPLER_HEAD_DIM = 128  # remote code: Resampler(num_heads=embed_dim // 128)
LN_EPS = 1e-6  # remote Resampler: partial(nn.LayerNorm, eps=1e-6)
DIM_MODEL_BASE = 64  # written into the tiny config (hidden 256): head scale 1/4
SCALE_RESOLUTION = 448
MAX_SLICE_NUMS = 9
QUESTION = "What is in this picture? Describe it."
NEW_TOKENS = 8
MAX_CONTEXT = 512  # the session's KV cache (the longest prompt here is 280 tokens)
# max |ours (fp32) - reference (float64)| / max(reference scale, 1)
TOL = 1e-4
# max |ours - timm| on the tower's O(1) output (measured: <= 3e-6 at these grids); tighter than TOL
# so that a tanh-approximated GELU (~7e-4 away) fails by a clear margin
VISION_TOL = 2e-5

VISION_GRIDS = [(32, 32), (27, 27), (20, 32), (45, 10)]  # (rows, cols) of patches: 448 px, 384 px, ...
RESAMPLER_GRIDS = [(32, 32), (20, 32), (45, 10), (5, 7)]


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = init_checkpoint("minicpm-v-2.0", "tiny", tmp_path_factory.mktemp("v20ref") / "tiny", seed=2)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    assert config["hidden_size"] != DIM_MODEL_BASE
    config["dim_model_base"] = DIM_MODEL_BASE
    config_file.write_text(json.dumps(config, indent=2))
    # image features at the scale of the text rows (embed x scale_emb): the init's O(1) features
    # would barely move the logits next to them
    weights_file = path / "model.safetensors"
    weights = load_file(weights_file)
    weights["resampler.proj"] = weights["resampler.proj"] * config["scale_emb"]
    save_file(weights, weights_file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def config(checkpoint) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def model(checkpoint) -> MiniCPMV20:
    model = load_checkpoint(checkpoint).model.eval()
    assert isinstance(model, MiniCPMV20)
    return model


@pytest.fixture(scope="module")
def session(checkpoint):
    return open_session(checkpoint=checkpoint, max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def prepared(session):
    """session.prepare(QUESTION, [sample]) by sample name, each computed once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = session.prepare(QUESTION, [SAMPLES / f"{name}.png"])
        return cache[name]

    return get


def _require_timm() -> None:
    if timm is None:
        pytest.skip(
            "timm is not installed (pip install --no-deps timm==1.0.31; see tests/torchvision_standin.py)"
        )


@pytest.fixture(scope="module")
def tower(config, model):
    _require_timm()
    return _timm_tower(config, model.vpm.state_dict())


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    return tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def special_ids(checkpoint) -> dict[str, int]:
    data = json.loads((checkpoint / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in data["added_tokens"]}


# --------------------------------------------------------------------------------------------
# helpers


def _timm_tower(config: dict, vpm_state: dict[str, torch.Tensor], **kwargs) -> nn.Module:
    """The remote code's vision tower at the checkpoint's sizes, float64: timm's so400m with the
    attention-pool head replaced by Identity and the last block dropped (drop_vision_last_layer)."""
    vc = config["vision_config"]
    assert vc["patch_size"] == PATCH and vc["image_size"] == 384  # the timm model's own 27 x 27 grid
    tower = timm.create_model(
        TIMM_MODEL, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True,
        embed_dim=vc["hidden_size"], depth=vc["num_hidden_layers"], num_heads=vc["num_attention_heads"],
        mlp_ratio=vc["intermediate_size"] / vc["hidden_size"], **kwargs,
    )  # fmt: skip
    tower.attn_pool = nn.Identity()
    assert config["drop_vision_last_layer"]
    tower.blocks = tower.blocks[:-1]
    tower.load_state_dict(vpm_state, strict=True)
    return tower.double().eval()


def _patches(pixels: torch.Tensor) -> torch.Tensor:
    """[3, H, W] -> [h*w, 3*14*14]: row-major patches, each `pixels[:, y0:y0+14, x0:x0+14]` flattened."""
    c, height, width = pixels.shape
    h, w = height // PATCH, width // PATCH
    grid = pixels.reshape(c, h, PATCH, w, PATCH).permute(1, 3, 0, 2, 4)
    return grid.reshape(h * w, c * PATCH * PATCH).contiguous()


def _pixels(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(seed))


def _timm_features(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """get_vision_embedding for one slice: forward_features of [1, 3, H, W] -> [h*w, D] float64."""
    with torch.no_grad():
        out = tower.forward_features(torch.as_tensor(pixels)[None].double())
    assert tower.num_prefix_tokens == 0
    return out[0]


def _ours_tower(model: MiniCPMV20, pixels: torch.Tensor) -> torch.Tensor:
    h, w = pixels.shape[1] // PATCH, pixels.shape[2] // PATCH
    with torch.no_grad():
        return model.vpm(_patches(pixels), *rows_cols(h, w))


def _reference_resampler(state: dict[str, torch.Tensor], x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Remote 2.0 Resampler.forward (adaptive=True) for one slice, float64: keys ln_kv(kv_proj(x)) +
    sincos(h, w), values ln_kv(kv_proj(x)), queries ln_q(query) + pos_embed (the stored 8 x 8
    table); torch's nn.MultiheadAttention with the packed in_proj; ln_post; @ proj."""
    p = {k: v.double() for k, v in state.items()}
    dim = p["query"].shape[1]
    mha = nn.MultiheadAttention(dim, dim // RESAMPLER_HEAD_DIM).double().eval()
    mha.load_state_dict(
        {k.removeprefix("attn."): v for k, v in p.items() if k.startswith("attn.")}, strict=True
    )

    def ln(name: str, t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, (dim,), p[f"{name}.weight"], p[f"{name}.bias"], LN_EPS)

    with torch.no_grad():
        kv = ln("ln_kv", x.double() @ p["kv_proj.weight"].T)
        pos = torch.from_numpy(sincos_2d(dim, h, w))
        query = ln("ln_q", p["query"]) + p["pos_embed"]
        out = mha(query[:, None], (kv + pos)[:, None], kv[:, None], need_weights=False)[0][:, 0]
        return ln("ln_post", out) @ p["proj"]


def _resampler_state(model: MiniCPMV20) -> dict[str, torch.Tensor]:
    state = {k: v.detach() for k, v in model.resampler.state_dict().items()}
    assert "kv_proj.bias" not in state  # kv_proj has no bias
    return state


# --------------------------------------------------------------------------------------------
# 1. vision tower vs timm


def test_timm_tower_is_the_remote_codes(tower, model, config):
    """timm's so400m at the tiny sizes, as the remote code runs it: exact GELU (timm's ViT default,
    not overridden for this model name in timm 0.9.10 or 1.0.31), LayerNorm eps 1e-6, no class or
    prefix token, a learned 27 x 27 table, qkv bias, one block dropped."""
    vc = config["vision_config"]
    assert len(tower.blocks) == len(model.vpm.blocks) == vc["num_hidden_layers"] - 1
    for block in tower.blocks:
        assert type(block.mlp.act) is nn.GELU and block.mlp.act.approximate == "none"
        assert block.mlp.fc1.out_features == vc["intermediate_size"]
        assert block.attn.qkv.bias is not None
        assert block.norm1.eps == block.norm2.eps == LN_EPS
    assert tower.norm.eps == LN_EPS
    assert tower.cls_token is None and tower.num_prefix_tokens == 0
    assert tuple(tower.patch_embed.grid_size) == (27, 27)
    assert tower.pos_embed.shape == (1, 27 * 27, vc["hidden_size"])


@pytest.mark.parametrize("grid", VISION_GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_vpm_matches_timm_forward_features(tower, model, grid):
    h, w = grid
    pixels = _pixels(h, w, seed=h * 100 + w)
    ref = _timm_features(tower, pixels)
    ours = _ours_tower(model, pixels)
    assert ours.shape == (h * w, model.cfg.vision.hidden_size)
    assert ref.abs().max() > 0.5  # a final-norm output of O(1), not collapsed
    err = float((ours.double() - ref).abs().max())
    assert err < VISION_TOL, f"{grid}: max |diff| {err:.3g}"


def test_vpm_check_is_sensitive_to_gelu_tanh(config, model):
    """The comparison above tells the two GELUs apart: timm's tower with act_layer='gelu_tanh'
    (what timm's SigLIP 2 / patch16 so400m models use) is far outside the tolerance."""
    _require_timm()
    tanh_tower = _timm_tower(config, model.vpm.state_dict(), act_layer="gelu_tanh")
    assert type(tanh_tower.blocks[0].mlp.act).__name__ == "GELUTanh"
    pixels = _pixels(20, 32, seed=5)
    err = float((_ours_tower(model, pixels).double() - _timm_features(tanh_tower, pixels)).abs().max())
    assert err > 10 * VISION_TOL, err


@pytest.mark.parametrize("grid", [(32, 32), (20, 32), (45, 10)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_position_table_is_antialiased_bicubic(model, grid):
    """Our resized table equals timm's resample_abs_pos_embed (antialias=True) and not plain bicubic."""
    _require_timm()
    from timm.layers import resample_abs_pos_embed

    h, w = grid
    table = model.vpm.pos_embed.detach()
    rows, cols = rows_cols(h, w)
    with torch.no_grad():
        ours = model.vpm.position_embedding(rows, cols)
    timm_aa = resample_abs_pos_embed(table, [h, w], num_prefix_tokens=0)[0]
    plain = resample_abs_pos_embed(table, [h, w], num_prefix_tokens=0, antialias=False)[0]
    assert float((ours - timm_aa).abs().max()) < 1e-5
    assert float((ours - plain).abs().max()) > 1e-2


# --------------------------------------------------------------------------------------------
# 2. resampler


def test_stored_query_pos_embed_is_the_8x8_sincos(model):
    """resampler.pos_embed, the queries' table: get_2d_sincos_pos_embed(D, 8) as the remote init."""
    side = math.isqrt(QUERY_NUM)
    stored = model.resampler.pos_embed.detach().double().numpy()
    np.testing.assert_allclose(stored, sincos_2d(stored.shape[1], side, side), rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid", RESAMPLER_GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_resampler_matches_float64_reference(model, grid):
    h, w = grid
    x = torch.randn(h * w, model.cfg.vision.hidden_size, generator=torch.Generator().manual_seed(h * w))
    with torch.no_grad():
        ours = model.resampler(x, *rows_cols(h, w))
    ref = _reference_resampler(_resampler_state(model), x, h, w)
    assert ours.shape == (QUERY_NUM, model.cfg.text.hidden_size)
    assert ref.abs().max() > 0.5
    err = max_rel(ours, ref)
    assert err < TOL, f"{grid}: {err:.3g}"


def test_resampler_check_is_sensitive(model):
    """The comparison sees a transposed key sin-cos and missing query positions."""
    h, w = 5, 7
    state = _resampler_state(model)
    x = torch.randn(h * w, model.cfg.vision.hidden_size, generator=torch.Generator().manual_seed(3))
    ref = _reference_resampler(state, x, h, w)
    with torch.no_grad():
        swapped = model.resampler(x, *reversed(rows_cols(h, w)))
    no_query_pos = _reference_resampler({**state, "pos_embed": torch.zeros_like(state["pos_embed"])}, x, h, w)
    assert max_rel(swapped, ref) > 1e-2
    assert max_rel(no_query_pos, ref) > 1e-2


@pytest.mark.parametrize("grid", [(32, 32), (20, 32)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_encode_slice_matches_timm_and_reference_resampler(tower, model, grid):
    h, w = grid
    pixels = _pixels(h, w, seed=11 + h)
    ref = _reference_resampler(_resampler_state(model), _timm_features(tower, pixels), h, w)
    rows, cols = rows_cols(h, w)
    with torch.no_grad():
        ours = model.encode_slice(_patches(pixels), torch.stack([rows, cols]), "adaptive")
    err = max_rel(ours, ref)
    assert err < TOL, f"{grid}: {err:.3g}"


# --------------------------------------------------------------------------------------------
# 3. LLM (muP) vs transformers

# the checkpoint's LLM, and one with other muP factors (and GQA) to show they are read, not fixed
LLM_CASES = {
    "checkpoint": {},
    "other-mup": {"scale_emb": 3.5, "scale_depth": 2.2, "dim_model_base": 32, "num_key_value_heads": 2},
}
LLM_REFERENCES = ("minicpm3", "folded-llama")


def _rope(config: dict) -> dict:
    assert config.get("rope_scaling") is None  # MiniCPM-2B: plain RoPE
    return {"rope_type": "default", "rope_theta": config["rope_theta"]}


def _llama_config(config: dict) -> LlamaConfig:
    keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
        "attention_bias", "mlp_bias", "tie_word_embeddings",
    )  # fmt: skip
    return LlamaConfig(
        **{k: config[k] for k in keys}, rope_parameters=_rope(config), attn_implementation="eager"
    )


def _llm_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("llm."): v.detach().double() for k, v in weights.items() if k.startswith("llm.")}


def _minicpm3(config: dict, weights: dict[str, torch.Tensor]) -> MiniCPM3ForCausalLM:
    """transformers' MiniCPM3 (MiniCPM's muP) with Llama attention in place of its MLA = MiniCPM-1."""
    hf_cfg = MiniCPM3Config(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_parameters=_rope(config),
        tie_word_embeddings=False,
        scale_emb=config["scale_emb"],
        scale_depth=config["scale_depth"],
        dim_model_base=config["dim_model_base"],
        qk_rope_head_dim=config["head_dim"],  # MiniCPM3's RoPE width = its config.head_dim
        qk_nope_head_dim=16,
        q_lora_rank=None,
        kv_lora_rank=32,
        attn_implementation="eager",
    )
    assert hf_cfg.head_dim == config["head_dim"]
    hf = MiniCPM3ForCausalLM(hf_cfg)
    llama_cfg = _llama_config(config)
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn = LlamaAttention(llama_cfg, i)
    hf.load_state_dict(_llm_state(weights), strict=True)
    return hf.double().eval()


def _folded_llama(config: dict, weights: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """transformers' Llama with MiniCPM's muP folded into the weights: embed_tokens x scale_emb,
    o_proj / down_proj (each residual branch's last, bias-free linear) x scale_depth / sqrt(L),
    lm_head x dim_model_base / hidden_size (it reads the final-normed hidden state)."""
    assert not config["attention_bias"] and not config["mlp_bias"] and not config["tie_word_embeddings"]
    state = _llm_state(weights)
    residual = config["scale_depth"] / math.sqrt(config["num_hidden_layers"])
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * config["scale_emb"]
    for i in range(config["num_hidden_layers"]):
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            state[name] = state[name] * residual
    state["lm_head.weight"] = state["lm_head.weight"] * (config["dim_model_base"] / config["hidden_size"])
    hf = LlamaForCausalLM(_llama_config(config))
    hf.load_state_dict(state, strict=True)
    return hf.double().eval()


_REFERENCE_BUILDERS = {"minicpm3": _minicpm3, "folded-llama": _folded_llama}


@pytest.fixture(scope="module", params=list(LLM_CASES))
def llm_case(request, config, model):
    """(case name, raw config, our model, {reference name: transformers model})."""
    raw = {**config, **LLM_CASES[request.param]}
    ours = MiniCPMV20(MiniCPMV20Config.from_hf(raw)).eval()
    weights = {k: v for k, v in model.state_dict().items() if k.startswith("llm.")}
    kv = raw["num_key_value_heads"] * raw["head_dim"]
    for k in list(weights):  # fewer KV heads: the first rows of the checkpoint's k / v projections
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            weights[k] = weights[k][:kv].contiguous()
    missing, unexpected = ours.load_state_dict(weights, strict=False)
    assert not unexpected and all(not k.startswith("llm.") for k in missing)
    refs = {name: build(raw, weights) for name, build in _REFERENCE_BUILDERS.items()}
    return request.param, raw, ours, refs


def test_llm_references_agree(llm_case):
    """The two independent references are one model (MiniCPM-1), not two; and muP matters: the
    same weights in a plain Llama give other logits."""
    _, raw, ours, refs = llm_case
    ids = torch.randint(0, raw["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(4))
    plain = LlamaForCausalLM(_llama_config(raw))
    plain.load_state_dict(_llm_state(ours.state_dict()), strict=True)
    with torch.no_grad():
        a, b = (refs[name](input_ids=ids).logits[0] for name in LLM_REFERENCES)
        c = plain.double().eval()(input_ids=ids).logits[0]
    assert max_rel(a, b) < 1e-6
    assert max_rel(c, a) > 1e-2


PROMPT_LEN, CHUNK, DECODE_STEPS = 40, 16, 5


@pytest.fixture(scope="module")
def llm_runs(llm_case) -> dict:
    """Our LLM on a PROMPT_LEN-token prompt: in one call, and as chunked prefill (CHUNK rows per
    call, the last chunk zero-padded) followed by DECODE_STEPS greedy steps."""
    _, raw, ours, _ = llm_case
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, raw["vocab_size"], (PROMPT_LEN,), generator=gen)
    prefill_rows, step_logits, tokens = [], [], []
    with torch.no_grad():
        emb = ours.embed(prompt)
        one_call, _ = ours.decode(
            emb[None], torch.tensor([0]), torch.tensor([PROMPT_LEN]), ours.new_state(64), all_logits=True
        )
        state = ours.new_state(64)
        for start in range(0, PROMPT_LEN, CHUNK):
            part = emb[start : start + CHUNK]
            n = part.shape[0]
            padded = F.pad(part, (0, 0, 0, CHUNK - n))[None]
            logits, state = ours.decode(
                padded, torch.tensor([start]), torch.tensor([n]), state, all_logits=True
            )
            prefill_rows.append(logits[:n])
        logits = prefill_rows[-1][-1:]
        for i in range(DECODE_STEPS):
            step_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            logits, state = ours.decode(
                ours.embed(torch.tensor(tokens[-1:]))[None], torch.tensor([PROMPT_LEN + i]), torch.tensor([1]),
                state, all_logits=True,
            )  # fmt: skip
        step_logits.append(logits[0])
    return {
        "prompt": prompt,
        "one_call": one_call,
        "prefill": torch.cat(prefill_rows),
        "steps": torch.stack(step_logits),
        "tokens": tokens,
    }


@pytest.mark.parametrize("ref_name", LLM_REFERENCES)
def test_llm_full_prompt_logits_match(llm_case, llm_runs, ref_name):
    name, _, _, refs = llm_case
    with torch.no_grad():
        ref = refs[ref_name](input_ids=llm_runs["prompt"][None]).logits[0]
    assert ref.abs().max() > 0.5
    err = max_rel(llm_runs["one_call"], ref)
    assert err < TOL, f"{name} vs {ref_name}: {err:.3g}"


@pytest.mark.parametrize("ref_name", LLM_REFERENCES)
def test_llm_chunked_prefill_and_decode_match(llm_case, llm_runs, ref_name):
    """Chunked prefill rows and each decode step's logits vs the reference over the whole sequence."""
    name, _, _, refs = llm_case
    tokens = llm_runs["tokens"]
    with torch.no_grad():
        ref = refs[ref_name](input_ids=torch.cat([llm_runs["prompt"], torch.tensor(tokens)])[None]).logits[0]
    prefill_err = max_rel(llm_runs["prefill"], ref[:PROMPT_LEN])
    decode_err = max_rel(llm_runs["steps"], ref[PROMPT_LEN - 1 :])
    assert prefill_err < TOL, f"{name} vs {ref_name} prefill: {prefill_err:.3g}"
    assert decode_err < TOL, f"{name} vs {ref_name} decode: {decode_err:.3g}"
    assert tokens == ref[PROMPT_LEN - 1 : -1].argmax(-1).tolist()


# --------------------------------------------------------------------------------------------
# 4. a whole chat turn


def _ensure_divide(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


def _find_best_resize(size, allow_upscale: bool = False) -> tuple[int, int]:
    width, height = size
    if width * height > SCALE_RESOLUTION * SCALE_RESOLUTION or allow_upscale:
        r = width / height
        height = int(SCALE_RESOLUTION / math.sqrt(r))
        width = int(height * r)
    return _ensure_divide(width, PATCH), _ensure_divide(height, PATCH)


def _remote_slices(image: Image.Image) -> tuple[list[np.ndarray], list[int] | None]:
    """slice_image of the 2.0 remote code (architectures.md §1.5; sizes are PIL's (width, height),
    the grid is [cols, rows]), then ToTensor and Normalize(0.5, 0.5): normalised [3, H, W] slices,
    source first, then the tiles row-major."""
    width, height = image.size
    multiple = min(math.ceil(width * height / SCALE_RESOLUTION**2), MAX_SLICE_NUMS)
    grid = None
    if multiple <= 1:
        crops = [image.resize(_find_best_resize(image.size, allow_upscale=True), Image.Resampling.BICUBIC)]
    else:
        crops = [image.resize(_find_best_resize(image.size), Image.Resampling.BICUBIC)]
        counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= MAX_SLICE_NUMS]
        candidates = [[m, n // m] for n in counts for m in range(1, n + 1) if n % m == 0]
        grid, best = [1, 1], float("inf")
        for cand in candidates:
            error = abs(math.log(width / height) - math.log(cand[0] / cand[1]))
            if error < best:
                grid, best = cand, error
        cols, rows = grid
        cell = (_ensure_divide(width, cols) / cols, _ensure_divide(height, rows) / rows)
        tile_w, tile_h = _find_best_resize(cell, allow_upscale=True)
        refine = image.resize((tile_w * cols, tile_h * rows), Image.Resampling.BICUBIC)
        for i in range(rows):
            for j in range(cols):
                crops.append(refine.crop((j * tile_w, i * tile_h, (j + 1) * tile_w, (i + 1) * tile_h)))
    slices = [(np.asarray(c, np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5 for c in crops]
    return slices, grid


def _expected_prompt(question: str, grid: list[int] | None) -> str:
    """chat() of the 2.0 remote code for one image: placeholder + "\\n" + question as the user turn,
    `<用户>` + content + `<AI>`; the placeholder is `<image>` + `<unk>`*64 + `</image>` and, for a
    sliced image, `<slice>` + rows joined by "\\n" (each cols x the same image placeholder) +
    `</slice>`."""
    image = "<image>" + "<unk>" * QUERY_NUM + "</image>"
    placeholder = image
    if grid is not None:
        cols, rows = grid
        placeholder += "<slice>" + "\n".join(image * cols for _ in range(rows)) + "</slice>"
    return "<用户>" + placeholder + "\n" + question + "<AI>"


def _remote_grid(image) -> list[int] | None:
    """Our PreparedImage.grid is (rows, cols); the remote code's grid is [cols, rows]."""
    if image.grid is None:
        return None
    rows, cols = image.grid
    return [cols, rows]


@pytest.mark.parametrize("name", ["square", "wide", "tall", "tiny"])
def test_slices_follow_remote_slice_image(prepared, name):
    ref_slices, ref_grid = _remote_slices(Image.open(SAMPLES / f"{name}.png").convert("RGB"))
    (image,) = prepared(name).images
    assert _remote_grid(image) == ref_grid
    assert [s.shape for s in image.slices] == [s.shape for s in ref_slices]
    for ours, ref in zip(image.slices, ref_slices, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["square", "wide", "tall"])
def test_prompt_text_and_ids_follow_remote_layout(prepared, hf_tokenizer, special_ids, name):
    prompt = prepared(name).prompt
    (image,) = prepared(name).images
    grid = _remote_grid(image)
    # the cases cover an unsliced image, a one-row grid and a multi-row grid
    assert grid == {"square": None, "wide": [2, 1], "tall": [1, 3]}[name]
    expected = _expected_prompt(QUESTION, grid)
    assert prompt.text == expected
    ids = prompt.ids
    assert ids[0] == special_ids["<s>"] == 1  # BOS once, first (the remote _convert_to_tensors)
    assert ids == hf_tokenizer.encode(expected, add_special_tokens=True).ids
    assert ids.count(special_ids["<unk>"]) == QUERY_NUM * len(image.slices)
    assert ids.count(special_ids["<image>"]) == len(image.slices)


def _image_bounds(ids: np.ndarray, special_ids: dict[str, int]) -> np.ndarray:
    """The remote _convert_to_tensors' image_bound: [idx(<image>) + 1, idx(</image>)) per pair."""
    starts = np.flatnonzero(ids == special_ids["<image>"]) + 1
    ends = np.flatnonzero(ids == special_ids["</image>"])
    assert len(starts) == len(ends)
    return np.stack([starts, ends], axis=1)


def _splice(table: np.ndarray, scale_emb: float, ids, bounds, feats) -> np.ndarray:
    """get_vllm_embedding: embed_tokens(ids) * scale_emb, then the features scattered (unscaled)
    over the bounds in order."""
    embeds = table[ids] * scale_emb
    assert len(bounds) == len(feats)
    for (start, end), f in zip(bounds, feats, strict=True):
        assert end - start == f.shape[0]
        embeds[start:end] = f
    return embeds


@pytest.fixture(scope="module")
def e2e(session, prepared, config, model, tower, hf_tokenizer, special_ids):
    """Our session's run and the reference's, for wide.png (source + 2 tiles) and the question."""
    path = SAMPLES / "wide.png"
    ref_slices, grid = _remote_slices(Image.open(path).convert("RGB"))
    assert grid is not None
    ids = np.array(hf_tokenizer.encode(_expected_prompt(QUESTION, grid), add_special_tokens=True).ids)
    resampler = _resampler_state(model)
    feats = []
    for pixels in ref_slices:
        h, w = pixels.shape[1] // PATCH, pixels.shape[2] // PATCH
        feats.append(
            _reference_resampler(resampler, _timm_features(tower, torch.from_numpy(pixels)), h, w).numpy()
        )
    bounds = _image_bounds(ids, special_ids)
    table = model.llm.model.embed_tokens.weight.detach().double().numpy()
    ref_embeds = _splice(table, config["scale_emb"], ids, bounds, feats)
    llm = _folded_llama(config, model.state_dict())
    ref_tokens, ref_logits = greedy(llm, ref_embeds, NEW_TOKENS)

    ours = prepared("wide")
    sampling = session.sampling(max_new_tokens=NEW_TOKENS, stop_ids=())
    chat = session.generate(ours, sampling)
    recorded = generation.generate(
        session.backend, ours.embeds, sampling, prompt_ids=ours.prompt.ids, record_logits=True
    )
    return {
        "prepared": ours, "ids": ids, "bounds": bounds, "feats": feats, "table": table,
        "ref_embeds": ref_embeds, "llm": llm, "ref_tokens": ref_tokens, "ref_logits": ref_logits,
        "chat": chat, "recorded": recorded,
    }  # fmt: skip


def test_e2e_prompt_ids_and_bounds(e2e, special_ids):
    """Our prompt is the reference's, and the remote bounds cover exactly the <unk> runs."""
    ids, bounds = e2e["ids"], e2e["bounds"]
    assert e2e["prepared"].prompt.ids == ids.tolist()
    assert len(bounds) == len(e2e["prepared"].images[0].slices) == 3
    covered = np.concatenate([np.arange(s, e) for s, e in bounds])
    assert np.array_equal(covered, np.flatnonzero(ids == special_ids["<unk>"]))


def test_e2e_slice_features_match_reference(e2e):
    ours = e2e["prepared"].slice_embeds
    assert len(ours) == len(e2e["feats"])
    for i, (o, r) in enumerate(zip(ours, e2e["feats"], strict=True)):
        assert np.abs(r).max() > 0.5
        err = max_rel(o, r)
        assert err < TOL, f"slice {i}: {err:.3g}"


def test_e2e_spliced_embeddings_match_reference(e2e, config):
    """Text rows are embed x scale_emb, image rows the features as they are."""
    ours, ref = e2e["prepared"].embeds, e2e["ref_embeds"]
    err = max_rel(ours, ref)
    assert err < TOL, err
    # and the alternatives are far off: features scaled too, text rows unscaled
    bounds, feats = e2e["bounds"], e2e["feats"]
    scaled = _splice(
        e2e["table"], config["scale_emb"], e2e["ids"], bounds, [f * config["scale_emb"] for f in feats]
    )
    unscaled_text = _splice(e2e["table"], 1.0, e2e["ids"], bounds, feats)
    assert max_rel(ours, scaled) > 1e-2 and max_rel(ours, unscaled_text) > 1e-2


def test_e2e_greedy_tokens_match_reference(e2e):
    ref_tokens = e2e["ref_tokens"]
    assert e2e["chat"].generation.token_ids == ref_tokens
    assert e2e["recorded"].token_ids == ref_tokens
    assert len(set(ref_tokens)) > 1  # not one token repeated
    for logits in e2e["ref_logits"]:  # each pick is clear of the runner-up by 10x the tolerance
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 10 * TOL * max(np.abs(logits).max(), 1.0)


def test_e2e_prefill_and_decode_logits_match_reference(e2e):
    recorded = e2e["recorded"].logits
    ref = e2e["ref_logits"]
    assert recorded is not None and len(recorded) == NEW_TOKENS
    assert len(e2e["recorded"].timings.prefill_chunk_ms) > 1  # a chunked prefill
    prefill_err = max_rel(recorded[0], ref[0])
    assert prefill_err < TOL, f"prefill: {prefill_err:.3g}"
    for step in range(1, NEW_TOKENS):
        err = max_rel(recorded[step], ref[step])
        assert err < TOL, f"decode step {step}: {err:.3g}"


def test_e2e_reference_is_sensitive_to_images_and_their_order(e2e, config):
    """The comparison is not vacuous: without the image features, or with the tiles swapped, the
    reference's last logits move far beyond the tolerance."""
    ids, bounds, feats, table, llm = e2e["ids"], e2e["bounds"], e2e["feats"], e2e["table"], e2e["llm"]
    ref = e2e["ref_logits"][0]
    text_only = last_logits(llm, table[ids] * config["scale_emb"])
    swapped = last_logits(
        llm, _splice(table, config["scale_emb"], ids, bounds, [feats[0], feats[2], feats[1]])
    )
    assert max_rel(text_only, ref) > 1e-2
    assert max_rel(swapped, ref) > 10 * TOL


def test_reference_sincos_layout():
    check_sincos_layout()
