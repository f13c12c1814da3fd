"""Fused text-decoder graphs: onnxruntime's contrib ops for the Qwen3.5 decoder, emitted at export time.

onnxruntime's CPU provider has kernels for pieces of this decoder that the plain-op export spells
out in dozens of small nodes. Matching those subgraphs after export would be brittle (the chunked
DeltaNet form alone is a few hundred nodes per layer), so the fusion happens one level up: while
the decoder graphs are exported, `fused_decoder(model, cache_len)` swaps the text model's modules
for subclasses whose forward emits the contrib op through `torch.onnx.ops.symbolic_multi_out` when
`torch.onnx.is_in_onnx_export()`, and runs the unchanged reference forward otherwise. The graphs'
inputs and outputs (names, shapes, dtypes, state layout) are exactly those of the plain export, so
the backend, the manifest and the quantizer need no change (the quantizer still rewrites every
weight MatMul; the contrib ops' only constant inputs are 1-D / 3-D tensors it leaves alone, and
the RoPE tables, which no MatMul / Gather reads).

Fusions (`FUSIONS`; every one is on by default and was measured faster or equal, see below):

* `rmsnorm`: every RMSNorm -> `SimplifiedLayerNormalization` (onnxruntime's contrib op in the
  default domain): the (1 + w) layer norms, the per-head q/k norms, the DeltaNet output norm
  (before its SiLU gate) and the DeltaNet q/k l2 norms (l2norm(x, eps) == SLN(x, 1/sqrt(d), eps/d)).
  2-3x faster per norm than Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul.
* `conv`: the DeltaNet causal depthwise conv + SiLU -> `com.microsoft.CausalConvWithState` in the
  decode graph only: ~6x faster than Conv + SiLU for one token, but 2-3x slower over a 64-token
  chunk, so prefill keeps Conv. Decode takes the op's carried state, which is the reference's
  because the decode graph runs with n_valid == 1 (the backend's contract for C == 1).
* `linear_attention`: the gated delta rule (recurrent form in decode, chunked UT form in prefill)
  -> `com.microsoft.LinearAttention` (update_rule gated_delta: S = exp(g) S; S += k (beta (v - k^T S));
  o = scale q^T S; state [1, H, d_k, d_v] as ours, decay g in log space, packed [1, T, H*d]
  q/k/v so no transposes) and the decay / beta chain -> `com.microsoft.LinearAttentionGate`.
  Padded prefill rows keep beta = g = 0, so they leave the state untouched as in the reference.
* `gqa`: the full attention's cache write, GQA head expansion, causal mask and softmax ->
  `com.microsoft.GroupQueryAttention` on the explicit `[1, n_kv, S, head_dim]` caches. Every row
  of the chunk, padding included, is written at `start_pos + i` as the reference does
  (`seqlens_k = start_pos + C - 1`, `total_sequence_length = start_pos + C`), and causality hides
  keys past each query's position. The op reads only the valid prefix instead of the whole static
  cache, which is most of the gain at a 4K context.
* `gqa_rotary`: RoPE inside GroupQueryAttention (`do_rotary`) by the cos/sin the text model
  computed from the graph's `position_ids` rows (1-D RoPE or M-RoPE alike: the chunk's own rows
  as the op's cos/sin cache, zero-padded to `cache_len` rows, at op position ids 0..C-1; see
  `_group_query_attention`) where the CPU kernel accepts the rotary width
  (rotary_dim / 2 a multiple of 8: 32 for the released 4.6; the tiny preset's 4 is not, and keeps
  the graph's own partial RoPE).

* `mha` (vision graphs): SigLIP's bidirectional self-attention (scores, softmax, weighted sum and
  the head split / merge transposes around them) -> `com.microsoft.MultiHeadAttention` on the
  packed [B, T, D] projections; the window merger's 2x2 windows are its batch. Its gain is
  memory, not time: on the full 4.6 tower a 16x 448x448 slice peaks at 1205 MB instead of 1340 MB
  (the plain form holds [H, T, T] scores and probabilities, 64 MB each per layer at T = 1024) in
  the same time (7209 / 7197 ms interleaved; the op alone 0.94-0.98x the plain form at T = 1024
  and 1.04x at T = 256, 16 heads of 72; issue 33).

Measured and left out: `SkipSimplifiedLayerNormalization` (residual Add + norm) is slower on the
CPU provider than Add + SimplifiedLayerNormalization at every chunk length (1.2x at C = 1, 1.8x at
C = 64), and onnxruntime does not fuse it by itself there. GroupQueryAttention's q/k-norm inputs are
rejected by the CPU kernel (CUDA / WebGPU only), so q/k norms stay separate SLN nodes. The standalone
`RotaryEmbedding` is subsumed by `gqa_rotary`. `MatMulNBits` is already the int4 quantizer's output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.blocks import (
    BidirectionalAttention,
    GatedRMSNorm,
    RMSNorm,
    ZeroCenteredRMSNorm,
    apply_partial_rope,
)
from edge_runtime.models.llama_text import LlamaAttention
from edge_runtime.models.qwen35_text import (
    GatedAttention,
    GatedDeltaNet,
    chunked_delta_rule,
    recurrent_delta_rule,
)

MS = "com.microsoft"
FUSIONS = ("rmsnorm", "conv", "linear_attention", "gqa", "gqa_rotary", "mha")
DEFAULT_FUSIONS = FUSIONS
GQA_ROTARY_MULTIPLE = 8  # CPU GroupQueryAttention: cos_cache width (rotary_dim / 2) must be a multiple of 8


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def _op(name: str, inputs: list, attrs: dict, out: list[tuple[torch.dtype, tuple]], domain: str = MS):
    """One contrib node; `out` = (dtype, shape) per output. Returns a tensor or a tuple of tensors."""
    outs = torch.onnx.ops.symbolic_multi_out(
        f"{domain}::{name}" if domain else name,
        inputs,
        attrs,
        dtypes=[d for d, _ in out],
        shapes=[list(s) for _, s in out],
        version=1,
    )
    return outs[0] if len(out) == 1 else tuple(outs)


def simplified_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight as one SimplifiedLayerNormalization (fp32, last axis)."""
    return _op(
        "SimplifiedLayerNormalization",
        [x, weight],
        {"axis": -1, "epsilon": float(eps), "stash_type": 1},
        [(x.dtype, tuple(x.shape))],
        domain="",
    )


