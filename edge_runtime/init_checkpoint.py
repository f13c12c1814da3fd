"""`init-checkpoint`: write a complete, random-weight checkpoint in the Hugging Face layout.

Tokenizer (trained by our own code), config.json, generation_config.json,
preprocessor_config.json and model.safetensors: everything transformers'
`MiniCPMV4_6ForConditionalGeneration.from_pretrained` and our loader read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import atomic_directory, write_random_checkpoint
from .errors import InputError
from .models.minicpm_v46 import FAMILY, MiniCPMV46Config, preset
from .tokenizer_build import build_tokenizer_files

FULL_VOCAB = 248094  # the released vocabulary; the tokenizer we ship covers only its first ids
PRESETS = ("tiny", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

PREPROCESSOR = {
    "image_processor_type": "MiniCPMV4_6ImageProcessor",
    "processor_class": "MiniCPMV4_6Processor",
    "do_convert_rgb": True,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "slice_mode": True,
    "use_image_id": True,
    "downsample_mode": "16x",
}


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
    if family != FAMILY:
        raise InputError(f"unknown family {family!r}; available: {FAMILY}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if preset_name not in PRESETS:
        raise InputError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    if type(seed) is not int or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    with atomic_directory(Path(out)) as tmp:
        if progress is not None:
            progress(f"writing {family} {preset_name} checkpoint to {out} ...")
        tok = build_tokenizer_files(tmp, seed=seed)
        ids = tok["token_ids"]
        vocab = FULL_VOCAB if preset_name == "full" else tok["vocab_size"]
        try:
            cfg = preset(preset_name, vocab, ids["<|image_pad|>"], ids["<|video_pad|>"])
        except ValueError as exc:
            raise InputError(str(exc)) from None
        write_random_checkpoint(cfg, tmp, seed, DTYPES[dtype])
        write_side_files(tmp, cfg, tok["stop_token_ids"], tok["pad_token_id"])
    return Path(out)


def write_side_files(out: Path, cfg: MiniCPMV46Config, stop_ids: list[int], pad_id: int) -> None:
    """generation_config.json (stop ids) and preprocessor_config.json (slicing, normalisation)."""
    generation = {"eos_token_id": stop_ids, "pad_token_id": pad_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    pre = dict(PREPROCESSOR, downsample_mode=cfg.downsample_mode)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
