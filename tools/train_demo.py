"""Train the embedded demo model: a small MiniCPM-V 4.6 on the synthetic task of edge_runtime.demo_task.

From scratch, on CPU, reproducibly from --seed, in three phases: the decoder alone on oracle image
features (`OracleFeatures`), the vision tower alone on dense "sheets" (demo_task.make_sheet) with
training-only probes and a pull onto the oracle codes, then question answering end to end.
Every question-answering input is built exactly as
`Session.prepare` builds it at inference (our slicing, `slice_to_patches`, the checkpoint's chat
template and placeholder expansion), then the answer and `<|im_end|>` are appended and the loss is
taken on those tokens only (teacher forcing). Samples alternate between 16x and 4x mode in blocks
of ten, so both downsample modes are trained. The result is a normal Hugging Face-format
checkpoint (fp16 safetensors + our tokenizer + side files).

    python tools/train_demo.py --out edge_runtime/data/demo-checkpoint --seed 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.checkpoint import load_checkpoint, save_checkpoint, tensor_generator  # noqa: E402
from edge_runtime.demo_task import (  # noqa: E402
    COLOURS,
    DEFAULT_SEED,
    EVAL,
    SHAPES,
    TRAIN,
    Sample,
    _Object,
    eval_samples,
    make_conversation,
    make_sample,
    make_scene,
    make_sheet,
)
from edge_runtime.init_checkpoint import write_side_files  # noqa: E402
from edge_runtime.models import qwen35_text  # noqa: E402
from edge_runtime.models.blocks import apply_partial_rope, gelu_tanh, rope_cos_sin  # noqa: E402
from edge_runtime.models.minicpm_v46 import MiniCPMV46, MiniCPMV46Config  # noqa: E402
from edge_runtime.models.qwen35_text import TextConfig, chunked_delta_rule, l2norm  # noqa: E402
from edge_runtime.models.siglip_navit import VisionConfig  # noqa: E402
from edge_runtime.processing.patches import slice_to_patches  # noqa: E402
from edge_runtime.processing.prompt import ImageLayout, PromptBuilder  # noqa: E402
from edge_runtime.processing.slicing import SliceConfig, merge_factor, slice_image  # noqa: E402
from edge_runtime.processing.tokenizer import Tokenizer  # noqa: E402
from edge_runtime.tokenizer_build import build_tokenizer_files  # noqa: E402

SCALE_RESOLUTION = 168  # 12x12 patches per full slice: 9 LLM tokens in 16x mode, 36 in 4x
MAX_SLICE_NUMS = 4
MODES = ("16x", "4x")
EXTRA_TEXT_OFFSET = 10_000_000
NUMBER_OFFSET = 20_000_000  # train-split indices of the vision phase's extra number images
# bfloat16 autocast for the vision tower's training forward (--vision-bf16 / --qa-vision-bf16):
# 1.4-1.5x faster vision steps on CPUs with AVX512-BF16; weights, optimizer and features stay fp32.
VISION_BF16 = False
FOLLOW_UP = "\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def demo_config(
    vocab_size: int,
    image_token_id: int,
    video_token_id: int,
    text_hidden: int = 128,
    full_attention: tuple[int, ...] = (2, 5),
    image_size: int = 980,
) -> MiniCPMV46Config:
    """The demo preset: `tiny`'s structure, wider. Vision: 4 SigLIP layers, window merger after
    layer 1. LLM: 6 layers of Gated DeltaNet, gated full attention at the `full_attention` layers;
    heads of 32 dimensions, as many as `text_hidden` holds (key/value heads: 2)."""
    # image_size / 14 patches a side of position table: 70x70 upstream; the demo's slices are at
    # most ~13 patches a side and NaViT buckets positions into whatever table the checkpoint has,
    # so 448 (32x32) would save 0.5 M parameters.
    vision = VisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
    )
    heads = text_hidden // 32
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=6,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=heads,
        linear_num_value_heads=heads,
        layer_types=["full_attention" if i in full_attention else "linear_attention" for i in range(6)],
    )
    return MiniCPMV46Config(
        vision=vision,
        text=text,
        insert_layer_id=1,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
    )


def write_assets(out: Path, **arch) -> dict:
    """Tokenizer, chat template, generation + preprocessor config: the host files of the checkpoint."""
    tok = build_tokenizer_files(out)
    ids = tok["token_ids"]
    cfg = demo_config(tok["vocab_size"], ids["<|image_pad|>"], ids["<|video_pad|>"], **arch)
    write_side_files(out, cfg, tok["stop_token_ids"], tok["pad_token_id"])
    pre_path = out / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pre.update(scale_resolution=SCALE_RESOLUTION, max_slice_nums=MAX_SLICE_NUMS)
    pre_path.write_text(json.dumps(pre, indent=2) + "\n")
    return tok


@dataclass
class Encoded:
    """One training example as the model consumes it."""

    ids: torch.Tensor  # [T] prompt + answer + <|im_end|> (+ follow-up turns)
    answer_start: int  # first answer token of the first turn (the one eval asks)
    answer_end: int  # one past its <|im_end|>
    targets: torch.Tensor  # [T] next-token targets, -100 outside answers
    slices: list[tuple[torch.Tensor, torch.Tensor]]
    mode: str
    qtype: str
    lang: str = ""
    aux: torch.Tensor | None = None  # [tokens of the source view, 2]: colour, shape/digit class (0 = none)
    digits: torch.Tensor | None = None  # [2] the two digits of a number image
    digit_map: torch.Tensor | None = None  # [tokens of the source view]: 0 ink-free, 1+d first, 11+d second
    digit_left: torch.Tensor | None = None  # [tokens of the source view]: share of ink left of the middle
    lookup: torch.Tensor | None = None  # [T, 6]: what a question names (see LOOKUP_CLASSES), -100 elsewhere
    grid: tuple[int, int] | None = None  # (rows, cols) of the source view's LLM tokens
    source_start: int = 0  # sequence position of the source view's first image token
    answer_objects: list[tuple[int, list[int]]] | None = None  # (position before an answer, colours named)
    # (position before an answer, (row, col) of the first and of the second object named) for every
    # turn whose question names two objects (the position questions)
    answer_places: list[tuple[int, tuple[int, int, int, int]]] | None = None


def scene_targets(size: tuple[int, int], token_grid: tuple[int, int], objects: list[_Object]) -> torch.Tensor:
    """Per LLM token of the source view (row-major): (colour + 1, shape + 1) of the object that
    covers the token's centre or whose centre lies in the token's cell; (0, 0) for background."""
    width, height = size
    rows, cols = token_grid
    out = torch.zeros(rows * cols, 2, dtype=torch.long)
    for r in range(rows):
        for c in range(cols):
            px, py = (c + 0.5) * width / cols, (r + 0.5) * height / rows
            for o in objects:
                if abs(px - o.cx) <= o.size / 2 and abs(py - o.cy) <= o.size / 2:
                    out[r * cols + c] = torch.tensor([o.colour + 1, o.shape + 1])
    for o in objects:
        c, r = min(int(o.cx * cols / width), cols - 1), min(int(o.cy * rows / height), rows - 1)
        out[r * cols + c] = torch.tensor([o.colour + 1, o.shape + 1])
    return out


def digit_targets(image, token_grid: tuple[int, int], answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per LLM token of the source view (row-major), from one scan of the ink: the digit label (0
    where the token's cell holds no ink, else 1 + first digit if the cell's ink lies mostly left of
    the number's horizontal middle, 11 + second digit if right of it) and the share of the cell's
    ink left of the middle (-1 where it holds none). Ink is found from the pixels (dark on a light
    background), so the generator is untouched."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    ink = gray < 140
    rows, cols = token_grid
    labels = torch.zeros(rows * cols, dtype=torch.long)
    left_share = torch.full((rows * cols,), -1.0)
    ys, xs = np.nonzero(ink)
    if xs.size == 0:
        return labels, left_share
    mid = 0.5 * (xs.min() + xs.max() + 1)
    height, width = gray.shape
    first, second = int(answer[0]), int(answer[1])
    for r in range(rows):
        y0, y1 = int(r * height / rows), int((r + 1) * height / rows)
        for c in range(cols):
            x0, x1 = int(c * width / cols), int((c + 1) * width / cols)
            cell = ink[y0:y1, x0:x1]
            if cell.sum() < 0.03 * cell.size:
                continue
            cell_xs = x0 + np.nonzero(cell)[1]
            labels[r * cols + c] = 1 + first if cell_xs.mean() < mid else 11 + second
            left_share[r * cols + c] = float((cell_xs < mid).mean())
    return labels, left_share


# colour, shape, grid row, grid column of a named object; first and second digit of a number image
GRID_CELLS = 4  # at most this many placement rows and columns (demo_task._grid)
LOOKUP_CLASSES = (len(COLOURS), len(SHAPES), GRID_CELLS, GRID_CELLS, 10, 10)


def named_objects(question: str, lang: str, objects: list[_Object]) -> list[tuple[int, _Object]]:
    """(end offset in `question`, object) for every object the question names, in question order:
    by its full name ("red circle") where the question has it, else by its one unique attribute
    ("the circle", "the red object"); every object of a task image has a distinct colour."""
    en = lang == "en"
    found = []
    for o in objects:
        colour, shape = COLOURS[o.colour][0 if en else 1], SHAPES[o.shape][0 if en else 1]
        full = f"{colour} {shape}" if en else f"{colour}{shape}"
        for key in (full, colour, shape):
            at = question.find(key)
            if at >= 0 and (key != shape or sum(p.shape == o.shape for p in objects) == 1):
                found.append((at + len(key), o))
                break
    return sorted(found, key=lambda f: f[0])


def find_tokens(seq: list[int], ids: list[int], start: int = 0) -> int | None:
    """Index of the first occurrence of `ids` in `seq` at or after `start` (None if absent)."""
    return next((i for i in range(start, len(seq) - len(ids) + 1) if seq[i : i + len(ids)] == ids), None)


def lookup_targets(
    tokenizer: Tokenizer, seq: list[int], questions: list[tuple[str, str]], objects: list[_Object]
) -> torch.Tensor:
    """Per sequence position: (colour, shape, row, col) of the object the question named most
    recently, from the token that completes its name to the question's last token; -100 elsewhere.

    A training-only signal for the decoder: "what shape is the red object" needs the model to find
    the red object among the image tokens. Supervising the looked-up attributes where the name is
    read gives that lookup a direct gradient instead of one through the whole answer path."""
    out = torch.full((len(seq), len(LOOKUP_CLASSES)), -100, dtype=torch.long)
    cursor = 0
    for question, lang in questions:
        q_ids = tokenizer.encode(question)
        start = find_tokens(seq, q_ids, cursor)
        if start is None:
            continue
        cursor = start + len(q_ids)
        for end, o in named_objects(question, lang, objects):
            first = next(
                k
                for k in range(1, len(q_ids) + 1)
                if len(tokenizer.decode(q_ids[:k]).rstrip("\ufffd")) >= end
            )
            out[start + first - 1 : cursor, :4] = torch.tensor([o.colour, o.shape, o.row, o.col])
    return out


def reading_targets(tokenizer: Tokenizer, seq: list[int], question: str, answer: str) -> torch.Tensor:
    """The number image's counterpart of `lookup_targets`: its two digits at every token of the
    question, so the decoder is taught to read them out of the image tokens before it answers."""
    out = torch.full((len(seq), len(LOOKUP_CLASSES)), -100, dtype=torch.long)
    q_ids = tokenizer.encode(question)
    start = find_tokens(seq, q_ids)
    out[start : start + len(q_ids), 4:] = torch.tensor([int(answer[0]), int(answer[1])])
    return out


class Encoder:
    """Sample -> model inputs, through the same host code as Session.prepare."""

    def __init__(self, assets: Path, pair_every_answer_token: bool = False):
        self.tokenizer = Tokenizer(assets)
        pre = json.loads((assets / "preprocessor_config.json").read_text())
        self.configs = {m: SliceConfig.from_preprocessor_config(pre, downsample_mode=m) for m in MODES}
        self.prompts = PromptBuilder.from_dir(
            assets, self.tokenizer, use_image_id=self.configs["16x"].use_image_id
        )
        self.im_end = self.tokenizer.im_end_id
        self.image_token_id = self.tokenizer.token_to_id("<|image_pad|>")
        # Answers of several tokens (左边 / 右边 are three, with the same first byte token) are decided
        # after their first token: the pair probe can read every position that predicts one.
        self.pair_every_answer_token = pair_every_answer_token

    def __call__(
        self,
        sample: Sample,
        mode: str,
        num_patches_per_side: int,
        follow_up: list[tuple[str, str, str]] = (),
        objects: list[_Object] | None = None,
    ) -> Encoded:
        config = self.configs[mode]
        prepared = slice_image(sample.image, config)
        layout = ImageLayout(prepared.token_counts[0], prepared.grid, list(prepared.token_counts[1:]))
        prompt = self.prompts.chat(sample.question, [layout])
        seq = list(prompt.ids)
        spans = []
        for k, (question, answer) in enumerate(
            [(sample.question, sample.answer)] + [f[:2] for f in follow_up]
        ):
            if k:  # a follow-up turn, as a chat app that keeps its cache continues the conversation
                seq += self.tokenizer.encode(FOLLOW_UP.format(question=question))
            start = len(seq)
            seq += self.tokenizer.encode(answer) + [self.im_end]
            spans.append((start, len(seq)))
        ids = torch.tensor(seq, dtype=torch.long)
        targets = torch.full_like(ids, -100)
        for start, end in spans:
            targets[start - 1 : end - 1] = ids[start:end]
        slices = self._patches(prepared, mode, num_patches_per_side)
        ex = Encoded(ids, spans[0][0], spans[0][1], targets, slices, mode, sample.qtype, sample.lang)
        if objects is not None:
            ex.grid = source_token_grid(prepared, mode)
            ex.aux = scene_targets(sample.image.size, ex.grid, objects)
            asked = [(sample.question, sample.lang)] + [(f[0], sample.lang) for f in follow_up]
            ex.lookup = lookup_targets(self.tokenizer, seq, asked, objects)
            ex.source_start = seq.index(self.image_token_id)
            ex.answer_objects, ex.answer_places = [], []
            for (start, end), (q, lang) in zip(spans, asked, strict=True):
                named = [o for _, o in named_objects(q, lang, objects)]
                ex.answer_objects.append((start - 1, [o.colour for o in named]))
                if len(named) == 2:
                    places = (named[0].row, named[0].col, named[1].row, named[1].col)
                    # every position that predicts an answer token (not the stop token), or the first
                    last = end - 2 if self.pair_every_answer_token else start
                    ex.answer_places += [(pos, places) for pos in range(start - 1, last)]
        elif sample.qtype == "text":
            ex.digits = torch.tensor([int(d) for d in sample.answer[:2]])
            ex.lookup = reading_targets(self.tokenizer, seq, sample.question, sample.answer)
            ex.grid = source_token_grid(prepared, mode)
            ex.digit_map, ex.digit_left = digit_targets(sample.image, ex.grid, sample.answer)
            ex.source_start = seq.index(self.image_token_id)
        return ex

    def vision_only(self, image, objects: list[_Object], mode: str, num_patches_per_side: int) -> Encoded:
        """A sheet for the vision probes alone: slices and per-token targets, no text."""
        prepared = slice_image(image, self.configs[mode])
        empty = torch.zeros(0, dtype=torch.long)
        ex = Encoded(empty, 0, 0, empty, self._patches(prepared, mode, num_patches_per_side), mode, "sheet")
        ex.grid = source_token_grid(prepared, mode)
        ex.aux = scene_targets(image.size, ex.grid, objects)
        return ex

    def _patches(
        self, prepared, mode: str, num_patches_per_side: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every slice as the vision graph's (patches, position ids), window-major."""
        patch_size = self.configs[mode].patch_size
        return [
            tuple(torch.from_numpy(a) for a in slice_to_patches(s, mode, patch_size, num_patches_per_side))
            for s in prepared.slices
        ]


