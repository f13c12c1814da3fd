"""The three exportable graphs of DESIGN.md, built from the reference modules; shared by every format.

* `VisionEncoderGraph(model, mode)`: one slice, patches [L, 3*P*P] + position ids [L] in
  window-major order -> [L/16 | L/4, D]. One graph per downsample mode; L is the one dynamic
  dimension (a multiple of 16 for 16x, of 4 for 4x).
* `TokenEmbeddingGraph(model)`: ids [T] -> [T, D].
* `TextDecoderGraph(model)`: embeds [1, C, D], start_pos [1], n_valid [1], position_ids [3, C],
  then every state tensor -> logits [1, V] of the last valid position, then every updated state
  tensor. Called with C = chunk for prefill and C = 1 for decode; formats that need static shapes
  export it twice and share the weights. The cache slots and the causal mask follow the cache
  index start_pos + i; RoPE follows `position_ids` (rows t, h, w: M-RoPE where the config has an
  `mrope_section`, else row 0 is the 1-D position), so one graph serves every family and the host
  decides positions (the cache index repeated in 3 rows, or 4.7's canvas rows).

State tensors travel flat, in `state_specs` order, so ONNX inputs/outputs, ExecuTorch buffers
and CoreML states all carry the same names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_runtime.families import StateSpec, family_of
from edge_runtime.processing.slicing import vision_mode


class VisionEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_slice(patches, position_ids, self.mode)


class TokenEmbeddingGraph(nn.Module):
    """ids -> the decoder's input embeddings: the table (only that, not the model's other weights,
    so the graph holds one tensor) times the family's embedding scale (MiniCPM muP's scale_emb)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embed_tokens = model.text_model.embed_tokens
        self.scale = float(model.embed_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        return x * self.scale if self.scale != 1.0 else x


class TextDecoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        embeds: torch.Tensor,
        start_pos: torch.Tensor,
        n_valid: torch.Tensor,
        position_ids: torch.Tensor,
        *state: torch.Tensor,
    ):
        logits, new_state = self.model.decode(
            embeds, start_pos, n_valid, list(state), rope_positions=position_ids
        )
        return (logits, *new_state)


class StatefulDecoder(nn.Module):
    """The text decoder with its state held in buffers, written back in place after every call: the
    one stateful wrapper of the formats that keep state inside the program (ExecuTorch's mutable
    buffers, Core ML's states). Inputs: `embeds` [1, T, D] (token ids [1, T] when
    `from_tokens`, ExecuTorch's `forward`), `start_pos` [1] and `n_valid` [1] (None: all T rows are
    real, as ExecuTorch's runners call it); integer inputs of any width (Core ML's are int32).
    Output: the logits [1, V] of the last valid position.

    With `position_rows` (families whose RoPE positions are not the cache index, Family.rope_positions
    "canvas": MiniCPM-V 4.7) the decoder also takes `position_ids` [3, T] (rows t, h, w; any integer
    width), passed to the model's RoPE; the cache slots and the mask still follow start_pos + i.
    Without it the signature is exactly the two / three inputs above and RoPE follows the cache
    index (ExecuTorch's stock runners call it so). A call that gives no rows (the token-id `forward`
    method) rotates by the cache index whatever `position_rows` says: for M-RoPE that equals three
    equal rows, which is what a text-only prompt's canvas rows are.

    Where the formats differ:
    * `buffer_name(state name)`: identifier-safe buffer names, which the bundles' manifests list;
    * `buffer_dtype(spec)`: the buffer's dtype (default the spec's); the state is computed in fp32
      and cast back on write (Core ML keeps fp16 states);
    * `seq_major_cache`: KV caches laid out [1, S, n_kv, D] for kernels that update them in place
      and hand the buffer itself back (ExecuTorch), which then needs no write-back;
    * `fresh_at_zero(positions)`: a context in which a call at start_pos 0 starts a new sequence
      (ExecuTorch: the conv state is multiplied by 0 and the kernel drops the recurrent state through
      the first token's decay); the KV caches need no reset, since attention reads only positions
      below start_pos + T, all written by the current sequence. None: the host resets the state.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: list[StateSpec],
        buffer_name: Callable[[str], str],
        buffer_dtype: Callable[[StateSpec], torch.dtype] | None = None,
        seq_major_cache: bool = False,
        fresh_at_zero: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None = None,
        persistent: bool = True,
        position_rows: bool = False,
    ):
        super().__init__()
        self.model = model
        self.position_rows = position_rows
        self.specs = specs
        self.names = [buffer_name(s.name) for s in specs]
        self.conv = [s.name.endswith("conv_state") for s in specs]
        self.fresh_at_zero = fresh_at_zero
        for name, spec in zip(self.names, specs, strict=True):
            shape = spec.shape
            if seq_major_cache and spec.name.endswith(("k_cache", "v_cache")):
                shape = (shape[0], shape[2], shape[1], shape[3])
            dtype = spec.dtype if buffer_dtype is None else buffer_dtype(spec)
            self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=persistent)
        self.from_tokens = False  # traced as a python constant: selects which method is exported

    def forward(
        self,
        embeds: torch.Tensor,
        start_pos: torch.Tensor,
        n_valid: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # `embeds` names the graph input (Core ML's function signature); token ids when from_tokens
        embeds = self.model.embed(embeds) if self.from_tokens else embeds
        t = embeds.shape[1]
        start = _as(start_pos, torch.int64)
        valid = torch.ones_like(start) * t if n_valid is None else _as(n_valid, torch.int64)
        buffers = [getattr(self, n) for n in self.names]
        state = [_as(b, torch.float32) for b in buffers]
        reset = contextlib.nullcontext()
        if self.fresh_at_zero is not None:
            keep = (start != 0).to(torch.float32)
            state = [s * keep if c else s for s, c in zip(state, self.conv, strict=True)]
            reset = self.fresh_at_zero(start + torch.arange(t))
        if position_ids is not None and not self.position_rows:
            raise ValueError("this decoder takes no position rows (position_rows=False)")
        rows = None if position_ids is None else _as(position_ids, torch.int64)
        with reset:
            logits, new_state = self.model.decode(embeds, start, valid, state, rope_positions=rows)
        for buf, new in zip(buffers, new_state, strict=True):
            if new is not buf:
                buf.copy_(_as(new, buf.dtype))
        return logits


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, the very tensor where it already is (no cast op traced, and a kernel that
    updates a buffer in place still hands that buffer back)."""
    return x if x.dtype == dtype else x.to(dtype)


