"""Parity can fail: the reference against itself passes every gate, and each injected fault (a vision
weight, a decoder weight, a state dropped between decode steps) fails its own stage with a readable
message. Also the cases file, the gate table and the `parity` command on a real (desktop) bundle."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from edge_runtime.backends.base import Backend
from edge_runtime.backends.torch_ref import TorchBackend
from edge_runtime.checkpoint import load_checkpoint
from edge_runtime.cli import main
from edge_runtime.errors import InputError
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.parity import GATES, SAMPLES_DIR, compare, default_cases, gates_for, load_cases
from edge_runtime.runtime import open_checkpoint_session
from edge_runtime.session import Session
from export.pipeline import ExportRequest, export_bundle

STEPS = 6
MAX_CONTEXT = 512


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return init_checkpoint("minicpm-v-4.6", "tiny", tmp_path_factory.mktemp("parity") / "ckpt", seed=3)


@pytest.fixture(scope="module")
def reference(ckpt_dir):
    return open_checkpoint_session(ckpt_dir, max_context=MAX_CONTEXT, threads=1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two small cases: one 16x image, and two images of which one runs in 4x... per case mode, so two cases."""
    path = tmp_path_factory.mktemp("cases") / "cases.json"
    path.write_text(
        json.dumps(
            {
                "cases": [
                    {"name": "square", "images": [str(SAMPLES_DIR / "square.png")], "prompt": "Colour?"},
                    {
                        "name": "tiny-4x",
                        "images": [str(SAMPLES_DIR / "tiny.png")],
                        "prompt": "What is it?",
                        "downsample_mode": "4x",
                    },
                ]
            }
        )
    )
    return load_cases(path)


def _backend_with(ckpt_dir, name: str, scale: float) -> TorchBackend:
    """A second reference whose parameter `name` is perturbed by scale * its own std."""
    ckpt = load_checkpoint(ckpt_dir)
    param = dict(ckpt.model.named_parameters())[name]
    with torch.no_grad():
        noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(0))
        param.add_(scale * float(param.std()) * noise)
    backend = TorchBackend(ckpt, max_context=MAX_CONTEXT, threads=1)
    backend.name = f"torch+perturbed:{name}"
    return backend


class ResetStateBackend(Backend):
    """The reference, except every decode step starts from an empty state (a classic export bug)."""

    name = "torch+state-reset"

    def __init__(self, inner: Backend):
        self.inner = inner
        self.info = inner.info

    def vision_encoder(self, patches, position_ids, mode):
        return self.inner.vision_encoder(patches, position_ids, mode)

    def token_embedding(self, ids):
        return self.inner.token_embedding(ids)

    def new_state(self):
        return self.inner.new_state()

    def prefill_chunk(self, embeds, n_valid, start_pos, state):
        return self.inner.prefill_chunk(embeds, n_valid, start_pos, state)

    def decode_step(self, embed, pos, state):
        return self.inner.decode_step(embed, pos, self.inner.new_state())

    def state_arrays(self, state):
        return self.inner.state_arrays(state)


def test_reference_against_itself_passes_every_gate(reference, cases):
    report = compare(reference, reference, cases, "fp32", n_steps=STEPS)
    data = report.to_json()
    assert data["passed"] is True and data["failures"] == [] and data["first_failed_stage"] is None
    assert set(data["stages"]) == {"vision", "prefill", "state", "decode", "greedy"}
    assert data["stages"]["vision"]["min_cosine"] == pytest.approx(1.0)
    assert data["stages"]["decode"]["positions"] == len(cases) * STEPS
    assert data["stages"]["decode"]["top1_rate"] == 1.0
    assert data["stages"]["state"]["gated"] is False and data["stages"]["state"]["max_rel_err"] == 0
    for case in data["cases"]:
        assert case["errors"] == {}
        shown = case["stages"]["greedy"]["reference_tokens"]
        assert case["stages"]["greedy"]["identical"]
        assert len(shown) == STEPS or (shown[-1] in reference.assets.stop_ids and len(shown) < STEPS)
        assert case["stages"]["prefill"]["kl_max"] < 1e-9
    assert data["gates"] == {
        "vision_cosine": 0.99999,
        "logits_max_abs": 1e-3,
        "top1_rate": None,
        "identical_cases": 1.0,
        "token_agree": None,
    }
    json.dumps(data)  # JSON-ready (no NaN, no numpy scalars)


