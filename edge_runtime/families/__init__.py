"""The model-family registry: every family the runtime and the exporters know, by name and by
`config.json`'s `model_type` (plus `version` where remote-code families share one model_type).

A family module (one per family, in this package) describes everything family-specific that the
rest of the tree needs: the config class (`from_hf` / `to_hf`), presets, the checkpoint key map,
the model class and its entry points, the decoder state layout, the vision variants, how a random
checkpoint is initialised and which tensors stay fp32 in a half-precision graph. It builds one
`Family` and hands it to `register_family`. Code outside the family modules looks the family up
(`family_for_config`, `family_by_name`, `family_of`) and never names it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.blocks import StateSpec

__all__ = [
    "Family",
    "StateSpec",
    "families",
    "family_by_name",
    "family_for_config",
    "family_names",
    "case_mode",
    "family_of",
    "register_family",
]


@dataclass(frozen=True)
class Family:
    """One model family: its identity, its config and model classes, and its per-family hooks."""

    name: str  # the user-facing name, e.g. for `init-checkpoint FAMILY`
    model_type: str  # config.json's `model_type`
    config_class: type  # has from_hf(raw: dict) and to_hf() -> dict, .text.vocab_size etc.
    model_class: type  # built from a config; encode_slice / embed / decode / new_state
    presets: tuple[str, ...]
    # preset(name, vocab_size, token_ids) -> config; token_ids are the tokenizer's special ids
    make_preset: Callable[[str, int, Mapping[str, int]], Any]
    # checkpoint tensor name -> module state_dict name (None: ignore the tensor), and back
    checkpoint_key_to_module: Callable[[str], str | None]
    module_key_to_checkpoint: Callable[[str], str]
    # state_specs(config, cache_len, kv_dtype, conv_dtype) -> [StateSpec] in graph order
    state_specs: Callable[..., list[StateSpec]]
    vision_modes: tuple[str, ...]  # the vision encoder's variants (one graph each)
    # patches per LLM token of each vision variant (a square: sqrt patches per side are merged)
    vision_reduction: Mapping[str, int]
    # rebuild non-persistent buffers (e.g. RoPE frequencies) after loading weights onto meta modules
    materialize_buffers: Callable[[Any], None]
    # the value at which a norm weight of this checkpoint name is the identity scale
    neutral_norm_value: Callable[[str], float]
    # writes the tokenizer files into a directory; returns {"token_ids", "vocab_size", ...}
    build_tokenizer: Callable[..., dict[str, Any]]
    full_vocab: int  # the vocabulary of the released checkpoint (the `full` preset's)
    # validate_config(raw, where, error_class) -> raw: the family's config.json schema, one line per
    # failure, raised as error_class
    validate_config: Callable[[dict[str, Any], str, type], dict[str, Any]]
    preprocessor: Mapping[str, Any] = field(default_factory=dict)  # preprocessor_config.json base
    # quantization policy: parameters/buffers (by name suffix) and modules (by class name) that
    # stay fp32 in a half-precision graph
    fp32_keep_suffixes: tuple[str, ...] = ()
    fp32_keep_modules: tuple[str, ...] = ()
    # random_init(name, shape, standard-normal noise) -> tensor, or None for the shared rule
    # (checkpoint.random_init)
    random_init: Callable[[str, tuple[int, ...], torch.Tensor], torch.Tensor | None] | None = None
    # placeholder token names and a chat template for checkpoints whose tokenizer files name none
    # (remote-code `chat()` built the prompt in Python): see processing.tokenizer / prompt
    prompt_tokens: Mapping[str, str] | None = None
    chat_template: str | None = None
    version: str | None = None  # config.json's `version`, for families sharing a model_type
    # where the decoder's RoPE positions come from: "cache" = the cache index (every family but
    # 4.7); "canvas" = three rows per token computed on the host (processing.canvas_positions,
    # from the marker ids in config.json) and passed to the decoder apart from the cache index
    rope_positions: str = "cache"
    default: bool = False  # the family a config.json without `model_type` is read as

    def preset(self, name: str, vocab_size: int, token_ids: Mapping[str, int]) -> Any:
        if name not in self.presets:
            raise ValueError(f"unknown preset {name!r} (choose {' or '.join(self.presets)})")
        return self.make_preset(name, vocab_size, token_ids)

    def case_mode(self, mode: str | None) -> str | None:
        """A shared case's vision variant for this family: the case's own where the family has it;
        None (the model's default) where the family has a single variant (the shared sample cases
        name 4.6's 16x / 4x); ValueError for a variant the family lacks otherwise."""
        if mode is None or mode in self.vision_modes:
            return mode
        if len(self.vision_modes) == 1:
            return None
        raise ValueError(f"downsample_mode {mode!r} is not one of {self.name}'s {self.vision_modes}")

    def new_model(self, cfg: Any) -> torch.nn.Module:
        return self.model_class(cfg)


_BY_NAME: dict[str, Family] = {}
_BY_TYPE: dict[tuple[str, str | None], Family] = {}


def register_family(family: Family) -> Family:
    """Add `family`; a second family with the same name or (model_type, version) is an error."""
    key = (family.model_type, family.version)
    if family.name in _BY_NAME or key in _BY_TYPE:
        raise ValueError(
            f"family {family.name!r} ({family.model_type}, {family.version}) is already registered"
        )
    if family.default and any(f.default for f in _BY_NAME.values()):
        raise ValueError("only one family can read config.json files without a model_type")
    _BY_NAME[family.name] = family
    _BY_TYPE[key] = family
    return family


def families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_BY_NAME.values())


