"""The demo task generator, the shipped demo checkpoint and `minicpmv-edge eval`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edge_runtime.commands.eval import eval_command
from edge_runtime.commands.options import DEFAULT_CHECKPOINT
from edge_runtime.demo_task import (
    DIGIT_SHAPE,
    EVAL,
    LANGUAGES,
    QUESTION_TYPES,
    TRAIN,
    answer_vocabulary,
    eval_samples,
    make_conversation,
    make_sample,
    make_sheet,
)

SAMPLES_DIR = DEFAULT_CHECKPOINT.parent / "samples-demo"
CJK = re.compile(r"[\u4e00-\u9fff]")


def _fingerprint(split: str, index: int) -> str:
    s = make_sample(split, index)
    return hashlib.sha256(s.image.tobytes() + s.question.encode() + s.answer.encode()).hexdigest()


def test_generator_is_deterministic() -> None:
    for split in (TRAIN, EVAL):
        for index in (0, 7, 123):
            assert _fingerprint(split, index) == _fingerprint(split, index)
    first, follow = make_conversation(TRAIN, 3)
    again = make_sample(TRAIN, 3)
    assert (first.question, first.answer, first.image.tobytes()) == (
        again.question,
        again.answer,
        again.image.tobytes(),
    )
    assert follow == make_conversation(TRAIN, 3)[1]


def test_sheets_are_deterministic_dense_and_labelled() -> None:
    """Training sheets: same image for the same index, several objects each, shapes and digits
    both present, every label inside the image and drawn (not background) at its centre."""
    shapes = digits = 0
    for index in range(20):
        image, objects = make_sheet(index)
        again, same = make_sheet(index)
        assert image.tobytes() == again.tobytes() and objects == same
        assert len(objects) >= 2
        for obj in objects:
            assert 0 <= obj.cx < image.width and 0 <= obj.cy < image.height
            is_digit = obj.shape >= DIGIT_SHAPE
            digits += is_digit
            shapes += not is_digit
            assert (obj.colour == -1) == is_digit and obj.shape < DIGIT_SHAPE + 10
            if not is_digit:  # a filled shape covers its own centre
                background = image.getpixel((0, 0))
                assert image.getpixel((int(obj.cx), int(obj.cy))) != background
    assert shapes > 20 and digits > 20


def _ink_per_digit(sheets: list[tuple[Image.Image, list]]) -> float:
    """Dark ink pixels (every channel under 100: the INK colours, no shape colour) per digit drawn."""
    ink = sum(int((np.asarray(image).max(axis=-1) < 100).sum()) for image, _ in sheets)
    return ink / sum(obj.shape >= DIGIT_SHAPE for _, objects in sheets for obj in objects)


def test_digit_sheets_are_mostly_digits_drawn_at_number_scale() -> None:
    """Digit sheets: deterministic, nine cells in ten digits, and glyphs larger than a shape
    sheet's (the number images' scale), which is what makes them teach number reading."""
    digit_sheets = [make_sheet(index, digits=True) for index in range(20)]
    shape_sheets = [make_sheet(index) for index in range(20)]
    again = make_sheet(3, digits=True)
    assert again[0].tobytes() == digit_sheets[3][0].tobytes() and again[1] == digit_sheets[3][1]
    objects = [obj for _, objs in digit_sheets for obj in objs]
    assert sum(obj.shape >= DIGIT_SHAPE for obj in objects) >= 0.8 * len(objects)
    assert _ink_per_digit(digit_sheets) > 1.3 * _ink_per_digit(shape_sheets)


def test_splits_are_disjoint() -> None:
    train = {_fingerprint(TRAIN, i) for i in range(150)}
    held_out = {_fingerprint(EVAL, i) for i in range(150)}
    assert not train & held_out


def test_every_type_in_both_languages_with_closed_answers() -> None:
    samples = eval_samples(200)
    vocab = answer_vocabulary()
    seen = {(s.qtype, s.lang) for s in samples}
    assert seen == {(t, lang) for t in QUESTION_TYPES for lang in LANGUAGES}
    for s in samples:
        assert s.answer in vocab[s.qtype], (s.qtype, s.answer)
        assert bool(CJK.search(s.question)) == (s.lang == "zh")
        if s.qtype in ("colour", "shape", "position"):
            assert bool(CJK.search(s.answer)) == (s.lang == "zh")
        else:
            assert s.answer.isdigit()
    sizes = {s.image.size for s in samples}
    assert any(w > 1.8 * h for w, h in sizes) and any(h > 1.8 * w for w, h in sizes)


def _shipped_questions() -> list[dict]:
    return json.loads((SAMPLES_DIR / "questions.json").read_text(encoding="utf-8"))["questions"]


def _answer_shipped_samples() -> list[tuple[dict, str, str]]:
    """(question item, mode, model answer) for every shipped sample question in both modes."""
    from edge_runtime.runtime import open_session

    assert (DEFAULT_CHECKPOINT / "config.json").is_file(), "the trained demo checkpoint is not shipped"
    session = open_session(DEFAULT_CHECKPOINT, max_context=512)
    out = []
    for item in _shipped_questions():
        for mode in ("16x", "4x"):
            prepared = session.prepare(item["question"], [SAMPLES_DIR / item["image"]], downsample_mode=mode)
            result = session.generate(prepared, session.sampling(max_new_tokens=8))
            out.append((item, mode, result.text.strip()))
    return out


def test_shipped_checkpoint_loads_and_answers_in_vocabulary() -> None:
    size = sum(f.stat().st_size for f in DEFAULT_CHECKPOINT.iterdir())
    assert size <= 10 * 2**20
    vocab = answer_vocabulary()
    for item, mode, got in _answer_shipped_samples():
        assert got in vocab[item["type"]], (item, mode, got)


def test_shipped_checkpoint_answers_the_sample_questions() -> None:
    wrong = [
        (item["question"], mode, got)
        for item, mode, got in _answer_shipped_samples()
        if got != item["answer"]
    ]
    assert not wrong


def test_eval_command_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(eval_command, ["--limit", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1
    assert report["n_samples"] == 8 and report["split"] == "eval" and report["backend"] == "torch"
    assert set(report["modes"]) == {"16x", "4x"}
    for mode in report["modes"].values():
        assert mode["n"] == 8 and 0 <= mode["correct"] <= 8
        assert set(mode["per_type"]) == set(QUESTION_TYPES)
        assert set(mode["per_language"]) == set(LANGUAGES)
        assert sum(t["n"] for t in mode["per_type"].values()) == 8
        split = mode["per_type_language"]
        assert set(split) == set(QUESTION_TYPES) and all(set(v) == set(LANGUAGES) for v in split.values())
        for qtype, cell in mode["per_type"].items():
            assert sum(split[qtype][lang]["correct"] for lang in LANGUAGES) == cell["correct"]
    assert report["overall"] == pytest.approx(sum(m["correct"] for m in report["modes"].values()) / 16)
