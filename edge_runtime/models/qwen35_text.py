"""Qwen3.5 hybrid text model (MiniCPM-V 4.6's LLM) with explicit decoder state.

Layers alternate Gated-DeltaNet ("linear_attention") and gated full attention, per
`layer_types`. All state is passed in and returned as tensors, so the same code runs as the
PyTorch reference and exports as a graph with state inputs/outputs or mutable buffers:

* attention layer: `k_cache`, `v_cache` [1, n_kv, S, head_dim], a static cache written at the
  token positions; keys past the query position are masked, so padding written beyond the
  valid tokens is never read before it is overwritten.
* DeltaNet layer: `conv_state` [1, conv_dim, K-1] (the last K-1 pre-conv inputs) and
  `recurrent_state` [1, n_v, d_k, d_v], always fp32.

A call processes a chunk of C tokens of which the first `n_valid` are real. Padded tokens get
beta = 0 and log-decay g = 0, which leaves the DeltaNet state untouched, and the conv state is
taken from the last valid inputs, so a padded chunk equals the unpadded one exactly.
C > 1 uses the chunked (UT-transform) DeltaNet form, C == 1 the recurrent form; both compute
the same recurrence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (  # noqa: F401 - StateSpec is re-exported
    GatedRMSNorm,
    StateSpec,
    SwiGLU,
    ZeroCenteredRMSNorm,
    apply_partial_rope,
    rope_cos_sin,
)
from .mrope import mrope_cos_sin, mrope_row_index

DELTANET_CHUNK = 64


@dataclass
class TextConfig:
    """`text_config` of a MiniCPM-V 4.6 checkpoint (Hugging Face field names)."""

    vocab_size: int = 248094
    hidden_size: int = 1024
    intermediate_size: int = 3584
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    attention_bias: bool = False
    attn_output_gate: bool = True
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    layer_types: list[str] = field(default_factory=list)
    tie_word_embeddings: bool = True
    # rope_parameters.mrope_section / mrope_interleaved: the (t, h, w) split of the rotary
    # frequencies for 3-row positions (MiniCPM-V 4.7); None where the checkpoint names none
    mrope_section: list[int] | None = None
    mrope_interleaved: bool | None = None

    def __post_init__(self) -> None:
        if self.mrope_interleaved is False:
            raise ValueError(
                "mrope_interleaved=false is not supported: transformers' Qwen3.5 rotary embedding "
                "always interleaves the (t, h, w) frequencies"
            )
        if not self.layer_types:
            self.layer_types = [
                "full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_head_dim * self.linear_num_key_heads + self.value_dim

    @property
    def value_dim(self) -> int:
        return self.linear_value_head_dim * self.linear_num_value_heads


def state_specs(
    cfg: TextConfig,
    cache_len: int,
    kv_dtype: torch.dtype = torch.float32,
    conv_dtype: torch.dtype | None = None,
) -> list[StateSpec]:
    """The decoder state layout, in the order every graph takes and returns it. The DeltaNet
    recurrent state is always fp32; the conv state follows `conv_dtype` (default: `kv_dtype`)."""
    conv_dtype = kv_dtype if conv_dtype is None else conv_dtype
    specs: list[StateSpec] = []
    for i, kind in enumerate(cfg.layer_types):
        if kind == "full_attention":
            shape = (1, cfg.num_key_value_heads, cache_len, cfg.head_dim)
            specs.append(StateSpec(f"layers.{i}.k_cache", shape, kv_dtype))
            specs.append(StateSpec(f"layers.{i}.v_cache", shape, kv_dtype))
        else:
            conv = (1, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1)
            rec = (1, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
            specs.append(StateSpec(f"layers.{i}.conv_state", conv, conv_dtype))
            specs.append(StateSpec(f"layers.{i}.recurrent_state", rec, torch.float32))
    return specs


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """The DeltaNet decay's softplus; module-level, as l2norm, so an exporter can swap in a form its
    backend runs whole (export/executorch/norms.py)."""
    return F.softplus(x)


def unit_lower_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower-triangular A [..., c, c], by recursive block doubling.

    At block size b, X holds the inverses of the diagonal b x b blocks of I + A. Merging two
    neighbouring blocks, inv([[L11, 0], [L21, L22]]) = [[X11, 0], [-X22 L21 X11, X22]], which for all
    blocks at once is X - X (A * M_b) X, with M_b keeping the lower-left b x b quarter of each
    diagonal 2b x 2b block. ceil(log2 c) levels of two matmuls each, plain ops every export format
    has. Every factor is a block of I + A or of its inverse, both bounded for the delta rule, so
    float32 keeps its precision. (The Neumann product (I - A)(I + A^2)(I + A^4)... this replaced
    forms powers of A that reach 1e10 when keys within a chunk are near-parallel and decay is slow,
    and lost every digit: issue 26.)
    """
    c, dtype = strict_lower.shape[-1], strict_lower.dtype
    inverse = torch.eye(c, dtype=dtype, device=strict_lower.device)
    for level, quarter in enumerate(_lower_left_quarters(c)):  # block size b = 2**level
        lower_left = strict_lower * torch.from_numpy(quarter).to(dtype)
        inverse = inverse - lower_left if level == 0 else inverse - inverse @ lower_left @ inverse
    return inverse