def to_half_precision(model: nn.Module) -> nn.Module:
    """`model` in fp16 (in place) except the tensors DESIGN.md keeps in fp32: what a fp16-activation
    graph is traced from. Which ones is the family's policy (`fp32_keep_suffixes` for parameters and
    buffers by name, `fp32_keep_modules` for whole modules by class; for 4.6 the DeltaNet decay, the
    rotary frequencies and the norm weights). The reference modules upcast where the numerics need
    it (norms, softmax, the delta rule and its decay), so tracing this model gives those islands in
    fp32."""
    family = family_of(model.cfg)
    keep_suffixes, keep_modules = family.fp32_keep_suffixes, family.fp32_keep_modules
    model.half()
    for module in model.modules():
        keep_all = type(module).__name__ in keep_modules
        for name, param in module.named_parameters(recurse=False):
            if keep_all or name.endswith(keep_suffixes):
                param.data = param.data.float()
        for name, buf in module.named_buffers(recurse=False):
            if name.endswith(keep_suffixes):
                setattr(module, name, buf.float())
    return model


class Fp32Boundary(nn.Module):
    """A graph with fp32 inputs and outputs around a half-precision body, so every variant of a
    format has the same I/O dtypes and the host code never changes. Only the first `n_args` inputs
    and `n_outs` outputs are cast; the state tensors after them keep their own dtypes."""

    def __init__(self, graph: nn.Module, compute: torch.dtype, n_args: int, n_outs: int):
        super().__init__()
        self.inner, self.compute, self.n_args, self.n_outs = graph, compute, n_args, n_outs

    def forward(self, *args: torch.Tensor):
        head = [a.to(self.compute) if a.is_floating_point() else a for a in args[: self.n_args]]
        out = self.inner(*head, *args[self.n_args :])
        out = out if isinstance(out, tuple) else (out,)
        cast = tuple(o.float() for o in out[: self.n_outs]) + tuple(out[self.n_outs :])
        return cast if len(cast) > 1 else cast[0]


POSITION_ROWS = 3  # the decoder's position_ids rows (t, h, w); 1-D families read row 0
DECODER_ARGS = 4  # embeds, start_pos, n_valid, position_ids: the inputs before the state tensors


@dataclass(frozen=True)
class DecoderSignature:
    """Names and shapes of the decoder graph's inputs and outputs for a given cache length."""

    state: list[StateSpec]
    hidden_size: int
    vocab_size: int

    @property
    def input_names(self) -> list[str]:
        return ["embeds", "start_pos", "n_valid", "position_ids", *(f"past.{s.name}" for s in self.state)]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(f"present.{s.name}" for s in self.state)]


def decoder_signature(
    model: nn.Module,
    cache_len: int,
    kv_dtype: torch.dtype = torch.float32,
    conv_dtype: torch.dtype | None = None,
) -> DecoderSignature:
    cfg = model.cfg
    specs = family_of(cfg).state_specs(cfg, cache_len, kv_dtype, conv_dtype)
    return DecoderSignature(specs, cfg.text.hidden_size, cfg.text.vocab_size)


def decoder_example_inputs(
    model: nn.Module,
    chunk: int,
    cache_len: int,
    kv_dtype: torch.dtype = torch.float32,
    conv_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing the decoder at chunk length `chunk` (zeros: values do not matter to export)."""
    sig = decoder_signature(model, cache_len, kv_dtype, conv_dtype)
    embeds = torch.zeros(1, chunk, sig.hidden_size)
    state = [torch.zeros(s.shape, dtype=s.dtype) for s in sig.state]
    positions = torch.arange(chunk).expand(POSITION_ROWS, chunk).contiguous()
    return (embeds, torch.tensor([0]), torch.tensor([chunk]), positions, *state)


def vision_position_example(cfg: Any, mode: str, length: int) -> np.ndarray:
    """Valid position ids of an L-patch slice for `mode`: int64 [L], or the family's [K, L] (a
    1 x L grid), whose last axis is the dynamic one."""
    custom = vision_mode(mode).position_ids
    if custom is None:
        return np.arange(length, dtype=np.int64)
    return custom(1, length, cfg.vision.num_patches_per_side)


def vision_tokens(cfg: Any, mode: str, length: int) -> int:
    """LLM tokens the vision graph of `mode` makes from an L-patch slice."""
    if vision_mode(mode).fixed_tokens:
        return cfg.query_num
    return length // family_of(cfg).vision_reduction[mode]


def vision_example_inputs(model: nn.Module, mode: str, length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches and position ids of an L-patch slice (L a multiple of 16)."""
    patch_dim = model.cfg.vision.patch_dim
    ids = vision_position_example(model.cfg, mode, length)
    return torch.zeros(length, patch_dim), torch.from_numpy(np.zeros_like(ids))
