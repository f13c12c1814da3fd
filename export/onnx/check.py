"""Shape checks of a written ONNX bundle: every graph loads in onnxruntime and answers with the
shapes the manifest promises, at two lengths for the dynamic dimensions (L, T), before the bundle
is committed. Values are `parity`'s job; this catches a wrong dynamic axis or a broken file early."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.onnxruntime import make_session
from edge_runtime.errors import EdgeError
from edge_runtime.families import family_of
from export.graphs import POSITION_ROWS, vision_position_example, vision_tokens

VISION_LENGTHS = (64, 128)
EMBED_LENGTHS = (1, 5)


class ExportCheckError(EdgeError):
    """A graph that onnxruntime cannot run or that returns the wrong shape."""


def _expect(graph: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ExportCheckError(f"{graph}: output shape {tuple(got)}, expected {tuple(want)}")


def check_graphs(
    out: Path, files: dict[str, str], cfg: Any, chunk: int, state: list[dict], say: Callable
) -> None:
    """`state`: the manifest's state entries (name, shape, dtype), fed as zeros."""
    try:
        _check(out, files, cfg, chunk, state)
    except EdgeError:
        raise
    except Exception as exc:  # onnxruntime's errors: one line is enough to name the graph's fault
        raise ExportCheckError(f"onnxruntime rejected a written graph: {str(exc).splitlines()[0]}") from None
    say("onnxruntime shape checks passed (vision L=64/128, embedding T=1/5, decoder prefill + decode)")


def _check(out: Path, files: dict[str, str], cfg: Any, chunk: int, state: list[dict]) -> None:
    d = cfg.text.hidden_size
    family = family_of(cfg)
    for mode in family.vision_modes:
        sess = None  # one session at a time: a full-size decoder session holds its weights
        sess = make_session(out / files[f"vision_{mode}"], threads=1, prepack=False)
        for length in VISION_LENGTHS:
            feeds = {
                "patches": np.zeros((length, cfg.vision.patch_dim), np.float32),
                "position_ids": vision_position_example(cfg, mode, length),
            }
            _expect(f"vision_{mode}", sess.run(None, feeds)[0].shape, (vision_tokens(cfg, mode, length), d))
    sess = None
    sess = make_session(out / files["token_embedding"], threads=1, prepack=False)
    for length in EMBED_LENGTHS:
        _expect("token_embedding", sess.run(None, {"ids": np.zeros(length, np.int64)})[0].shape, (length, d))
    for name, c in (("decoder_prefill", chunk), ("decoder_decode", 1)):
        sess = None
        sess = make_session(out / files[name], threads=1, prepack=False)
        feeds = {
            "embeds": np.zeros((1, c, d), np.float32),
            "start_pos": np.zeros(1, np.int64),
            "n_valid": np.full(1, c, np.int64),
            "position_ids": np.zeros((POSITION_ROWS, c), np.int64),
            **{f"past.{s['name']}": np.zeros(s["shape"], np.dtype(s["dtype"])) for s in state},
        }
        outs = sess.run(None, feeds)
        _expect(name, outs[0].shape, (1, cfg.text.vocab_size))
        for spec, value in zip(state, outs[1:], strict=True):
            _expect(f"{name} present.{spec['name']}", value.shape, tuple(spec["shape"]))
        if not np.isfinite(outs[0]).all():
            raise ExportCheckError(f"{name}: non-finite logits on zero input")
