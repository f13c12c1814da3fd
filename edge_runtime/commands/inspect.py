"""`minicpmv-edge inspect`: what a bundle holds, read from its manifest and file headers (no model is loaded).

Exit 0 when every listed file checks out, 1 when one is missing or changed (the report still
prints), 2 when the manifest itself cannot be read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1}


def inspect_bundle(path: Path, checksums: bool = True) -> dict[str, Any]:
    """The documented `inspect --json` object (docs/json.md)."""
    from ..bundle import MANIFEST, iter_bundle_files, read_manifest, safetensors_tensors, verify_files

    manifest = read_manifest(path)
    files = verify_files(path, manifest) if checksums else []
    weights: dict[str, dict[str, int]] = {}
    packages = _coreml_packages(path, manifest.graphs) if manifest.format == "coreml" else {}
    for package in packages.values():
        for dtype, nbytes in package["weight_bytes_by_dtype"].items():
            entry = weights.setdefault(dtype, {"bytes": 0, "tensors": 0, "params": 0})
            entry["bytes"] += nbytes["bytes"]
            entry["tensors"] += nbytes["tensors"]
            entry["params"] += nbytes["params"]
    in_packages = {rel for rel in manifest.files if rel.split("/", 1)[0] in packages}
    for rel in sorted(set(manifest.files) - in_packages):
        if not (path / rel).is_file():
            continue
        if rel.endswith(".safetensors"):
            for t in safetensors_tensors(path / rel):
                entry = weights.setdefault(t.dtype, {"bytes": 0, "tensors": 0, "params": 0})
                entry["bytes"] += t.nbytes
                entry["tensors"] += 1
                entry["params"] += t.numel
        elif rel in _graph_files(manifest.graphs):
            entry = weights.setdefault(
                f"opaque ({Path(rel).suffix or rel})", {"bytes": 0, "tensors": 0, "params": 0}
            )
            entry["bytes"] += int(manifest.files[rel]["bytes"])
    state = [
        {**s, "bytes": _numel(s.get("shape", [])) * _DTYPE_BYTES.get(str(s.get("dtype")), 0)}
        for s in manifest.state
    ]
    return {
        "bundle": str(path),
        "schema_version": manifest.schema_version,
        "family": manifest.family,
        "target": manifest.target,
        "format": manifest.format,
        "quantization": manifest.quantization,
        "toolkit_version": manifest.toolkit_version,
        "created_by": manifest.created_by,
        "max_context": manifest.max_context,
        "chunk_size": manifest.chunk_size,
        "model": manifest.model,
        "entry_points": manifest.graphs,
        "state": state,
        "state_bytes": sum(s["bytes"] for s in state),
        "weights_by_dtype": weights,
        "coreml_packages": packages,
        "size_bytes": (path / MANIFEST).stat().st_size
        + sum(int(e["bytes"]) for e in manifest.files.values()),
        "checksums_verified": checksums,
        "files": [f.to_json() | {"message": f.message()} for f in files],
        "files_ok": all(f.ok for f in files),
        "unlisted_files": [rel for rel in iter_bundle_files(path) if rel not in manifest.files],
    }


def _coreml_packages(path: Path, graphs: dict[str, Any]) -> dict[str, Any]:
    """Per .mlpackage: each function's inputs, states, outputs and op histogram, and its weight
    bytes by stored dtype, read from the MIL program the package carries (nothing is executed).
    A package that cannot be read is reported with its error, the rest of the report still prints."""
    from ..backends.coreml.executor import MILProgram

    names = sorted(
        {f.split("/", 1)[0] for f in _graph_files(graphs) if f.split("/", 1)[0].endswith(".mlpackage")}
    )
    out: dict[str, Any] = {}
    for name in names:
        try:
            program = MILProgram(path / name)
        except Exception as exc:  # a damaged package is a finding of inspect, not a crash
            out[name] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
            continue

        weights = program.weight_bytes_by_function()
        functions = {
            fname: {
                "inputs": _tensor_specs(fn.inputs),
                "states": _tensor_specs(fn.states),
                "outputs": list(fn.outputs),
                "ops": dict(sorted(fn.op_histogram().items(), key=lambda kv: (-kv[1], kv[0]))),
                "weight_bytes": weights[fname]["bytes"],
                "shared_weight_bytes": weights[fname]["shared_bytes"],
            }
            for fname, fn in program.functions.items()
        }
        out[name] = {"functions": functions, "weight_bytes_by_dtype": program.weight_stats_by_dtype()}
    return out


def _tensor_specs(items) -> list[dict[str, Any]]:  # noqa: ANN001 - executor TensorSpecs
    """Executor TensorSpecs as JSON: a flexible dimension becomes null."""
    return [
        {"name": s.name, "shape": [d if isinstance(d, int) else None for d in s.shape], "dtype": str(s.dtype)}
        for s in items
    ]


def _graph_files(graphs: dict[str, Any]) -> set[str]:
    out = set()
    for graph in graphs.values():
        if isinstance(graph, dict):
            out.update(v for k, v in graph.items() if k in ("file", "data_file") and isinstance(v, str))
            out.update(v for v in graph.get("files", []) if isinstance(v, str))
    return out


def _numel(shape: list) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else 0
    return n


def _io_line(io: dict[str, Any]) -> str:
    shape = ", ".join(str(d) for d in io.get("shape", []))
    return f"{io.get('name')} [{shape}] {io.get('dtype')}"


def render(info: dict[str, Any]) -> str:
    lines = [
        f"bundle {info['bundle']}",
        f"  {info['family']} -> {info['target']} / {info['format']} / {info['quantization']}  "
        f"(schema {info['schema_version']}, {info['created_by']})",
        f"  max context {info['max_context']}, prefill chunk {info['chunk_size']}, "
        f"size {info['size_bytes'] / 1e6:.2f} MB",
        "  model: "
        + ", ".join(f"{k} {v}" for k, v in info["model"].items() if not isinstance(v, list | dict)),
        "entry points:",
    ]
    for name, graph in info["entry_points"].items():
        extra = f" method {graph['method']}" if "method" in graph else ""
        state = " + state in/out" if graph.get("state") else ""
        lines.append(f"  {name} ({graph.get('file')}{extra}){state}")
        lines += [f"    in  {_io_line(io)}" for io in graph.get("inputs", [])]
        lines += [f"    out {_io_line(io)}" for io in graph.get("outputs", [])]
    lines.append(f"state: {len(info['state'])} tensors, {info['state_bytes'] / 1e6:.2f} MB")
    lines += [f"  {s['name']} {list(s['shape'])} {s['dtype']}" for s in info["state"]]
    lines.append("weights by dtype:")
    for dtype, w in sorted(info["weights_by_dtype"].items()):
        lines.append(f"  {dtype}: {w['bytes'] / 1e6:.2f} MB ({w['tensors']} tensors, {w['params']} params)")
    for name, package in info.get("coreml_packages", {}).items():
        if "error" in package:
            lines.append(f"{name}: unreadable: {package['error']}")
            continue
        lines.append(f"{name}:")
        for fname, fn in package["functions"].items():
            lines.append(f"  function {fname}")
            lines += [f"    in    {_io_line(io)}" for io in fn["inputs"]]
            lines += [f"    state {_io_line(io)}" for io in fn["states"]]
            lines.append(f"    out   {', '.join(fn['outputs'])}")
            lines.append(
                f"    weights {fn['weight_bytes'] / 1e6:.2f} MB"
                f" ({fn['shared_weight_bytes'] / 1e6:.2f} MB shared with other functions)"
            )
            top = ", ".join(f"{op} {n}" for op, n in list(fn["ops"].items())[:12])
            more = len(fn["ops"]) - 12
            lines.append(
                f"    ops   {sum(fn['ops'].values())}: {top}"
                + (f", ... {more} more types" if more > 0 else "")
            )
    if info["checksums_verified"]:
        lines.append("files:")
        lines += [f"  {'ok ' if f['status'] == 'ok' else 'BAD'} {f['message']}" for f in info["files"]]
    lines += [f"  unlisted (ignored by runtimes): {rel}" for rel in info["unlisted_files"]]
    return "\n".join(lines)


@click.command("inspect")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle directory.")
@click.option("--no-checksums", is_flag=True, help="Skip hashing the files (faster on big bundles).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(bundle: Path, no_checksums: bool, as_json: bool) -> None:
    """Summarise BUNDLE: manifest, entry points, state layout, weight bytes, checksum status."""
    from ..cli import print_json

    info = inspect_bundle(bundle, checksums=not no_checksums)
    if as_json:
        print_json(info)
    else:
        click.echo(render(info))
    if not info["files_ok"]:
        from ..errors import CheckFailed

        bad = next(f for f in info["files"] if f["status"] != "ok")
        raise CheckFailed(f"bundle {bundle}: {bad['message']}")


COMMANDS = [inspect]
