"""Train a small MiniCPM-V of any registered family on the demo task (edge_runtime.demo_task).

Why: quantization gates only mean something on a model with trained margins. A random model's
next-token distribution is nearly flat, so int8/int4 rounding flips near-ties that no trained model
has. The 4.6 demo checkpoint has its own recipe (tools/train_demo.py, which leans on 4.6's batched
DeltaNet forward); this one is family-generic: it starts from the family's `tiny` preset, sets the
demo task's slicing (scale_resolution 168, at most 4 slices), and trains every weight end to end on
question answering. Each input is exactly what `Session.plan` builds at inference (our slicing,
patches, position ids, the checkpoint's own chat template and placeholder expansion); the answer
and the stop token are appended and the loss is taken on those tokens only (teacher forcing). The
forward is the reference model's own: `encode_slice`, `embed`, the placeholder splice and `decode`.

    python tools/train_family_demo.py --family minicpm-v-4.0 --out build/demo-4.0 --steps 1500

The result is a Hugging Face-format checkpoint (fp16 safetensors + tokenizer + side files) that
`minicpmv-edge eval`, `export` and `parity --cases edge_runtime/data/samples-demo/questions.json`
read like any other.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.checkpoint import save_checkpoint  # noqa: E402
from edge_runtime.demo_task import COLOURS, SHAPES, TRAIN, make_conversation, make_scene  # noqa: E402
from edge_runtime.init_checkpoint import init_checkpoint  # noqa: E402
from edge_runtime.processing.prompt import Message  # noqa: E402
from edge_runtime.processing.slicing import slice_image  # noqa: E402
from edge_runtime.runtime import open_checkpoint_session  # noqa: E402
from edge_runtime.session import Session, VisionInput, image_layout  # noqa: E402

SCALE_RESOLUTION = 168  # as the 4.6 demo: 12x12 patches a full slice
MAX_SLICE_NUMS = 4
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
)


@dataclass
class Example:
    """One image's vision inputs and a conversation about it: the token ids and, per turn, where its
    answer (plus the turn's stop token) sits in them."""

    vision: list[VisionInput]
    ids: torch.Tensor
    answers: list[tuple[int, int]]  # [start, end) of each answer + stop token in `ids`
    qtypes: list[str]  # question type of each answer
    scene: SceneTargets


@dataclass
class SceneTargets:
    """What the image shows, for the training-only probes: per colour (objects' colours are
    distinct), whether it is there, its object's shape and its centre's column / row third; or a
    number image's two digits. -1 marks a target that does not apply (ignored by the loss)."""

    present: torch.Tensor  # [n_colours] float 0/1 (all -1 for a number image)
    shape: torch.Tensor  # [n_colours] int64
    column: torch.Tensor  # [n_colours] int64, 0-2
    row: torch.Tensor  # [n_colours] int64, 0-2
    digits: torch.Tensor  # [2] int64


def scene_targets(split: str, index: int, seed: int) -> SceneTargets:
    sample, objects = make_scene(split, index, seed)
    n = len(COLOURS)
    none = torch.full((n,), -1, dtype=torch.int64)
    if objects is None:
        digits = torch.tensor([int(sample.answer[0]), int(sample.answer[1])])
        return SceneTargets(torch.full((n,), -1.0), none, none.clone(), none.clone(), digits)
    width, height = sample.image.size
    present, shape, column, row = torch.zeros(n), none.clone(), none.clone(), none.clone()
    for obj in objects:
        present[obj.colour] = 1.0
        shape[obj.colour] = obj.shape
        column[obj.colour] = min(int(3 * obj.cx / width), 2)
        row[obj.colour] = min(int(3 * obj.cy / height), 2)
    return SceneTargets(present, shape, column, row, torch.full((2,), -1, dtype=torch.int64))


class SceneProbes(torch.nn.Module):
    """Training-only linear probes on the mean of the first slice's image features (never saved).
    They give the vision tower a direct signal from the first step, which the answer loss alone,
    through a decoder that has not yet learnt to look, gives too weakly (the run without them
    stayed near chance); the decoder still learns to answer from the features by itself."""

    def __init__(self, dim: int):
        super().__init__()
        n = len(COLOURS)
        self.present = torch.nn.Linear(dim, n)
        self.shape = torch.nn.Linear(dim, n * len(SHAPES))
        self.column = torch.nn.Linear(dim, n * 3)
        self.row = torch.nn.Linear(dim, n * 3)
        self.digits = torch.nn.Linear(dim, 2 * 10)

    def forward(self, pooled: torch.Tensor, t: SceneTargets) -> torch.Tensor:
        n = len(COLOURS)
        terms = [F.cross_entropy(self.digits(pooled).view(2, 10), t.digits, ignore_index=-1)]
        if bool((t.present >= 0).all()):
            terms = [
                F.binary_cross_entropy_with_logits(self.present(pooled), t.present),
                F.cross_entropy(self.shape(pooled).view(n, len(SHAPES)), t.shape, ignore_index=-1),
                F.cross_entropy(self.column(pooled).view(n, 3), t.column, ignore_index=-1),
                F.cross_entropy(self.row(pooled).view(n, 3), t.row, ignore_index=-1),
            ]
        return torch.stack(terms).sum()


def start_checkpoint(family: str, out: Path, seed: int) -> None:
    """The family's tiny preset with the demo task's slicing."""
    init_checkpoint(family, "tiny", out, seed=seed)
    pre_path = out / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pre.update(scale_resolution=SCALE_RESOLUTION, max_slice_nums=MAX_SLICE_NUMS)
    pre_path.write_text(json.dumps(pre, indent=2) + "\n")


def encode(session: Session, index: int, seed: int, mode: str, turns: int) -> Example:
    """Sample `index` of the train split as a conversation of up to `turns` questions, each turn's
    prompt built as inference builds it (the image in the first user turn, earlier turns as history).

    Each answer is tokenized in its context (the prompt's text plus the answer), and turn k+1's
    prompt must extend turn k's prompt and answer token for token (checked), so one sequence
    carries every answer. The stop token is trained where the template writes it after an answer
    and after the last one.
    """
    sample, follow_ups = make_conversation(TRAIN, index, seed, turns=turns)
    image = slice_image(sample.image, session.slice_config(downsample_mode=mode))
    tokenizer, prompts, stop = session.assets.tokenizer, session.assets.prompts, session.assets.stop_ids[0]
    qa = [(sample.question, sample.answer)] + [(q, a) for q, a, _ in follow_ups]
    qtypes = [sample.qtype] + [t for _, _, t in follow_ups]
    plan = session.plan(qa[0][0], [image], downsample_mode=mode)
    history = [Message("user", [image_layout(image), qa[0][0]])]
    prompt, answers = plan.prompt, []
    for k, (_, answer) in enumerate(qa):
        ids = tokenizer.encode_prompt(prompt.text + answer)
        start, end = len(prompt.ids), len(ids)
        if ids[:start] != list(prompt.ids):
            raise ValueError(f"answer {answer!r} changes the tokens of the prompt before it")
        if k + 1 == len(qa):
            answers.append((start, end + 1))
            scene = scene_targets(TRAIN, index, seed)
            return Example(plan.image_inputs, torch.tensor(ids + [stop]), answers, qtypes, scene)
        history.append(Message("assistant", answer))
        prompt = prompts.chat(qa[k + 1][0], history=history)
        history.append(Message("user", qa[k + 1][0]))
        if list(prompt.ids[:end]) != ids:
            raise ValueError(
                "the chat template does not extend the earlier turns: cannot train them as one sequence"
            )
        answers.append((start, end + int(prompt.ids[end] == stop)))
    raise AssertionError("unreachable: qa is never empty")


def forward(model: torch.nn.Module, ex: Example, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [T, V] of the whole conversation, image features spliced in, and the mean
    feature of the first slice (the whole image) for the probes."""
    per_slice = [model.encode_slice(torch.from_numpy(p), torch.from_numpy(q), m) for p, q, m in ex.vision]
    feats = torch.cat(per_slice)
    embeds = model.embed(ex.ids)
    rows = torch.nonzero(ex.ids == image_token_id).squeeze(1)
    embeds = embeds.index_copy(0, rows, feats.to(embeds.dtype))
    n = len(ex.ids)
    logits, _ = model.decode(
        embeds[None], torch.tensor([0]), torch.tensor([n]), model.new_state(n), all_logits=True
    )
    return logits, per_slice[0].mean(0)


def example_loss(
    model: torch.nn.Module, probes: SceneProbes, ex: Example, image_token_id: int
) -> torch.Tensor:
    """Cross-entropy of every answer and stop token in the conversation, plus the probes' loss."""
    logits, pooled = forward(model, ex, image_token_id)
    rows = torch.cat([torch.arange(a, b) for a, b in ex.answers])
    return F.cross_entropy(logits[rows - 1], ex.ids[rows]) + probes(pooled, ex.scene)


def answer_accuracy(model: torch.nn.Module, examples: list[Example], image_token_id: int) -> dict[str, float]:
    """Per question type, the share of answers that are wholly the argmax under teacher forcing (a
    fast proxy for `minicpmv-edge eval`, which decodes greedily)."""
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for ex in examples:
            predicted = forward(model, ex, image_token_id)[0].argmax(-1)
            for (a, b), qtype in zip(ex.answers, ex.qtypes, strict=True):
                right.setdefault(qtype, []).append(bool((predicted[a - 1 : b - 1] == ex.ids[a:b]).all()))
    return {t: sum(v) / len(v) for t, v in right.items()}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def copy_side_files(src: Path):
    """`save_checkpoint`'s extra_files hook: the host files of the starting checkpoint."""

    def extra(out: Path) -> None:
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)

    return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8, help="images a step")
    parser.add_argument("--turns", type=int, default=3, help="questions an image")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from this checkpoint (one of ours) instead of random weights",
    )
    parser.add_argument("--first-index", type=int, default=0, help="train-split index of the first sample")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        start = args.init
        if start is None:
            start = Path(tmp) / "start"
            start_checkpoint(args.family, start, args.seed)
        session = open_checkpoint_session(start, max_context=1024, threads=args.threads)
        model = session.backend.model
        model.train()
        image_id = session.backend.info.image_token_id
        modes = list(session.backend.checkpoint.family.vision_modes)
        probes = SceneProbes(session.backend.info.hidden_size)
        params = [p for p in model.parameters() if p.requires_grad] + list(probes.parameters())
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
        held_out = [encode(session, 10**6 + i, args.seed, modes[i % len(modes)], 1) for i in range(100)]
        rng = random.Random(args.seed)
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
            batch = [args.first_index + step * args.batch + i for i in range(args.batch)]
            loss = sum(
                example_loss(
                    model, probes, encode(session, k, args.seed, rng.choice(modes), args.turns), image_id
                )
                for k in batch
            ) / len(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == args.steps - 1:
                line = f"step {step}/{args.steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s"
                if step % 250 == 0 or step == args.steps - 1:
                    model.eval()
                    accuracy = answer_accuracy(model, held_out, image_id)
                    line += "  held-out " + " ".join(f"{t} {v:.0%}" for t, v in accuracy.items())
                    model.train()
                print(line, flush=True)
        model.eval()
        save_checkpoint(model, args.out, dtype=torch.float16, extra_files=copy_side_files(start))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