class DivergeAfterBackend(ResetStateBackend):
    """The reference for the first `n_ok` decode steps after each prefill, then its top token is
    forbidden: free-running greedy leaves the reference's path exactly at step n_ok + 1."""

    name = "torch+diverging"

    def __init__(self, inner: Backend, n_ok: int):
        super().__init__(inner)
        self.n_ok, self.steps = n_ok, 0

    def prefill_chunk(self, embeds, n_valid, start_pos, state):
        self.steps = 0
        return self.inner.prefill_chunk(embeds, n_valid, start_pos, state)

    def decode_step(self, embed, pos, state):
        logits, state = self.inner.decode_step(embed, pos, state)
        self.steps += 1
        if self.steps > self.n_ok:
            logits = np.array(logits, copy=True)
            logits[int(np.argmax(logits))] = -np.inf
        return logits, state


def test_greedy_compares_up_to_the_reference_stop_token(reference, cases):
    """Tokens after the reference's stop are never shown to a user: a candidate that diverges only
    after it passes the greedy stage; without the stop the same candidate fails it."""
    case = cases[:1]
    candidate = Session(DivergeAfterBackend(reference.backend, n_ok=0), reference.assets)
    free = Session(reference.backend, dataclasses.replace(reference.assets, stop_ids=()))
    report = compare(free, candidate, case, "fp32", n_steps=STEPS)
    greedy = report.cases[0].stages["greedy"]
    assert len(greedy["reference_tokens"]) == STEPS and greedy["first_divergence"] == 1
    assert report.stages["greedy"]["passed"] is False

    first = greedy["reference_tokens"][0]
    stopping = Session(reference.backend, dataclasses.replace(reference.assets, stop_ids=(first,)))
    report = compare(stopping, candidate, case, "fp32", n_steps=STEPS)
    greedy = report.cases[0].stages["greedy"]
    assert greedy["reference_tokens"] == [first] and greedy["identical"] is True
    assert report.stages["greedy"]["passed"] is True
    decode = report.cases[0].stages["decode"]
    assert decode["top1_positions"] == 0 and decode["positions"] == STEPS  # the answer ended at once
    assert report.stages["decode"]["passed"] is False  # but fp32's max abs diff still sees every step


class CountingBackend(DivergeAfterBackend):
    """The reference with token 100 + k pushed to the top at decode step k: a random checkpoint
    repeats one token, and this gives an answer whose every token is new (so any can be a stop)."""

    name = "torch+counting"

    def __init__(self, inner: Backend):
        super().__init__(inner, n_ok=STEPS)

    def decode_step(self, embed, pos, state):
        logits, state = self.inner.decode_step(embed, pos, state)
        logits = np.array(logits, copy=True)
        logits[100 + self.steps] = logits.max() + 10.0
        self.steps += 1
        return logits, state

    def prefill_chunk(self, embeds, n_valid, start_pos, state):
        logits, state = super().prefill_chunk(embeds, n_valid, start_pos, state)
        logits = np.array(logits, copy=True)
        logits[99] = logits.max() + 10.0
        return logits, state


def test_decode_top1_counts_the_steps_up_to_the_reference_stop(reference, cases):
    """int4 gates decode top-1 (90 %), not max abs: a candidate that diverges right after the
    reference's stop token passes; the same candidate fails when the reference does not stop."""
    counting = CountingBackend(reference.backend)
    free = Session(counting, dataclasses.replace(reference.assets, stop_ids=()))
    candidate = Session(DivergeAfterBackend(counting, n_ok=2), reference.assets)
    report = compare(free, candidate, cases[:1], "int4", n_steps=STEPS)
    assert report.cases[0].stages["greedy"]["reference_tokens"][:3] == [99, 100, 101]
    assert report.stages["decode"]["passed"] is False and report.stages["decode"]["top1_positions"] == STEPS
    flipped = next(f.message for f in report.failures if f.gate == "top1_rate")
    assert "(first at step 3, reference top-2 margin " in flipped and " logits)" in flipped
    stopping = Session(counting, dataclasses.replace(reference.assets, stop_ids=(101,)))
    report = compare(stopping, candidate, cases[:1], "int4", n_steps=STEPS)
    decode = report.cases[0].stages["decode"]
    assert decode["top1_positions"] == 2 and decode["top1_rate"] == 1.0
    assert decode["top1_rate_all_positions"] < 0.9
    assert report.passed, "\n".join(report.summary_lines())


