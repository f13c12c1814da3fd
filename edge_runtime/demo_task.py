"""The synthetic visual task of the embedded demo model: shapes, colours, counts, positions, digits.

Deterministic: sample `i` of a split is a pure function of (split, seed, i), drawn from its own
`random.Random`, so the train and eval splits are fixed by their seeds and never depend on how
many samples were drawn before. Questions are short and closed-vocabulary in English and Chinese,
with exact-match answers ("red", "circle", "3", "left", "472"; "红色", "圆形", "左边" ...).

Image sizes and aspect ratios vary so that the demo checkpoint's slicing (scale_resolution 168,
max_slice_nums 4) produces a single view for most images and source + tiles for wide / tall ones.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

QUESTION_TYPES = ("colour", "shape", "count", "position", "text")
LANGUAGES = ("en", "zh")
TRAIN, EVAL = "train", "eval"
DEFAULT_SEED = 0
EVAL_SIZE = 400

# (english, chinese, rgb): saturated hues that stay apart after bicubic resizing.
COLOURS = (
    ("red", "红色", (215, 35, 35)),
    ("green", "绿色", (30, 150, 50)),
    ("blue", "蓝色", (35, 75, 215)),
    ("yellow", "黄色", (240, 200, 20)),
    ("purple", "紫色", (135, 50, 175)),
    ("orange", "橙色", (245, 125, 15)),
)
SHAPES = (("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形"), ("star", "星形"))
RELATIONS = {"left": "左边", "right": "右边", "above": "上面", "below": "下面"}
INK = ((20, 20, 20), (25, 25, 90), (90, 20, 20), (20, 70, 30))
MAX_OBJECTS = 3
_TEXT_QUESTION = {"en": "What number is written in the image?", "zh": "图中写的数字是什么？"}


@dataclass(frozen=True)
class Sample:
    """One image with one question and its exact answer."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    lang: str
    split: str
    index: int


@dataclass(frozen=True)
class _Object:
    colour: int
    shape: int
    cx: float
    cy: float
    size: float
    row: int
    col: int


def answer_vocabulary() -> dict[str, set[str]]:
    """Every possible answer per question type (digits for count/text are checked by pattern)."""
    return {
        "colour": {c[0] for c in COLOURS} | {c[1] for c in COLOURS},
        "shape": {s[0] for s in SHAPES} | {s[1] for s in SHAPES},
        "count": {str(n) for n in range(1, MAX_OBJECTS + 1)},
        "position": set(RELATIONS) | set(RELATIONS.values()),
        "text": {str(n) for n in range(10, 100)},
    }


def make_sample(split: str, index: int, seed: int = DEFAULT_SEED) -> Sample:
    """Sample `index` of `split`; question type and language cycle so every block of 10 is balanced."""
    return _generate(split, index, seed)[0]


def make_conversation(
    split: str, index: int, seed: int = DEFAULT_SEED, turns: int = 4
) -> tuple[Sample, list[tuple[str, str, str]]]:
    """`make_sample` plus up to `turns - 1` follow-up (question, answer, qtype) about the same image.

    Training asks several questions per image for more signal per vision pass; the first turn is
    exactly `make_sample`, and follow-ups draw from their own stream so they never change it.
    """
    sample, objects = _generate(split, index, seed)
    if objects is None:
        return sample, []
    rng = random.Random(f"minicpmv-edge-demo/{split}/{seed}/{index}/follow-up")
    pool = [t for t in QUESTION_TYPES[:4] if t != sample.qtype and (t != "position" or len(objects) > 1)]
    rng.shuffle(pool)
    extra = [t for t in ("colour", "shape", "position") if t != "position" or len(objects) > 1]
    while len(pool) < turns - 1:
        pool.append(rng.choice(extra))
    follow = []
    for qtype in pool[: turns - 1]:
        question, answer = _ask(rng, objects, qtype, sample.lang)
        follow.append((question, answer, qtype))
    return sample, follow


def make_scene(split: str, index: int, seed: int = DEFAULT_SEED) -> tuple[Sample, list[_Object] | None]:
    """`make_sample` plus the objects drawn (None for a number image): ground truth for training probes."""
    return _generate(split, index, seed)


