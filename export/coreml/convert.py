"""coremltools conversion of the three graphs (iOS 18 ML programs), one function at a time.

Why the choices:
* torch.export (not jit.trace): under torch 2.13 + coremltools 9 the trace frontend fails on the
  decoder (`int` cast of a 1-element array, whole-buffer `copy_` not matched as a state write);
  the ExportedProgram frontend maps buffer mutations to `coreml_update_state` directly.
* `common::canonicalize_inplace_pattern` is removed from the pass pipeline: on this graph it
  crashes on a scope with several COREMLTOOLS_GRAPH_PASS entries (coremltools 9 bug).
* fp16 compute, except the position path: ops that depend only on `start_pos` / `n_valid` and
  constants (RoPE angles, cos/sin, masks) stay fp32, because fp16 cannot hold position x
  inv_freq (0.5 rad steps at position 1000); canvas families' `position_ids` rows are such an
  input too (M-RoPE angles fp32). Core ML states are fp16 only (the converter casts
  fp32 buffers), so the DeltaNet recurrent state is fp16 in the package: docs/coreml.md.
* RMS norms are traced in a scaled form whose squares stay <= 1 (export/coreml/norms.py): fp16
  `x^2` overflows past |x| = 256, which trained residual streams reach.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import coremltools as ct
import numpy as np
import torch
from torch import nn

from edge_runtime.families import StateSpec, family_of
from export.graphs import POSITION_ROWS, vision_position_example

from . import torch_ops  # noqa: F401 - registers the index_copy converter
from .lower import Embedding32, VisionGraph32, export_program, stateful_decoder
from .norms import fp16_safe_norms

os.environ.setdefault("TQDM_DISABLE", "1")
DEPLOYMENT_TARGET = ct.target.iOS18
_HOST_INPUTS = ("start_pos", "n_valid", "position_ids")


def pass_pipeline() -> ct.PassPipeline:
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::canonicalize_inplace_pattern"])
    return pipeline


def _position_only(op) -> bool:  # noqa: ANN001 - a MIL Operation
    """True when every value feeding `op` comes from host integer inputs or constants."""
    memo: dict[int, bool] = {}

    def pure(var) -> bool:  # noqa: ANN001
        key = id(var)
        if key not in memo:
            producer = var.op
            if producer is None:
                memo[key] = var.name in _HOST_INPUTS
            elif producer.op_type == "const":
                memo[key] = True
            elif producer.op_type in ("read_state",):
                memo[key] = False
            else:
                memo[key] = all(pure(v) for v in _op_inputs(producer))
        return memo[key]

    inputs = _op_inputs(op)
    return bool(inputs) and all(pure(v) for v in inputs) and any(not _is_const(v) for v in inputs)


def _op_inputs(op) -> list:  # noqa: ANN001
    out = []
    for value in op.inputs.values():
        out.extend(value if isinstance(value, list | tuple) else [value])
    return out


def _is_const(var) -> bool:  # noqa: ANN001
    return var.op is not None and var.op.op_type == "const"


def fp16_except_positions() -> ct.transform.FP16ComputePrecision:
    return ct.transform.FP16ComputePrecision(op_selector=lambda op: not _position_only(op))


def _convert(program, precision) -> ct.models.MLModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            program,
            minimum_deployment_target=DEPLOYMENT_TARGET,
            compute_precision=precision,
            pass_pipeline=pass_pipeline(),
            skip_model_load=True,
        )


def convert_decoder(model: nn.Module, specs: list[StateSpec], chunk: int) -> ct.models.MLModel:
    """The stateful decoder at chunk length `chunk` (C > 1: chunked DeltaNet, C == 1: recurrent);
    canvas families' decoder also takes position_ids int32 [3, C] (their RoPE rows)."""
    rows = family_of(model.cfg).rope_positions == "canvas"
    wrapper = stateful_decoder(model, specs, position_rows=rows)
    hidden = model.cfg.text.hidden_size
    example = (
        torch.zeros(1, chunk, hidden),
        torch.tensor([0], dtype=torch.int32),
        torch.tensor([chunk], dtype=torch.int32),
    )
    if rows:
        example += (torch.arange(chunk, dtype=torch.int32).expand(POSITION_ROWS, chunk).contiguous(),)
    with fp16_safe_norms(model):  # fp16 squares overflow past |x| = 256 (export/coreml/norms.py)
        program = export_program(wrapper, example)
    return _convert(program, fp16_except_positions())


def convert_vision(model: nn.Module, mode: str, max_patches: int) -> ct.models.MLModel:
    """One downsample mode, L dynamic in steps of the mode's reduction (16x: 16, 4x: 4) up to max_patches."""
    step = family_of(model.cfg).vision_reduction[mode]
    dim = torch.export.Dim(f"blocks_{mode}", min=1, max=max_patches // step)
    ids = torch.from_numpy(vision_position_example(model.cfg, mode, 4 * step)).to(torch.int32)
    example = (torch.zeros(4 * step, model.cfg.vision.patch_dim), torch.zeros_like(ids))
    dynamic = ({0: step * dim}, {ids.ndim - 1: step * dim})
    program = export_program(VisionGraph32(model, mode), example, dynamic)
    return _convert(program, ct.precision.FLOAT16)


def convert_embedding(model: nn.Module, max_tokens: int) -> ct.models.MLModel:
    dim = torch.export.Dim("tokens", min=1, max=max_tokens)
    program = export_program(Embedding32(model), (torch.zeros(8, dtype=torch.int32),), ({0: dim},))
    return _convert(program, ct.precision.FLOAT16)


def save_multifunction(parts: dict[str, Path], out: Path, default: str) -> None:
    """Merge single-function packages into one; identical weights are stored once."""
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in parts.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = default
    ct.utils.save_multifunction(desc, str(out))


def state_dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name
