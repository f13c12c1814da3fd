"""The `.pte` methods as exported programs: the three graphs of export/graphs.py, with decoder state in
mutable buffers.

ExecuTorch keeps state as mutable buffers of the program. `text_decoder` (embeddings in) and
`forward` (token ids in) are traced from the *same* module instance, so their buffers have the same
fully qualified names; `MemoryPlanningPass(share_mutable_buffers=True)` then places each buffer at
one address shared by every method. One method serves prefill and decode (T is dynamic), and a call
at start_pos 0 starts a new sequence (the state is per program, so a program runs one sequence at a
time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.export import Dim, ExportedProgram, export

from edge_runtime.families import family_of
from edge_runtime.processing.slicing import vision_mode
from export.graphs import POSITION_ROWS, StatefulDecoder, TokenEmbeddingGraph

from .custom_ops import attention_ops, delta_rule_op, fresh_state_at_position_zero
from .norms import delegable_norms

# Method names and signatures are those of ExecuTorch's LLM runners (extension/llm/runner:
# constants.h, multimodal_prefiller.cpp, multimodal_decoder_runner.h, text_decoder_runner.cpp), so
# the stock MultimodalRunner / TextLLMRunner (and Android's LlmModule over them) drive the program
# unchanged, and our backend calls the very same methods:
#   token_embedding(ids [1, T]) -> [1, T, D]
#   text_decoder(embeds [1, T, D], start_pos [1]) -> logits [1, V] of the last position
#   forward(tokens [1, T], start_pos [1]) -> logits [1, V] (TextLLMRunner: token_embedding + text_decoder)
# Families whose RoPE positions are not the cache index (Family.rope_positions "canvas", MiniCPM-V
# 4.7) add one input to `text_decoder`:
#   text_decoder(embeds [1, T, D], start_pos [1], position_ids int64 [3, T]) -> logits [1, V]
# (the host's Canvas M-RoPE rows; the cache slots still follow start_pos), so the stock
# MultimodalRunner, which cannot compute the rows, fails on the input count instead of answering
# with wrong positions. Their `forward` keeps the stock signature: a text-only prompt's canvas rows
# are the cache index, which is what it rotates by, so the TextLLMRunner stays correct.
# T is dynamic (1 .. max_seq_len) for prefill and decode alike; a call at start_pos 0 starts a new
# sequence (the DeltaNet state is reset inside the program).
#   vision_encoder(image uint8 [1, 3, H, W]) -> [1, N, D] for one slice in the checkpoint's default
#     downsample mode; the other mode as `vision_encoder_<mode>`. H, W multiples of 14 x 4 (16x) or
#     14 x 2 (4x), at least two such units per side; normalisation, patchify (window-major) and
#     position ids happen in the graph.
VISION_METHOD = "vision_encoder"


def vision_methods(default_mode: str, modes: Iterable[str]) -> dict[str, str]:
    """Downsample mode -> method name: the runner's `vision_encoder` is the default mode."""
    return {m: VISION_METHOD if m == default_mode else f"{VISION_METHOD}_{m}" for m in modes}


TOKEN_EMBEDDING = "token_embedding"
DECODER = "text_decoder"
FORWARD = "forward"


def buffer_name(state_name: str) -> str:
    """Buffer names cannot contain dots: `layers.3.k_cache` -> `state_layers_3_k_cache`."""
    return "state_" + state_name.replace(".", "_")


def stateful_decoder(model: nn.Module, cache_len: int, seq_major_cache: bool = False) -> StatefulDecoder:
    """The decoder as ExecuTorch's runners call it: `embeds` [1, T, D] (token ids when `from_tokens`:
    the `forward` method) and `start_pos` [1] (plus `position_ids` [3, T] for canvas families), state
    in mutable buffers (not persistent: the program holds no initial state), a call at start_pos 0
    starting a new sequence (custom_ops.fresh_state_at_position_zero), and with `seq_major_cache` the
    KV layout ExecuTorch's cache kernels update in place."""
    family = family_of(model.cfg)
    specs = family.state_specs(model.cfg, cache_len)
    return StatefulDecoder(
        model,
        specs,
        buffer_name,
        seq_major_cache=seq_major_cache,
        fresh_at_zero=fresh_state_at_position_zero,
        persistent=False,
        position_rows=family.rope_positions == "canvas",
    )