def _generate(split: str, index: int, seed: int) -> tuple[Sample, list[_Object] | None]:
    rng = random.Random(f"minicpmv-edge-demo/{split}/{seed}/{index}")
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    lang = LANGUAGES[(index // len(QUESTION_TYPES)) % len(LANGUAGES)]
    width, height = _image_size(rng)
    background = _background(rng)
    image = Image.new("RGB", (width, height), background)
    objects = None
    if qtype == "text":
        question, answer = _draw_text(rng, image, lang)
    else:
        objects = _place_objects(rng, width, height, qtype)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            _draw_shape(draw, obj)
        question, answer = _ask(rng, objects, qtype, lang)
    return Sample(image, question, answer, qtype, lang, split, index), objects


def eval_samples(n: int = EVAL_SIZE, seed: int = DEFAULT_SEED) -> list[Sample]:
    """The fixed eval split (the first `n`; any prefix of a multiple of 10 is balanced)."""
    return [make_sample(EVAL, i, seed) for i in range(n)]


# ---- geometry -----------------------------------------------------------------------------------


def _image_size(rng: random.Random) -> tuple[int, int]:
    """Mostly single-view sizes (area under 168^2); about one in six wide or tall enough to be cut
    into a source view plus tiles by the demo checkpoint's slicing (scale_resolution 168)."""
    kind = rng.random()
    if kind < 0.08:
        return rng.randint(300, 360), rng.randint(130, 170)  # wide
    if kind < 0.16:
        return rng.randint(130, 170), rng.randint(300, 360)  # tall
    side = rng.randint(100, 165)
    aspect = math.exp(rng.uniform(-0.35, 0.35))
    return int(side * math.sqrt(aspect)), int(side / math.sqrt(aspect))


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A light tint (or light grey): every shape colour stays distinct from it."""
    if rng.random() < 0.3:
        v = rng.randint(205, 250)
        return (v, v, v)
    return tuple(rng.randint(200, 255) for _ in range(3))  # type: ignore[return-value]


def _grid(width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of placement cells: roughly square cells, at least MAX_OBJECTS + 1 of them."""
    if width >= 1.8 * height:
        return 2, 4
    if height >= 1.8 * width:
        return 4, 2
    return (2, 3) if width >= height else (3, 2)


def _place_objects(rng: random.Random, width: int, height: int, qtype: str) -> list[_Object]:
    """1-3 objects in distinct cells, distinct colours; at least one shape occurs once."""
    rows, cols = _grid(width, height)
    lo = 2 if qtype == "position" else 1
    n = rng.randint(lo, MAX_OBJECTS)
    while True:
        cells = rng.sample(range(rows * cols), n)
        colours = rng.sample(range(len(COLOURS)), n)
        shapes = [rng.randrange(len(SHAPES)) for _ in range(n)]
        if any(shapes.count(s) == 1 for s in shapes):
            break
    cw, ch = width / cols, height / rows
    objects = []
    for cell, colour, shape in zip(cells, colours, shapes, strict=True):
        r, c = divmod(cell, cols)
        size, cx, cy = _in_cell(rng, r, c, cw, ch, 0.8)
        objects.append(_Object(colour, shape, cx, cy, size, r, c))
    return objects


def _in_cell(
    rng: random.Random, row: int, col: int, cw: float, ch: float, max_fill: float
) -> tuple[float, float, float]:
    """(size, cx, cy) of an object in grid cell (row, col): 55 % to `max_fill` of the cell's short
    side, its centre jittered within the cell's slack."""
    size = rng.uniform(0.55, max_fill) * min(cw, ch)
    slack_x, slack_y = (cw - size) / 2, (ch - size) / 2
    cx = (col + 0.5) * cw + rng.uniform(-slack_x, slack_x) * 0.8
    cy = (row + 0.5) * ch + rng.uniform(-slack_y, slack_y) * 0.8
    return size, cx, cy


def _draw_shape(draw: ImageDraw.ImageDraw, obj: _Object) -> None:
    fill = COLOURS[obj.colour][2]
    h = obj.size / 2
    x, y = obj.cx, obj.cy
    name = SHAPES[obj.shape][0]
    if name == "circle":
        draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
    elif name == "square":
        s = h * 0.85
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif name == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h * 0.8), (x - h, y + h * 0.8)], fill=fill)
    else:  # five-pointed star
        points = []
        for k in range(10):
            radius = h if k % 2 == 0 else h * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in default font (scalable when FreeType is present); nothing downloaded."""
    return ImageFont.load_default(size=size)


def _draw_text(rng: random.Random, image: Image.Image, lang: str) -> tuple[str, str]:
    """A big two-digit number somewhere on the image."""
    digits = str(rng.randint(10, 99))
    width, height = image.size
    draw = ImageDraw.Draw(image)
    size = int(min(height * 0.45, width * 0.8 / (0.6 * len(digits))) * rng.uniform(0.7, 1.0))
    font = _font(max(size, 16))
    left, top, right, bottom = draw.textbbox((0, 0), digits, font=font)
    tw, th = right - left, bottom - top
    x = rng.uniform(0, max(width - tw, 0)) - left
    y = rng.uniform(0, max(height - th, 0)) - top
    ink = rng.choice(INK)
    draw.text((x, y), digits, fill=ink, font=font, stroke_width=_bold(font.size), stroke_fill=ink)
    return _TEXT_QUESTION[lang], digits


def _bold(font_size: float) -> int:
    """Stroke width that turns the built-in (light) font bold: thin strokes are hard to see in
    14-px patches, and printed numbers on signs and labels are usually bold anyway. A twenty-fourth
    of the font size keeps the holes of 0, 6, 8 and 9 open; a tenth (the first version) filled
    them, so 6, 8, 9 and 0 became the same blob even to a human reader."""
    return max(1, int(font_size) // 24)


DIGIT_SHAPE = len(SHAPES)  # in a sheet, `_Object.shape` DIGIT_SHAPE + d is the digit d (colour -1)


def make_sheet(
    index: int, seed: int = DEFAULT_SEED, digits: bool = False
) -> tuple[Image.Image, list[_Object]]:
    """A dense training scene for the vision tower: most cells of a grid hold a shape or a single
    bold digit, so one image carries several labelled objects (task images carry one to three).

    `digits=True` draws a digit sheet: one cell in ten empty, nine in ten of the others a digit,
    at 1.2-1.7x the shape sheets' font size, which is the scale of the task's number images. Digit
    reading is the slowest skill of the vision tower: from a fresh init (vision tower and probes
    alone, 300 steps of 24 sheets + 8 number images), the digit probe was right on 38 / 30 % of
    the number images' inked tokens (16x / 4x) after digit sheets drawn at 1.6x, against 18 / 18 %
    after shape sheets and 20 / 19 % after digit sheets at the shape sheets' scale.

    Training only (the eval split never uses sheets); sizes and backgrounds come from the task's
    own distribution so the tower sees the same scales and slicing. A sheet is a pure function of
    (seed, index, digits).
    """
    kind = "digit-sheet" if digits else "sheet"
    rng = random.Random(f"minicpmv-edge-demo/{kind}/{seed}/{index}")
    empty, digit_share = (0.1, 0.9) if digits else (0.25, 0.5)
    width, height = _image_size(rng)
    image = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(image)
    rows, cols = _grid(width, height)
    cw, ch = width / cols, height / rows
    objects = []
    for cell in range(rows * cols):
        if rng.random() < empty:
            continue
        r, c = divmod(cell, cols)
        size, cx, cy = _in_cell(rng, r, c, cw, ch, 0.85)
        if rng.random() < digit_share:
            digit = rng.randrange(10)
            scale = rng.uniform(1.2, 1.7) if digits else 1.1
            font = _font(max(16, int(size * scale)))
            left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
            ink = rng.choice(INK)
            origin = (cx - (left + right) / 2, cy - (top + bottom) / 2)
            draw.text(origin, str(digit), fill=ink, font=font, stroke_width=_bold(font.size), stroke_fill=ink)
            objects.append(_Object(-1, DIGIT_SHAPE + digit, cx, cy, min(size, right - left), r, c))
        else:
            obj = _Object(rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES)), cx, cy, size, r, c)
            _draw_shape(draw, obj)
            objects.append(obj)
    return image, objects


# ---- questions ----------------------------------------------------------------------------------


def _name(obj: _Object, lang: str) -> str:
    colour, shape = COLOURS[obj.colour], SHAPES[obj.shape]
    return f"{colour[0]} {shape[0]}" if lang == "en" else f"{colour[1]}{shape[1]}"


def _ask(rng: random.Random, objects: list[_Object], qtype: str, lang: str) -> tuple[str, str]:
    en = lang == "en"
    if qtype == "colour":
        shapes = [o.shape for o in objects]
        obj = rng.choice([o for o in objects if shapes.count(o.shape) == 1])
        shape = SHAPES[obj.shape]
        colour = COLOURS[obj.colour]
        if en:
            return f"What colour is the {shape[0]}?", colour[0]
        return f"{shape[1]}是什么颜色？", colour[1]
    if qtype == "shape":
        obj = rng.choice(objects)
        colour, shape = COLOURS[obj.colour], SHAPES[obj.shape]
        if en:
            return f"What shape is the {colour[0]} object?", shape[0]
        return f"{colour[1]}的物体是什么形状？", shape[1]
    if qtype == "count":
        n = str(len(objects))
        return ("How many shapes are there?", n) if en else ("图中有几个图形？", n)
    return _ask_position(rng, objects, lang)


def _ask_position(rng: random.Random, objects: list[_Object], lang: str) -> tuple[str, str]:
    """Left/right of two objects in different columns, or above/below in different rows."""
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    options = [(a, b, "h") for a, b in pairs if a.col != b.col and abs(a.cx - b.cx) > 0.6 * a.size]
    options += [(a, b, "v") for a, b in pairs if a.row != b.row and abs(a.cy - b.cy) > 0.6 * a.size]
    a, b, axis = rng.choice(options)
    if axis == "h":
        answer = "left" if a.cx < b.cx else "right"
        en_q = f"Is the {_name(a, 'en')} left or right of the {_name(b, 'en')}?"
        zh_q = f"{_name(a, 'zh')}在{_name(b, 'zh')}的左边还是右边？"
    else:
        answer = "above" if a.cy < b.cy else "below"
        en_q = f"Is the {_name(a, 'en')} above or below the {_name(b, 'en')}?"
        zh_q = f"{_name(a, 'zh')}在{_name(b, 'zh')}的上面还是下面？"
    return (en_q, answer) if lang == "en" else (zh_q, RELATIONS[answer])


# ---- shipped sample images ----------------------------------------------------------------------

# (file name, eval index, how many of its generator questions to ship): a busy picture, a wide one
# that gets sliced (Chinese questions) and a number; all straight from the eval generator.
SAMPLE_PICKS = (("shapes.png", 22, 3), ("wide.png", 8, 3), ("number.png", 24, 1))


def write_samples(folder: Path, picks: tuple[tuple[str, int, int], ...] = SAMPLE_PICKS) -> Path:
    """PNGs from the eval split plus `questions.json` ({"questions": [{image, question, answer,
    type, lang, index}]}), the sample set of `make demo` and the tests."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = []
    for name, index, n in picks:
        sample, follow = make_conversation(EVAL, index, turns=n)
        sample.image.save(folder / name, optimize=True)
        asked = [(sample.question, sample.answer, sample.qtype)] + follow
        if sample.qtype == "text":  # a number image has one question type: ask it in both languages
            other = "zh" if sample.lang == "en" else "en"
            asked.append((_TEXT_QUESTION[other], sample.answer, "text"))
        for question, answer, qtype in asked:
            lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in question) else "en"
            questions.append(
                {
                    "image": name,
                    "question": question,
                    "answer": answer,
                    "type": qtype,
                    "lang": lang,
                    "index": index,
                }
            )
    text = json.dumps({"questions": questions}, indent=2, ensure_ascii=False) + "\n"
    (folder / "questions.json").write_text(text, encoding="utf-8")
    return folder


if __name__ == "__main__":
    write_samples(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data" / "samples-demo")
