"""Core ML conversion of the tiny decoder, run by the MIL executor against the torch reference,
and the mutation test: corrupting one layer's weights inside the saved package breaks parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from edge_runtime.backends.coreml.executor import MILProgram  # noqa: E402
from edge_runtime.checkpoint import load_checkpoint  # noqa: E402
from edge_runtime.init_checkpoint import init_checkpoint  # noqa: E402
from edge_runtime.models.qwen35_text import state_specs  # noqa: E402

CACHE = 24


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from export.coreml.convert import convert_decoder

    root = tmp_path_factory.mktemp("coreml")
    model = load_checkpoint(init_checkpoint("minicpm-v-4.6", "tiny", root / "ckpt")).model.eval()
    path = root / "decode.mlpackage"
    convert_decoder(model, state_specs(model.cfg.text, CACHE), 1).save(str(path))
    return model, path


def _run(program: MILProgram, embeds: np.ndarray) -> list[np.ndarray]:
    fn, states, out = program.function(), program.new_states(), []
    for pos, row in enumerate(embeds):
        inputs = {
            "embeds": row[None, None],
            "start_pos": np.array([pos], np.int32),
            "n_valid": np.array([1], np.int32),
        }
        out.append(np.asarray(fn(inputs, states)[fn.outputs[0]], np.float32).ravel())
    return out


def _reference(model, embeds: np.ndarray) -> list[np.ndarray]:
    state, out = model.new_state(CACHE), []
    with torch.no_grad():
        for pos, row in enumerate(embeds):
            logits, state = model.decode(
                torch.from_numpy(row)[None, None], torch.tensor([pos]), torch.tensor([1]), state
            )
            out.append(logits.numpy().ravel())
    return out


def test_stateful_decoder_matches_reference_and_mutation_breaks_it(converted, tmp_path):
    import shutil

    model, path = converted
    program = MILProgram(path)
    fn = program.function()
    assert [s.name for s in fn.states] == [
        s.name.replace(".", "__") for s in state_specs(model.cfg.text, CACHE)
    ]
    assert all(s.dtype == np.float16 for s in fn.states)  # Core ML states are fp16
    ops = fn.op_histogram()
    assert ops["read_state"] == ops["write_state"] + ops["coreml_update_state"] == len(fn.states)
    embeds = (np.random.default_rng(0).standard_normal((6, model.cfg.text.hidden_size)) * 0.5).astype(
        np.float32
    )
    ref, got = _reference(model, embeds), _run(program, embeds)
    for a, b in zip(ref, got, strict=True):
        assert a.argmax() == b.argmax()
        assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.999

    # mutation: flip the sign of layer 3's attention output projection inside weight.bin
    bad = tmp_path / "bad.mlpackage"
    shutil.copytree(path, bad)
    mutated = MILProgram(bad)
    target = next(
        op for op in mutated.function().block.operations
        if op.type == "const" and "layers_3_self_attn_o_proj_weight" in op.outputs[0].name
    )  # fmt: skip
    offset = target.attributes["val"].blobFileValue.offset
    blob = bad / "Data/com.apple.CoreML/weights/weight.bin"
    raw = bytearray(blob.read_bytes())
    data_offset = int.from_bytes(raw[offset + 16 : offset + 24], "little")
    size = int.from_bytes(raw[offset + 8 : offset + 16], "little")
    for i in range(data_offset + 1, data_offset + size, 2):  # fp16 sign bits
        raw[i] ^= 0x80
    blob.write_bytes(bytes(raw))
    broken = _run(MILProgram(bad), embeds)
    cos = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(ref, broken, strict=True)]
    assert min(cos) < 0.999
