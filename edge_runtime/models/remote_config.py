"""Reading and writing the config.json of remote-code MiniCPM-V releases (2.0, 4.0): one flat dict
with the LLM's fields at the top level, `model_type` "minicpmv" and a `version` telling them apart."""

from __future__ import annotations

import dataclasses
from typing import Any

from .llama_text import TextConfig

_TEXT_KEYS = tuple(f.name for f in dataclasses.fields(TextConfig))


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_identity(raw: dict[str, Any], model_type: str, version: str) -> None:
    if raw.get("model_type") != model_type or str(raw.get("version")) != version:
        raise ValueError(
            f"model_type/version are {raw.get('model_type')!r}/{raw.get('version')!r}, "
            f"expected {model_type!r}/{version}"
        )


def parse_vision(raw: dict[str, Any], cls: type) -> Any:
    """`vision_config` into the family's vision dataclass (unknown keys ignored)."""
    vision_raw = raw.get("vision_config") or {}
    if not isinstance(vision_raw, dict):
        raise ValueError("vision_config must be an object")
    return cls(**{k: v for k, v in vision_raw.items() if k in field_names(cls)})


def parse_text(raw: dict[str, Any]) -> TextConfig:
    """The top-level LLM fields; `head_dim` defaults to hidden / heads as transformers derives it."""
    text_raw = {k: raw[k] for k in _TEXT_KEYS if k in raw}
    if "head_dim" not in text_raw and "hidden_size" in raw and "num_attention_heads" in raw:
        text_raw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    return TextConfig(**text_raw)


def top_fields(raw: dict[str, Any], cls: type, exclude: set[str]) -> dict[str, Any]:
    """The family config's own top-level fields present in `raw`."""
    return {k: raw[k] for k in field_names(cls) - exclude if k in raw}


def text_to_hf(text: TextConfig) -> dict[str, Any]:
    """The LLM fields as the release writes them (unset options left out)."""
    return {k: v for k, v in dataclasses.asdict(text).items() if v is not None}
