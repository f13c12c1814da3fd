"""MiniCPM-OCR 1.0: MiniCPM-V 4.6's model (SigLIP2 NaViT + 2x2 merger + Qwen3.5) under its own config.

transformers 5.23's `minicpm_ocr` modeling is 4.6's module for module, with the same weight names;
what differs is the config: `model_type` "minicpm_ocr", 4x downsampling by default, tied word
embeddings by default, and no `image_size` / `drop_vision_last_layer` keys. The model class is
`MiniCPMV46` itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from . import minicpm_v46

FAMILY = "minicpm-ocr-1.0"
MODEL_TYPE = "minicpm_ocr"


@dataclass
class MiniCPMOcrConfig(minicpm_v46.MiniCPMV46Config):
    """Top-level `config.json` of a MiniCPM-OCR checkpoint (transformers' MiniCPMOcrConfig)."""

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = "MiniCPMOcrForConditionalGeneration"
    VISION_MODEL_TYPE: ClassVar[str] = "minicpm_ocr_vision"
    HF_OMITTED: ClassVar[tuple[str, ...]] = ("image_size", "drop_vision_last_layer")

    downsample_mode: str = "4x"
    tie_word_embeddings: bool = True


def preset(name: str, vocab_size: int, image_token_id: int, video_token_id: int) -> MiniCPMOcrConfig:
    """4.6's `tiny` / `full` sizes (MiniCPM-OCR keeps 4.6's architecture) in 4x mode, tied."""
    base = minicpm_v46.preset(name, vocab_size, image_token_id, video_token_id)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return MiniCPMOcrConfig(**{**values, "downsample_mode": "4x", "tie_word_embeddings": True})
