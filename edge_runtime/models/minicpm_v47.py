"""MiniCPM-V 4.7: MiniCPM-V 4.6's model with Canvas M-RoPE, under its own config.

transformers 5.23's `minicpmv4_7` modeling is 4.6's module for module, with the same weight names;
what differs is how the text model is positioned: every prompt token gets three position rows
(t, h, w), laid out by `processing.canvas_positions` from marker token ids the config names
(`image_start_id`, `image_end_id`, `slice_start_id`, `slice_end_id`, `newline_id`), and the
Qwen3.5 decoder rotates with interleaved M-RoPE (`text_config.rope_parameters.mrope_section`).
The config has no `drop_vision_last_layer` key. The model class is `MiniCPMV46` itself; its
decoder takes the position rows as an optional input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from . import minicpm_v46

FAMILY = "minicpm-v-4.7"
MODEL_TYPE = "minicpmv4_7"
MARKER_FIELDS = ("image_start_id", "image_end_id", "slice_start_id", "slice_end_id", "newline_id")
# mrope_section of the released 4.7 (Qwen3.5's): 32 rotary frequencies of a 256-wide head at 0.25
FULL_MROPE_SECTION = [11, 11, 10]
# the tiny preset rotates half of its 32-wide heads (8 frequencies) so that every row reads several
TINY_MROPE_SECTION = [3, 3, 2]


@dataclass
class MiniCPMV47Config(minicpm_v46.MiniCPMV46Config):
    """Top-level `config.json` of a MiniCPM-V 4.7 checkpoint (transformers' MiniCPMV4_7Config)."""

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = "MiniCPMV4_7ForConditionalGeneration"
    VISION_MODEL_TYPE: ClassVar[str] = "minicpmv4_7_vision"
    HF_OMITTED: ClassVar[tuple[str, ...]] = ("drop_vision_last_layer",)

    # the Canvas M-RoPE markers; transformers' conversion script resolves them from the tokenizer
    # and stores them in config.json (None there = a text-only checkpoint)
    image_start_id: int | None = None
    image_end_id: int | None = None
    slice_start_id: int | None = None
    slice_end_id: int | None = None
    newline_id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text.mrope_section is None:
            raise ValueError(
                "text_config.rope_parameters.mrope_section is missing; MiniCPM-V 4.7's Canvas M-RoPE needs it"
            )

    def to_hf(self) -> dict[str, Any]:
        hf = super().to_hf()
        hf.update({name: getattr(self, name) for name in MARKER_FIELDS})
        return hf


def preset(name: str, vocab_size: int, token_ids: dict[str, int]) -> MiniCPMV47Config:
    """4.6's `tiny` / `full` sizes plus the M-RoPE split and the marker ids of our tokenizer.

    `token_ids` maps the tokenizer's marker strings (`<image>`, `</image>`, `<slice>`, `</slice>`,
    "\\n") and placeholders to ids, as the family's tokenizer builder returns them.
    """
    base = minicpm_v46.preset(name, vocab_size, token_ids["<|image_pad|>"], token_ids["<|video_pad|>"])
    text_changes: dict[str, Any] = {"mrope_section": list(FULL_MROPE_SECTION), "mrope_interleaved": True}
    if name == "tiny":
        text_changes.update(mrope_section=list(TINY_MROPE_SECTION), partial_rotary_factor=0.5)
    text = dataclasses.replace(base.text, **text_changes)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    markers = dict(zip(MARKER_FIELDS, ("<image>", "</image>", "<slice>", "</slice>", "\n"), strict=True))
    values.update(text=text, **{field: token_ids[token] for field, token in markers.items()})
    return MiniCPMV47Config(**values)
