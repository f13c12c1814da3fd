"""Llama text model (MiniCPM-V 4.0's LLM, "MiniCPM4-3B run as LlamaForCausalLM") with explicit state.

Pre-norm decoder layers of GQA attention and a SwiGLU MLP; `head_dim` may differ from
hidden / heads (4.0: 32 x 128 = 4096 query channels over a 2560 residual). RoPE is the default
one or LongRoPE; LongRoPE's per-frequency factors are folded into constant inverse frequencies at
load time, using the short factors, which transformers applies while the sequence stays within
`original_max_position_embeddings` — the context a bundle is limited to when the two lists differ
(see `TextConfig.max_static_context`).

State per layer: `k_cache`, `v_cache` [1, n_kv, S, head_dim], written at the token positions as in
the Qwen3.5 attention layers (same `cached_attention`), so every exporter's KV handling applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import qwen35_text
from .blocks import RMSNorm, StateSpec, SwiGLU, apply_partial_rope, rope_cos_sin


@dataclass
class TextConfig:
    """The Llama fields of a MiniCPM-V 4.0 `config.json` (top level there; Hugging Face names)."""

    vocab_size: int = 73448
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # MiniCPM-1 muP (MiniCPM-V 2.0's LLM): text embeddings x scale_emb, residual branches x
    # scale_depth / sqrt(num_layers), final hidden / (hidden_size / dim_model_base) before the head;
    # None = plain Llama
    scale_emb: float | None = None
    scale_depth: float | None = None
    dim_model_base: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Llama uses 'silu')")
        if self.mlp_bias:
            raise ValueError("mlp_bias=true is not supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        mup = (self.scale_emb, self.scale_depth, self.dim_model_base)
        if any(v is not None for v in mup) and any(v is None for v in mup):
            raise ValueError("muP needs all of scale_emb, scale_depth and dim_model_base")
        rope_type = self.rope_type
        if rope_type not in ("default", "longrope"):
            raise ValueError(f"unsupported rope_type {rope_type!r} (default or longrope)")
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                factors = self.rope_scaling.get(key) if self.rope_scaling else None
                if not isinstance(factors, list) or len(factors) != self.head_dim // 2:
                    raise ValueError(
                        f"rope_scaling.{key} must list head_dim/2 = {self.head_dim // 2} factors"
                    )
            if not isinstance(self.rope_scaling.get("original_max_position_embeddings"), int):
                raise ValueError("rope_scaling.original_max_position_embeddings must be an integer")

    @property
    def embed_scale(self) -> float:
        return 1.0 if self.scale_emb is None else float(self.scale_emb)

    @property
    def residual_scale(self) -> float:
        if self.scale_depth is None:
            return 1.0
        return float(self.scale_depth) / math.sqrt(self.num_hidden_layers)

    @property
    def head_scale(self) -> float:
        """Multiplier of the final hidden state before the vocabulary head."""
        return 1.0 if self.dim_model_base is None else self.dim_model_base / self.hidden_size

    @property
    def layer_types(self) -> list[str]:
        """Every layer is full attention (the manifest's per-layer kinds, shared with hybrid models)."""
        return ["full_attention"] * self.num_hidden_layers

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return str(scaling.get("rope_type", scaling.get("type", "default")))

    @property
    def max_static_context(self) -> int:
        """The longest context the constant frequencies are exact for: LongRoPE switches to its
        long factors past original_max_position_embeddings when they differ from the short ones."""
        scaling = self.rope_scaling or {}
        if self.rope_type == "longrope" and scaling["long_factor"] != scaling["short_factor"]:
            return min(self.max_position_embeddings, scaling["original_max_position_embeddings"])
        return self.max_position_embeddings


def rope_parameters(cfg: TextConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] fp32, cos/sin scale), computed in the order and dtype
    transformers' default / LongRoPE initialisers use, for contexts up to `max_static_context`."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    if cfg.rope_type == "default":
        return 1.0 / (cfg.rope_theta**exponents), 1.0
    scaling = cfg.rope_scaling or {}
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = cfg.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = torch.tensor(scaling["short_factor"], dtype=torch.float32)
    return 1.0 / (short * cfg.rope_theta**exponents), float(attention_factor)


def state_specs(
    cfg: TextConfig,
    cache_len: int,
    kv_dtype: torch.dtype = torch.float32,
    conv_dtype: torch.dtype | None = None,
) -> list[StateSpec]:
    """k_cache / v_cache per layer, in graph order (`conv_dtype` is unused: no conv state)."""
    del conv_dtype
    shape = (1, cfg.num_key_value_heads, cache_len, cfg.head_dim)
    specs: list[StateSpec] = []
    for i in range(cfg.num_hidden_layers):
        specs.append(StateSpec(f"layers.{i}.k_cache", shape, kv_dtype))
        specs.append(StateSpec(f"layers.{i}.v_cache", shape, kv_dtype))
    return specs


class LlamaAttention(nn.Module):
    """GQA attention with full-width RoPE over a static KV cache."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, t, _ = x.shape
        q = self.q_proj(x).view(1, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(1, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(1, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = apply_partial_rope(q, cos.to(q.dtype), sin.to(q.dtype))
        k = apply_partial_rope(k, cos.to(k.dtype), sin.to(k.dtype))
        # looked up at call time: an exporter swaps in its runtime's cache / SDPA kernels there
        out, k_cache, v_cache = qwen35_text.cached_attention(q, k, v, positions, k_cache, v_cache)
        return self.o_proj(out), k_cache, v_cache


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    """Token embedding, decoder layers and final norm (`llm.model.*`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.materialize_rope()

    def materialize_rope(self) -> None:
        """(Re)build the non-persistent RoPE buffer, e.g. after loading weights onto meta modules."""
        inv_freq, self.rope_scale = rope_parameters(self.cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self,
        embeds: torch.Tensor,
        start_pos: torch.Tensor,
        n_valid: torch.Tensor,
        state: list[torch.Tensor],
        rope_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """embeds [1, T, D], start_pos int64 [1] -> normed hidden [1, T, D], new state. Rows past
        n_valid are written to the cache beyond the valid tokens, where nothing reads them before
        the next call overwrites them. The cache slots and the mask follow start_pos + i; RoPE
        follows row 0 of `rope_positions` int64 [3, T] when given (the exported graphs' position
        rows), else the cache index."""
        del n_valid
        positions = start_pos + torch.arange(embeds.shape[1], device=embeds.device)
        cos, sin = rope_cos_sin(positions if rope_positions is None else rope_positions[0], self.inv_freq)
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        x = embeds
        scale = self.cfg.residual_scale
        new_state: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            h, k, v = layer.self_attn(
                layer.input_layernorm(x), positions, cos, sin, state[2 * i], state[2 * i + 1]
            )
            new_state += [k, v]
            x = x + (h * scale if scale != 1.0 else h)
            m = layer.mlp(layer.post_attention_layernorm(x))
            x = x + (m * scale if scale != 1.0 else m)
        return self.norm(x), new_state


class LlamaForCausalLM(nn.Module):
    """`llm.model` + `llm.lm_head`, named as transformers' LlamaForCausalLM."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the decoder takes them (x scale_emb under muP)."""
        x = self.model.embed_tokens(ids)
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        scale = self.cfg.head_scale
        return self.lm_head(hidden * scale if scale != 1.0 else hidden)
