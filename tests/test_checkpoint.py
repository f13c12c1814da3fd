"""Checkpoint reading/writing: our writer, transformers' reader, legacy names, shards, bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_runtime.checkpoint import load_checkpoint
from edge_runtime.cli import main
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.models.minicpm_v46 import module_key_to_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint("minicpm-v-4.6", "tiny", out, seed=0)
    return out


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_init_checkpoint_is_complete_and_transformers_reads_it(tiny_dir):
    transformers = pytest.importorskip("transformers")
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json", "preprocessor_config.json"} <= names  # fmt: skip
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    ours = load_checkpoint(tiny_dir)
    hf = transformers.MiniCPMV4_6ForConditionalGeneration.from_pretrained(tiny_dir)
    hf_state = hf.state_dict()
    for key, value in ours.model.state_dict().items():
        assert torch.equal(hf_state[module_key_to_checkpoint(key)], value), key
    image_processor = transformers.AutoImageProcessor.from_pretrained(tiny_dir, backend="pil")
    assert type(image_processor).__name__ == "MiniCPMV4_6ImageProcessorPil"
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == ours.config.image_token_id


def test_init_checkpoint_is_deterministic(tiny_dir, tmp_path):
    again = tmp_path / "again"
    init_checkpoint("minicpm-v-4.6", "tiny", again, seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    other = tmp_path / "other"
    init_checkpoint("minicpm-v-4.6", "tiny", other, seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_legacy_prefixes_mtp_and_explicit_lm_head(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    renamed = {}
    for name, value in tensors.items():
        name = name.replace("model.vision_tower.vit_merger.", "model.vit_merger.")
        renamed[name.replace("model.vision_tower.", "model.vpm.")] = value
    renamed["mtp.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 4)
    renamed["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
    save_file(renamed, ckpt / "model.safetensors")
    loaded = load_checkpoint(ckpt)
    reference = load_checkpoint(tiny_dir)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_sharded_index(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ckpt / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_checkpoint(ckpt)
    assert torch.equal(
        loaded.model.lm_head.weight, load_checkpoint(tiny_dir).model.language_model.embed_tokens.weight
    )


def _break(tiny_dir, tmp_path, how):
    ckpt = _copy(tiny_dir, tmp_path, how)
    path = ckpt / "model.safetensors"
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return ckpt
    tensors = load_file(path)
    if how == "missing":
        del tensors["model.language_model.layers.0.mlp.up_proj.weight"]
    elif how == "misshaped":
        tensors["model.merger.mlp.0.linear_2.weight"] = torch.zeros(3, 3)
    elif how == "unexpected":
        tensors["model.language_model.layers.99.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, path)
    return ckpt


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("missing", "layers.0.mlp.up_proj.weight"),
        ("misshaped", "model.merger.mlp.0.linear_2.weight [3, 3] != [64, 256]"),
        ("unexpected", "layers.99.mlp.up_proj.weight"),
        ("truncated", "truncated"),
    ],
)
def test_bad_checkpoint_gives_one_line_and_exit_2(tiny_dir, tmp_path, capsys, how, needle):
    ckpt = _break(tiny_dir, tmp_path, how)
    code = main(["chat", "--checkpoint", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err, err


def test_console_script_exit_codes(tmp_path):
    """The installed entry point itself: a missing checkpoint and an unknown flag are one line, exit 2."""
    exe = [sys.executable, "-m", "edge_runtime.cli"]
    missing = subprocess.run([*exe, "chat", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: checkpoint directory {tmp_path / 'nope'} does not exist"
    ]
    unknown = subprocess.run([*exe, "chat", "--bogus-flag"], capture_output=True, text=True)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == ["error: No such option '--bogus-flag'."]


def test_mapped_loading_keeps_weights_in_the_file(tiny_dir, tmp_path):
    """load_checkpoint(mapped=True): every fp32 weight of the model is a view of the memory-mapped
    file (Checkpoint.mapped says where its bytes lie), equal to the read-in weight; a NaN in the
    file is still found (checked from the file in chunks, leaving the mapping untouched)."""
    from edge_runtime.checkpoint import CheckpointError

    eager = load_checkpoint(tiny_dir).model.state_dict()
    loaded = load_checkpoint(tiny_dir, mapped=True)
    params = dict(loaded.model.named_parameters())
    views = {name: p for name, p in params.items() if p.data_ptr() in loaded.mapped}
    assert len(views) == len(params)  # the tiny checkpoint is all fp32
    for name, param in views.items():
        where = loaded.mapped[param.data_ptr()]
        assert where.length == param.numel() * 4
        with where.file.open("rb") as fh:
            fh.seek(where.offset)
            assert fh.read(16) == param.detach().flatten()[:4].numpy().tobytes(), name
        assert torch.equal(param, eager[name]), name

    ckpt = _copy(tiny_dir, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.language_model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite weights in 1 tensor"):
        load_checkpoint(ckpt, mapped=True)
