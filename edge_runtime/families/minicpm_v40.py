"""MiniCPM-V 4.0 as a registered family: SigLIP2 NaViT vision + perceiver resampler + Llama LLM.

The model code lives in `edge_runtime.models.minicpm_v40` / `llama_text` / `resampler`; this module
binds it into one `Family`: the remote-code config (model_type "minicpmv", version 4.0), presets,
the `resampler` vision mode (row-major patches, [3, L] position ids, `query_num` tokens a slice),
random-init and half-precision policies, and a Llama-layout tokenizer with the 4.0 chat template.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models import llama_text
from ..models.minicpm_v40 import (
    FAMILY,
    MODEL_TYPE,
    VERSION,
    VISION_MODE,
    MiniCPMV40,
    MiniCPMV40Config,
    checkpoint_key_to_module,
    graph_slice_position_ids,
    module_key_to_checkpoint,
    preset,
    slice_position_ids,
)
from ..processing.slicing import VisionMode, register_vision_mode
from ..schema import LlamaVLConfigSchema, validate_config
from ..tokenizer_build_sp import build_sp_tokenizer_files
from . import Family, register_family

FULL_VOCAB = 73448  # the released vocabulary (architectures.md §2.3)

register_vision_mode(
    VISION_MODE,
    VisionMode(
        merge=1,
        fixed_tokens=True,
        position_ids=slice_position_ids,
        graph_position_ids=graph_slice_position_ids,
    ),
)

PREPROCESSOR = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "processor_class": "MiniCPMVProcessor",
    "auto_map": {
        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
    },
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "use_image_id": True,
    "image_feature_size": 64,
    "im_start": "<image>",
    "im_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "unk": "<unk>",
    "im_id_start": "<image_id>",
    "im_id_end": "</image_id>",
    "slice_mode": True,
    "norm_mean": [0.5, 0.5, 0.5],
    "norm_std": [0.5, 0.5, 0.5],
    "version": 4.0,
}

# ChatML over string content, as the release's template: `chat()` has already joined the parts
# (images as "(<image>./</image>)") with newlines.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Added after the trained pieces, as in the release (<|im_end|> = 73440 there, <|im_start|> next).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|im_end|>", True),
    ("<|im_start|>", True),
    ("<image>", True),
    ("</image>", True),
    ("<ref>", True),
    ("</ref>", True),
    ("<box>", True),
    ("</box>", True),
    ("<quad>", True),
    ("</quad>", True),
    ("<point>", True),
    ("</point>", True),
    ("<slice>", True),
    ("</slice>", True),
    ("<image_id>", True),
    ("</image_id>", True),
)

TOKENIZER_CONFIG: dict[str, Any] = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "<|im_end|>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 32768,
    "tokenizer_class": "MiniCPMVTokenizerFast",
    "auto_map": {"AutoTokenizer": [None, "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"]},
}
TINY_VOCAB = 2000


def make_preset(name: str, vocab_size: int, token_ids: Mapping[str, int]) -> MiniCPMV40Config:
    return preset(name, vocab_size, token_ids["<unk>"])


def state_specs(
    cfg: MiniCPMV40Config,
    cache_len: int,
    kv_dtype: torch.dtype = torch.float32,
    conv_dtype: torch.dtype | None = None,
) -> list[llama_text.StateSpec]:
    return llama_text.state_specs(cfg.text, cache_len, kv_dtype, conv_dtype)


def materialize_buffers(model: MiniCPMV40) -> None:
    """The RoPE frequencies are not in checkpoints: rebuild them from the config."""
    model.llm.model.materialize_rope()


def neutral_norm_value(name: str) -> float:
    """Every norm here (LayerNorm, Llama RMSNorm) scales by w itself: identity at 1, biases at 0."""
    return 0.0 if name.endswith(".bias") else 1.0


def random_init(name: str, shape: tuple[int, ...], noise: torch.Tensor) -> torch.Tensor | None:
    """Weights at their trained scale instead of 0.02 everywhere: fan-in scaled matrices, unit
    tables and queries, so logits spread over several units and images move them. At 0.02 the
    tiny model's logits are near-uniform (a quantized bundle then flips near-ties) and the
    resampler's `ln_*` scales, not named `norm`, would start near zero, blanking the image."""
    if name.startswith("resampler.ln_"):
        return 0.02 * noise if name.endswith(".bias") else 1.0 + 0.05 * noise
    if name.endswith(".bias") or "norm" in name:
        return None
    if name.endswith(("embed_tokens.weight", "position_embedding.weight")) or name == "resampler.query":
        return noise
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return noise / math.sqrt(fan_in)
    return None


def build_tokenizer(out: Any, seed: int = 0) -> dict[str, Any]:
    """A Llama-layout tokenizer trained on our corpus, plus generation facts for the checkpoint."""
    del seed  # BPE training is deterministic
    facts = build_sp_tokenizer_files(
        Path(out),
        added=ADDED_TOKENS,
        chat_template=CHAT_TEMPLATE,
        config=TOKENIZER_CONFIG,
        vocab_size=TINY_VOCAB,
        bos=True,
    )
    ids = facts["token_ids"]
    facts["stop_token_ids"] = [ids["<|im_end|>"], ids["</s>"]]
    facts["pad_token_id"] = ids["<unk>"]
    return facts


def _validate(raw: dict[str, Any], where: str, error: type) -> dict[str, Any]:
    return validate_config(raw, where, error, schema=LlamaVLConfigSchema)


FAMILY_SPEC = register_family(
    Family(
        name=FAMILY,
        model_type=MODEL_TYPE,
        version=VERSION,
        config_class=MiniCPMV40Config,
        model_class=MiniCPMV40,
        presets=("tiny", "full"),
        make_preset=make_preset,
        checkpoint_key_to_module=checkpoint_key_to_module,
        module_key_to_checkpoint=module_key_to_checkpoint,
        state_specs=state_specs,
        vision_modes=(VISION_MODE,),
        vision_reduction={VISION_MODE: 1},
        materialize_buffers=materialize_buffers,
        neutral_norm_value=neutral_norm_value,
        build_tokenizer=build_tokenizer,
        full_vocab=FULL_VOCAB,
        validate_config=_validate,
        preprocessor=PREPROCESSOR,
        random_init=random_init,
        fp32_keep_suffixes=("inv_freq",),
        fp32_keep_modules=("RMSNorm",),
    )
)