class TokenEmbedding(TokenEmbeddingGraph):
    """ids [1, T] -> [1, T, D], as the multimodal runner calls it."""


class ImageSliceEncoder(nn.Module):
    """One slice as ExecuTorch's MultimodalRunner passes an image: uint8 [1, 3, H, W] (CHW, as its
    `Image` is laid out) -> [1, N, D] LLM-space embeddings.

    The host steps of processing/ done in the graph, bit for bit: normalisation through the host's
    own 256-entry table per channel (image.normalize), patches flattened (c, y, x) and reordered
    window-major (patches.window_order), position ids as patches.position_ids computes them
    (bucketize(arange(h) / h, right=True) as a count of boundaries <= value)."""

    def __init__(self, model: nn.Module, mode: str, mean, std, rescale: float):
        super().__init__()
        self.model, self.mode = model, mode
        self.patch = model.cfg.vision.patch_size
        self.side = model.cfg.vision.num_patches_per_side
        levels = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
        m = np.asarray(mean, dtype=np.float32).reshape(3, 1)
        sd = np.asarray(std, dtype=np.float32).reshape(3, 1)
        table = ((levels[None, :] - m) / sd).reshape(-1)  # [3 * 256], channel-major
        self.register_buffer("table", torch.from_numpy(np.ascontiguousarray(table)), persistent=False)
        self.register_buffer(
            "offsets", torch.arange(3, dtype=torch.int64).reshape(1, 3, 1, 1) * 256, persistent=False
        )
        n = self.side
        self.register_buffer(
            "boundaries", torch.arange(1 / n, 1.0, 1 / n, dtype=torch.float32), persistent=False
        )

    def _buckets(self, length: int) -> torch.Tensor:
        steps = torch.arange(length, dtype=torch.float32)
        values = steps / (steps[-1:] + 1.0)
        return (values[:, None] >= self.boundaries[None, :]).sum(dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        p = self.patch
        height, width = image.shape[2], image.shape[3]
        h, w = height // p, width // p
        pixels = self.table[(image.to(torch.int64) + self.offsets).reshape(-1)].reshape(3, height, width)
        # row-major patches [h, w, 3 * p * p], each flattened (c, y, x)
        grid = pixels.reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h, w, 3 * p * p)
        custom = vision_mode(self.mode).graph_position_ids
        if custom is not None:  # the family's own ids; its vision merges nothing (row-major patches)
            ids = custom(h, w, self.boundaries, self.side)
            return self.model.encode_slice(grid.reshape(h * w, 3 * p * p), ids, self.mode).unsqueeze(0)
        ids = (self._buckets(h)[:, None] * self.side + self._buckets(w)[None, :])[:, :, None]
        # window-major: group 2 x 2 neighbours once (4x) or twice (16x: 2 x 2 windows of 2 x 2
        # patches); at most 5 dims per step, XNNPACK's limit is 6
        for _ in range(2 if self.mode == "16x" else 1):
            grid, ids = _group_2x2(grid), _group_2x2(ids)
        patches = grid.reshape(h * w, 3 * p * p)
        return self.model.encode_slice(patches, ids.reshape(h * w), self.mode).unsqueeze(0)


