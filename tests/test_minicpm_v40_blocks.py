"""MiniCPM-V 4.0 block by block against code outside this project.

- vision tower (`vpm`) vs transformers' Idefics2VisionTransformer (the same SigLIP NaViT
  maths), fed the 4.0 position-table ids through a forward pre-hook on its position table;
- `vision_position_ids` vs the 4.0 remote-code bucketing, written out literally here, and the
  evidence that transformers' own NaViT bucketings differ from it;
- resampler vs torch.nn.MultiheadAttention plus a float64 numpy 2D sin-cos (MAE layout);
- encode_slice end to end (transformers tower + the reference resampler);
- the Llama LLM vs transformers' LlamaForCausalLM (GQA, head_dim != hidden / heads, LongRoPE),
  in one prefill and chunked prefill + greedy decode.

Weights are random but scaled so that activations stay O(1) and norms are not the identity.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from resampler_reference import check_sincos_layout, rows_cols, sincos_2d
from torch import nn

from edge_runtime.models.minicpm_v40 import MiniCPMV40, preset, vision_position_ids
from edge_runtime.processing.patches import row_major_patches

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig  # noqa: E402
from transformers.models.idefics2.modeling_idefics2 import (  # noqa: E402
    Idefics2VisionEmbeddings,
    Idefics2VisionTransformer,
)
from transformers.vision_utils import get_vision_nearest_position_ids  # noqa: E402

SIDE = 70  # 980 / 14: the vision position table is SIDE x SIDE
PATCH = 14
VOCAB = 2000

# patch-grid sides where NaViT bucketings are known to round differently, and 32 (448 px)
ID_SIZES = [25, 49, 50, 55, 77, 95, 98, 100, 32]
# for which of ID_SIZES each transformers bucketing gives the 4.0 remote-code ids (square grids):
# MiniCPM-V 4.6's get_vision_nearest_position_ids (arange(h) / h) mostly not, transformers'
# Idefics2VisionEmbeddings (arange(h) * float32(1 / h), one fp32 multiply) everywhere
VISION_UTILS_AGREES = {32, 77, 95}
# where the 4.0 step float32(1 / h) and a double step 1 / h give different ids
DOUBLE_STEP_DIFFERS = {25, 49, 50, 55, 98, 100}

VISION_GRIDS = [(32, 32), (25, 49), (55, 12), (7, 25)]  # (rows, cols): 448x448 and non-square
RESAMPLER_GRIDS = [(5, 7), (32, 32), (25, 49)]


# --------------------------------------------------------------------------------------------
# helpers


def _randomize(module: nn.Module, seed: int) -> None:
    """O(1) activations: linear / conv weights ~ N(0, 1 / fan_in), embedding tables and queries
    ~ N(0, 1), norm weights 1 + N(0, 0.2), biases N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_")
            if p.ndim == 1 and is_norm and leaf == "weight":
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name or "position_embedding" in name or leaf == "query":
                p.copy_(noise)
            elif leaf == "proj" and p.ndim == 2:  # resampler out projection, used as x @ proj
                p.copy_(noise / p.shape[0] ** 0.5)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def _tiny_model(seed: int = 0, **text_overrides) -> MiniCPMV40:
    cfg = preset("tiny", VOCAB)
    if text_overrides:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text_overrides))
    model = MiniCPMV40(cfg).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def model() -> MiniCPMV40:
    return _tiny_model(seed=0)


def _remote_position_ids(h: int, w: int, side: int = SIDE) -> np.ndarray:
    """SiglipVisionEmbeddings.forward of the 4.0 remote code (modeling_navit_siglip.py), one slice,
    as CUDA evaluates it: element i of `arange(0, 1 - 1e-6, step)` is fp32(i * step), one rounding
    of the exact product (RangeFactories.cu: `static_cast<float>(xstep * ind)`), written here in
    float64 numpy (the product of an int below 2^8 and an fp32 value is exact in a double).

    `tgt_sizes` there is `torch.vstack(tgt_sizes).type(torch.int32)`, so `1 / nb_patches_h` is a
    float32 tensor and the step is float32(1 / h)."""
    bounds = torch.arange(1 / side, 1.0, 1 / side).numpy()

    def buckets(n: int) -> np.ndarray:
        step = np.float32(1.0) / np.float32(n)
        count = int(np.ceil((1 - 1e-6) / np.float64(step)))
        fractions = (np.arange(count, dtype=np.float64) * np.float64(step)).astype(np.float32)
        return np.searchsorted(bounds, fractions, side="right")

    return (buckets(h)[:, None] * side + buckets(w)[None, :]).reshape(-1)


