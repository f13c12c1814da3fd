"""`make demo`: the main job end to end on the embedded default model.

Uses the shipped trained demo checkpoint when it is present (edge_runtime/data/demo-checkpoint);
otherwise writes a tiny random-weight checkpoint under build/demo and says so, because random
weights prove the plumbing but cannot answer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.commands.options import DEFAULT_CHECKPOINT  # noqa: E402
from edge_runtime.init_checkpoint import init_checkpoint  # noqa: E402
from edge_runtime.runtime import open_session  # noqa: E402

BUILD = ROOT / "build" / "demo"
QUESTIONS = [
    ("shapes.png", "What colour is the circle?"),
    ("shapes.png", "How many squares are there?"),
    ("wide.png", "Is the red triangle left of the blue square?"),
]


def sample_images(folder: Path) -> None:
    """Two small deterministic pictures: a square one and a wide one (which gets sliced)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (448, 448), (235, 235, 220))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 40, 180, 180), fill=(30, 160, 60))
    draw.rectangle((260, 60, 380, 180), fill=(40, 70, 200))
    draw.rectangle((120, 260, 240, 380), fill=(40, 70, 200))
    img.save(folder / "shapes.png")
    wide = Image.new("RGB", (1200, 400), (250, 250, 250))
    draw = ImageDraw.Draw(wide)
    draw.polygon([(150, 320), (250, 120), (350, 320)], fill=(210, 40, 40))
    draw.rectangle((800, 120, 1000, 320), fill=(40, 70, 200))
    wide.save(folder / "wide.png")


def main() -> int:
    checkpoint = DEFAULT_CHECKPOINT
    if not (checkpoint / "config.json").exists():
        checkpoint = BUILD / "tiny-random"
        if not (checkpoint / "config.json").exists():
            init_checkpoint("minicpm-v-4.6", "tiny", checkpoint, seed=0)
        print(f"note: no trained demo checkpoint shipped yet; using random weights at {checkpoint}")
        print("      (answers are meaningless; this shows the pipeline, timings and streaming)\n")
    samples = BUILD / "samples"
    sample_images(samples)
    t0 = time.perf_counter()
    session = open_session(checkpoint)
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s\n")
    for image, question in QUESTIONS:
        prepared = session.prepare(question, [samples / image])
        result = session.generate(prepared, session.sampling(max_new_tokens=24))
        info = result.to_json()
        answer = result.text.strip().replace("\n", " ") or "(empty)"
        print(f"Q [{image}, {info['n_slices']} slices, {info['n_image_tokens']} image tokens]: {question}")
        print(f"A: {answer}")
        print(f"   TTFT {info['ttft_ms']:.0f} ms, decode {info['decode_tok_s']:.1f} tok/s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
