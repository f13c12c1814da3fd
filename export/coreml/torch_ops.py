"""Torch -> MIL converters that coremltools 9 lacks for our graphs under torch 2.13.

`aten.index_copy` writes the new keys/values into the static KV cache. MIL has the exact op for
it: `scatter(mode="update")` along one axis with an int32 index vector, so no model change is
needed. Registration is idempotent (override=True), done on import.
"""

from __future__ import annotations

from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op


@register_torch_op(override=True)
def index_copy(context, node):  # noqa: ANN001 - coremltools converter signature
    data, dim, index, source = _get_inputs(context, node, expected=4)
    index = mb.cast(x=index, dtype="int32") if index.dtype.__name__ != "int32" else index
    axis = int(dim.val) % data.rank
    out = mb.scatter(data=data, indices=index, updates=source, axis=axis, mode="update", name=node.name)
    context.add(out)
