"""The model-family registry: lookup by name, by config.json's model_type (+ version), by config."""

from __future__ import annotations

import dataclasses

import pytest

from edge_runtime.families import (
    family_by_name,
    family_for_config,
    family_names,
    family_of,
    register_family,
)


def test_minicpm_v46_is_registered_and_found_every_way():
    family = family_by_name("minicpm-v-4.6")
    assert "minicpm-v-4.6" in family_names()
    assert family_for_config({"model_type": "minicpmv4_6"}) is family
    assert family_for_config({}) is family  # a config.json without model_type reads as 4.6, as before
    cfg = family.preset("tiny", 512, {"<|image_pad|>": 500, "<|video_pad|>": 501})
    assert family_of(cfg) is family
    assert family.config_class.from_hf(cfg.to_hf()).to_hf() == cfg.to_hf()
    assert family.vision_modes == ("16x", "4x")
    names = [s.name for s in family.state_specs(cfg, 32)]
    assert names[:2] == ["layers.0.conv_state", "layers.0.recurrent_state"]


def test_unknown_family_model_type_and_preset_fail_loudly():
    with pytest.raises(KeyError, match="available: minicpm-v-4.6"):
        family_by_name("no-such-family")
    with pytest.raises(ValueError, match="no known family"):
        family_for_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="unknown preset"):
        family_by_name("minicpm-v-4.6").preset("huge", 512, {})


def test_a_second_family_with_the_same_identity_is_refused():
    family = family_by_name("minicpm-v-4.6")
    with pytest.raises(ValueError, match="already registered"):
        register_family(dataclasses.replace(family, default=False))
    with pytest.raises(ValueError, match="only one family"):
        register_family(dataclasses.replace(family, name="other", version="9", default=True))


def test_read_config_picks_the_family_by_model_type(tmp_path):
    import json

    from edge_runtime.checkpoint import read_config
    from edge_runtime.errors import CheckpointError

    family = family_by_name("minicpm-v-4.6")
    cfg = family.preset("tiny", 512, {"<|image_pad|>": 500, "<|video_pad|>": 501})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    parsed, _ = read_config(tmp_path)
    assert family_of(parsed) is family
    for bad, words in (("llama", "no known family"), (7, "must be a string")):
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg.to_hf(), model_type=bad)))
        with pytest.raises(CheckpointError, match=words):
            read_config(tmp_path)
