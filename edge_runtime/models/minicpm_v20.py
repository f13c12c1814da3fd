"""MiniCPM-V 2.0: timm SigLIP so400m/14 (last block dropped) + Qwen-VL-style resampler + MiniCPM-2B.

The checkpoint is remote code (`model_type` "minicpmv", `version` 2.0): MiniCPM's LLM config at the
top level of config.json (muP: scale_emb, scale_depth, dim_model_base) plus the MiniCPM-V fields;
the vision tower is named by its timm model (`vision_encoder`), so its sizes have no config keys in
the release: an optional `vision_config` (ours, for the tiny preset) overrides the so400m defaults.
Weights: `vpm.*` (timm names), `resampler.*`, `llm.*` (architectures.md §1).

The vision graph of one slice takes row-major patches with int64 ids [2, L] (each patch's row and
column): the tower resizes its 27 x 27 position table to the slice's grid from them and the
resampler computes its key embedding (sin-cos of the absolute row / column, "adaptive"). Every
slice becomes `query_num` tokens; their queries carry the stored 8 x 8 sin-cos `pos_embed`.
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
from .timm_vit import VisionConfig, VisionTransformer
from .vlm import LlamaVisionLanguageModel

FAMILY = "minicpm-v-2.0"
MODEL_TYPE = "minicpmv"
VERSION = "2.0"
ARCHITECTURE = "MiniCPMV"
VISION_MODE = "adaptive"  # the resampler of HF's 2.0 code, adaptive=True: key sin-cos per grid
VISION_ENCODER = "vit_so400m_patch14_siglip_384.webli"
RESAMPLER_HEAD_DIM = 128  # Resampler(num_heads=embed_dim // 128)
DROPPED_BLOCK = "vpm.blocks.26."  # so400m's last (27th) block, which drop_vision_last_layer skips

_MUP_KEYS = ("scale_emb", "scale_depth", "dim_model_base")
_RELEASE_FIELDS: dict[str, Any] = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.1,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "vision_encoder": VISION_ENCODER,
    "auto_map": {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    },
}


@dataclass
class MiniCPMV20Config:
    """`config.json` of a MiniCPM-V 2.0 checkpoint."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: preset_text(122753))
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = True
    slice_mode: bool = True
    max_slice_nums: int = 9
    scale_resolution: int = 448
    image_token_id: int = 0  # `<unk>` fills the image slots
    video_token_id: int = -1  # 2.0 takes no video

    def __post_init__(self) -> None:
        side = int(round(self.query_num**0.5))
        if side * side != self.query_num:
            raise ValueError(f"query_num {self.query_num} is not a square (the queries' sin-cos grid)")
        if self.text.hidden_size % RESAMPLER_HEAD_DIM:
            raise ValueError(
                f"hidden_size {self.text.hidden_size} is not a multiple of the resampler's "
                f"{RESAMPLER_HEAD_DIM}-wide heads"
            )
        if self.text.scale_emb is None:
            raise ValueError("MiniCPM-V 2.0's LLM needs scale_emb, scale_depth and dim_model_base (muP)")

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def downsample_mode(self) -> str:
        return VISION_MODE

    @property
    def vision_layers(self) -> int:
        return self.vision.num_hidden_layers - (1 if self.drop_vision_last_layer else 0)

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> MiniCPMV20Config:
        check_identity(raw, MODEL_TYPE, VERSION)
        encoder = raw.get("vision_encoder", VISION_ENCODER)
        if encoder != VISION_ENCODER:
            raise ValueError(
                f"vision_encoder {encoder!r} is not {VISION_ENCODER!r}, the tower this family runs"
            )
        missing = [k for k in _MUP_KEYS if k not in raw]
        if missing:
            raise ValueError(f"lacks the MiniCPM muP keys {', '.join(missing)}")
        top = top_fields(raw, cls, {"vision", "text"})
        return cls(vision=parse_vision(raw, VisionConfig), text=parse_text(raw), **top)

    def to_hf(self) -> dict[str, Any]:
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
            "max_slice_nums": self.max_slice_nums,
            "scale_resolution": self.scale_resolution,
            "vision_config": dataclasses.asdict(self.vision),
        }


