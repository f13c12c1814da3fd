"""MiniCPM-OCR 1.0 as a registered family: 4.6's model, state layout and hooks under the OCR config.

Looked up by `model_type` "minicpm_ocr". Its preprocessing is 4.6's slicing with 4x as the default
variant, plus the OCR image processor's `small_image_upsize` (processing/small_image_upsize.py):
"always" (4.6's behaviour, the default written here), "never" (small images keep their native size)
and "adaptive" (sized from glyph size and density; needs OpenCV, `pip install 'minicpmv-edge[ocr]'`).
The host reads it from preprocessor_config.json, a checkpoint's or a bundle's alike. Upstream's OCR
video processor ignores the key (frames always upscale), and so does processing/video.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial

from ..models.minicpm_ocr import FAMILY, MODEL_TYPE, MiniCPMOcrConfig, preset
from ..schema import OcrConfigSchema, validate_config
from . import register_family
from .minicpm_v46 import FAMILY_SPEC as V46

OCR_PREPROCESSOR = {
    **V46.preprocessor,
    "image_processor_type": "MiniCPMOcrImageProcessor",
    "processor_class": "MiniCPMOcrProcessor",
    "downsample_mode": "4x",
    "small_image_upsize": "always",
}


def make_preset(name: str, vocab_size: int, token_ids: Mapping[str, int]) -> MiniCPMOcrConfig:
    return preset(name, vocab_size, token_ids["<|image_pad|>"], token_ids["<|video_pad|>"])


# everything else (model class, key map, state layout, vision variants, init and fp16 policies,
# tokenizer) is 4.6's
FAMILY_SPEC = register_family(
    dataclasses.replace(
        V46,
        name=FAMILY,
        model_type=MODEL_TYPE,
        config_class=MiniCPMOcrConfig,
        make_preset=make_preset,
        validate_config=partial(validate_config, schema=OcrConfigSchema),
        preprocessor=OCR_PREPROCESSOR,
        default=False,
    )
)