def test_perturbed_decoder_weight_fails_prefill(ckpt_dir, reference, cases):
    candidate = _backend_with(ckpt_dir, "language_model.layers.0.mlp.down_proj.weight", 0.5)
    report = compare(reference, candidate, cases[:1], "fp32", assets=reference.assets, n_steps=STEPS)
    assert not report.passed
    assert report.stages["vision"]["passed"] is True
    assert report.first_failure.stage == "prefill"
    message = next(f.message for f in report.failures if f.stage == "prefill")
    assert "case square: prefill logits max abs diff" in message and "> 0.001" in message
    assert "gate failed: [prefill]" in "\n".join(report.summary_lines())


def test_perturbed_vision_weight_fails_vision(ckpt_dir, reference, cases):
    candidate = _backend_with(ckpt_dir, "vision_tower.encoder.layers.0.mlp.fc1.weight", 0.5)
    report = compare(reference, candidate, cases[:1], "fp32", assets=reference.assets, n_steps=2)
    assert report.first_failure.stage == "vision"
    assert report.first_failure.gate == "vision_cosine"
    assert report.first_failure.message.startswith("case square: slice 0 embeddings cosine")


def test_state_reset_between_decode_steps_fails_decode(reference, cases):
    candidate = ResetStateBackend(reference.backend)
    report = compare(reference, candidate, cases[:1], "fp32", assets=reference.assets, n_steps=STEPS)
    stages = report.stages
    assert stages["vision"]["passed"] and stages["prefill"]["passed"]
    assert stages["state"]["max_rel_err"] == 0  # the state after prefill is still right
    assert stages["decode"]["passed"] is False
    assert report.first_failure.stage == "decode"
    assert "decode logits max abs diff" in report.first_failure.message
    assert "at decode step" in report.first_failure.message
    # a looser gate table judges the same figures by its own rules
    int4 = compare(reference, candidate, cases[:1], "int4", assets=reference.assets, n_steps=STEPS)
    assert all(f.gate in ("top1_rate", "token_agree") for f in int4.failures)


def test_a_crashing_candidate_is_reported_not_raised(reference, cases):
    class Broken(ResetStateBackend):
        name = "broken"

        def vision_encoder(self, patches, position_ids, mode):
            return np.zeros((3, self.info.hidden_size), np.float32)  # wrong token count

    report = compare(
        reference, Broken(reference.backend), cases[:1], "fp32", assets=reference.assets, n_steps=2
    )
    assert report.first_failure.stage == "vision" and report.first_failure.gate == "error"
    assert "placeholder tokens" in report.first_failure.message


def test_gate_table_covers_every_quantization():
    assert set(GATES) >= {"fp32", "fp16", "int8", "int4", "8da4w", "int4-channel"}
    assert gates_for("int8").top1_rate == 0.95 and gates_for("int4").token_agree == 0.7
    with pytest.raises(InputError, match="no parity gates"):
        gates_for("int3")


def test_default_cases_cover_sizes_modes_and_two_images():
    cases = default_cases()
    assert 4 <= len(cases) <= 8
    assert {c.downsample_mode for c in cases} == {"16x", "4x"}
    assert any(len(c.images) == 2 for c in cases)
    assert all(p.is_file() for c in cases for p in c.images)
    assert len({p.name for c in cases for p in c.images}) >= 4


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"cases": []}', "non-empty list"),
        ('{"cases": [{"name": "a", "images": ["nope.png"], "prompt": "x"}]}', "does not exist"),
        ('{"cases": [{"name": "a", "images": [], "prompt": "x", "downsample_mode": "8x"}]}', "16x or 4x"),
        ('{"cases": [{"name": "a", "prompt": "x", "color": 1}]}', "unknown keys color"),
    ],
)
def test_bad_cases_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "cases.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        load_cases(path)
    assert "\n" not in str(err.value)