@functools.cache
def _lower_left_quarters(c: int) -> tuple[np.ndarray, ...]:
    """For b = 1, 2, 4, ... < c: 1 where (row, column) lies in the lower-left b x b quarter of a
    diagonal 2b x 2b block. Built in numpy, so an exporter sees constants, not index arithmetic."""
    index = np.arange(c)
    masks, b = [], 1
    while b < c:
        pair, block = index // (2 * b), index // b
        masks.append(
            ((pair[:, None] == pair[None, :]) & (block[:, None] != block[None, :])).astype(np.float32)
        )
        b *= 2
    return tuple(masks)


def chunked_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule over T tokens in chunks of 64 (parallel within a chunk). fp32 in and out.

    q, k [1, H, T, dk] (normalised, q scaled), v [1, H, T, dv], g, beta [1, H, T], state [1, H, dk, dv].
    """
    t = q.shape[2]
    c = min(DELTANET_CHUNK, t)
    pad = (c - t % c) % c
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // c
    split = lambda x: x.reshape(x.shape[0], x.shape[1], n, c, *x.shape[3:])  # noqa: E731
    q, k, v, g, beta = (split(x) for x in (q, k, v, g, beta))

    cum = g.cumsum(dim=-1)  # [1, H, n, c]
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    k_beta = k * beta.unsqueeze(-1)
    v_beta = v * beta.unsqueeze(-1)
    inverse = unit_lower_inverse(((k_beta @ k.transpose(-1, -2)) * decay).tril(-1))
    new_values = inverse @ v_beta
    k_cumdecay = inverse @ (k_beta * cum.exp().unsqueeze(-1))
    intra = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * cum.exp().unsqueeze(-1)
    k_decayed = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()

    outs = []
    for i in range(n):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        outs.append(q_decayed[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i, None, None] + k_decayed[:, :, i].transpose(-1, -2) @ v_new
    out = torch.cat(outs, dim=2)[:, :, :t]
    return out, state


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-token gated delta rule (decode). Shapes as chunked_delta_rule with T = 1."""
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [1, H, d]
    state = state * g[:, :, 0].exp()[..., None, None]
    remembered = (k.unsqueeze(-2) @ state).squeeze(-2)  # k^T S: [1, H, dv]
    delta = (v - remembered) * beta[:, :, 0].unsqueeze(-1)
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    out = (q.unsqueeze(-2) @ state).squeeze(-2)
    return out.unsqueeze(2), state


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over T tokens: the recurrent form for one token, the chunked form
    otherwise. A module-level function, so an exporter whose runtime has one kernel for every T
    swaps it whole (export/executorch/custom_ops.py) and a graph with a dynamic T never branches
    on it."""
    rule = recurrent_delta_rule if q.shape[2] == 1 else chunked_delta_rule
    return rule(q, k, v, g, beta, state)


class GatedDeltaNet(nn.Module):
    """Qwen3.5 linear-attention token mixer."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_k = cfg.linear_num_key_heads
        self.n_v = cfg.linear_num_value_heads
        self.d_k = cfg.linear_key_head_dim
        self.d_v = cfg.linear_value_head_dim
        self.key_dim = self.n_k * self.d_k
        self.conv_dim = cfg.conv_dim
        self.kernel = cfg.linear_conv_kernel_dim
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, cfg.value_dim, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.n_v, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.n_v, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.n_v))
        self.A_log = nn.Parameter(torch.zeros(self.n_v))
        self.norm = GatedRMSNorm(self.d_v, eps=cfg.rms_norm_eps)
        self.out_proj = nn.Linear(cfg.value_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        n_valid: torch.Tensor,
        conv_state: torch.Tensor,
        recurrent_state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, t, _ = x.shape
        mixed = self.in_proj_qkv(x).transpose(1, 2)  # [1, conv_dim, T]
        window = torch.cat([conv_state.to(mixed.dtype), mixed], dim=-1)
        conv = F.silu(F.conv1d(window, self.conv1d.weight, groups=self.conv_dim))
        keep = n_valid + torch.arange(self.kernel - 1, device=x.device)
        new_conv_state = window.index_select(2, keep).to(conv_state.dtype)

        q, k, v = torch.split(conv.transpose(1, 2), [self.key_dim, self.key_dim, self.n_v * self.d_v], dim=-1)
        q = q.reshape(1, t, self.n_k, self.d_k)
        k = k.reshape(1, t, self.n_k, self.d_k)
        v = v.reshape(1, t, self.n_v, self.d_v)
        if self.n_v != self.n_k:
            q = q.repeat_interleave(self.n_v // self.n_k, dim=2)
            k = k.repeat_interleave(self.n_v // self.n_k, dim=2)
        q, k, v = (y.transpose(1, 2).float() for y in (q, k, v))  # [1, H, T, d]
        q = l2norm(q) * (self.d_k**-0.5)
        k = l2norm(k)

        beta = torch.sigmoid(self.in_proj_b(x).float()) * valid[None, :, None]
        g = -self.A_log.float().exp() * softplus(self.in_proj_a(x).float() + self.dt_bias.float())
        g = g * valid[None, :, None]
        beta, g = beta.transpose(1, 2), g.transpose(1, 2)  # [1, H, T]

        out, new_state = delta_rule(q, k, v, g, beta, recurrent_state.float())

        out = out.transpose(1, 2).to(x.dtype)  # [1, T, H, dv]
        z = self.in_proj_z(x).reshape(1, t, self.n_v, self.d_v)
        out = self.norm(out, z).reshape(1, t, self.n_v * self.d_v)
        return self.out_proj(out), new_conv_state, new_state


class GatedAttention(nn.Module):
    """Full attention with QK-norm, partial RoPE, GQA and a per-head sigmoid output gate."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if not cfg.attn_output_gate:
            raise ValueError("attn_output_gate=false is not a Qwen3.5 configuration this runtime supports")
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

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
        q, gate = torch.chunk(self.q_proj(x).view(1, t, self.n_heads, 2 * self.head_dim), 2, dim=-1)
        gate = gate.reshape(1, t, self.n_heads * self.head_dim)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(1, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(1, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = apply_partial_rope(q, cos.to(q.dtype), sin.to(q.dtype))
        k = apply_partial_rope(k, cos.to(k.dtype), sin.to(k.dtype))

        out, k_cache, v_cache = cached_attention(q, k, v, positions, k_cache, v_cache)
        out = out * torch.sigmoid(gate)
        return self.o_proj(out), k_cache, v_cache


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write k, v [1, n_kv, T, D] into the static caches [1, n_kv, S, D] at `positions`, then causal
    GQA attention of q [1, H, T, D] over the caches -> ([1, T, H * D], new k_cache, new v_cache).

    A module-level function so an exporter can swap in a runtime's own cache-update and SDPA
    kernels (export/executorch/custom_ops.py) with the same contract."""
    n_heads, t, head_dim = q.shape[1], q.shape[2], q.shape[3]
    k_cache = k_cache.index_copy(2, positions, k.to(k_cache.dtype))
    v_cache = v_cache.index_copy(2, positions, v.to(v_cache.dtype))
    groups = n_heads // k_cache.shape[1]
    keys = k_cache.to(q.dtype).repeat_interleave(groups, dim=1)
    values = v_cache.to(q.dtype).repeat_interleave(groups, dim=1)

    key_pos = torch.arange(k_cache.shape[2], device=q.device)
    visible = key_pos[None, :] <= positions[:, None]  # [T, S]
    scores = (q @ keys.transpose(-1, -2)) * (head_dim**-0.5)
    scores = scores.float().masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return (probs @ values).transpose(1, 2).reshape(1, t, n_heads * head_dim), k_cache, v_cache


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "full_attention":
            self.self_attn = GatedAttention(cfg)
        elif kind == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            raise ValueError(f"unknown layer type {kind!r}")
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = ZeroCenteredRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


def mrope_rows_of(cfg: TextConfig) -> torch.Tensor | None:
    """Which position row each rotary frequency reads (`mrope.mrope_row_index`), or None without
    an `mrope_section`."""
    if cfg.mrope_section is None:
        return None
    return mrope_row_index(cfg.rotary_dim // 2, cfg.mrope_section)


class Qwen35TextModel(nn.Module):
    """Token embedding, hybrid decoder layers and final norm (`model.language_model.*`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind) for kind in cfg.layer_types)
        self.norm = ZeroCenteredRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        rot = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("mrope_rows", mrope_rows_of(cfg), persistent=False)

    def forward(
        self,
        embeds: torch.Tensor,
        start_pos: torch.Tensor,
        n_valid: torch.Tensor,
        state: list[torch.Tensor],
        rope_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """embeds [1, T, D], start_pos and n_valid int64 [1] -> normed hidden [1, T, D], new state.

        The cache slots and the causal mask always follow the cache index start_pos + i. RoPE
        follows it too unless `rope_positions` int64 [3, T] (rows t, h, w) is given: then the
        interleaved M-RoPE of `mrope_section` rotates by those rows (Canvas M-RoPE), which is why
        they are an input and not derived from start_pos; without an `mrope_section` row 0 is the
        1-D RoPE position (the exported graphs take rows for every family). The choice is made by
        the caller's signature and the config, never by tensor values, so either form traces to a
        fixed graph.
        """
        t = embeds.shape[1]
        steps = torch.arange(t, device=embeds.device)
        positions = start_pos + steps
        valid = (steps < n_valid).to(torch.float32)
        if rope_positions is None:
            cos, sin = rope_cos_sin(positions, self.inv_freq)
        elif self.mrope_rows is None:  # 1-D RoPE: row 0 is the position
            cos, sin = rope_cos_sin(rope_positions[0], self.inv_freq)
        else:
            cos, sin = mrope_cos_sin(rope_positions, self.inv_freq, self.mrope_rows)
        x = embeds
        new_state: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            a, b = state[2 * i], state[2 * i + 1]
            h = layer.input_layernorm(x)
            if layer.kind == "full_attention":
                h, a, b = layer.self_attn(h, positions, cos, sin, a, b)
            else:
                h, a, b = layer.linear_attn(h, valid, n_valid, a, b)
            new_state += [a, b]
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x), new_state