def _group_2x2(grid: torch.Tensor) -> torch.Tensor:
    """[R, C, F] -> [R/2, C/2, 4 F]: each 2 x 2 block of cells becomes one cell, its four cells
    row-major inside (patches.window_order applied one level at a time)."""
    rows, cols, feat = grid.shape
    blocks = grid.reshape(rows // 2, 2, cols // 2, 2, feat).permute(0, 2, 1, 3, 4)
    return blocks.reshape(rows // 2, cols // 2, 4 * feat)


def max_slice_side(model: nn.Module, scale_resolution: int) -> int:
    """Most patches per side of a slice the vision methods take: twice a square slice's side (896 px
    at scale_resolution 448, i.e. source views up to about 4:1). Memory planning sizes the vision
    activations for this side squared (the graph's two dims are bounded separately)."""
    return 2 * (scale_resolution // model.cfg.vision.patch_size)


def max_seq_len(chunk: int, max_context: int) -> int:
    """Most tokens one decoder call takes (the runners' `get_max_seq_len`): the TextLLMRunner
    splits a longer prompt into calls of this many; the MultimodalRunner sends each input (a text,
    a slice's embeddings) in one call. Memory planning sizes every activation for it, so it is kept
    at 512 (a 4x slice of the largest size is 512 tokens) unless the context is shorter."""
    return max(chunk, min(max_context, PREFILL_BOUND))


PREFILL_BOUND = 512


def export_methods(
    model: nn.Module,
    cache_len: int,
    max_side: int,
    max_tokens: int,
    default_mode: str,
    normalisation: tuple,
    delta_rule: bool = True,
    attention_kernels: bool = False,
) -> dict[str, ExportedProgram]:
    """torch.export every method. Vision has dynamic H, W (multiples of 14 x 4 / 14 x 2, at most
    `max_side` patches each; `normalisation` = (mean, std, rescale) of the preprocessor); token
    embedding and both decoder methods a dynamic T in 1 .. max_tokens. The decoder methods call
    ExecuTorch's gated delta rule kernel (a dynamic T leaves no room for our chunk loop) and, with
    `attention_kernels`, its cache-update and SDPA kernels (custom_ops.py)."""
    if not delta_rule:
        raise ValueError("the ExecuTorch decoder needs llama::gated_delta_rule (its T is dynamic)")
    model = model.eval()
    d = model.cfg.text.hidden_size
    programs: dict[str, ExportedProgram] = {}
    with torch.no_grad(), delegable_norms(model):
        p = model.cfg.vision.patch_size
        family = family_of(model.cfg)
        for mode, name in vision_methods(default_mode, family.vision_modes).items():
            unit = math.isqrt(family.vision_reduction[mode])  # patches per side merged into one LLM token
            # at least two merge units per side: torch.export specialises a size of 1
            rows = Dim(f"rows_{mode}", min=2, max=max_side // unit)
            cols = Dim(f"cols_{mode}", min=2, max=max_side // unit)
            encoder = ImageSliceEncoder(model, mode, *normalisation)
            example = torch.zeros(1, 3, 2 * unit * p, 3 * unit * p, dtype=torch.uint8)
            programs[name] = export(
                encoder, (example,), dynamic_shapes=({2: unit * p * rows, 3: unit * p * cols},)
            )
        t = Dim("tokens", min=1, max=max_tokens)
        ids = torch.zeros(1, 4, dtype=torch.int64)
        programs[TOKEN_EMBEDDING] = export(TokenEmbedding(model), (ids,), dynamic_shapes=({1: t},))
        decoder = stateful_decoder(model, cache_len, seq_major_cache=attention_kernels)
        start = torch.tensor([0])
        with delta_rule_op(True), attention_ops(attention_kernels):
            embeds = torch.zeros(1, 4, d)
            if decoder.position_rows:  # text_decoder(embeds, start_pos, position_ids): no n_valid
                rows = torch.arange(4).expand(POSITION_ROWS, 4).contiguous()
                programs[DECODER] = export(
                    decoder,
                    (embeds, start),
                    {"position_ids": rows},
                    dynamic_shapes={"embeds": {1: t}, "start_pos": None, "position_ids": {1: t}},
                )
            else:
                programs[DECODER] = export(decoder, (embeds, start), dynamic_shapes=({1: t}, None))
            decoder.from_tokens = True
            programs[FORWARD] = export(decoder, (ids, start), dynamic_shapes=({1: t}, None))
            decoder.from_tokens = False
    return programs
