"""MiniCPM-V 4.7 as a registered family: 4.6's model, state layout and hooks, with Canvas M-RoPE.

Looked up by `model_type` "minicpmv4_7". The one runtime difference is `rope_positions="canvas"`:
the host computes three position rows per prompt token (`processing.canvas_positions`) and the
generation loop hands them to the decoder apart from the cache index. No bundle format takes those
rows yet, so exporting a 4.7 checkpoint is refused (export.pipeline checks this field).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from ..models.minicpm_v47 import FAMILY, MODEL_TYPE, MiniCPMV47Config, preset
from ..schema import V47ConfigSchema, validate_config
from ..tokenizer_build import build_tokenizer_files
from . import register_family
from .minicpm_v46 import FAMILY_SPEC as V46

V47_PREPROCESSOR = {
    **V46.preprocessor,
    # transformers maps minicpmv4_7 to 4.6's image processor; the processor class is 4.7's own
    "processor_class": "MiniCPMV4_7Processor",
}


def make_preset(name: str, vocab_size: int, token_ids: Mapping[str, int]) -> MiniCPMV47Config:
    return preset(name, vocab_size, dict(token_ids))


def build_tokenizer(out: str | Path, seed: int = 0) -> dict[str, Any]:
    """4.6's tokenizer files; the newline id (a Canvas M-RoPE marker) joins the returned token ids."""
    from tokenizers import Tokenizer

    built = build_tokenizer_files(out, seed=seed)
    newline = (
        Tokenizer.from_file(str(Path(out) / "tokenizer.json")).encode("\n", add_special_tokens=False).ids
    )
    if len(newline) != 1:
        raise ValueError(f"the tokenizer splits a newline into {len(newline)} tokens; 4.7 needs one id")
    built["token_ids"] = {**built["token_ids"], "\n": newline[0]}
    return built


# everything else (model class, key map, state layout, vision variants, init and fp16 policies) is 4.6's
FAMILY_SPEC = register_family(
    dataclasses.replace(
        V46,
        name=FAMILY,
        model_type=MODEL_TYPE,
        config_class=MiniCPMV47Config,
        make_preset=make_preset,
        build_tokenizer=build_tokenizer,
        validate_config=partial(validate_config, schema=V47ConfigSchema),
        preprocessor=V47_PREPROCESSOR,
        rope_positions="canvas",
        default=False,
    )
)
