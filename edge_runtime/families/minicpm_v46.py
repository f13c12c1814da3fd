"""MiniCPM-V 4.6 as a registered family: SigLIP2 NaViT vision + 2x2 merger + Qwen3.5 hybrid LLM.

The model code lives in `edge_runtime.models.minicpm_v46` / `qwen35_text` / `siglip_navit`; this
module is the only place outside them that names it. It binds the config class, presets, the
checkpoint key map, the decoder state layout, the 16x / 4x vision variants, the random-init and
half-precision policies and the tokenizer/preprocessor of a `init-checkpoint` into one `Family`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..models import qwen35_text
from ..models.minicpm_v46 import (
    DOWNSAMPLE_FACTOR,
    FAMILY,
    MODEL_TYPE,
    MiniCPMV46,
    MiniCPMV46Config,
    checkpoint_key_to_module,
    module_key_to_checkpoint,
    preset,
)
from ..schema import validate_config
from ..tokenizer_build import build_tokenizer_files
from . import Family, register_family

FULL_VOCAB = 248094  # the released vocabulary; the tokenizer we ship covers only its first ids

PREPROCESSOR = {
    "image_processor_type": "MiniCPMV4_6ImageProcessor",
    "processor_class": "MiniCPMV4_6Processor",
    "do_convert_rgb": True,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "slice_mode": True,
    "use_image_id": True,
    "downsample_mode": "16x",
}


def make_preset(name: str, vocab_size: int, token_ids: Mapping[str, int]) -> MiniCPMV46Config:
    return preset(name, vocab_size, token_ids["<|image_pad|>"], token_ids["<|video_pad|>"])


def state_specs(
    cfg: MiniCPMV46Config,
    cache_len: int,
    kv_dtype: torch.dtype = torch.float32,
    conv_dtype: torch.dtype | None = None,
) -> list[qwen35_text.StateSpec]:
    return qwen35_text.state_specs(cfg.text, cache_len, kv_dtype, conv_dtype)


def materialize_buffers(model: MiniCPMV46) -> None:
    """Non-persistent buffers (RoPE inverse frequencies, M-RoPE rows) are not in checkpoints:
    rebuild them."""
    text = model.cfg.text
    rot = text.rotary_dim
    model.language_model.inv_freq = 1.0 / (
        text.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    )
    model.language_model.mrope_rows = qwen35_text.mrope_rows_of(text)


def neutral_norm_value(name: str) -> float:
    """The value at which a norm weight is the identity scale: 0 for Qwen3.5's (1 + w) norms."""
    if name.endswith(".bias"):
        return 0.0
    zero_centered = name.startswith("model.language_model.") and ".linear_attn.norm." not in name
    return 0.0 if zero_centered else 1.0


def _build_tokenizer(out: Any, seed: int = 0) -> dict[str, Any]:
    return build_tokenizer_files(out, seed=seed)


FAMILY_SPEC = register_family(
    Family(
        name=FAMILY,
        model_type=MODEL_TYPE,
        config_class=MiniCPMV46Config,
        model_class=MiniCPMV46,
        presets=("tiny", "full"),
        make_preset=make_preset,
        checkpoint_key_to_module=checkpoint_key_to_module,
        module_key_to_checkpoint=module_key_to_checkpoint,
        state_specs=state_specs,
        vision_modes=tuple(DOWNSAMPLE_FACTOR),
        vision_reduction=dict(DOWNSAMPLE_FACTOR),
        materialize_buffers=materialize_buffers,
        neutral_norm_value=neutral_norm_value,
        build_tokenizer=_build_tokenizer,
        full_vocab=FULL_VOCAB,
        validate_config=validate_config,
        preprocessor=PREPROCESSOR,
        # the DeltaNet decay parameters and the rotary frequencies (fp16 would round them), and the
        # norm weights (norms compute in fp32)
        fp32_keep_suffixes=("A_log", "dt_bias", "inv_freq"),
        fp32_keep_modules=("ZeroCenteredRMSNorm", "GatedRMSNorm"),
        default=True,
    )
)
