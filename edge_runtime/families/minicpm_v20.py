"""MiniCPM-V 2.0 as a registered family: timm SigLIP so400m (26 blocks) + 2.0 resampler + MiniCPM-2B.

The model code lives in `edge_runtime.models.minicpm_v20` / `timm_vit` / `resampler` / `llama_text`
(muP); this module binds it into one `Family`: the remote-code config (model_type "minicpmv",
version 2.0), presets, the `adaptive` vision mode (row-major patches, [2, L] row / column ids,
`query_num` tokens a slice), the `<用户>…<AI>` prompt and its `<image>`-in-`<slice>` tile layout,
random-init and half-precision policies, and a Llama-layout tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..models.minicpm_v20 import (
    FAMILY,
    MODEL_TYPE,
    VERSION,
    VISION_MODE,
    MiniCPMV20,
    MiniCPMV20Config,
    checkpoint_key_to_module,
    graph_slice_position_ids,
    module_key_to_checkpoint,
    preset,
    slice_position_ids,
)
from ..models.resampler import query_grid_sincos
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

FULL_VOCAB = 122753  # the released vocabulary (architectures.md §1.3)

register_vision_mode(
    VISION_MODE,
    VisionMode(
        merge=1,
        fixed_tokens=True,
        position_ids=slice_position_ids,
        graph_position_ids=graph_slice_position_ids,
    ),
)

# The release has no processor config: its modeling code slices with these values (2.0's config).
PREPROCESSOR = {
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "use_image_id": False,
    "image_feature_size": 64,
    "slice_mode": True,
    "norm_mean": [0.5, 0.5, 0.5],
    "norm_std": [0.5, 0.5, 0.5],
}

# The remote code's placeholders: the source image and every tile as `<image>` + `<unk>` x 64 +
# `</image>`, the tiles' rows (joined by "\n") inside one `<slice>` ... `</slice>`; `chat()` writes
# the placeholder, "\n", then the question.
PROMPT_TOKENS = {
    **REMOTE_CODE_PROMPT_TOKENS,
    "tile_start_token": "<image>",
    "tile_end_token": "</image>",
    "grid_start_token": "<slice>",
    "grid_end_token": "</slice>",
}

# `chat()` of the remote code: "<用户>" + user content, "<AI>" + assistant content, then "<AI>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<用户>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<AI>' + message['content'] }}"
    "{% else %}{{ raise_exception('MiniCPM-V 2.0 prompts have user and assistant turns only') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}"
)

ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
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
    ("<用户>", False),
    ("<AI>", False),
)

TOKENIZER_CONFIG: dict[str, Any] = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 4096,
    "tokenizer_class": "LlamaTokenizerFast",
    "extra_special_tokens": PROMPT_TOKENS,
}


def make_preset(name: str, vocab_size: int, token_ids: Mapping[str, int]) -> MiniCPMV20Config:
    return preset(name, vocab_size, token_ids["<unk>"])


def random_init(name: str, shape: tuple[int, ...], noise: torch.Tensor) -> torch.Tensor | None:
    """Trained-scale random weights (fan-in scaled matrices, unit tables), unit LayerNorm scales
    (timm's `norm1` / `norm2` / `norm` and the resampler's `ln_*`) and the queries' true sin-cos
    `pos_embed`, which upstream freezes."""
    if name == "resampler.pos_embed":
        return query_grid_sincos(shape[1], shape[0])
    layer_norm = name.startswith(("resampler.ln_", "vpm.norm")) or ".norm" in name
    unit = name.endswith(("embed_tokens.weight", "pos_embed")) or name == "resampler.query"
    return trained_scale_init(name, shape, noise, layer_norm, unit)


build_tokenizer = tokenizer_builder(ADDED_TOKENS, CHAT_TEMPLATE, TOKENIZER_CONFIG, ("</s>",))


FAMILY_SPEC = register_family(
    Family(
        name=FAMILY,
        model_type=MODEL_TYPE,
        version=VERSION,
        config_class=MiniCPMV20Config,
        model_class=MiniCPMV20,
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
        chat_template=CHAT_TEMPLATE,
        fp32_keep_suffixes=("inv_freq",),
        fp32_keep_modules=("RMSNorm",),
    )
)