def family_names() -> list[str]:
    return list(_BY_NAME)


def family_by_name(name: str) -> Family:
    """The family called `name`; KeyError (naming the known ones) otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; available: {', '.join(_BY_NAME)}") from None


def family_for_config(raw: Mapping[str, Any]) -> Family:
    """The family a parsed `config.json` belongs to, by `model_type` (and `version` when several
    families share the model_type); ValueError when none matches."""
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"model_type must be a string, got {model_type!r:.60}")
    if model_type is None:
        for family in _BY_NAME.values():
            if family.default:
                return family
        raise ValueError("config.json has no model_type")
    version = raw.get("version")
    found = _BY_TYPE.get((model_type, None if version is None else str(version)))
    if found is None:
        found = _BY_TYPE.get((model_type, None))
    if found is None:
        candidates = [f for (t, _), f in _BY_TYPE.items() if t == model_type]
        if len(candidates) == 1:
            found = candidates[0]
    if found is None:
        known = ", ".join(sorted({t for t, _ in _BY_TYPE}))
        raise ValueError(
            f"model_type {model_type!r} (version {version!r}) is no known family; known: {known}"
        )
    return found


def case_mode(family_name: str, mode: str | None) -> str | None:
    """A shared case's vision variant for a model of `family_name` (`Family.case_mode`); an unknown
    family (a test double's) takes the case's own. ValueError for a variant the family lacks."""
    try:
        family = family_by_name(family_name)
    except KeyError:
        return mode
    return family.case_mode(mode)


def family_of(cfg: Any) -> Family:
    """The family of a parsed config object (an instance of some family's config class; the exact
    class first, since one family's config may subclass another's)."""
    for family in _BY_NAME.values():
        if type(cfg) is family.config_class:
            return family
    for family in _BY_NAME.values():
        if isinstance(cfg, family.config_class):
            return family
    raise TypeError(f"{type(cfg).__name__} is no registered family's config")


# The built-in families register themselves on import.
from . import minicpm_v46  # noqa: E402, F401, I001 - the default family first
from . import minicpm_v40  # noqa: E402, F401
from . import minicpm_v20  # noqa: E402, F401
from . import minicpm_ocr  # noqa: E402, F401, I001
from . import minicpm_v47  # noqa: E402, F401, I001
