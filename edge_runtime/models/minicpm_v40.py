"""MiniCPM-V 4.0: SigLIP2 NaViT vision tower (no merger) + perceiver resampler + Llama LLM.

The checkpoint is remote code (`model_type` "minicpmv", `version` 4.0): a LlamaConfig at the top
level of config.json plus `vision_config` and the MiniCPM-V fields; weights under `vpm.*`,
`resampler.*` and `llm.*` (architectures.md §2). The module names below mirror those prefixes, so
the key map is the identity.

The vision graph of one slice takes its patches in row-major order (neither the tower nor the
resampler depends on token order) with int64 ids [3, L]: the tower's position-table ids, then each
patch's row and column, from which the resampler computes its key embedding. Every slice becomes
`query_num` LLM tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .llama_text import LlamaForCausalLM, TextConfig
from .remote_config import check_identity, parse_text, parse_vision, text_to_hf, top_fields
from .resampler import Resampler
from .siglip_navit import VisionConfig, VisionTower
from .vlm import LlamaVisionLanguageModel

FAMILY = "minicpm-v-4.0"
MODEL_TYPE = "minicpmv"
VERSION = "4.0"
ARCHITECTURE = "MiniCPMV"
VISION_MODE = "resampler"
RESAMPLER_HEAD_DIM = 128  # the remote code builds Resampler(num_heads=embed_dim // 128)

# config.json keys of the Llama text model (top level in this family's config)
_TEXT_KEYS = tuple(
    f.name
    for f in dataclasses.fields(TextConfig)
    if f.name not in ("scale_emb", "scale_depth", "dim_model_base")
)
# remote-code fields without effect on the maths, written back as the release has them
_RELEASE_FIELDS: dict[str, Any] = {
    "batch_vision_input": True,
    "vision_batch_size": 16,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "initializer_range": 0.1,
    "torch_dtype": "bfloat16",
    "auto_map": {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    },
}
# MiniCPM-2B-style muP scalings: a Llama run of 4.0 must not have them (architectures.md §2.3)
_MUP_KEYS = ("scale_emb", "scale_depth", "dim_model_base")


@dataclass
class MiniCPMV40Config:
    """`config.json` of a MiniCPM-V 4.0 checkpoint."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = False
    slice_mode: bool = True
    use_image_id: bool = True
    max_slice_nums: int = 9
    image_token_id: int = 0  # `<unk>`: the remote processor fills placeholders with unk tokens
    video_token_id: int = -1  # no video placeholder: 4.0 takes video as frames of images

    def __post_init__(self) -> None:
        if self.query_num < 1:
            raise ValueError(f"query_num must be positive, got {self.query_num}")
        if self.text.hidden_size % RESAMPLER_HEAD_DIM:
            raise ValueError(
                f"hidden_size {self.text.hidden_size} is not a multiple of the resampler's "
                f"{RESAMPLER_HEAD_DIM}-wide heads"
            )

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def downsample_mode(self) -> str:
        return VISION_MODE

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> MiniCPMV40Config:
        """Parse a remote-code config dict; unknown keys are ignored, wrong values fail loudly."""
        check_identity(raw, MODEL_TYPE, VERSION)
        mup = [k for k in _MUP_KEYS if k in raw]
        if mup:
            raise ValueError(f"has MiniCPM muP keys {', '.join(mup)}, which a Llama LLM does not apply")
        top = top_fields(raw, cls, {"vision", "text", "max_slice_nums"})
        slice_config = raw.get("slice_config") or {}
        if isinstance(slice_config, dict) and "max_slice_nums" in slice_config:
            top["max_slice_nums"] = slice_config["max_slice_nums"]
        return cls(vision=parse_vision(raw, VisionConfig), text=parse_text(raw), **top)

    def to_hf(self) -> dict[str, Any]:
        """The config.json layout of the released remote-code checkpoint."""
        vision = {
            k: v
            for k, v in dataclasses.asdict(self.vision).items()
            if k not in ("insert_layer_id", "window_kernel_size")
        }
        vision["model_type"] = "siglip_vision_model"
        text = text_to_hf(self.text)
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "version": float(VERSION),
            **text,
            **_RELEASE_FIELDS,
            "query_num": self.query_num,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "drop_vision_last_layer": self.drop_vision_last_layer,
            "slice_mode": self.slice_mode,
            "use_image_id": self.use_image_id,
            "slice_config": {
                "max_slice_nums": self.max_slice_nums,
                "patch_size": self.patch_size,
                "model_type": MODEL_TYPE,
            },
            "vision_config": vision,
        }


def longrope_factors(n: int, first: float, last: float) -> list[float]:
    """A geometric ramp of per-frequency factors shaped like the release's (0.998 ... 31.02)."""
    ratio = (last / first) ** (1 / max(n - 1, 1))
    return [round(first * ratio**i, 5) for i in range(n)]