def _idefics2_config(model: MiniCPMV40) -> Idefics2VisionConfig:
    vc = model.cfg.vision
    return Idefics2VisionConfig(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_hidden_layers=len(model.vpm.encoder.layers),
        num_attention_heads=vc.num_attention_heads,
        num_channels=3,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=vc.layer_norm_eps,
        attn_implementation="eager",
    )


def _run_with_position_ids(module: nn.Module, table: nn.Embedding, ids: torch.Tensor | None, *args, **kw):
    """Run `module`, replacing the ids fed to its position table `table` by `ids` (if given).
    Returns (output, the ids transformers computed itself)."""
    seen: list[torch.Tensor] = []

    def hook(_mod, inputs):
        seen.append(inputs[0].clone())
        if ids is None:
            return None
        assert inputs[0].shape == (1, ids.numel())
        return (ids.reshape(1, -1),)

    handle = table.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = module(*args, **kw)
    finally:
        handle.remove()
    assert len(seen) == 1
    return out, seen[0][0]


def _idefics2_tower(model: MiniCPMV40) -> Idefics2VisionTransformer:
    hf = Idefics2VisionTransformer(_idefics2_config(model)).eval()
    hf.load_state_dict(model.vpm.state_dict(), strict=True)
    return hf


def _hf_tower_output(hf: Idefics2VisionTransformer, pixels: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """[L, D] from transformers' tower on one [3, H, W] slice, position ids replaced by `ids`."""
    h, w = pixels.shape[1] // PATCH, pixels.shape[2] // PATCH
    mask = torch.ones(1, h, w, dtype=torch.bool)
    out, _ = _run_with_position_ids(
        hf, hf.embeddings.position_embedding, torch.from_numpy(ids), pixel_values=pixels[None],
        patch_attention_mask=mask,
    )  # fmt: skip
    return out.last_hidden_state[0]


def _idefics2_embedding_ids(h: int, w: int) -> np.ndarray:
    """The ids transformers' Idefics2VisionEmbeddings computes for a full h x w grid."""
    cfg = Idefics2VisionConfig(hidden_size=8, image_size=SIDE * PATCH, patch_size=PATCH)
    emb = Idefics2VisionEmbeddings(cfg)
    pixels = torch.zeros(1, 3, h * PATCH, w * PATCH)
    mask = torch.ones(1, h, w, dtype=torch.bool)
    _, ids = _run_with_position_ids(emb, emb.position_embedding, None, pixels, mask)
    return ids.numpy()


def _reference_resampler(res: nn.Module, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """float64: ln_kv(kv_proj(x)) + 2D sin-cos as keys, nn.MultiheadAttention, ln_post, @ proj."""
    dim = res.query.shape[1]
    mha = nn.MultiheadAttention(dim, dim // 128).double().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(res.attn.in_proj_weight)
        mha.in_proj_bias.copy_(res.attn.in_proj_bias)
        mha.out_proj.weight.copy_(res.attn.out_proj.weight)
        mha.out_proj.bias.copy_(res.attn.out_proj.bias)

    def ln(mod: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(t, (dim,), mod.weight.double(), mod.bias.double(), mod.eps)

    with torch.no_grad():
        x = x.double()
        kv_w = getattr(res.kv_proj, "weight", None)
        kv = ln(res.ln_kv, x @ kv_w.double().T if kv_w is not None else x)
        pos = torch.from_numpy(sincos_2d(dim, h, w))
        query = ln(res.ln_q, res.query.double())
        out = mha(query[:, None], (kv + pos)[:, None], kv[:, None], need_weights=False)[0][:, 0]
        return ln(res.ln_post, out) @ res.proj.double()


def _pixels(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(seed))


def _hf_llama(model: MiniCPMV40) -> LlamaForCausalLM:
    t = model.cfg.text
    rope = dict(t.rope_scaling) if t.rope_scaling else {"rope_type": "default"}
    rope["rope_theta"] = t.rope_theta
    hf_cfg = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        hidden_act="silu",
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_parameters=rope,
        attention_bias=t.attention_bias,
        mlp_bias=t.mlp_bias,
        tie_word_embeddings=t.tie_word_embeddings,
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.llm.state_dict(), strict=True)
    return hf


def _geometric(n: int, first: float, last: float) -> list[float]:
    return np.geomspace(first, last, n).tolist()


def _assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = float(ref.abs().max())
    err = float((ours - ref).abs().max())
    assert err <= 1e-4 * max(scale, 1.0), f"{what}: max |diff| {err:.3g} at logit scale {scale:.3g}"


# --------------------------------------------------------------------------------------------
# 1. vision tower


@pytest.mark.parametrize("grid", VISION_GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_vpm_matches_idefics2_vision_transformer(model, grid):
    h, w = grid
    hf = _idefics2_tower(model)
    pixels = _pixels(h, w, seed=h * 100 + w)
    ids = _remote_position_ids(h, w)
    ref = _hf_tower_output(hf, pixels, ids)
    patches = torch.from_numpy(row_major_patches(pixels.numpy(), PATCH))
    with torch.no_grad():
        ours = model.vpm(patches, torch.from_numpy(ids), use_vit_merger=False)
    assert ours.shape == (1, h * w, model.cfg.vision.hidden_size)
    assert ref.abs().max() > 0.5  # post_layernorm output of O(1), not collapsed
    err = (ours[0] - ref).abs().max()
    assert err < 1e-4, (grid, err)


def test_vpm_check_is_sensitive_to_position_ids(model):
    """The tower comparison above would notice a wrong bucket: 4.6's ids at 25x49 (which differ from
    4.0's in some rows) move the output far beyond the tolerance."""
    h, w = 25, 49
    hf = _idefics2_tower(model)
    pixels = _pixels(h, w, seed=7)
    remote = _remote_position_ids(h, w)
    other = get_vision_nearest_position_ids(torch.tensor([[h, w]]), SIDE).numpy()
    assert not np.array_equal(remote, other)
    diff = _hf_tower_output(hf, pixels, remote) - _hf_tower_output(hf, pixels, other)
    assert diff.abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# 2. vision position ids


@pytest.mark.parametrize("size", ID_SIZES)
def test_vision_position_ids_match_remote_code(size):
    for h, w in ((size, size), (size, 32), (32, size), (size, 7)):
        ours = vision_position_ids(h, w)
        ref = _remote_position_ids(h, w)
        assert ours.dtype == np.int64 and ours.shape == (h * w,)
        ours_rows, ref_rows = ours.reshape(h, w)[:, 0] // SIDE, ref.reshape(h, w)[:, 0] // SIDE
        ours_cols, ref_cols = ours.reshape(h, w)[0] % SIDE, ref.reshape(h, w)[0] % SIDE
        bad_r, bad_c = np.flatnonzero(ours_rows != ref_rows), np.flatnonzero(ours_cols != ref_cols)
        assert bad_r.size + bad_c.size == 0, (
            f"{h}x{w}: table row differs at patch rows {bad_r.tolist()} (ours {ours_rows[bad_r].tolist()}, "
            f"remote {ref_rows[bad_r].tolist()}); table column differs at patch columns {bad_c.tolist()} "
            f"(ours {ours_cols[bad_c].tolist()}, remote {ref_cols[bad_c].tolist()})"
        )
        assert np.array_equal(ours, ref)


@pytest.mark.parametrize("size", ID_SIZES)
def test_transformers_bucketing_differs_from_remote_code(size):
    """Why 4.0 needs its own function: MiniCPM-V 4.6's bucketing (transformers' vision_utils) gives
    other ids for most of these grids (all agree at 32x32, 448-px slices), while transformers'
    Idefics2VisionEmbeddings, one fp32 multiply per fraction, gives the remote code's ids, ours."""
    remote = _remote_position_ids(size, size)
    vision_utils = get_vision_nearest_position_ids(torch.tensor([[size, size]]), SIDE).numpy()
    idefics2 = _idefics2_embedding_ids(size, size)
    assert np.array_equal(vision_utils, remote) == (size in VISION_UTILS_AGREES)
    assert np.array_equal(idefics2, remote)
    assert np.array_equal(vision_position_ids(size, size), idefics2)


@pytest.mark.parametrize("size", ID_SIZES)
def test_remote_code_on_cpu_torch_is_at_most_one_ulp_away(size):
    """torch's CPU arange is not the portable definition: its fractions may sit one ulp from the
    single rounding and so cross a bucket edge (e.g. 49, 77, 98, 100 on x86), never more."""
    boundaries = torch.arange(1 / SIDE, 1.0, 1 / SIDE)
    step = 1 / torch.tensor(size, dtype=torch.int32)
    cpu = torch.arange(0, 1 - 1e-6, step)
    exact = torch.from_numpy((np.arange(size, dtype=np.float64) * float(step)).astype(np.float32))
    assert cpu.shape == exact.shape
    ulps = (cpu.view(torch.int32) - exact.view(torch.int32)).abs()
    assert int(ulps.max()) <= 1
    same = cpu == exact
    cpu_ids = torch.bucketize(cpu, boundaries, right=True)
    assert torch.equal(cpu_ids[same], torch.from_numpy(_remote_position_ids(size, 1) // SIDE)[same])


@pytest.mark.parametrize("size", ID_SIZES)
def test_remote_step_is_float32_not_double(size):
    """The remote arange steps by the float32 tensor 1 / tgt_sizes[i][0]; the same fractions with the
    Python float 1 / h (a double) step land in another bucket for some rows of these grids."""
    bounds = torch.arange(1 / SIDE, 1.0, 1 / SIDE).numpy()
    fractions = (np.arange(size, dtype=np.float64) * (1 / size)).astype(np.float32)
    double_step = np.searchsorted(bounds, fractions, side="right")
    remote_rows = _remote_position_ids(size, 1) // SIDE
    assert np.array_equal(vision_position_ids(size, 1) // SIDE, remote_rows)
    assert np.array_equal(double_step, remote_rows) == (size not in DOUBLE_STEP_DIFFERS)


# --------------------------------------------------------------------------------------------
# 3. resampler


@pytest.mark.parametrize("grid", RESAMPLER_GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_resampler_matches_multihead_attention_and_float64_sincos(model, grid):
    h, w = grid
    res = model.resampler
    assert res.attn.in_proj_weight.shape[0] == 3 * res.query.shape[1]
    x = torch.randn(h * w, model.cfg.vision.hidden_size, generator=torch.Generator().manual_seed(h * w))
    rows, cols = rows_cols(h, w)
    with torch.no_grad():
        ours = res(x, rows, cols)
    ref = _reference_resampler(res, x, h, w)
    assert ours.shape == (model.cfg.query_num, model.cfg.text.hidden_size)
    assert ref.abs().max() > 0.5
    err = (ours.double() - ref).abs().max()
    assert err < 1e-4, (grid, err)


def test_resampler_check_is_sensitive_to_row_col_order(model):
    """Swapping rows and columns (a transposed sin-cos) is far outside the tolerance above."""
    h, w = 5, 7
    res = model.resampler
    x = torch.randn(h * w, model.cfg.vision.hidden_size, generator=torch.Generator().manual_seed(3))
    rows, cols = rows_cols(h, w)
    with torch.no_grad():
        swapped = res(x, cols, rows)
    assert (swapped.double() - _reference_resampler(res, x, h, w)).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# 4. one slice end to end


@pytest.mark.parametrize("grid", [(32, 32), (25, 49)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_encode_slice_matches_transformers_tower_and_reference_resampler(model, grid):
    h, w = grid
    pixels = _pixels(h, w, seed=11 + h)
    ids = _remote_position_ids(h, w)
    tower = _hf_tower_output(_idefics2_tower(model), pixels, ids)
    ref = _reference_resampler(model.resampler, tower, h, w)
    rows, cols = rows_cols(h, w)
    position_ids = torch.stack([torch.from_numpy(ids), rows, cols])
    patches = torch.from_numpy(row_major_patches(pixels.numpy(), PATCH))
    with torch.no_grad():
        ours = model.encode_slice(patches, position_ids, model.cfg.downsample_mode)
    err = (ours.double() - ref).abs().max()
    assert err < 1e-4, (grid, err)


# --------------------------------------------------------------------------------------------
# 5. Llama LLM


def _llm_cases() -> dict[str, dict]:
    head_dim = preset("tiny", VOCAB).text.head_dim
    n = head_dim // 2
    factors = _geometric(n, 1.0, 31.0)
    return {
        # the tiny preset as it is (LongRoPE, equal lists, factor 1)
        "preset": {},
        # the release's shape: equal lists, factor 1, original 32786 > max 32768
        "release-like": {
            "max_position_embeddings": 32768,
            "rope_scaling": {
                "rope_type": "longrope",
                "factor": 1.0,
                "original_max_position_embeddings": 32786,
                "long_factor": factors,
                "short_factor": list(factors),
            },
        },
        # lists differ, factor 2: below original_max transformers uses the short factors and
        # scales cos / sin by sqrt(1 + ln 2 / ln original_max)
        "split-factor2": {
            "max_position_embeddings": 8192,
            "rope_theta": 50000.0,
            "rope_scaling": {
                "rope_type": "longrope",
                "factor": 2.0,
                "original_max_position_embeddings": 4096,
                "long_factor": _geometric(n, 1.5, 60.0),
                "short_factor": factors,
            },
        },
        # no explicit factor: transformers derives it as max_position / original_max (= 2)
        "implicit-factor": {
            "max_position_embeddings": 8192,
            "rope_scaling": {
                "rope_type": "longrope",
                "original_max_position_embeddings": 4096,
                "long_factor": _geometric(n, 2.0, 40.0),
                "short_factor": factors,
            },
        },
        # plain RoPE and q/k/v/o biases
        "default-rope-bias": {"rope_scaling": None, "attention_bias": True},
    }


LLM_CASES = _llm_cases()


@pytest.fixture(scope="module", params=list(LLM_CASES))
def llm_pair(request):
    model = _tiny_model(seed=5, **LLM_CASES[request.param])
    return request.param, model, _hf_llama(model)


def test_llm_config_as_transformers_reads_it(llm_pair):
    """`to_hf()` (the release's config.json layout: top-level Llama fields, `rope_scaling`) read
    by transformers' LlamaConfig gives the sizes and RoPE parameters of the reference above, and
    `from_hf` reads it back to the same config."""
    name, model, hf = llm_pair
    read = LlamaConfig.from_dict(model.cfg.to_hf())  # transformers edits the dict it reads
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "attention_bias",
        "mlp_bias", "tie_word_embeddings", "rope_parameters",
    ):  # fmt: skip
        assert getattr(read, key) == getattr(hf.config, key), (name, key)
    assert type(model.cfg).from_hf(model.cfg.to_hf()) == model.cfg


def test_llm_attention_scaling_is_exercised(llm_pair):
    """The cases cover attention_factor 1 and > 1 on the transformers side."""
    name, _, hf = llm_pair
    scaling = hf.model.rotary_emb.attention_scaling
    if name in ("split-factor2", "implicit-factor"):
        assert scaling == pytest.approx((1 + np.log(2.0) / np.log(4096)) ** 0.5)
    else:
        assert scaling == 1.0


def test_llm_full_prompt_logits_match_llama(llm_pair):
    name, model, hf = llm_pair
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        ours, _ = model.decode(
            model.embed(ids)[None],
            torch.tensor([0]),
            torch.tensor([40]),
            model.new_state(64),
            all_logits=True,
        )
    assert ref.abs().max() > 1.0
    _assert_logits_close(ours, ref, name)


def test_llm_chunked_prefill_and_decode_match_llama(llm_pair):
    name, model, hf = llm_pair
    prompt_len, chunk, steps = 40, 16, 5
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(2))
    state = model.new_state(64)
    prefill_rows, step_logits, tokens = [], [], []
    with torch.no_grad():
        emb = model.embed(prompt)
        for start in range(0, prompt_len, chunk):
            part = emb[start : start + chunk]
            n = part.shape[0]
            padded = nn.functional.pad(part, (0, 0, 0, chunk - n))[None]
            args = (padded, torch.tensor([start]), torch.tensor([n]), state)
            last, _ = model.decode(*args, all_logits=False)
            logits, state = model.decode(*args, all_logits=True)
            assert logits.shape == (chunk, VOCAB)
            assert torch.allclose(last, logits[n - 1 : n], atol=1e-5)  # all_logits=False: last valid row
            prefill_rows.append(logits[:n])
        logits = prefill_rows[-1][-1:]
        for i in range(steps):
            step_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            logits, state = model.decode(
                model.embed(torch.tensor(tokens[-1:]))[None], torch.tensor([prompt_len + i]), torch.tensor([1]),
                state, all_logits=True,
            )  # fmt: skip
            assert logits.shape == (1, VOCAB)
        step_logits.append(logits[0])
        sequence = torch.cat([prompt, torch.tensor(tokens)])[None]
        ref = hf(input_ids=sequence).logits[0]
    _assert_logits_close(torch.cat(prefill_rows), ref[:prompt_len], f"{name} prefill")
    _assert_logits_close(torch.stack(step_logits), ref[prompt_len - 1 :], f"{name} decode")
    assert tokens == ref[prompt_len - 1 : -1].argmax(-1).tolist()


def test_reference_sincos_layout():
    check_sincos_layout()
