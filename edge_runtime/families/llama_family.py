"""What the Llama-decoder families (MiniCPM-V 2.0, 4.0) share in their `Family`: decoder state,
RoPE rebuild, norm conventions, config schema, trained-scale random init, and the builder of their
Llama-layout tokenizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models import llama_text
from ..schema import LlamaVLConfigSchema, validate_config
from ..tokenizer_build_sp import build_sp_tokenizer_files

TINY_VOCAB = 2000


# The remote-code tokenizer class (MiniCPMVTokenizerFast) of 4.0 and 2.0 hard-codes these names:
# `<unk>` fills the image slots, and `chat()` marks an image in the text with "(<image>./</image>)",
# which the processor expands; there is no video placeholder (a video is a list of frames).
REMOTE_CODE_PROMPT_TOKENS = {
    "image_token": "<unk>",
    "image_marker": "(<image>./</image>)",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}


def state_specs(
    cfg: Any, cache_len: int, kv_dtype: torch.dtype = torch.float32, conv_dtype: torch.dtype | None = None
) -> list[llama_text.StateSpec]:
    return llama_text.state_specs(cfg.text, cache_len, kv_dtype, conv_dtype)


def materialize_buffers(model: Any) -> None:
    """The RoPE frequencies are not in checkpoints: rebuild them from the config."""
    model.llm.model.materialize_rope()


def neutral_norm_value(name: str) -> float:
    """Every norm here (LayerNorm, Llama RMSNorm) scales by w itself: identity at 1, biases at 0."""
    return 0.0 if name.endswith(".bias") else 1.0


def validate(raw: dict[str, Any], where: str, error: type) -> dict[str, Any]:
    return validate_config(raw, where, error, schema=LlamaVLConfigSchema)


def trained_scale_init(
    name: str, shape: tuple[int, ...], noise: torch.Tensor, layer_norm: bool, unit: bool
) -> torch.Tensor | None:
    """Weights at their trained scale instead of 0.02 everywhere: fan-in scaled matrices, unit
    tables and queries (`unit`), LayerNorm scales at 1 (`layer_norm`: names a family's norms that
    the shared rule's "norm" match misses, like the resampler's `ln_*`). At 0.02 a tiny model's
    logits are near-uniform (a quantized bundle then flips near-ties) and an `ln_*` scale near 0
    blanks the image. None: the shared rule (checkpoint.random_init)."""
    if layer_norm:
        return 0.02 * noise if name.endswith(".bias") else 1.0 + 0.05 * noise
    if name.endswith(".bias") or "norm" in name:
        return None
    if unit:
        return noise
    if len(shape) >= 2:
        return noise / math.sqrt(math.prod(shape[1:]))
    return None


def tokenizer_builder(
    added: Sequence[tuple[str, bool]], chat_template: str, config: dict[str, Any], stops: Sequence[str]
) -> Callable[..., dict[str, Any]]:
    """A family's `build_tokenizer`: a Llama-layout tokenizer trained on our corpus (deterministic:
    the seed is unused), with the stop and pad ids a checkpoint's side files need."""

    def build(out: Any, seed: int = 0) -> dict[str, Any]:
        del seed
        facts = build_sp_tokenizer_files(
            Path(out),
            added=added,
            chat_template=chat_template,
            config=config,
            vocab_size=TINY_VOCAB,
            bos=True,
        )
        ids = facts["token_ids"]
        facts["stop_token_ids"] = [ids[t] for t in stops]
        facts["pad_token_id"] = ids["<unk>"]
        return facts

    return build
