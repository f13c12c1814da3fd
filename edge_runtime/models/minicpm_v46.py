"""MiniCPM-V 4.6: SigLIP2 NaViT vision tower + 2x2 merger + Qwen3.5 hybrid LLM.

The family module: its config (read from and written to a Hugging Face `config.json`), the
`tiny` / `full` presets, the checkpoint-name mapping, and the model whose three entry points
are the graphs of DESIGN.md (vision encoder per slice, token embedding, text decoder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .qwen35_text import Qwen35TextModel, TextConfig, state_specs
from .siglip_navit import Merger, VisionConfig, VisionTower
from .vlm import VisionLanguageModel

FAMILY = "minicpm-v-4.6"
MODEL_TYPE = "minicpmv4_6"
ARCHITECTURE = "MiniCPMV4_6ForConditionalGeneration"
DOWNSAMPLE_FACTOR = {"16x": 16, "4x": 4}


@dataclass
class MiniCPMV46Config:
    """Top-level `config.json` of a MiniCPM-V 4.6 checkpoint. A family that shares the model under
    another config (MiniCPM-OCR) subclasses it and overrides the class-level names below."""

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    VISION_MODEL_TYPE: ClassVar[str] = "minicpmv4_6_vision"
    HF_OMITTED: ClassVar[tuple[str, ...]] = ()  # fields the family's config.json does not have

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    insert_layer_id: int = 6
    drop_vision_last_layer: bool = False
    image_size: int = 448
    image_token_id: int = 248056
    video_token_id: int = 248057
    downsample_mode: str = "16x"
    merge_kernel_size: tuple[int, int] = (2, 2)
    merger_times: int = 1
    tie_word_embeddings: bool = False  # transformers' default when config.json omits it

    def __post_init__(self) -> None:
        self.vision.insert_layer_id = self.insert_layer_id
        if self.downsample_mode not in DOWNSAMPLE_FACTOR:
            raise ValueError(f"downsample_mode must be 16x or 4x, got {self.downsample_mode!r}")
        if tuple(self.merge_kernel_size) != (2, 2) or self.merger_times != 1:
            raise ValueError(
                f"unsupported merger (merge_kernel_size={self.merge_kernel_size}, "
                f"merger_times={self.merger_times}); MiniCPM-V 4.6 uses (2, 2) x 1"
            )

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> MiniCPMV46Config:
        """Parse a Hugging Face config dict; unknown keys are ignored, wrong types fail loudly."""
        if raw.get("model_type") not in (cls.MODEL_TYPE, None):
            raise ValueError(f"model_type is {raw.get('model_type')!r}, expected {cls.MODEL_TYPE!r}")
        vision = _pick(VisionConfig, raw.get("vision_config") or {})
        text_raw = dict(raw.get("text_config") or {})
        rope = text_raw.pop("rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r} (only 'default')")
        for key in ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"):
            if key in rope:
                text_raw[key] = rope[key]
        text = _pick(TextConfig, text_raw)
        top = {
            k: v
            for k, v in raw.items()
            if k in _field_names(cls) and k not in ("vision", "text", *cls.HF_OMITTED)
        }
        return cls(vision=vision, text=text, **top)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` transformers' MiniCPMV4_6ForConditionalGeneration reads."""
        vision = dataclasses.asdict(self.vision)
        vision["window_kernel_size"] = list(self.vision.window_kernel_size)
        vision["model_type"] = self.VISION_MODEL_TYPE
        text = dataclasses.asdict(self.text)
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": text.pop("rope_theta"),
            "partial_rotary_factor": text.pop("partial_rotary_factor"),
        }
        for key in ("mrope_section", "mrope_interleaved"):  # written only where the config has them
            value = text.pop(key)
            if value is not None:
                text["rope_parameters"][key] = list(value) if key == "mrope_section" else value
        text["model_type"] = "qwen3_5_text"
        hf = {
            "architectures": [self.ARCHITECTURE],
            "model_type": self.MODEL_TYPE,
            "insert_layer_id": self.insert_layer_id,
            "drop_vision_last_layer": self.drop_vision_last_layer,
            "image_size": self.image_size,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "downsample_mode": self.downsample_mode,
            "merge_kernel_size": list(self.merge_kernel_size),
            "merger_times": self.merger_times,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": vision,
            "text_config": text,
        }
        return {k: v for k, v in hf.items() if k not in self.HF_OMITTED}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _pick(cls: type, raw: dict[str, Any]) -> Any:
    values = {k: v for k, v in raw.items() if k in _field_names(cls)}
    for key in ("window_kernel_size", "merge_kernel_size"):
        if key in values:
            values[key] = tuple(values[key])
    return cls(**values)


