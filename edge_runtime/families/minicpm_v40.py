"""MiniCPM-V 4.0 as a registered family: SigLIP2 NaViT vision + perceiver resampler + Llama LLM.

The model code lives in `edge_runtime.models.minicpm_v40` / `llama_text` / `resampler`; this module
binds it into one `Family`: the remote-code config (model_type "minicpmv", version 4.0), presets,
the `resampler` vision mode (row-major patches, [3, L] position ids, `query_num` tokens a slice),
random-init and half-precision policies, and a Llama-layout tokenizer with the 4.0 chat template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

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
from . import Family, register_family
from .llama_family import (
    REMOTE_CODE_PROMPT_TOKENS,
    materialize_buffers,
    neutral_norm_value,
    state_specs,
    tokenizer_builder,
    trained_scale_init,
    validate,
)

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

PROMPT_TOKENS = REMOTE_CODE_PROMPT_TOKENS

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


def make_preset(name: str, vocab_size: int, token_ids: Mapping[str, int]) -> MiniCPMV40Config:
    return preset(name, vocab_size, token_ids["<unk>"])


def random_init(name: str, shape: tuple[int, ...], noise: torch.Tensor) -> torch.Tensor | None:
    unit = name.endswith(("embed_tokens.weight", "position_embedding.weight")) or name == "resampler.query"
    return trained_scale_init(name, shape, noise, name.startswith("resampler.ln_"), unit)


build_tokenizer = tokenizer_builder(ADDED_TOKENS, CHAT_TEMPLATE, TOKENIZER_CONFIG, ("<|im_end|>", "</s>"))


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
        validate_config=validate,
        preprocessor=PREPROCESSOR,
        random_init=random_init,
        prompt_tokens=PROMPT_TOKENS,
        fp32_keep_suffixes=("inv_freq",),
        fp32_keep_modules=("RMSNorm",),
    )
)