def _longrope(head_dim: int, original_max: int) -> dict[str, Any]:
    factors = longrope_factors(head_dim // 2, 0.9978, 31.02392)
    return {
        "rope_type": "longrope",
        "factor": 1.0,
        "original_max_position_embeddings": original_max,
        "long_factor": list(factors),
        "short_factor": list(factors),
    }


def preset(name: str, vocab_size: int, image_token_id: int = 0) -> MiniCPMV40Config:
    """`full` = the released sizes (architectures.md §2: 32 layers DERIVED from the 3.6 B count;
    a real config.json is read as it is); `tiny` = seconds to build and test.

    The tiny sizes keep every structural feature: GQA, head_dim above hidden / heads, LongRoPE with
    a 30x spread of factors, an untied head, two resampler heads and a SigLIP MLP width (136) that
    no int4 block of 32 divides.
    """
    if name == "full":
        text = TextConfig(vocab_size=vocab_size, rope_scaling=_longrope(128, 32786))
        return MiniCPMV40Config(text=text, image_token_id=image_token_id)
    if name == "tiny":
        vision = VisionConfig(
            hidden_size=64, intermediate_size=136, num_hidden_layers=4, num_attention_heads=4
        )
        text = TextConfig(
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=4096,
            rope_scaling=_longrope(64, 4096),
        )
        return MiniCPMV40Config(vision=vision, text=text, image_token_id=image_token_id)
    raise ValueError(f"unknown preset {name!r} (choose tiny or full)")


def vision_position_ids(h: int, w: int, side: int = 70) -> np.ndarray:
    """int64 [h*w] row-major ids into the side x side position table, by 4.0's remote-code formula.

    The remote code takes fractions from `arange(0, 1 - 1e-6, 1 / nb_patches)` with nb_patches an
    int32 tensor (`tgt_sizes`): the step is float32(1/n), not the double 1/n, and not
    `arange(n) / n` as in transformers' Idefics2 / MiniCPM-V 4.6 code; those fall into other buckets
    for n in {25, 49, 50, 55, 77, 98, 100, ...}, so this family cannot share 4.6's function.

    Fraction i is fp32(i * step), rounded once: what torch's CUDA arange computes (one fp32 multiply
    per element), where the model was trained and is usually run. torch's CPU arange instead adds
    the step to a per-vector base in SIMD lanes, which lands one ulp away at some i and moves a
    bucket for n in {49, 58, 77, 86, 98, 100, ...} on x86 (the lane width decides which), so the
    CPU result is not a portable definition. One rounding is also what a graph computes from the
    pixels alone (`graph_slice_position_ids`), bit for bit.
    """
    boundaries = torch.arange(1 / side, 1.0, 1 / side)

    def buckets(n: int) -> torch.Tensor:
        step = 1 / torch.tensor(n, dtype=torch.int32)  # float32(1/n), as in the remote code
        return torch.bucketize(torch.arange(n, dtype=torch.float32) * step, boundaries, right=True)

    rows, cols = buckets(h), buckets(w)
    return (rows[:, None] * side + cols[None, :]).reshape(-1).numpy().astype(np.int64)


def slice_position_ids(h: int, w: int, side: int = 70) -> np.ndarray:
    """int64 [3, h*w] for one row-major slice: table ids, patch rows, patch columns."""
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return np.stack([vision_position_ids(h, w, side), rows, cols])


def graph_slice_position_ids(h: int, w: int, boundaries: torch.Tensor, side: int) -> torch.Tensor:
    """`slice_position_ids` as graph ops, for a vision graph that patchifies itself (h, w may be
    symbolic; `boundaries` = arange(1/side, 1, 1/side) in fp32). float32(1/n) is a correctly
    rounded fp32 division, and i * step rounds once in fp32 as the reference's arange does (the
    exact product fits a double), so the buckets come out bit-identical."""

    def buckets(n: int) -> torch.Tensor:
        steps = torch.arange(n, dtype=torch.float32)
        values = steps * (1.0 / (steps[-1:] + 1.0))
        return (values[:, None] >= boundaries[None, :]).sum(dim=1)

    rows = torch.arange(h, dtype=torch.int64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.int64)[None, :].expand(h, w)
    ids = buckets(h)[:, None] * side + buckets(w)[None, :]
    return torch.stack([ids.reshape(-1), rows.reshape(-1), cols.reshape(-1)])


class MiniCPMV40(LlamaVisionLanguageModel):
    """The whole model; module names are the checkpoint's (`vpm.`, `resampler.`, `llm.`)."""

    def __init__(self, cfg: MiniCPMV40Config):
        super().__init__()
        self.cfg = cfg
        self.vpm = VisionTower(cfg.vision, drop_last_layer=cfg.drop_vision_last_layer, window_merger=False)
        dim = cfg.text.hidden_size
        self.resampler = Resampler(cfg.query_num, dim, dim // RESAMPLER_HEAD_DIM, cfg.vision.hidden_size)
        self.llm = LlamaForCausalLM(cfg.text)

    # --- graph 1: vision encoder -------------------------------------------------------------
    def encode_slice(self, patches: torch.Tensor, position_ids: torch.Tensor, mode: str) -> torch.Tensor:
        """patches [L, 3*14*14] row-major, position_ids [3, L] -> [query_num, D_llm]."""
        if mode != VISION_MODE:
            raise ValueError(f"MiniCPM-V 4.0 has one vision mode, {VISION_MODE!r}; got {mode!r}")
        x = self.vpm(patches, position_ids[0], use_vit_merger=False)[0]
        return self.resampler(x, position_ids[1], position_ids[2])


def checkpoint_key_to_module(key: str) -> str | None:
    """Checkpoint name -> module name (the same); None for the parts a 4.0 chat never runs: the
    position-id buffer some exporters store and the audio/TTS heads of omni uploads."""
    if key.endswith("embeddings.position_ids") or key.startswith(("apm.", "audio", "tts.")):
        return None
    return key


def module_key_to_checkpoint(key: str) -> str:
    return key