def preset(name: str, vocab_size: int, image_token_id: int, video_token_id: int) -> MiniCPMV46Config:
    """`full` = the released 4.6 sizes (architectures.md §3.1); `tiny` = seconds to build and test.

    The tiny sizes keep every structural feature: DeltaNet and attention layers both present, GQA,
    partial RoPE, a window merger after a middle layer, and a SigLIP MLP width (136) that no int4
    block of 32 divides, like the real 4304.
    """
    if name == "full":
        return MiniCPMV46Config(
            vision=VisionConfig(),
            text=TextConfig(vocab_size=vocab_size),
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            tie_word_embeddings=True,
        )
    if name == "tiny":
        vision = VisionConfig(
            hidden_size=64, intermediate_size=136, num_hidden_layers=4, num_attention_heads=4
        )
        text = TextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=4,
            linear_num_value_heads=4,
        )
        return MiniCPMV46Config(
            vision=vision,
            text=text,
            insert_layer_id=1,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown preset {name!r} (choose tiny or full)")


class MiniCPMV46(VisionLanguageModel):
    """The whole model, with module names that mirror the checkpoint (minus the `model.` prefix)."""

    def __init__(self, cfg: MiniCPMV46Config):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision, drop_last_layer=cfg.drop_vision_last_layer)
        self.merger = Merger(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.language_model = Qwen35TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tie_weights()

    TEXT_MODULE = "language_model"
    HEAD_MODULE = "lm_head"
    VISION_MODULES = ("vision_tower", "merger")

    # --- graph 1: vision encoder -------------------------------------------------------------
    def encode_slice(self, patches: torch.Tensor, position_ids: torch.Tensor, mode: str) -> torch.Tensor:
        """patches [L, 3*14*14], position_ids [L] (window-major for `mode`) -> [L/16 or L/4, D_llm]."""
        return self.merger(self.vision_tower(patches, position_ids, use_vit_merger=(mode == "16x")))

    # --- graph 2: token embedding ------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids)

    # --- graph 3: text decoder ---------------------------------------------------------------
    def decode(
        self,
        embeds: torch.Tensor,
        start_pos: torch.Tensor,
        n_valid: torch.Tensor,
        state: list[torch.Tensor],
        all_logits: bool = False,
        rope_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """embeds [1, C, D] -> logits [1, V] of the last valid token (or [C, V]) and the new state.

        `rope_positions` int64 [3, C]: RoPE position rows apart from the cache index (4.7's Canvas
        M-RoPE); None = the cache index, as every other family."""
        hidden, new_state = self.language_model(embeds, start_pos, n_valid, state, rope_positions)
        if all_logits:
            return self.lm_head(hidden[0]), new_state
        last = hidden[0].index_select(0, n_valid - 1)
        return self.lm_head(last), new_state

    def new_state(self, cache_len: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        return [torch.zeros(s.shape, dtype=s.dtype) for s in state_specs(self.cfg.text, cache_len, dtype)]


def checkpoint_key_to_module(key: str) -> str | None:
    """Map a checkpoint tensor name to our module's state_dict name; None = ignore it.

    Accepts the native transformers layout and the legacy `model.vpm.` / `model.vit_merger.`
    prefixes of older uploads; drops the multi-token-prediction head (`mtp.*`) and the
    position-id buffer some exporters store.
    """
    if key.startswith("mtp.") or key.endswith("embeddings.position_ids"):
        return None
    for src, dst in _PREFIXES:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.vpm.", "vision_tower."),
    ("model.vit_merger.", "vision_tower.vit_merger."),
    ("model.merger.", "merger."),
    ("model.language_model.", "language_model."),
)


def module_key_to_checkpoint(key: str) -> str:
    """Inverse of checkpoint_key_to_module for the current (non-legacy) layout."""
    if key.startswith("lm_head."):
        return key
    return "model." + key