def preset_text(vocab_size: int) -> TextConfig:
    """MiniCPM-2B (architectures.md §1.3): 40 layers, 2304 wide, 36 heads (MHA), muP 12 / 1.4 / 256."""
    return TextConfig(
        vocab_size=vocab_size,
        hidden_size=2304,
        intermediate_size=5760,
        num_hidden_layers=40,
        num_attention_heads=36,
        num_key_value_heads=36,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        scale_emb=12.0,
        scale_depth=1.4,
        dim_model_base=256,
    )


def preset(name: str, vocab_size: int, image_token_id: int = 0) -> MiniCPMV20Config:
    """`full` = the released sizes (3.4 B); `tiny` = seconds to build and test, keeping muP (the
    released factors), MHA, an untied head, the dropped last vision block, two resampler heads and
    a SigLIP MLP width (136) no int4 block of 32 divides."""
    if name == "full":
        return MiniCPMV20Config(text=preset_text(vocab_size), image_token_id=image_token_id)
    if name == "tiny":
        vision = VisionConfig(
            hidden_size=64, intermediate_size=136, num_hidden_layers=4, num_attention_heads=4
        )
        text = dataclasses.replace(
            preset_text(vocab_size),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=64,
        )
        return MiniCPMV20Config(vision=vision, text=text, image_token_id=image_token_id)
    raise ValueError(f"unknown preset {name!r} (choose tiny or full)")


def slice_position_ids(h: int, w: int, side: int = 27) -> np.ndarray:
    """int64 [2, h*w] for one row-major slice: each patch's row and column."""
    del side  # the table is resized to the grid in the graph
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return np.stack([rows, cols])


def graph_slice_position_ids(h: int, w: int, boundaries: torch.Tensor, side: int) -> torch.Tensor:
    """`slice_position_ids` as graph ops (h, w may be symbolic)."""
    del boundaries, side
    rows = torch.arange(h, dtype=torch.int64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.int64)[None, :].expand(h, w)
    return torch.stack([rows.reshape(-1), cols.reshape(-1)])


class MiniCPMV20(LlamaVisionLanguageModel):
    """The whole model; module names are the checkpoint's (`vpm.`, `resampler.`, `llm.`)."""

    def __init__(self, cfg: MiniCPMV20Config):
        super().__init__()
        self.cfg = cfg
        self.vpm = VisionTransformer(cfg.vision, cfg.vision_layers)
        dim = cfg.text.hidden_size
        self.resampler = Resampler(
            cfg.query_num, dim, dim // RESAMPLER_HEAD_DIM, cfg.vision.hidden_size, query_pos=True
        )
        self.llm = LlamaForCausalLM(cfg.text)

    def encode_slice(self, patches: torch.Tensor, position_ids: torch.Tensor, mode: str) -> torch.Tensor:
        """patches [L, 3*14*14] row-major, position_ids [2, L] (rows, cols) -> [query_num, D_llm]."""
        if mode != VISION_MODE:
            raise ValueError(f"MiniCPM-V 2.0 has one vision mode, {VISION_MODE!r}; got {mode!r}")
        x = self.vpm(patches, position_ids[0], position_ids[1])
        return self.resampler(x, position_ids[0], position_ids[1])


def checkpoint_key_to_module(key: str) -> str | None:
    """Checkpoint name -> module name (the same). Ignored: timm's attention-pool head, which the
    remote code replaces by Identity, and the dropped last block where a checkpoint still has it."""
    if key.startswith(("vpm.attn_pool.", "vpm.head.", "vpm.fc_norm.", DROPPED_BLOCK)):
        return None
    return key


def module_key_to_checkpoint(key: str) -> str:
    return key
