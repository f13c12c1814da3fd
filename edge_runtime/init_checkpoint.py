"""`init-checkpoint`: write a complete, random-weight checkpoint in the Hugging Face layout.

Tokenizer (trained by our own code), config.json, generation_config.json,
preprocessor_config.json and model.safetensors: everything transformers' `from_pretrained` of the
family's class and our loader read. The family (edge_runtime.families) supplies the presets, the
tokenizer, the config and the preprocessor settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_directory, write_random_checkpoint
from .errors import InputError
from .families import Family, family_by_name, family_names, family_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def init_checkpoint(
    family: str,
    preset_name: str,
    out: Path,
    seed: int = 0,
    dtype: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build tokenizer + config + random weights into `out` atomically; returns `out`.

    Every argument and the output path are checked before anything is written (or `progress` is
    told "writing ..."): an unknown family, a negative seed or an `out` that holds something other
    than a checkpoint of ours is one line and nothing on disk changes.
    """
    if family not in family_names():
        raise InputError(f"unknown family {family!r}; available: {', '.join(family_names())}")
    spec: Family = family_by_name(family)
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if preset_name not in spec.presets:
        raise InputError(f"unknown preset {preset_name!r}; choose one of {', '.join(spec.presets)}")
    if type(seed) is not int or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    with atomic_directory(Path(out)) as tmp:
        if progress is not None:
            progress(f"writing {family} {preset_name} checkpoint to {out} ...")
        tok = spec.build_tokenizer(tmp, seed=seed)
        vocab = spec.full_vocab if preset_name == "full" else tok["vocab_size"]
        try:
            cfg = spec.preset(preset_name, vocab, tok["token_ids"])
        except ValueError as exc:
            raise InputError(str(exc)) from None
        write_random_checkpoint(cfg, tmp, seed, DTYPES[dtype])
        write_side_files(tmp, cfg, tok["stop_token_ids"], tok["pad_token_id"])
    return Path(out)


def write_side_files(out: Path, cfg: Any, stop_ids: list[int], pad_id: int) -> None:
    """generation_config.json (stop ids) and preprocessor_config.json (slicing, normalisation)."""
    generation = {"eos_token_id": stop_ids, "pad_token_id": pad_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    pre = dict(family_of(cfg).preprocessor, downsample_mode=cfg.downsample_mode)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