def _l2norm_as_sln(x: torch.Tensor, eps: float) -> torch.Tensor:
    """l2norm(x, eps) == SLN(x, w = 1 / sqrt(d), eps / d) over the last axis (d = x.shape[-1])."""
    d = x.shape[-1]
    return simplified_layer_norm(x, torch.full((d,), d**-0.5, dtype=x.dtype), eps / d)


# ---------------------------------------------------------------------------------------------------
# fused modules: subclasses swapped in by `fused_decoder`; outside an ONNX export they are the
# reference modules (super().forward), so nothing changes for the PyTorch path.


class FusedZeroCenteredRMSNorm(ZeroCenteredRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _exporting() or x.dtype != torch.float32:
            return super().forward(x)
        return simplified_layer_norm(x, 1.0 + self.weight, self.eps)


class FusedGatedRMSNorm(GatedRMSNorm):
    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if not _exporting() or x.dtype != torch.float32:
            return super().forward(x, gate)
        return simplified_layer_norm(x, self.weight, self.eps) * F.silu(gate)


class FusedGatedDeltaNet(GatedDeltaNet):
    _fusions: frozenset = frozenset()

    def forward(self, x, valid, n_valid, conv_state, recurrent_state):
        if not _exporting() or x.dtype != torch.float32:
            return super().forward(x, valid, n_valid, conv_state, recurrent_state)
        fusions = self._fusions
        _, t, _ = x.shape
        mixed = self.in_proj_qkv(x)  # [1, T, conv_dim]
        if "conv" in fusions and t == 1:
            # decode only: the CPU kernel beats Conv + SiLU ~6x for one token but is 2-3x slower
            # over a 64-token chunk. Channels-first: the [1, 1, C] transposes are free and the state
            # needs none; with C == 1 (n_valid == 1) the op's carried state is the reference's.
            conv, new_conv_state = _op(
                "CausalConvWithState",
                [mixed.transpose(1, 2), self.conv1d.weight, None, conv_state],
                {"activation": "silu"},
                [(mixed.dtype, (1, self.conv_dim, 1)), (conv_state.dtype, tuple(conv_state.shape))],
            )
        else:
            window = torch.cat([conv_state, mixed.transpose(1, 2)], dim=-1)
            conv = F.silu(F.conv1d(window, self.conv1d.weight, groups=self.conv_dim))
            keep = n_valid + torch.arange(self.kernel - 1, device=x.device)
            new_conv_state = window.index_select(2, keep)

        q, k, v = torch.split(conv.transpose(1, 2), [self.key_dim, self.key_dim, self.n_v * self.d_v], dim=-1)
        q = q.reshape(1, t, self.n_k, self.d_k)
        k = k.reshape(1, t, self.n_k, self.d_k)
        if self.n_v != self.n_k:
            q = q.repeat_interleave(self.n_v // self.n_k, dim=2)
            k = k.repeat_interleave(self.n_v // self.n_k, dim=2)
        if "rmsnorm" in fusions:  # l2norm(x) == SLN(x, 1 / sqrt(d), eps / d)
            q, k = _l2norm_as_sln(q, 1e-6), _l2norm_as_sln(k, 1e-6)
        else:
            q, k = _l2(q), _l2(k)

        mask = valid[None, :, None]
        a, b = self.in_proj_a(x), self.in_proj_b(x)  # [1, T, H]
        if "linear_attention" in fusions:
            g, beta = _op(
                "LinearAttentionGate",
                [a, self.dt_bias, -self.A_log.exp(), b],
                {},
                [(torch.float32, tuple(a.shape)), (torch.float32, tuple(b.shape))],
            )
            g, beta = g * mask, beta * mask
        else:
            beta = torch.sigmoid(b) * mask
            g = -self.A_log.exp() * F.softplus(a + self.dt_bias) * mask

        if "linear_attention" in fusions:
            out, new_state = _op(
                "LinearAttention",
                [
                    q.reshape(1, t, self.n_v * self.d_k),
                    k.reshape(1, t, self.n_v * self.d_k),
                    v,
                    recurrent_state,
                    g,
                    beta,
                ],
                {
                    "q_num_heads": self.n_v,
                    "kv_num_heads": self.n_v,
                    "update_rule": "gated_delta",
                    "scale": float(self.d_k**-0.5),
                },
                [(torch.float32, (1, t, self.n_v * self.d_v)), (torch.float32, tuple(recurrent_state.shape))],
            )
            out = out.reshape(1, t, self.n_v, self.d_v)
        else:  # the reference rule in its [1, H, T, d] layout
            v = v.reshape(1, t, self.n_v, self.d_v).transpose(1, 2)
            q, k = q.transpose(1, 2) * (self.d_k**-0.5), k.transpose(1, 2)
            rule = recurrent_delta_rule if t == 1 else chunked_delta_rule
            out, new_state = rule(q, k, v, g.transpose(1, 2), beta.transpose(1, 2), recurrent_state)
            out = out.transpose(1, 2)
        z = self.in_proj_z(x).reshape(1, t, self.n_v, self.d_v)
        out = self.norm(out, z).reshape(1, t, self.n_v * self.d_v)
        return self.out_proj(out), new_conv_state, new_state


def _l2(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _group_query_attention(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, T, H, hd], k [1, T, n_kv, hd] before RoPE, v [1, T, n_kv * hd] -> GroupQueryAttention
    over the caches: ([1, T, H * hd], new k_cache, new v_cache). RoPE runs inside the op when the
    module carries `_rotary_rows`, else here; either way it rotates by `cos` / `sin` [T, rot], which
    the text model computed from the graph's position rows (1-D or M-RoPE), never by the cache index.

    Inside the op: the chunk's own cos / sin halves are the op's cos_cache / sin_cache with
    position_ids 0..T-1, zero-padded to `_rotary_rows` (the cache length) because the kernel wants at
    least total_sequence_length rows. The CPU kernel ignores position_ids on a first prompt
    (past length 0) and counts 0..T-1 itself, which these ids equal, so the rotation is the rows'
    in every call; a static table indexed by row 0 would rotate a first chunk by the cache index."""
    t, n_heads, n_kv, head_dim = q.shape[1], module.n_heads, module.n_kv, module.head_dim
    rotary = module._rotary_rows
    if rotary is None:  # rotate here, in the [1, T, H, hd] layout (cos/sin broadcast over heads)
        q = apply_partial_rope(q, cos[:, None, :], sin[:, None, :])
        k = apply_partial_rope(k, cos[:, None, :], sin[:, None, :])
    q = q.reshape(1, t, n_heads * head_dim)
    k = k.reshape(1, t, n_kv * head_dim)
    # every row, padding included, goes to the cache at start_pos + i (as the reference does)
    last = positions[-1:]
    seqlens_k = last.to(torch.int32)
    total = (last + 1).to(torch.int32).reshape(())
    inputs = [q, k, v, k_cache, v_cache, seqlens_k, total]
    attrs = {"num_heads": n_heads, "kv_num_heads": n_kv, "scale": float(head_dim**-0.5)}
    if rotary is not None:
        inputs += _rotary_inputs(cos, sin, rotary)
        attrs["do_rotary"] = 1
    return _op(
        "GroupQueryAttention",
        inputs,
        attrs,
        [
            (q.dtype, (1, t, n_heads * head_dim)),
            (k_cache.dtype, tuple(k_cache.shape)),
            (v_cache.dtype, tuple(v_cache.shape)),
        ],
    )


def _rotary_inputs(cos: torch.Tensor, sin: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """GroupQueryAttention's cos_cache, sin_cache [rows, rot/2] and position_ids [1, T] (see above)."""
    t, half = cos.shape[0], cos.shape[-1] // 2
    pad = (0, 0, 0, rows - t)  # static: T and the cache length are graph constants
    return [F.pad(cos[:, :half], pad), F.pad(sin[:, :half], pad), torch.arange(t, device=cos.device)[None, :]]


class FusedGatedAttention(GatedAttention):
    _rotary_rows: int | None = None  # RoPE inside GroupQueryAttention, tables of this many rows

    def forward(self, x, positions, cos, sin, k_cache, v_cache):
        if not _exporting() or x.dtype != torch.float32:
            return super().forward(x, positions, cos, sin, k_cache, v_cache)
        _, t, _ = x.shape
        q, gate = torch.chunk(self.q_proj(x).view(1, t, self.n_heads, 2 * self.head_dim), 2, dim=-1)
        gate = gate.reshape(1, t, self.n_heads * self.head_dim)
        q = self.q_norm(q)  # [1, T, H, hd]
        k = self.k_norm(self.k_proj(x).view(1, t, self.n_kv, self.head_dim))
        out, new_k, new_v = _group_query_attention(
            self, q, k, self.v_proj(x), positions, cos, sin, k_cache, v_cache
        )
        out = out * torch.sigmoid(gate)
        return self.o_proj(out), new_k, new_v


class FusedLlamaAttention(LlamaAttention):
    _rotary_rows: int | None = None

    def forward(self, x, positions, cos, sin, k_cache, v_cache):
        if not _exporting() or x.dtype != torch.float32:
            return super().forward(x, positions, cos, sin, k_cache, v_cache)
        _, t, _ = x.shape
        q = self.q_proj(x).view(1, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(1, t, self.n_kv, self.head_dim)
        out, new_k, new_v = _group_query_attention(
            self, q, k, self.v_proj(x), positions, cos, sin, k_cache, v_cache
        )
        return self.o_proj(out), new_k, new_v


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _exporting() or x.dtype != torch.float32:
            return super().forward(x)
        return simplified_layer_norm(x, self.weight, self.eps)


class FusedBidirectionalAttention(BidirectionalAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _exporting() or x.dtype != torch.float32:
            return super().forward(x)
        *lead, t, d = x.shape
        flat = x.reshape(-1, t, d)  # one slice [1, L, D] or the window merger's windows [L/4, 4, D]
        shape = tuple(flat.shape)
        out = _op(
            "MultiHeadAttention",
            [self.q_proj(flat), self.k_proj(flat), self.v_proj(flat)],
            {"num_heads": self.num_heads, "scale": float(self.head_dim**-0.5)},
            [(flat.dtype, shape)],
        )
        return self.out_proj(out.reshape(*lead, t, d))


_SWAPS = {
    GatedDeltaNet: (FusedGatedDeltaNet, ("rmsnorm", "conv", "linear_attention")),
    GatedAttention: (FusedGatedAttention, ("gqa",)),
    LlamaAttention: (FusedLlamaAttention, ("gqa",)),
    RMSNorm: (FusedRMSNorm, ("rmsnorm",)),
    ZeroCenteredRMSNorm: (FusedZeroCenteredRMSNorm, ("rmsnorm",)),
    GatedRMSNorm: (FusedGatedRMSNorm, ("rmsnorm",)),
}
_VISION_SWAPS = {BidirectionalAttention: (FusedBidirectionalAttention, ("mha",))}


def _check_fusions(fusions: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(fusions)
    unknown = chosen - set(FUSIONS)
    if unknown:
        raise ValueError(f"unknown decoder fusions {sorted(unknown)} (known: {', '.join(FUSIONS)})")
    return chosen


@contextlib.contextmanager
def _swapped(
    modules: Iterable[nn.Module], swaps: dict, chosen: frozenset[str], extra: dict
) -> Iterator[None]:
    """Swap each module whose type `swaps` maps to a fusion in `chosen` for its fused class, with
    `extra` attributes set on it; the classes are restored (and the attributes removed) on exit."""
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for module in modules:
            target = swaps.get(type(module))
            if target is None or not chosen.intersection(target[1]):
                continue
            swapped.append((module, type(module)))
            module.__class__ = target[0]
            for name, value in extra.items():
                if hasattr(target[0], name):
                    setattr(module, name, value)
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
            for name in extra:
                module.__dict__.pop(name, None)


@contextlib.contextmanager
def fused_decoder(
    model: nn.Module, cache_len: int, fusions: Iterable[str] = DEFAULT_FUSIONS
) -> Iterator[None]:
    """Within the block, ONNX exports of `model`'s text decoder emit the contrib ops of `fusions`.

    `model` is a family's model (or its text model); modules are swapped by type, so any decoder
    built from these blocks gets the fusions of its blocks. The module classes are restored on exit,
    so the model is unchanged afterwards. Only fp32 exports are fused (the ONNX exporter's input).
    """
    chosen = _check_fusions(fusions)
    text = getattr(model, "text_model", model)
    rot_half = text.inv_freq.shape[0]  # rotary_dim / 2
    rotary = None
    plain_rope = getattr(text, "rope_scale", 1.0) == 1.0  # the op's rotary cannot scale cos / sin
    if "gqa_rotary" in chosen and rot_half % GQA_ROTARY_MULTIPLE == 0 and plain_rope:
        rotary = cache_len
    with _swapped(text.modules(), _SWAPS, chosen, {"_fusions": chosen, "_rotary_rows": rotary}):
        yield


@contextlib.contextmanager
def fused_vision(model: nn.Module, fusions: Iterable[str] = DEFAULT_FUSIONS) -> Iterator[None]:
    """Within the block, ONNX exports of `model`'s vision graphs emit the vision contrib ops of
    `fusions` (`mha`); like fused_decoder, the model is unchanged afterwards."""
    with _swapped(model.modules(), _VISION_SWAPS, _check_fusions(fusions), {}):
        yield


def contrib_op_counts(model) -> dict[str, int]:
    """How many nodes of each fused op a graph holds (for tests and the export log)."""
    names = {
        "SimplifiedLayerNormalization",
        "CausalConvWithState",
        "LinearAttention",
        "LinearAttentionGate",
        "GroupQueryAttention",
        "MatMulNBits",
    }
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in names:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