def source_token_grid(prepared, mode: str) -> tuple[int, int]:
    """(rows, cols) of LLM tokens of the source view: its patch grid over the merge factor."""
    m = merge_factor(mode)
    h, w = prepared.patch_grids[0]
    return h // m, w // m


def sample_mode(index: int) -> str:
    """Blocks of ten samples (one of each question type x language) alternate 16x / 4x."""
    return MODES[(index // 10) % 2]


def train_item(k: int, extra: int = 2, numbers_16x: float | None = None) -> tuple[int, str]:
    """The k-th training conversation: (train-split index, downsample mode).

    Blocks of 10 + `extra`: the 10 samples of one balanced block, plus `extra` more digit-reading
    images (alternately en, zh) from a separate index range, because those images carry one
    question where shape images carry several. Consecutive blocks alternate 16x / 4x; with
    `numbers_16x` the extra number images instead take 16x at that share (`spread_mode`).
    """
    block, pos = divmod(k, 10 + extra)
    mode = MODES[block % 2]
    if pos < 10:
        return block * 10 + pos, mode
    if numbers_16x is not None:
        mode = spread_mode(block * extra + pos - 10, numbers_16x)
    return EXTRA_TEXT_OFFSET + block * 5 * extra + 5 * (pos - 10) + 4, mode


def spread_mode(n: int, share_16x: float) -> str:
    """Mode of the n-th of a stream of images of which `share_16x` are 16x, evenly spread."""
    return MODES[0] if int((n + 1) * share_16x) > int(n * share_16x) else MODES[1]


def qa_start_item(k: int, extra: int, qa_extra: int) -> int:
    """First conversation of the question-answering phase when it lays out blocks with `qa_extra`
    number images where the earlier phases used `extra`: the first block of the new layout past
    every block the earlier phases started, so no train-split scene or number image is reused."""
    blocks_started = -(-k // (10 + extra))
    # number images of block b are indices from EXTRA_TEXT_OFFSET + 5 * extra * b on
    block = max(blocks_started, -(-blocks_started * extra // max(qa_extra, 1)))
    return block * (10 + qa_extra)


def init_model(cfg: MiniCPMV46Config, seed: int) -> MiniCPMV46:
    """PyTorch default init, then small embeddings, neutral norms and upstream-like DeltaNet decays."""
    torch.manual_seed(seed)
    model = MiniCPMV46(cfg)
    with torch.no_grad():
        model.language_model.embed_tokens.weight.normal_(0.0, 0.02)
        model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, 0.02)
        # Image features enter the LLM's residual stream next to token embeddings: start them at
        # the same scale, or the decoder learns to ignore them (seen with default init: 10x larger).
        model.merger.mlp[0].linear_2.weight.normal_(0.0, 0.02 / math.sqrt(cfg.vision.hidden_size))
        model.merger.mlp[0].linear_2.bias.zero_()
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(demo_decay_init(name, tuple(param.shape), seed))
    return model


def demo_decay_init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A_log as the demo recipe has always drawn it: A uniform in [1, 16] (fast decay) from the
    tensor's own stream, after the noise draw `random_init` makes first. `init-checkpoint` now draws
    slow decays too (issue 26); the demo recipe keeps its law so it stays the recipe it was tuned as."""
    gen = tensor_generator(name, seed)
    torch.randn(shape, generator=gen)
    return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()


def forward_logits(model: MiniCPMV46, ex: Encoded) -> torch.Tensor:
    """Logits predicting the first answer (and its <|im_end|>) with the model's own forward."""
    features = torch.cat([model.encode_slice(p, pos, ex.mode) for p, pos in ex.slices])
    embeds = model.embed(ex.ids)
    mask = (ex.ids == model.cfg.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, features)
    t = ex.ids.shape[0]
    state = model.new_state(t)
    hidden, _ = model.language_model(embeds[None], torch.tensor([0]), torch.tensor([t]), state)
    return model.lm_head(hidden[0, ex.answer_start - 1 : ex.answer_end - 1])


# ---- batched training forward ------------------------------------------------------------------
# The model's entry points take one slice / one sequence (batch 1, as the graphs do). Training runs
# the same modules on a padded batch: slices are padded with whole masked windows, sequences on the
# right (causal attention, causal conv and the causal delta rule never look right), so every real
# position computes the same function as the batch-1 path; `check_batched` verifies this.


def _masked_attention(attn: torch.nn.Module, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """BidirectionalAttention over [B, L, D] with padded keys masked out."""
    b, t, d = x.shape
    shape = (b, t, attn.num_heads, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (attn.head_dim**-0.5)
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, t, d)
    return attn.out_proj(out)


def vision_batched(
    model: MiniCPMV46, slices: list[tuple[torch.Tensor, torch.Tensor]], mode: str
) -> list[torch.Tensor]:
    """encode_slice for many slices of one mode at once -> per-slice [L/16 or L/4, D_llm]."""
    lengths = [p.shape[0] for p, _ in slices]
    longest = max(lengths)
    patches = torch.stack([F.pad(p, (0, 0, 0, longest - p.shape[0])) for p, _ in slices])
    positions = torch.stack([F.pad(pos, (0, longest - pos.shape[0])) for _, pos in slices])
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=VISION_BF16):
        out = _tower_batched(model, patches, positions, valid, mode)
    div = 16 if mode == "16x" else 4
    return [out[i, : n // div].float() for i, n in enumerate(lengths)]


@contextlib.contextmanager
def vision_bf16(enabled: bool) -> Iterator[None]:
    """VISION_BF16 set to `enabled` inside the block, restored after it."""
    global VISION_BF16
    saved, VISION_BF16 = VISION_BF16, enabled
    try:
        yield
    finally:
        VISION_BF16 = saved


def _tower_batched(
    model: MiniCPMV46, patches: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, mode: str
) -> torch.Tensor:
    """Vision tower and merger over a padded batch of slices -> [B, L/16 or L/4, D_llm]."""
    tower = model.vision_tower
    x = tower.embeddings(patches, positions)
    insert_at = tower.cfg.insert_layer_id if mode == "16x" else -1
    for index, layer in enumerate(tower.encoder.layers):
        x = x + _masked_attention(layer.self_attn, layer.layer_norm1(x), valid)
        x = x + layer.mlp(layer.layer_norm2(x))
        if index == insert_at:
            merger = tower.vit_merger
            b, t, d = x.shape
            windows = x.reshape(b, t // 4, 4, d)
            windows = windows + merger.self_attn(merger.layer_norm1(windows))
            flat = windows.reshape(b, t // 4, 4 * d)
            x = merger.linear_2(gelu_tanh(merger.linear_1(merger.pre_norm(flat)))) + windows.mean(dim=2)
            valid = valid[:, ::4]
    x = tower.post_layernorm(x)
    b, t, d = x.shape
    return model.merger.mlp[0](x.reshape(b, t // 4, 4 * d))


def _attention_batched(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """GatedAttention over a whole right-padded batch from position 0 (no cache)."""
    b, t, _ = x.shape
    q, gate = torch.chunk(attn.q_proj(x).view(b, t, attn.n_heads, 2 * attn.head_dim), 2, dim=-1)
    gate = gate.reshape(b, t, attn.n_heads * attn.head_dim)
    q = attn.q_norm(q).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(b, t, attn.n_kv, attn.head_dim)).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    groups = attn.n_heads // attn.n_kv
    keys, values = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * (attn.head_dim**-0.5)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    out = (probs @ values).transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim)
    return attn.o_proj(out * torch.sigmoid(gate)), probs


def _deltanet_batched(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GatedDeltaNet over a right-padded batch from a zero state (chunked form)."""
    b, t, _ = x.shape
    mixed = net.in_proj_qkv(x).transpose(1, 2)
    conv = F.silu(F.conv1d(F.pad(mixed, (net.kernel - 1, 0)), net.conv1d.weight, groups=net.conv_dim))
    q, k, v = torch.split(conv.transpose(1, 2), [net.key_dim, net.key_dim, net.n_v * net.d_v], dim=-1)
    q = q.reshape(b, t, net.n_k, net.d_k)
    k = k.reshape(b, t, net.n_k, net.d_k)
    v = v.reshape(b, t, net.n_v, net.d_v)
    if net.n_v != net.n_k:
        q = q.repeat_interleave(net.n_v // net.n_k, dim=2)
        k = k.repeat_interleave(net.n_v // net.n_k, dim=2)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))
    q = l2norm(q) * (net.d_k**-0.5)
    k = l2norm(k)
    beta = torch.sigmoid(net.in_proj_b(x)).transpose(1, 2)
    g = (-net.A_log.exp() * F.softplus(net.in_proj_a(x) + net.dt_bias)).transpose(1, 2)
    state = torch.zeros(b, net.n_v, net.d_k, net.d_v)
    out, _ = chunked_delta_rule(q, k, v, g, beta, state)
    z = net.in_proj_z(x).reshape(b, t, net.n_v, net.d_v)
    out = net.norm(out.transpose(1, 2), z).reshape(b, t, net.n_v * net.d_v)
    return net.out_proj(out)


def text_batched(
    model: MiniCPMV46, embeds: torch.Tensor, probs: dict | None = None, residuals: dict | None = None
) -> torch.Tensor:
    """language_model over [B, T, D] right-padded embeddings from position 0 -> normed hidden;
    attention probabilities [B, H, T, T] of every full-attention layer go into `probs` and the
    residual stream after every layer into `residuals`, by layer index, when given (the probes
    read them)."""
    lm = model.language_model
    cos, sin = rope_cos_sin(torch.arange(embeds.shape[1]), lm.inv_freq)
    x = embeds
    for index, layer in enumerate(lm.layers):
        h = layer.input_layernorm(x)
        if layer.kind == "full_attention":
            h, p = _attention_batched(layer.self_attn, h, cos, sin)
            if probs is not None:
                probs[index] = p
        else:
            h = _deltanet_batched(layer.linear_attn, h)
        x = x + h
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        if residuals is not None:
            residuals[index] = x
    return lm.norm(x)


def hidden_batched(
    model: MiniCPMV46,
    group: list[Encoded],
    return_features: bool = False,
    probs: dict | None = None,
    oracle: OracleFeatures | None = None,
    residuals: dict | None = None,
):
    """Vision + splice + decoder for examples of one downsample mode -> hidden [B, T_max, D]
    (and the image features per slice when asked; `probs` and `residuals`: see `text_batched`).
    With `oracle`, its features stand in for the vision tower's (features returned: None).

    Left alone, the image features grow a large constant component (the same vector on every
    image token, tens of times the per-image variation) and the decoder, which RMS-normalises
    its inputs, no longer sees image content. The mean penalty in `batch_loss` prevents that."""
    image_id = model.cfg.image_token_id
    if oracle is None:
        feats = vision_batched(model, [s for ex in group for s in ex.slices], group[0].mode)
        counts = np.cumsum([0] + [len(ex.slices) for ex in group])
        per_example = [torch.cat(feats[a:b]) for a, b in zip(counts[:-1], counts[1:], strict=True)]
    else:
        feats = None
        per_example = [oracle(ex, int((ex.ids == image_id).sum())) for ex in group]
    longest = max(ex.ids.shape[0] for ex in group)
    rows = []
    for ex, f in zip(group, per_example, strict=True):
        e = model.embed(ex.ids).masked_scatter((ex.ids == image_id).unsqueeze(-1), f)
        rows.append(F.pad(e, (0, 0, 0, longest - ex.ids.shape[0])))
    hidden = text_batched(model, torch.stack(rows), probs, residuals)
    return (hidden, feats) if return_features else hidden


def by_mode(batch: list[Encoded]) -> list[list[Encoded]]:
    groups: dict[str, list[Encoded]] = {}
    for ex in batch:
        groups.setdefault(ex.mode, []).append(ex)
    return list(groups.values())


class AuxHeads(torch.nn.Module):
    """Training-only probes on the image features (never saved): colour and shape of the object
    under each source-view token, and the two digits of a number image. They give the vision
    tower a dense signal from the first step; the decoder still learns to answer from scratch."""

    def __init__(self, dim: int, n_colours: int, n_shapes: int):
        super().__init__()
        self.colour = torch.nn.Linear(dim, n_colours + 1)
        self.shape = torch.nn.Linear(dim, n_shapes + 10 + 1)  # shapes, then sheet digits 0-9
        self.digits = torch.nn.Linear(dim, 20)
        self.digit_map = torch.nn.Linear(dim, 21)
        self.lookup = torch.nn.Linear(dim, sum(LOOKUP_CLASSES))
        self.where = torch.nn.Linear(dim, 2 * WHERE_BINS)
        self.feature_weight = 0.0  # see OracleFeatures
        self.where_weight = 0.0  # see where_targets
        self.oracle: OracleFeatures | None = None  # the codes `feature_weight` pulls features onto
        self.pair = torch.nn.Linear(
            dim, 4 * GRID_CELLS
        )  # see pair_terms (created last: the others' init is unchanged)


WHERE_BINS = 6


def where_targets(grid: tuple[int, int]) -> torch.Tensor:
    """Per source-view token (row-major): the bins of its centre's (row, column) in the image,
    WHERE_BINS per axis. Position questions compare where two objects are; this probe keeps each
    image feature's location linearly readable, which nothing else asks the vision tower for."""
    rows, cols = grid
    r = ((torch.arange(rows) + 0.5) * WHERE_BINS / rows).long()
    c = ((torch.arange(cols) + 0.5) * WHERE_BINS / cols).long()
    return torch.stack([r[:, None].expand(rows, cols), c[None, :].expand(rows, cols)], -1).reshape(-1, 2)


class OracleFeatures(torch.nn.Module):
    """Image features as the decoder would want them: per source-view token, the sum of a code for
    the colour and one for the shape or digit under it (`scene_targets` classes; a number image's
    digits use the sheet-digit codes) and codes for its row and column bins; one shared code for
    every tile token.

    Three uses: the decoder-oracle diagnostic (tools/decoder_oracle.py: a decoder trained on these
    learns colour binding in 500 steps), the `--oracle-steps` phase (the decoder learns the task on
    them first, the codes are then frozen) and the `--feature-weight` target that pulls the vision
    tower's features onto them."""

    def __init__(self, dim: int, n_colours: int, n_shapes: int, seed: int, ordinal: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.n_shapes = n_shapes
        self.blend_digits = False  # see source
        sizes = {
            "colour": n_colours + 1,
            "shape": n_shapes + 11,
            "row": WHERE_BINS,
            "col": WHERE_BINS,
            "tile": 1,
        }
        self.codes = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(torch.randn(n, dim, generator=gen)) for k, n in sizes.items()}
        )
        if ordinal:  # location bins on a line (one direction per axis): "left of" becomes a difference
            ramp = torch.linspace(-1.5, 1.5, WHERE_BINS)[:, None]
            for axis in ("row", "col"):
                self.codes[axis].data = ramp * torch.randn(1, dim, generator=gen)

    def source(self, ex: Encoded) -> torch.Tensor | None:
        """[tokens of the source view, dim], or None for an example without per-token labels."""
        if ex.grid is None or (ex.aux is None and ex.digit_map is None):
            return None
        where = where_targets(ex.grid)
        out = self.codes["row"][where[:, 0]] + self.codes["col"][where[:, 1]]
        if ex.aux is not None:
            return out + self.codes["colour"][ex.aux[:, 0]] + self.codes["shape"][ex.aux[:, 1]]
        # the empty colour's code gathered per token (as the shipped recipe's oracle phase learned it)
        out = out + self.codes["colour"][torch.zeros_like(ex.digit_map)]
        if self.blend_digits:  # a token with ink of both digits carries both codes, in proportion
            first, second = self.codes["shape"][self.n_shapes + 1 + ex.digits]
            share = ex.digit_left.clamp(min=0.0)[:, None]
            blend = share * first + (1.0 - share) * second
            return out + torch.where((ex.digit_left >= 0)[:, None], blend, self.codes["shape"][0])
        digit = torch.where(ex.digit_map > 0, self.n_shapes + 1 + (ex.digit_map - 1) % 10, 0)
        return out + self.codes["shape"][digit]

    def forward(self, ex: Encoded, n_image_tokens: int) -> torch.Tensor:
        """Features for every image token of `ex` (source view first, then tiles)."""
        source = self.source(ex)
        tiles = self.codes["tile"].expand(n_image_tokens - source.shape[0], -1)
        return torch.cat([source, tiles])


def attention_terms(
    group: list[Encoded], probs: dict, question_layer: int, answer_layer: int
) -> list[torch.Tensor]:
    """Where heads of the full-attention layers should look: -log of the attention mass a head
    puts on the source-view image tokens of the object in question.

    At `question_layer`, head 0 from every question token after an object's name (the
    `lookup_targets` range) to that object; at `answer_layer`, head k from the position that
    predicts an answer to the k-th object its question named (a position question names two:
    heads 0 and 1 keep the two locations apart, where one head looking at both would average
    them), and head 0 from the position before each digit of a number to that digit's ink.
    Binding a name to the image token that shows it is the step the answer loss alone did not
    teach in the training budget (answers stayed at "some colour in the picture": 62 % colour /
    69 % shape, chance-level positions); this supervises it directly."""
    terms = []
    for row, ex in enumerate(group):
        if ex.digit_map is not None and answer_layer in probs:
            # a number: the position before each digit of the answer looks at that digit's ink
            src = slice(ex.source_start, ex.source_start + ex.digit_map.shape[0])
            for k, (lo, hi) in enumerate(((1, 11), (11, 21))):
                mask = (ex.digit_map >= lo) & (ex.digit_map < hi)
                if bool(mask.any()):
                    mass = (probs[answer_layer][row, 0, ex.answer_start - 1 + k, src] * mask).sum()
                    terms.append(-torch.log(mass + 1e-6))
        if ex.aux is None or ex.lookup is None:
            continue
        colour_of_token = ex.aux[:, 0] - 1  # [source tokens], -1 background
        n = colour_of_token.shape[0]
        src = slice(ex.source_start, ex.source_start + n)
        if question_layer in probs:
            named = ex.lookup[:, 0]
            rows = (named != -100).nonzero().flatten()
            if rows.numel():
                mask = colour_of_token[None, :] == named[rows][:, None]
                mass = (probs[question_layer][row, 0, rows, src] * mask).sum(-1)
                terms.append(-torch.log(mass + 1e-6).mean())
        if answer_layer in probs and ex.answer_objects:
            for pos, colours in ex.answer_objects:
                for head, colour in enumerate(colours):  # head k looks at the k-th named object
                    mass = (probs[answer_layer][row, head, pos, src] * (colour_of_token == colour)).sum()
                    terms.append(-torch.log(mass + 1e-6))
    return terms


def lookup_terms(aux: AuxHeads, group: list[Encoded], tapped: torch.Tensor) -> list[torch.Tensor]:
    """Losses of the decoder lookup probe (see `lookup_targets`) on the tapped residual stream."""
    rows = [ex.lookup for ex in group if ex.lookup is not None]
    if not rows:
        return []
    longest = tapped.shape[1]
    target = torch.stack(
        [
            F.pad(ex.lookup, (0, 0, 0, longest - ex.lookup.shape[0]), value=-100)
            if ex.lookup is not None
            else torch.full((longest, len(LOOKUP_CLASSES)), -100, dtype=torch.long)
            for ex in group
        ]
    )
    keep = (target != -100).any(dim=-1)
    if not bool(keep.any()):
        return []
    x, target = tapped[keep], target[keep]
    logits = torch.split(aux.lookup(F.rms_norm(x, (x.shape[-1],))), LOOKUP_CLASSES, dim=-1)
    return [
        F.cross_entropy(part, target[:, i])
        for i, part in enumerate(logits)
        if bool((target[:, i] != -100).any())
    ]


def pair_terms(aux: AuxHeads, group: list[Encoded], residual: torch.Tensor) -> list[torch.Tensor]:
    """Where a position question's answer is predicted: the (row, col) placement cells of both
    objects it names, read by a linear probe from the residual stream after one decoder layer.

    "Is A left of B" needs both locations side by side before they can be compared; the answer
    loss alone did not teach the decoder to fetch them, even from perfect image features."""
    terms = []
    for row, ex in enumerate(group):
        for pos, places in ex.answer_places or ():
            x = residual[row, pos]
            logits = aux.pair(F.rms_norm(x, (x.shape[-1],))).view(4, GRID_CELLS)  # 2 objects x (row, col)
            terms.append(F.cross_entropy(logits, torch.tensor(places)))
    return terms


def probe_terms(aux: AuxHeads, group: list[Encoded], feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Probe losses on the source view of each example of one mode (`feats`: per slice)."""
    terms, k = [], 0
    for ex in group:
        source = feats[k]
        k += len(ex.slices)
        if ex.aux is not None:
            terms.append(F.cross_entropy(aux.colour(source), ex.aux[:, 0]))
            terms.append(F.cross_entropy(aux.shape(source), ex.aux[:, 1]))
        if aux.where_weight > 0 and ex.grid is not None:
            where = aux.where(source).view(-1, 2, WHERE_BINS)
            terms.append(aux.where_weight * F.cross_entropy(where.transpose(1, 2), where_targets(ex.grid)))
        if ex.digits is not None:
            terms.append(F.cross_entropy(aux.digits(source.mean(0)).view(2, 10), ex.digits))
        if ex.digit_map is not None:
            terms.append(F.cross_entropy(aux.digit_map(source), ex.digit_map))
        if aux.feature_weight > 0 and aux.oracle is not None:
            target = aux.oracle.source(ex)
            if target is not None:
                terms.append(aux.feature_weight * F.mse_loss(source, target))
    return terms


def vision_loss(model: MiniCPMV46, aux: AuxHeads, images: list[Encoded]) -> torch.Tensor:
    """Mean probe loss over images (sheets or task images): trains the vision tower and merger
    without running the decoder, so a step costs a fraction of a question-answering step."""
    terms = []
    for group in by_mode(images):
        terms += probe_terms(
            aux, group, vision_batched(model, [s for ex in group for s in ex.slices], group[0].mode)
        )
    return torch.stack(terms).mean()


def batch_loss(
    model: MiniCPMV46,
    batch: list[Encoded],
    mean_penalty: float = 0.0,
    aux: AuxHeads | None = None,
    aux_weight: float = 0.0,
    lookup_layer: int = -1,
    attend: tuple[int, int, float] = (-1, -1, 0.0),
    oracle: OracleFeatures | None = None,
    pair: tuple[int, float] = (-1, 0.0),
) -> torch.Tensor:
    """Mean cross-entropy over every answer token of every turn of every example, plus
    `mean_penalty` x the squared mean image feature (see `hidden_batched`), plus the auxiliary
    probe losses. With `oracle` the decoder reads oracle features and the vision terms drop out.
    `pair` = (layer, weight) of `pair_terms` (needs `aux`)."""
    total, count, penalty = torch.zeros(()), 0, torch.zeros(())
    aux_terms: list[torch.Tensor] = []
    attend_terms: list[torch.Tensor] = []
    pairs: list[torch.Tensor] = []
    for group in by_mode(batch):
        probs: dict = {}
        residuals: dict = {}
        hidden, feats = hidden_batched(
            model, group, return_features=True, probs=probs, oracle=oracle, residuals=residuals
        )
        if attend[2] > 0:
            attend_terms += attention_terms(group, probs, attend[0], attend[1])
        if pair[1] > 0 and aux is not None:
            pairs += pair_terms(aux, group, residuals[pair[0]])
        if feats is not None:
            penalty = penalty + torch.cat(feats).mean(dim=0).pow(2).mean()
        longest = hidden.shape[1]
        target = torch.stack([F.pad(ex.targets, (0, longest - ex.ids.shape[0]), value=-100) for ex in group])
        keep = target != -100
        total = total + F.cross_entropy(model.lm_head(hidden[keep]), target[keep], reduction="sum")
        count += int(keep.sum())
        if aux is not None:
            if feats is not None:
                aux_terms += probe_terms(aux, group, feats)
            if residuals.get(lookup_layer) is not None:
                aux_terms += lookup_terms(aux, group, residuals[lookup_layer])
    loss = total / count + mean_penalty * penalty
    if aux_terms:
        loss = loss + aux_weight * torch.stack(aux_terms).mean()
    if attend_terms:
        loss = loss + attend[2] * torch.stack(attend_terms).mean()
    if pairs:
        loss = loss + pair[1] * torch.stack(pairs).mean()
    return loss


def check_batched(model: MiniCPMV46, batch: list[Encoded]) -> float:
    """Max |difference| of first-answer logits between the batched path and the model's own forward."""
    worst = 0.0
    with torch.no_grad(), vision_bf16(False):  # the maths, not bfloat16's rounding
        for group in by_mode(batch):
            hidden = hidden_batched(model, group)
            for row, ex in enumerate(group):
                got = model.lm_head(hidden[row, ex.answer_start - 1 : ex.answer_end - 1])
                worst = max(worst, float((got - forward_logits(model, ex)).abs().max()))
    return worst


def answer_matches(logits: torch.Tensor, ex: Encoded) -> bool:
    """Teacher-forced argmax equals every answer token and the stop token <=> greedy exact match.
    `logits` are those of the positions that predict the first answer (and its stop) token."""
    return bool((logits.argmax(-1) == ex.ids[ex.answer_start : ex.answer_end]).all())


def exact(model: MiniCPMV46, ex: Encoded) -> bool:
    with torch.no_grad():
        return answer_matches(forward_logits(model, ex), ex)


def feature_scale(model: MiniCPMV46, ex: Encoded) -> tuple[float, float]:
    """(std of image features, std of token embeddings): they should stay comparable."""
    with torch.no_grad():
        feats = torch.cat([model.encode_slice(p, pos, ex.mode) for p, pos in ex.slices])
        return float(feats.std()), float(model.embed(ex.ids).std())


def quick_eval(model: MiniCPMV46, encoded: list[Encoded]) -> dict[str, float]:
    model.eval()
    per: dict[str, list[bool]] = {}
    for ex in encoded:
        ok = exact(model, ex)
        per.setdefault(ex.mode, []).append(ok)
        per.setdefault(ex.qtype, []).append(ok)
    model.train()
    return {k: 100.0 * float(np.mean(v)) for k, v in per.items()}


def oracle_eval(model: MiniCPMV46, oracle: OracleFeatures, encoded: list[Encoded]) -> dict[str, float]:
    """Teacher-forced exact match per question type and language with oracle image features: what
    the decoder learned in the oracle phase, before any vision feature reaches it (English and
    Chinese questions bind objects through different tokens, and one may be learned without the
    other)."""
    model.eval()
    per: dict[str, list[bool]] = {}
    with torch.no_grad():
        for group in by_mode(encoded):
            for start in range(0, len(group), 32):
                part = group[start : start + 32]
                hidden = hidden_batched(model, part, oracle=oracle)
                for row, ex in enumerate(part):
                    logits = model.lm_head(hidden[row, ex.answer_start - 1 : ex.answer_end - 1])
                    per.setdefault(f"{ex.qtype} {ex.lang}", []).append(answer_matches(logits, ex))
    model.train()
    return {k: 100.0 * float(np.mean(v)) for k, v in per.items()}


def save_state(
    path: Path, model: MiniCPMV46, aux: AuxHeads, opt: torch.optim.Optimizer, k: int, sheets: int
) -> None:
    """Everything the later phases read (weights, probes and oracle codes, optimizer moments, the
    next training item and sheet), so a resumed run continues exactly where the straight run went."""
    state = {
        "model": model.state_dict(),
        "aux": aux.state_dict(),
        "opt": opt.state_dict(),
        "k": k,
        "sheet_index": sheets,
    }
    torch.save(state, path)


def load_state(path: Path, model: MiniCPMV46, aux: AuxHeads, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """Restore what `save_state` wrote; returns (next training item, next sheet)."""
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    aux.load_state_dict(state["aux"])
    opt.load_state_dict(state["opt"])
    return state["k"], state["sheet_index"]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, peak: float, warmup: int) -> None:
    """Warmup then cosine decay (`lr_at`) for every parameter group; each phase has its own."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, total, peak, warmup)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, clipped) -> None:
    """One update of every phase: backward, gradient norm of `clipped` clipped to 1, step, clear."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clipped, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "edge_runtime" / "data" / "demo-checkpoint")
    ap.add_argument("--seed", type=int, default=4, help="init, oracle codes and training split (4: shipped)")
    ap.add_argument("--steps", type=int, default=1300, help="question-answering optimizer steps")
    ap.add_argument("--batch", type=int, default=14, help="images (conversations) per optimizer step")
    ap.add_argument("--turns", type=int, default=4, help="questions per image in training conversations")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--qa-lr",
        type=float,
        default=1e-3,
        help="peak lr of the question-answering phase; at --lr it undoes much of what the oracle phase taught",
    )
    ap.add_argument(
        "--extra-numbers",
        type=int,
        default=4,
        help="number images added to every balanced block of 10 training conversations (train_item)",
    )
    ap.add_argument(
        "--numbers-16x",
        type=float,
        default=None,
        help="share of the vision and question-answering phases' extra number images in 16x mode "
        "(default: half, each in its block's mode); 16x reads digits from a quarter of the tokens",
    )
    ap.add_argument(
        "--qa-batch", type=int, default=0, help="conversations per question-answering step (0: --batch)"
    )
    ap.add_argument(
        "--qa-extra-numbers",
        type=int,
        default=6,
        help="number images per block of 10 in the question-answering phase (the earlier phases use "
        "--extra-numbers; 8 of every 16 conversations are then number images, and a step is cheaper)",
    )
    ap.add_argument(
        "--qa-pair-every-answer-token",
        action="store_true",
        help="--pair-every-answer-token in the question-answering phase only",
    )
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=100, help="quick eval every N steps (0: none)")
    ap.add_argument("--eval-samples", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (use 1 on a shared machine)")
    ap.add_argument(
        "--vision-steps", type=int, default=1400, help="vision-only probe steps on sheets before the QA phase"
    )
    ap.add_argument(
        "--vision-bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the vision phase's vision tower under bfloat16 autocast (see VISION_BF16)",
    )
    ap.add_argument(
        "--qa-vision-bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the question-answering phase's vision tower under bfloat16 autocast (see VISION_BF16)",
    )
    ap.add_argument("--vision-batch", type=int, default=32, help="images per vision-only step")
    ap.add_argument("--vision-numbers", type=int, default=8, help="extra number images per vision-only step")
    ap.add_argument("--sheets", type=int, default=4, help="sheets added to every QA step (probe loss only)")
    ap.add_argument(
        "--digit-sheets",
        type=float,
        default=0.75,
        help="share of sheets drawn as digit sheets (demo_task.make_sheet(digits=True)), evenly spread",
    )
    ap.add_argument("--deltanet-chunk", type=int, default=16)
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the training-only probes")
    ap.add_argument(
        "--lookup-layer",
        type=int,
        default=2,
        help="decoder layer whose output the training-only lookup probe reads (-1: no lookup probe)",
    )
    ap.add_argument(
        "--attend-layers",
        type=int,
        nargs=2,
        default=[2, 5],
        help="full-attention layers taught where to look (see attention_terms): from questions, from answers",
    )
    ap.add_argument("--attend-weight", type=float, default=0.0, help="weight of the attention supervision")
    ap.add_argument(
        "--pair-weight",
        type=float,
        default=1.0,
        help="weight of the position-question pair probe (pair_terms)",
    )
    ap.add_argument(
        "--pair-layer", type=int, default=4, help="decoder layer whose output the pair probe reads"
    )
    ap.add_argument(
        "--pair-every-answer-token",
        action="store_true",
        help="the pair probe reads every position that predicts an answer token, not only the first",
    )
    ap.add_argument(
        "--oracle-steps",
        type=int,
        default=850,
        help="decoder steps on oracle features before the vision phase",
    )
    ap.add_argument(
        "--oracle-eval",
        type=int,
        default=400,
        help="eval samples scored with oracle features after the oracle phase (0: none; logged only)",
    )
    ap.add_argument(
        "--oracle-ordinal", action="store_true", help="oracle location codes on a line instead of random"
    )
    ap.add_argument("--where-weight", type=float, default=0.0, help="weight of the image-location probe")
    ap.add_argument(
        "--oracle-blend-digits",
        action="store_true",
        help="a number token's oracle code mixes both digits' codes by the share of its ink left and "
        "right of the middle (default: the code of the digit most of its ink belongs to)",
    )
    ap.add_argument(
        "--feature-weight",
        type=float,
        default=1.0,
        help="weight of pulling image features onto the oracle codes (MSE)",
    )
    ap.add_argument("--text-hidden", type=int, default=128, help="decoder width (multiple of 32)")
    ap.add_argument(
        "--image-size", type=int, default=980, help="vision position table: image_size / 14 patches a side"
    )
    ap.add_argument(
        "--full-attention",
        type=int,
        nargs="+",
        default=[2, 5],
        help="decoder layers (of 6) with gated full attention; the others are Gated DeltaNet",
    )
    ap.add_argument(
        "--mean-penalty", type=float, default=0.01, help="weight of the image-feature mean penalty"
    )
    ap.add_argument(
        "--init-from", type=Path, default=None, help="continue from this checkpoint instead of a fresh init"
    )
    ap.add_argument(
        "--start-item", type=int, default=0, help="first training conversation (continue the data stream)"
    )
    ap.add_argument("--snapshot", type=Path, default=None, help="also save here at every quick eval")
    ap.add_argument(
        "--phase-state",
        type=Path,
        default=None,
        help="training state after the vision phase: written here, or, if the file exists, "
        "read and the oracle and vision phases skipped (to try question-answering settings)",
    )
    ap.add_argument(
        "--oracle-state",
        type=Path,
        default=None,
        help="training state after the oracle phase: written here, or, if the file exists, read and "
        "the oracle phase skipped (to try vision and question-answering settings on the same decoder)",
    )
    args = ap.parse_args(argv)
    # Chunk length is a free parameter of the chunked delta rule (same recurrence, other grouping);
    # 16 is several times cheaper than the inference default of 64 for these short sequences.
    with training_knobs(args.threads, args.deltanet_chunk, deterministic=True):
        return train(args)


@contextlib.contextmanager
def training_knobs(threads: int, deltanet_chunk: int, deterministic: bool) -> Iterator[None]:
    """Set the process-wide knobs a training run wants, and restore them after it, so an
    in-process caller (the tests) is unaffected: a test that ran after one of these once saw the
    DeltaNet chunk at 16."""
    saved = (
        qwen35_text.DELTANET_CHUNK,
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
    )
    torch.set_num_threads(threads)
    qwen35_text.DELTANET_CHUNK = deltanet_chunk
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        qwen35_text.DELTANET_CHUNK = saved[0]
        torch.use_deterministic_algorithms(saved[1])
        torch.set_num_threads(saved[2])


def train(args: argparse.Namespace) -> int:
    """The three phases and the checkpoint, from parsed arguments."""
    t_start = time.perf_counter()
    assets = Path(tempfile.mkdtemp(prefix="demo-assets-"))
    try:
        arch = {
            "text_hidden": args.text_hidden,
            "full_attention": tuple(args.full_attention),
            "image_size": args.image_size,
        }
        tok = write_assets(assets, **arch)
        ids = tok["token_ids"]
        cfg = demo_config(tok["vocab_size"], ids["<|image_pad|>"], ids["<|video_pad|>"], **arch)
        model = init_model(cfg, args.seed)
        if args.init_from is not None:
            weights = load_checkpoint(args.init_from).model.state_dict()
            model.load_state_dict({k: v.float() for k, v in weights.items()})
        n_params = sum(p.numel() for p in model.parameters())
        log(f"demo model: {n_params / 1e6:.2f} M parameters ({2 * n_params / 2**20:.1f} MiB in fp16)")
        encode = Encoder(assets, args.pair_every_answer_token)
        nps = cfg.vision.num_patches_per_side
        held_out = [encode(s, sample_mode(i), nps) for i, s in enumerate(eval_samples(args.eval_samples))]

        torch.manual_seed(args.seed + 1)
        aux = AuxHeads(cfg.text.hidden_size, len(COLOURS), len(SHAPES))
        aux.feature_weight, aux.where_weight = args.feature_weight, args.where_weight
        if args.oracle_steps or args.feature_weight:
            aux.oracle = OracleFeatures(
                cfg.text.hidden_size, len(COLOURS), len(SHAPES), args.seed + 2, ordinal=args.oracle_ordinal
            )
            aux.oracle.requires_grad_(args.oracle_steps > 0)  # learned only in the oracle phase
            aux.oracle.blend_digits = args.oracle_blend_digits
        decay, no_decay = [], []
        for name, p in list(model.named_parameters()) + list(aux.named_parameters()):
            (no_decay if p.ndim < 2 or "norm" in name or "embedding" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.98),
        )

        def extra(tmp: Path) -> None:
            for f in assets.iterdir():
                shutil.copy2(f, tmp / f.name)

        model.train()
        k = args.start_item
        sheet_index = 0

        def next_sheets(n: int) -> list[Encoded]:
            nonlocal sheet_index
            out = []
            for _ in range(n):
                digits = int((sheet_index + 1) * args.digit_sheets) > int(sheet_index * args.digit_sheets)
                image, objects = make_sheet(sheet_index, args.seed, digits)
                out.append(encode.vision_only(image, objects, MODES[(sheet_index // 10) % 2], nps))
                sheet_index += 1
            return out

        def next_batch(
            size: int, extra: int, encoder: Encoder, numbers_16x: float | None = None
        ) -> list[Encoded]:
            nonlocal k
            batch = []
            for _ in range(size):
                sample_index, mode = train_item(k, extra, numbers_16x)
                sample, follow = make_conversation(TRAIN, sample_index, args.seed, args.turns)
                objects = make_scene(TRAIN, sample_index, args.seed)[1]
                batch.append(encoder(sample, mode, nps, follow, objects))
                k += 1
            return batch

        attend = (args.attend_layers[0], args.attend_layers[1], args.attend_weight)
        pair = (args.pair_layer, args.pair_weight)

        # Phase 0 (optional): the decoder learns the task on oracle features (no vision tower),
        # then the codes are frozen and become the target the vision tower's features are pulled to.
        resume = args.phase_state is not None and args.phase_state.exists()
        oracle_resume = not resume and args.oracle_state is not None and args.oracle_state.exists()
        if oracle_resume:
            k, sheet_index = load_state(args.oracle_state, model, aux, opt)
            log(f"resumed from {args.oracle_state}")
        t_loop = time.perf_counter()
        for step in range(0 if resume or oracle_resume else args.oracle_steps):
            set_lr(opt, step, args.oracle_steps, args.lr, args.warmup)
            loss = batch_loss(
                model,
                next_batch(args.batch, args.extra_numbers, encode),
                0.0,
                aux,
                args.aux_weight,
                args.lookup_layer,
                attend,
                oracle=aux.oracle,
                pair=pair,
            )
            optimizer_step(opt, loss, model.parameters())
            if (step + 1) % 50 == 0:
                rate = (step + 1) / (time.perf_counter() - t_loop)
                log(f"oracle step {step + 1}/{args.oracle_steps} loss {loss.item():.4f} {rate:.2f} step/s")
        if aux.oracle is not None:
            aux.oracle.requires_grad_(False)
        if args.oracle_state is not None and not resume and not oracle_resume:
            save_state(args.oracle_state, model, aux, opt, k, sheet_index)
        if args.oracle_steps and args.oracle_eval and not resume:
            scenes = [
                encode(s, sample_mode(i), nps, (), make_scene(EVAL, s.index, DEFAULT_SEED)[1])
                for i, s in enumerate(eval_samples(args.oracle_eval))
            ]
            acc = oracle_eval(model, aux.oracle, scenes)
            log(
                "after the oracle phase, oracle features: "
                + " ".join(f"{k} {v:.0f}" for k, v in sorted(acc.items()))
            )

        def number_mode(step: int, j: int) -> str:
            """Mode of the j-th extra number image of vision-only step `step`."""
            if args.numbers_16x is None:
                return MODES[j % 2]
            return spread_mode(step * args.vision_numbers + j, args.numbers_16x)

        # Phase 1: the vision tower alone, on dense sheets plus task images (probe targets only).
        # Each sheet labels several objects per image, which trains shape and digit recognition
        # several times faster per second than question answering does (measured: centre-token
        # shape accuracy 76 % vs 50 % after the same 250 steps). Most sheets are digit sheets
        # (--digit-sheets): number reading is the skill the tower learns slowest.
        t_loop = time.perf_counter()
        for step in range(0 if resume else args.vision_steps):
            set_lr(opt, step, args.vision_steps, args.lr, args.warmup)
            images = next_sheets(args.vision_batch * 3 // 4)
            while len(images) < args.vision_batch:
                sample_index, mode = train_item(k, args.extra_numbers, args.numbers_16x)
                sample, objects = make_scene(TRAIN, sample_index, args.seed)
                images.append(encode(sample, mode, nps, (), objects))
                k += 1
            for j in range(args.vision_numbers):  # extra number images: digit reading is the slowest skill
                index = NUMBER_OFFSET + 10 * (step * args.vision_numbers + j) + (4 if j % 2 == 0 else 9)
                images.append(encode(make_sample(TRAIN, index, args.seed), number_mode(step, j), nps))
            with vision_bf16(args.vision_bf16):
                loss = vision_loss(model, aux, images)
            optimizer_step(opt, loss, model.parameters())
            if (step + 1) % 50 == 0:
                rate = (step + 1) / (time.perf_counter() - t_loop)
                log(
                    f"vision step {step + 1}/{args.vision_steps} probe loss {loss.item():.4f} {rate:.2f} step/s"
                )

        def report(label: str) -> None:
            acc = quick_eval(model, held_out)
            fs, es = feature_scale(model, held_out[0])
            log(
                f"{label} quick eval: "
                + " ".join(f"{k} {v:.0f}" for k, v in sorted(acc.items()))
                + f" | feature std {fs:.3f}, embedding std {es:.3f}"
            )

        if resume:
            k, sheet_index = load_state(args.phase_state, model, aux, opt)
            log(f"resumed from {args.phase_state}")
        elif args.phase_state is not None:
            save_state(args.phase_state, model, aux, opt, k, sheet_index)

        # How much of the task the decoder already answers from the pulled features (it learned
        # on the oracle codes): what the question-answering phase starts from.
        if args.oracle_steps and args.eval_every:
            report("after the vision phase")

        # Phase 2: question answering end to end, with sheets still feeding the probes. Its own
        # batch layout (--qa-batch, --qa-extra-numbers) starts at the next block of that layout
        # whose conversations and number images no earlier step has used.
        qa_batch = args.qa_batch or args.batch
        qa_extra = args.qa_extra_numbers
        if qa_extra != args.extra_numbers:
            k = qa_start_item(k, args.extra_numbers, qa_extra)
        qa_encode = encode
        if args.qa_pair_every_answer_token and not args.pair_every_answer_token:
            qa_encode = Encoder(assets, pair_every_answer_token=True)
        t_loop = time.perf_counter()
        running = []
        for step in range(args.steps):
            set_lr(opt, step, args.steps, args.qa_lr, args.warmup)
            batch = next_batch(qa_batch, qa_extra, qa_encode, args.numbers_16x)
            if step == 0:
                log(f"batched vs reference forward: max |logit diff| {check_batched(model, batch):.2e}")
            with vision_bf16(args.qa_vision_bf16):
                loss = batch_loss(
                    model,
                    batch,
                    args.mean_penalty,
                    aux,
                    args.aux_weight,
                    args.lookup_layer,
                    attend,
                    pair=pair,
                )
                if args.sheets:
                    loss = loss + args.aux_weight * vision_loss(model, aux, next_sheets(args.sheets))
            running.append(loss.item())
            optimizer_step(opt, loss, model.parameters())
            if (step + 1) % 10 == 0:
                rate = (step + 1) / (time.perf_counter() - t_loop)
                log(f"step {step + 1}/{args.steps} loss {np.mean(running):.4f} {rate:.2f} step/s")
                running = []
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                report(f"step {step + 1}")
                if args.snapshot is not None:  # a fallback copy if a run has to be stopped early
                    save_checkpoint(model, args.snapshot, dtype=torch.float16, extra_files=extra)

        save_checkpoint(model, args.out, dtype=torch.float16, extra_files=extra)
        log(f"wrote {args.out} after {(time.perf_counter() - t_start) / 60:.1f} min")
    finally:
        shutil.rmtree(assets, ignore_errors=True)
    return 0


def log(message: str) -> None:
    print(f"[train_demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
