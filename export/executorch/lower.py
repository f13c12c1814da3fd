"""Lowering: exported methods -> one XNNPACK-delegated `.pte`, plus the delegation report and its gate.

All methods go through one `to_edge_transform_and_lower` call, so weights shared by several methods
(prefill and decode, the two vision modes) are serialized once: XNNPACK stores its constants in the
program's named-data store keyed by content, and the emitter deduplicates the rest.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram

from edge_runtime.errors import InputError

# Operators that move no data through arithmetic (views, shape queries, tuple access): left out of the
# delegation count, since a delegate gains nothing by owning them.
_BOOKKEEPING = (
    "getitem",
    "sym_size",
    "sym_numel",
    "view_copy",
    "alias_copy",
    "squeeze_copy",
    "unsqueeze_copy",
    "expand_copy",
    "select_copy",
    "slice_copy",
    "_to_dim_order_copy",
    "_assert",
    "scalar_tensor",
)
DEFAULT_MAX_UNDELEGATED = 0.5  # fraction of compute operators a method set may leave to portable kernels


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    if hasattr(target, "_schema"):
        namespace, _, op = target._schema.name.rpartition("::")
        overload = getattr(target, "_overloadname", "")
        name = f"{namespace or 'aten'}.{op}" + (f".{overload}" if overload and overload != "default" else "")
    return name


def _is_bookkeeping(target: Any) -> bool:
    if not hasattr(target, "_schema"):
        return True  # built-in python functions on SymInts
    name = target._schema.name.split("::")[-1]
    return name in _BOOKKEEPING


@dataclass
class DelegationReport:
    """Per-method counts of compute operators inside XNNPACK delegates and left outside."""

    delegated: dict[str, int] = field(default_factory=dict)
    undelegated: dict[str, Counter] = field(default_factory=dict)

    @property
    def total_delegated(self) -> int:
        return sum(self.delegated.values())

    @property
    def total_undelegated(self) -> int:
        return sum(sum(c.values()) for c in self.undelegated.values())

    @property
    def fraction_undelegated(self) -> float:
        total = self.total_delegated + self.total_undelegated
        return self.total_undelegated / total if total else 0.0

    def op_counts(self) -> Counter:
        out: Counter = Counter()
        for c in self.undelegated.values():
            out.update(c)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "delegated_ops": self.total_delegated,
            "undelegated_ops": self.total_undelegated,
            "fraction_undelegated": round(self.fraction_undelegated, 4),
            "per_method": {
                m: {"delegated": self.delegated[m], "undelegated": dict(sorted(self.undelegated[m].items()))}
                for m in self.delegated
            },
        }


def _called_op(node: torch.fx.Node) -> Any:
    """The operator a node runs: an in-place custom op (llama::update_cache) appears wrapped in
    `auto_functionalized` until ExecuTorch re-inplaces it; count it as itself."""
    if "auto_functionalized" in str(node.target) and node.args:
        return node.args[0]
    return node.target


def _count_compute(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and not _is_bookkeeping(_called_op(n)))


def delegation_report(edge_manager: Any, methods: list[str]) -> DelegationReport:
    """Walk each lowered method: ops inside `executorch_call_delegate` count as delegated."""
    report = DelegationReport()
    for method in methods:
        gm = edge_manager.exported_program(method).graph_module
        delegated, left = 0, Counter()
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            op = _called_op(node)
            if "executorch_call_delegate" in str(op):
                lowered = getattr(gm, node.args[0].target)
                delegated += _count_compute(lowered.original_module.graph_module)
            elif not _is_bookkeeping(op):
                left[_op_name(op)] += 1
        report.delegated[method] = delegated
        report.undelegated[method] = left
    return report


def check_delegation(report: DelegationReport, max_undelegated: float) -> None:
    """One-line failure listing the undelegated operators when their share is above the threshold."""
    if report.fraction_undelegated <= max_undelegated:
        return
    ops = ", ".join(f"{name} x{n}" for name, n in report.op_counts().most_common())
    raise InputError(
        f"XNNPACK left {report.total_undelegated} of {report.total_delegated + report.total_undelegated} "
        f"operators undelegated ({report.fraction_undelegated:.0%} > --max-undelegated "
        f"{max_undelegated:.0%}): {ops}"
    )


def partitioners(quantization: str) -> list[Any]:
    """8da4w: dynamically quantized linears first, one delegate each (so packed and unpacked weights
    are never both held), then everything else; the LLaVA recipe in ExecuTorch does the same."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if quantization == "fp32":
        return [XnnpackPartitioner()]
    return [
        XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True),
        XnnpackPartitioner(),
    ]


def is_topologically_sorted(gm: torch.fx.GraphModule) -> bool:
    """Every node comes after the nodes it reads."""
    seen: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if any(inp not in seen for inp in node.all_input_nodes):
            return False
        seen.add(node)
    return True


def stable_sort_in_place(gm: torch.fx.GraphModule) -> bool:
    """Reorders `gm`'s nodes topologically, keeping the existing order wherever the dependencies
    allow, by relinking the nodes (no copies, no recompile). False on a cycle, graph untouched."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    waiting = {node: len(node.all_input_nodes) for node in nodes}
    ready = [i for i, node in enumerate(nodes) if waiting[node] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, index[user])
    if len(order) < len(nodes):
        return False
    for before, node in zip(order, order[1:], strict=False):
        if before.next is not node:
            before.append(node)
    return True


@contextmanager
def sort_only_when_needed() -> Iterator[None]:
    """Delegate creation re-sorts only graphs that are out of order.

    ExecuTorch's `create_submodule_from_nodes` rebuilds the whole method graph (`legalize_graph`:
    copy every node, regenerate and compile the module's Python source) after cutting out each
    delegate. With one delegate per quantized linear that is quadratic in depth: on the full preset
    it was half of the lowering time (py-spy) and the 8da4w lowering did not finish in 47 minutes.
    The graph is usually still in order after the cut (84 % of the cuts on the tiny model), and
    then nothing is done; otherwise the nodes are relinked into order in place (a cycle still goes
    to ExecuTorch's rebuild, which reports it). The module's Python source is not used by lowering
    or serialization (they walk the graph), and the `.pte` runs the same programs: the parity
    tests run these bundles."""
    from executorch.exir import lowered_backend_module

    original = lowered_backend_module.legalize_graph

    def legalize_if_needed(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        if is_topologically_sorted(gm) or stable_sort_in_place(gm):
            return gm
        return original(gm)

    lowered_backend_module.legalize_graph = legalize_if_needed
    try:
        yield
    finally:
        lowered_backend_module.legalize_graph = original


def lower(
    programs: dict[str, ExportedProgram], metadata: dict[str, Any], quantization: str
) -> tuple[Any, DelegationReport]:
    """Lower every method in one program; returns the edge manager and the delegation report."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    with sort_only_when_needed():
        edge = to_edge_transform_and_lower(
            programs,
            partitioner=partitioners(quantization),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=metadata,
        )
    return edge, delegation_report(edge, list(programs))


def to_pte_bytes(edge: Any) -> bytes:
    """Serialize with shared mutable buffers (prefill and decode see one state) and graph inputs
    owned by the caller (no copy of the inputs into planned memory)."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        )
    )
    return program.buffer