def test_parity_command_on_bundles(ckpt_dir, tmp_path, capsys):
    """The CLI: a faithful bundle passes (exit 0, --json, --report); a bundle with changed weights
    (re-hashed, so it opens) fails a gate (exit 1)."""
    from safetensors.torch import load_file, save_file

    from edge_runtime.bundle import file_entry, write_manifest

    cases_file = tmp_path / "cases.json"
    cases_file.write_text(
        json.dumps([{"name": "sq", "images": [str(SAMPLES_DIR / "square.png")], "prompt": "Hi"}])
    )
    bundle = export_bundle(ExportRequest(ckpt_dir, tmp_path / "bundle", "desktop", max_context=MAX_CONTEXT))
    report = tmp_path / "parity.md"
    args = [
        "parity",
        "--checkpoint",
        str(ckpt_dir),
        "--cases",
        str(cases_file),
        "--steps",
        "3",
        "--threads",
        "1",
    ]
    assert main([*args, "--bundle", str(bundle), "--json", "--report", str(report)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True and data["quantization"] == "fp32" and data["n_decode_steps"] == 3
    assert report.read_text().startswith("# Parity report")

    weights = bundle / "model.safetensors"
    tensors = load_file(weights)
    name = "model.language_model.layers.3.mlp.up_proj.weight"
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = file_entry(weights)
    write_manifest(bundle, manifest)
    assert main([*args, "--bundle", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "gate failed: [prefill]" in out and "parity FAILED" in out


def test_parity_command_bad_input_exits_2(ckpt_dir, tmp_path, capsys):
    code = main(["parity", "--checkpoint", str(ckpt_dir), "--bundle", str(tmp_path / "none")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bundle directory") and "\n" not in err


def test_case_that_does_not_fit_is_bad_input(reference):
    tall = next(c for c in default_cases() if c.name == "tall-sliced-4x")  # > 1000 tokens, context is 512
    with pytest.raises(InputError, match="case tall-sliced-4x: context overflow"):
        compare(reference, reference, [tall], "fp32", n_steps=2)


def test_nan_from_the_candidate_fails_and_stays_valid_json(reference, cases):
    class NaNVision(ResetStateBackend):
        name = "nan-vision"

        def decode_step(self, embed, pos, state):
            return self.inner.decode_step(embed, pos, state)

        def vision_encoder(self, patches, position_ids, mode):
            out = self.inner.vision_encoder(patches, position_ids, mode)
            out[0, 0] = np.nan
            return out

    report = compare(
        reference, NaNVision(reference.backend), cases[:1], "fp32", assets=reference.assets, n_steps=2
    )
    assert report.first_failure.stage == "vision" and report.first_failure.value is None
    assert report.stages["prefill"]["passed"] is False  # NaN spreads into the logits: null, failed
    json.dumps(report.to_json(), allow_nan=False)


def test_a_top1_mismatch_reports_how_close_the_reference_was_to_a_tie() -> None:
    """A flip where the reference's own top two logits nearly tie is a different finding from a
    flip of a confident answer: the stage figures carry the reference's margin there."""
    from edge_runtime.parity import _logits_stage

    ref = [np.array([0.0, 3.0, 0.0]), np.array([2.0, 1.95, -1.0])]
    flips = _logits_stage(ref, [np.array([0.0, 3.0, 0.0]), np.array([1.0, 2.0, 0.0])])
    assert flips["first_top1_mismatch"] == 1
    assert flips["first_mismatch_ref_margin"] == pytest.approx(0.05)
    assert _logits_stage(ref, ref)["first_mismatch_ref_margin"] is None


def test_parity_without_checkpoint_uses_the_demo_model(tmp_path, capsys):
    """As every command: no --checkpoint means the embedded demo model is the reference."""
    from edge_runtime.commands.options import DEFAULT_CHECKPOINT

    bundle = export_bundle(
        ExportRequest(DEFAULT_CHECKPOINT, tmp_path / "demo", "desktop", max_context=MAX_CONTEXT)
    )
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(
        json.dumps([{"name": "sq", "images": [str(SAMPLES_DIR / "square.png")], "prompt": "Hi"}])
    )
    assert (
        main(["parity", "--bundle", str(bundle), "--cases", str(cases_file), "--steps", "2", "--json"]) == 0
    )
    captured = capsys.readouterr()
    assert json.loads(captured.out)["passed"] is True
    assert f"opening reference {DEFAULT_CHECKPOINT}" in captured.err
