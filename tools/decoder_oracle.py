"""How fast can the demo decoder learn the task from perfect image features? A diagnostic.

Trains only the decoder of the demo preset (`train_demo.demo_config`) on shape scenes whose image
tokens are replaced by *oracle* features (`train_demo.OracleFeatures`, codes learned along: per
source-view token, colour and shape under it and its location bins; one shared code for tiles).
Number images are left out (their answer is the digits, a vision skill). Everything else is the
training script's own: prompts, follow-up turns, `batch_loss` on the answer tokens, optional
attention supervision, lookup probe and pair probe (`train_demo.pair_terms`).

If a question type stays low here, better vision features cannot fix it: the decoder's circuit
for it is the bottleneck. Accuracy is teacher-forced exact match (argmax of every answer token
and the stop token), which equals greedy exact match, on the eval split's shape questions.

    python tools/decoder_oracle.py --steps 800 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_demo as td  # noqa: E402

from edge_runtime.demo_task import COLOURS, EVAL, SHAPES, TRAIN, make_conversation, make_scene  # noqa: E402
from edge_runtime.models.minicpm_v46 import MiniCPMV46  # noqa: E402


def scene_example(encode: td.Encoder, split: str, index: int, mode: str, turns: int, nps: int) -> td.Encoded:
    sample, follow = make_conversation(split, index, 0, turns)
    return encode(sample, mode, nps, follow, make_scene(split, index, 0)[1])


def accuracy(model: MiniCPMV46, oracle: td.OracleFeatures, held_out: list[td.Encoded]) -> dict[str, float]:
    """Per question type and per mode, teacher-forced exact match of the first turn."""
    per: dict[str, list[bool]] = {}
    with torch.no_grad():
        for mode in td.MODES:
            same = [ex for ex in held_out if ex.mode == mode]
            for start in range(0, len(same), 32):
                group = same[start : start + 32]
                hidden = td.hidden_batched(model, group, oracle=oracle)
                for row, ex in enumerate(group):
                    logits = model.lm_head(hidden[row, ex.answer_start - 1 : ex.answer_end - 1])
                    ok = bool((logits.argmax(-1) == ex.ids[ex.answer_start : ex.answer_end]).all())
                    per.setdefault(ex.qtype, []).append(ok)
                    per.setdefault(mode, []).append(ok)
    return {k: 100.0 * float(np.mean(v)) for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--attend-weight", type=float, default=0.0, help="attention supervision (train_demo's)")
    ap.add_argument("--pair-weight", type=float, default=0.0, help="pair probe (train_demo.pair_terms)")
    ap.add_argument("--pair-layer", type=int, default=4, help="decoder layer the pair probe reads")
    ap.add_argument(
        "--lookup-layer", type=int, default=-1, help="train_demo's lookup probe on this layer (-1: none)"
    )
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the lookup probe")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument(
        "--eval-samples", type=int, default=400, help="eval-split indices (number images skipped)"
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    with td.training_knobs(args.threads, deltanet_chunk=16, deterministic=False):
        return run(args)


def run(args: argparse.Namespace) -> int:
    """Train the decoder on oracle features and report per question type."""
    assets = Path(tempfile.mkdtemp(prefix="oracle-assets-"))
    tok = td.write_assets(assets)
    ids = tok["token_ids"]
    cfg = td.demo_config(tok["vocab_size"], ids["<|image_pad|>"], ids["<|video_pad|>"])
    model = td.init_model(cfg, 0)
    encode = td.Encoder(assets)
    nps = cfg.vision.num_patches_per_side
    oracle = td.OracleFeatures(cfg.text.hidden_size, len(COLOURS), len(SHAPES), seed=2)
    held_out = [
        scene_example(encode, EVAL, i, td.sample_mode(i), 1, nps)
        for i in range(args.eval_samples)
        if i % 5 != 4
    ]
    aux = td.AuxHeads(cfg.text.hidden_size, len(COLOURS), len(SHAPES))
    params = list(model.parameters()) + list(oracle.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    item, t0 = 0, time.perf_counter()
    for step in range(args.steps):
        td.set_lr(opt, step, args.steps, args.lr, 20)
        batch = []
        while len(batch) < args.batch:
            index, mode = td.train_item(item)
            item += 1
            if index % 5 != 4 and index < td.EXTRA_TEXT_OFFSET:  # shape scenes only
                batch.append(scene_example(encode, TRAIN, index, mode, args.turns, nps))
        attend = (2, 5, args.attend_weight)
        loss = td.batch_loss(
            model,
            batch,
            aux=aux,
            aux_weight=args.aux_weight,
            lookup_layer=args.lookup_layer,
            attend=attend,
            oracle=oracle,
            pair=(args.pair_layer, args.pair_weight),
        )
        td.optimizer_step(opt, loss, params)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = accuracy(model, oracle, held_out)
            rate = (step + 1) / (time.perf_counter() - t0)
            print(
                f"step {step + 1} loss {loss.item():.3f} {rate:.2f} step/s | "
                + " ".join(f"{k} {v:.0f}" for k, v in sorted(acc.items())),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
