"""Quantized bundles of MiniCPM-V 4.0 and 2.0 against DESIGN.md's gates on trained weights
(issues 31 and 32), and tools/train_family_demo.py's inputs.

A random model's next-token distribution is nearly flat, so int8 / int4 rounding flips near-ties
that a trained model does not have: the gates are applied here to the small 4.0 and 2.0 models
that tools/train_family_demo.py trained on the demo task (edge_runtime/data/demo-minicpm-v-*), on
questions of the demo task's eval split, which no training step saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from edge_runtime.bundle import open_bundle_session
from edge_runtime.commands.eval import answer as eval_answer
from edge_runtime.demo_task import eval_samples
from edge_runtime.parity import compare, load_cases
from edge_runtime.processing.slicing import slice_image
from edge_runtime.runtime import open_checkpoint_session
from export.pipeline import ExportRequest, export_bundle

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import train_family_demo  # noqa: E402

DATA = ROOT / "edge_runtime" / "data"
FAMILIES = ("minicpm-v-4.0", "minicpm-v-2.0")
MAX_CONTEXT = 512
N_CASES = 10
STEPS = 8  # the longest answer is 2 digits + the stop token
SLOW = os.environ.get("MINICPMV_EDGE_SLOW") == "1"


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request) -> Path:
    return DATA / f"demo-{request.param}"


@pytest.fixture(scope="module")
def reference(trained):
    return open_checkpoint_session(trained, max_context=MAX_CONTEXT, threads=1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The first eval-split samples: every question type, both languages, some sliced images."""
    folder = tmp_path_factory.mktemp("eval-cases")
    entries = []
    for sample in eval_samples(N_CASES):
        image = folder / f"eval-{sample.index}.png"
        sample.image.save(image)
        entries.append(
            {"name": f"eval-{sample.index}-{sample.qtype}", "images": [str(image)], "prompt": sample.question}
        )
    (folder / "cases.json").write_text(json.dumps({"cases": entries}))
    return load_cases(folder / "cases.json")


def test_the_trained_models_answer_the_eval_questions(reference):
    """The gates below need trained margins. These small models learnt part of the task: over the
    first 200 eval questions 41.0 % (4.0) / 39.5 % (2.0), count 77.5 % / 75 % and colour 40 % / 55 %
    (of 6 colours), the two-digit numbers not at all."""
    samples = eval_samples(40)
    mode = reference.assets.slice_config.downsample_mode
    right = sum(eval_answer(reference, sample, mode) == sample.answer for sample in samples)
    assert right / len(samples) >= 0.3


slow = pytest.mark.skipif(not SLOW, reason="minutes; make test-slow")


# Measured on the shipped models (2026-12-07; docs/history.md): 2.0 passes every gate below; 4.0
# passes int8, and its int4 bundles (ONNX and Core ML alike) fail the top-1 gate on 2 of these 10
# cases at reference margins of 0.086 and 0.0036 logits: shape / position questions that model
# answers near chance (27.5 % / 60 %), where rounding picks between near-equal guesses. Its task
# accuracy over 200 questions: fp32 41.0 %, ONNX int8 39.5 %, ONNX int4 39.5 %, Core ML int4 39.0 %.
@pytest.mark.parametrize(
    "family, target, quant",
    [
        ("minicpm-v-4.0", "harmonyos", "fp16"),
        ("minicpm-v-4.0", "harmonyos", "int8"),
        ("minicpm-v-2.0", "harmonyos", "fp16"),
        ("minicpm-v-2.0", "harmonyos", "int8"),
        ("minicpm-v-2.0", "harmonyos", "int4"),
        ("minicpm-v-2.0", "ios", "int4"),
        pytest.param("minicpm-v-2.0", "android", "8da4w", marks=slow),
    ],
    ids=[
        "4.0-onnx-fp16",
        "4.0-onnx-int8",
        "2.0-onnx-fp16",
        "2.0-onnx-int8",
        "2.0-onnx-int4",
        "2.0-coreml-int4",
        "2.0-executorch-8da4w",
    ],
)
def test_quantized_bundle_passes_its_gates(cases, tmp_path, family, target, quant):
    trained = DATA / f"demo-{family}"
    reference = open_checkpoint_session(trained, max_context=MAX_CONTEXT, threads=1)
    out = export_bundle(ExportRequest(trained, tmp_path / "b", target, None, quant, MAX_CONTEXT))
    report = compare(reference, open_bundle_session(out, threads=1), cases, quant, n_steps=STEPS)
    assert report.passed, "\n".join(report.summary_lines())


@pytest.mark.parametrize("family", FAMILIES)
def test_training_sequences_hold_each_answer_where_inference_puts_it(family, tmp_path):
    """Each answer span of a training conversation is that answer (and the stop token where the
    template writes one), and its prompt prefix is exactly what `Session.prepare` builds."""
    train_family_demo.start_checkpoint(family, tmp_path / "c", seed=0)
    session = open_checkpoint_session(tmp_path / "c", max_context=MAX_CONTEXT, threads=1)
    tokenizer, stop = session.assets.tokenizer, session.assets.stop_ids[0]
    for index in range(5):
        ex = train_family_demo.encode(session, index, 0, session.assets.slice_config.downsample_mode, turns=3)
        sample, follow_ups = train_family_demo.make_conversation(train_family_demo.TRAIN, index, 0, turns=3)
        answers = [sample.answer] + [a for _, a, _ in follow_ups]
        assert len(ex.answers) == len(answers)
        for (start, end), answer in zip(ex.answers, answers, strict=True):
            span = ex.ids[start:end].tolist()
            assert tokenizer.decode([t for t in span if t != stop]).strip() == answer
        assert ex.ids[-1].item() == stop
        image = slice_image(sample.image, session.slice_config())
        first = session.plan(sample.question, [image]).prompt.ids
        assert ex.ids[: len(first)].tolist() == list(first)


def test_a_template_that_rewrites_history_is_refused(tmp_path):
    """4.6's (Qwen3.5) template drops the empty think block from past assistant turns, so a later
    turn's prompt does not extend the earlier one: one sequence cannot carry both (4.6 has its own
    trainer, tools/train_demo.py, which appends follow-ups as it infers them)."""
    train_family_demo.start_checkpoint("minicpm-v-4.6", tmp_path / "c", seed=0)
    session = open_checkpoint_session(tmp_path / "c", max_context=MAX_CONTEXT, threads=1)
    with pytest.raises(ValueError, match="does not extend the earlier turns"):
        train_family_demo.encode(session, 0, 0, "16x", turns=2)
