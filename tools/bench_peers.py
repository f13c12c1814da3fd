"""`make bench-peers`: our int4 bundles against llama.cpp and onnxruntime-genai, in one interleaved run.

    python tools/bench_peers.py [--preset full|tiny] [--rounds 5] [--threads 2] [--out docs/bench-peers]

Every system runs the same text weights (one MiniCPM-V 4.6 checkpoint, random full-size weights by
default), the same prompt length, the same decode length, the same thread count and the same
context capacity (prompt + decode + depth, as llama-bench sizes its own):

| system | built by | measured by |
|---|---|---|
| ours onnx int4 | `minicpmv-edge export --target harmonyos --quant int4` | the shared generation loop |
| ours executorch 8da4w | `minicpmv-edge export --target android --quant 8da4w` | the shared generation loop |
| ours onnx int4, int4 vision | the same with `--vision-quant int4` | vision and TTFT only (its text weights are the first row's) |
| onnxruntime-genai int4 | its model builder, CPU defaults (accuracy level 4) | `append_tokens` / `generate_next_token` |
| llama.cpp Q4_0, Q4_K_M | `convert_hf_to_gguf.py` + `llama-quantize` | `llama-bench` (pp N; tg M at depth N) |

Prefill: N prompt tokens from an empty context, tok/s. Decode: M steps after those N tokens, tok/s
(the first token, which comes from prefill, is not a decode step). Vision: the time to encode one
448x448 slice, ours (the ONNX bundle's vision graph) against llama.cpp's mmproj (`llama-mtmd-cli`'s
"image slice encoded" line); TTFT of a chat turn on that image in 16x and in 4x mode (ours only).

Rounds: every system once per round, in the same order, after one warm-up round that is not
counted; each round waits until the machine is idle (other processes below --idle-max of the CPUs)
and records how busy it was. Medians and min-max per figure; ratios are ours / peer on the medians.
A peer that fails to build, convert or run is reported with its error, never dropped.
Outputs are reused between runs while the checkpoint is unchanged (in build/bench-peers/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import genai_compare  # noqa: E402
import llama_cpp_peer  # noqa: E402
from stamped_outputs import fingerprint, reuse_or_make  # noqa: E402

from edge_runtime.bench import machine_info, measure_bandwidth, run_chat_turn, stats, write_atomic  # noqa: E402
from edge_runtime.errors import EdgeError, InputError  # noqa: E402
from edge_runtime.worker_process import WorkerProcess, one_line, serve  # noqa: E402

Progress = Callable[[str], None]
WORK = ROOT / "build" / "bench-peers"


def shown_path(path: Path) -> str:
    """A path as the committed report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


PROMPT_TEXT = "The keeper climbed the stairs, lit the lamp and watched the waves break on the rocks. "
OURS = ("ours onnx int4", "ours executorch 8da4w")
OURS_INT4_VISION = "ours onnx int4, int4 vision"
# how each of our systems is exported: target, quantization, --vision-quant (None: the default)
OUR_BUILDS = {
    OURS[0]: ("harmonyos", "int4", None),
    OURS[1]: ("android", "8da4w", None),
    OURS_INT4_VISION: ("harmonyos", "int4", "int4"),
}
# the vision figures of our ONNX systems, by key prefix in the report's "vision" table
VISION_KEYS = {OURS[0]: "ours", OURS_INT4_VISION: "ours_int4_vision"}
GENAI = "onnxruntime-genai int4"
LLAMA = ("llama.cpp Q4_0", "llama.cpp Q4_K_M")
VISION_SIDE = 448


def log(message: str) -> None:
    print(f"[bench-peers] {message}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    checkpoint: Path
    work: Path
    rounds: int = 5
    warmup: int = 1
    threads: int = 2
    prompt_tokens: int = 128
    decode_tokens: int = 64
    idle_max: float = 0.10
    idle_wait_s: float = 600.0

    @property
    def max_context(self) -> int:
        """llama-bench's context for `-p N -n M -d N` is N + M + N; everyone gets that capacity."""
        return 2 * self.prompt_tokens + self.decode_tokens


@dataclass
class System:
    """One entry of the run: what it is, how it was built, and its per-round results or its error."""

    name: str
    kind: str  # ours | genai | llama
    path: Path | None = None
    build: dict[str, Any] = field(default_factory=dict)
    text: bool = True  # False: measured on vision / TTFT only
    error: str | None = None
    runs: list[dict[str, float]] = field(default_factory=list)
    weight_bytes_per_token: int | None = None
    worker: Any = None


# ---------------------------------------------------------------------------------------------------
# Preparation: every system's model, reused while the checkpoint is unchanged


def prepare(s: Settings, say: Progress, skip: Sequence[str] = ()) -> list[System]:
    """Every system's model, built or reused; a skipped one keeps its place with the reason as its error."""
    ours = [System(n, "ours", text=n in OURS) for n in OUR_BUILDS]
    genai = System(GENAI, "genai")
    systems = ours + [genai] + [System(n, "llama") for n in LLAMA]
    for system in systems:
        if system.name in skip:
            system.error = "skipped (--skip)"
    fp = fingerprint
    for system in ours:
        target, quant, vision_quant = OUR_BUILDS[system.name]
        suffix = "" if vision_quant is None else f"-vision-{vision_quant}"
        system.path = s.work / f"ours-{target}-{quant}{suffix}"
        if system.error is None:
            stamp = {
                "step": "export",
                "target": target,
                "quant": quant,
                "ctx": s.max_context,
                **({} if vision_quant is None else {"vision_quant": vision_quant}),
                **_export_defaults(),
            }
            system.build = _guard(system, say, lambda t=target, q=quant, v=vision_quant, p=system.path, f=stamp: {**reuse_or_make(
                p, fp(s.checkpoint, f), "manifest.json", lambda: _export(s, t, q, v, p, say)
            ), **{k: f[k] for k in ("int4_compute", "export_source_sha256")}})  # fmt: skip
    genai.path = s.work / "genai-int4"
    if genai.error is None:
        genai.build = _guard(genai, say, lambda: _prepare_genai(s, genai.path, say))
    llama_systems = [x for x in systems if x.kind == "llama" and x.error is None]
    llama_tree: llama_cpp_peer.LlamaCpp | None = None
    if llama_systems:
        try:
            llama_tree = llama_cpp_peer.ensure_built(say)
        except llama_cpp_peer.PeerError as exc:
            for system in llama_systems:
                system.error = f"build: {exc}"
    if llama_tree is not None:
        f16 = s.work / "gguf" / "text-f16.gguf"
        for system in llama_systems:
            qtype = system.name.rsplit(" ", 1)[-1]
            system.path = s.work / "gguf" / f"text-{qtype}.gguf"
            system.build = _guard(system, say, lambda q=qtype, p=system.path: reuse_or_make(
                p, fp(s.checkpoint, {"step": "gguf", "qtype": q}), None,
                lambda: _gguf(llama_tree, s, f16, q, p, say),
            ))  # fmt: skip
            system.build["llama_cpp"] = llama_tree.version
    for system in systems:
        if system.error is None:
            system.weight_bytes_per_token = _guard(system, say, lambda x=system: weight_bytes_per_token(x))
    return systems


def _guard(system: System, say: Progress, work: Callable[[], Any]) -> Any:
    """Run a preparation step; a failure becomes the system's recorded error."""
    try:
        return work()
    except (EdgeError, llama_cpp_peer.PeerError, OSError, RuntimeError, ValueError) as exc:
        system.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        say(f"{system.name}: {system.error}")
        return {}


EXPORT_SOURCES = ("export", "edge_runtime/models", "edge_runtime/families")


def _export_defaults() -> dict[str, Any]:
    """What decides the bytes of our bundles besides the checkpoint: the int4 compute default and the
    exporter's own source (a bundle stamped by other exporter code is stale, never reused silently)."""
    import hashlib

    from export.onnx.quantize import DEFAULT_INT4_COMPUTE

    digest = hashlib.sha256()
    for folder in EXPORT_SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {"int4_compute": DEFAULT_INT4_COMPUTE, "export_source_sha256": digest.hexdigest()[:16]}


def _export(
    s: Settings, target: str, quant: str, vision_quant: str | None, out: Path, say: Progress
) -> dict[str, Any]:
    from export.pipeline import ExportRequest, export_bundle

    option = "" if vision_quant is None else f" --vision-quant {vision_quant}"
    say(f"exporting ours: {target} {quant}{option} -> {out}")
    request = ExportRequest(
        s.checkpoint, out, target, quantization=quant, max_context=s.max_context, vision_quant=vision_quant
    )
    export_bundle(request, progress=lambda m: say(f"export {quant}{option}: {m}"))
    return {
        "command": f"minicpmv-edge export --target {target} --quant {quant} --max-context {s.max_context}"
        + option
    }


def _prepare_genai(s: Settings, out: Path, say: Progress) -> dict[str, Any]:
    og = genai_compare.require_genai()
    hf = s.work / genai_compare.HF_DIR

    def convert() -> None:
        say(f"converting the text weights to the Qwen3.5 layout in {hf}")
        genai_compare.convert_checkpoint(s.checkpoint, hf)

    reuse_or_make(hf, fingerprint(s.checkpoint, {"step": "convert"}), "model.safetensors", convert)
    fp = fingerprint(s.checkpoint, {"step": "builder-defaults", "genai": og.__version__})
    record = reuse_or_make(
        out, fp, "genai_config.json", lambda: genai_compare.run_builder(hf, out, "int4", say, {})
    )
    return {**record, "options": "model builder CPU defaults", "onnxruntime_genai": og.__version__}


def _gguf(
    tree: llama_cpp_peer.LlamaCpp, s: Settings, f16: Path, qtype: str, out: Path, say: Progress
) -> dict:
    """The text GGUF at `qtype`, quantized from the f16 GGUF (converted first, with the mmproj)."""
    f16.parent.mkdir(parents=True, exist_ok=True)
    mmproj = f16.with_name("mmproj-f16.gguf")

    def convert(path: Path, vision: bool) -> None:
        say(f"convert_hf_to_gguf: {'the mmproj' if vision else 'text'} f16 -> {path}")
        tree.convert(s.checkpoint, path, mmproj=vision)

    for path, is_mmproj in ((f16, False), (mmproj, True)):
        stamp = fingerprint(s.checkpoint, {"step": "gguf-f16", "mmproj": is_mmproj})
        reuse_or_make(path, stamp, None, lambda p=path, m=is_mmproj: convert(p, m))
    say(f"llama-quantize {qtype}")
    tree.quantize(f16, out, qtype, s.threads)
    return {"commands": [
        f"convert_hf_to_gguf.py CK --outtype f16 {' '.join(llama_cpp_peer.CONVERTER_FLAGS)} "
        f"(pre-tokenizer {llama_cpp_peer.PRE_TOKENIZER})",
        f"llama-quantize text-f16.gguf text-{qtype}.gguf {qtype}",
    ]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Weight bytes read per decoded token (the bandwidth bound's denominator), per format


def weight_bytes_per_token(system: System) -> int | None:
    """Decoder weights as stored, less the token-embedding table where the head does not share it
    (an embedding lookup reads one row)."""
    assert system.path is not None
    if system.kind == "ours":
        from edge_runtime.bundle import load_bundle

        value = load_bundle(system.path).manifest.model.get("decode_weight_bytes")
        return int(value) if value is not None else None
    if system.kind == "genai":
        return _onnx_weight_bytes(system.path / "model.onnx")
    return _gguf_weight_bytes(system.path)


def _onnx_weight_bytes(model_file: Path) -> int:
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for t in model.graph.initializer:
        if users.get(t.name) and users[t.name] <= {"Gather", "GatherBlockQuantized"}:
            continue  # an embedding table only gathered from
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def _gguf_weight_bytes(path: Path) -> int:
    gguf_py = str(llama_cpp_peer.cache_root() / "src" / "gguf-py")
    if gguf_py not in sys.path:  # llama.cpp's own reader, from the tree it was built from
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


# ---------------------------------------------------------------------------------------------------
# Workers: ours and onnxruntime-genai each in their own process (own thread pools, own memory)


def worker_main() -> int:
    """JSON lines (edge_runtime/worker_process.py): first the spec (reply: ready), then
    {"op": "text"|"vision"|"stop"}; any failure is answered as this system's error."""
    runners: list[Any] = []

    def handle(message: dict[str, Any]) -> dict[str, Any] | None:
        if not runners:
            runners.append(OursRunner(message) if message["kind"] == "ours" else GenaiRunner(message))
            return {"ready": True}
        if message["op"] == "text":
            return runners[0].text()
        if message["op"] == "vision":
            return runners[0].vision(message["image"], message["mode"])
        return None

    return serve(handle, lambda exc: {"error": one_line(exc)})


class OursRunner:
    """A bundle behind the shared generation loop, fed the spec's prompt token ids."""

    def __init__(self, spec: dict[str, Any]):
        import numpy as np

        from edge_runtime.runtime import open_session

        self.spec = spec
        self.session = open_session(
            bundle=Path(spec["path"]), max_context=spec["max_context"], threads=spec["threads"]
        )
        ids = np.asarray(spec["prompt_ids"], dtype=np.int64)
        self.embeds = np.asarray(self.session.backend.token_embedding(ids), dtype=np.float32)

    def text(self) -> dict[str, float]:
        from edge_runtime.generation import generate

        n = self.spec["decode_tokens"]
        sampling = self.session.sampling(max_new_tokens=n + 1, stop_ids=())
        t = generate(self.session.backend, self.embeds, sampling).timings
        # prefill = the prompt through the decoder and the first token picked (TTFT without vision)
        return {"prefill_tok_s": len(self.embeds) / (t.ttft_ms / 1000), "decode_tok_s": t.decode_tok_s}

    def vision(self, image: str, mode: str) -> dict[str, Any]:
        settings = {"prompt": "Describe the image.", "images": [image], "downsample_mode": mode}
        out = run_chat_turn(self.session, {**settings, "max_slice_nums": None, "decode_tokens": 0})
        return {
            "ttft_ms": out["ttft_ms"],
            "vision_slice_ms": out["vision_slice_ms"],
            "n_slices": out["n_slices"],
        }


class GenaiRunner:
    """onnxruntime-genai's model through its Python API (greedy, CPU provider, no eos)."""

    def __init__(self, spec: dict[str, Any]):
        og = genai_compare.require_genai()
        self.spec = spec
        self.theirs = genai_compare.Theirs(og, Path(spec["path"]), spec["threads"], spec["max_context"])

    def text(self) -> dict[str, float]:
        run = self.theirs.run(self.spec["prompt_ids"], self.spec["decode_tokens"])
        return {
            "prefill_tok_s": len(self.spec["prompt_ids"]) / (run.prefill_ms / 1000),
            "decode_tok_s": run.tok_s,
        }


class Worker:
    """A system's worker process (ours or onnxruntime-genai); replies with "error" raise RuntimeError."""

    def __init__(self, system: System, spec: dict[str, Any]):
        self.system = system
        self._process = WorkerProcess(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            {"kind": system.kind, "path": str(system.path), **spec},
            f"worker for {system.name}",
            lambda reply: RuntimeError(reply["error"]),
        )
        self._process.receive()  # ready

    def reply_to(self, message: dict[str, Any]) -> dict[str, Any]:
        return self._process.request(message)

    def close(self) -> None:
        self._process.close()


# ---------------------------------------------------------------------------------------------------
# The interleaved run


def prompt_ids(checkpoint: Path, n: int) -> list[int]:
    """n token ids of a repeated English sentence, through the checkpoint's own tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    ids = tokenizer.encode(PROMPT_TEXT).ids
    return [ids[i % len(ids)] for i in range(n)]


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` while this run is idle (so: other processes)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except OSError:
        return 0.0
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_idle(s: Settings, say: Progress) -> float:
    deadline = time.monotonic() + s.idle_wait_s
    busy = busy_fraction()
    while busy > s.idle_max and time.monotonic() < deadline:
        say(f"waiting for an idle machine: {busy:.0%} of the CPUs busy")
        busy = busy_fraction(5.0)
    return busy


def run_rounds(s: Settings, systems: list[System], image: Path, llama: Any, say: Progress) -> dict[str, Any]:
    ids = prompt_ids(s.checkpoint, s.prompt_tokens)
    spec = {
        "threads": s.threads,
        "max_context": s.max_context,
        "prompt_ids": ids,
        "decode_tokens": s.decode_tokens,
    }
    for system in systems:
        if system.error is None and system.kind in ("ours", "genai"):
            system.worker = _guard(system, say, lambda x=system: Worker(x, spec))
    mmproj = s.work / "gguf" / "mmproj-f16.gguf"
    vision: dict[str, list[Any]] = {f"{p}_{m}": [] for p in VISION_KEYS.values() for m in ("16x", "4x")}
    vision["llama_cpp_mmproj"] = []
    vision_errors: dict[str, str] = {}
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(s.warmup + s.rounds):
            counted = r >= s.warmup
            busy = wait_idle(s, say)
            bandwidth = measure_bandwidth()
            rounds.append(
                {"round": r + 1, "counted": counted, "busy_before": busy, "bandwidth_gbs": bandwidth.gbs}
            )
            for system in systems:
                if system.error is not None or not system.text:
                    continue
                try:
                    if system.kind == "llama":
                        result = llama.bench(system.path, s.threads, s.prompt_tokens, s.decode_tokens)
                    else:
                        result = system.worker.reply_to({"op": "text"})
                except (RuntimeError, llama_cpp_peer.PeerError) as exc:
                    system.error = f"run: {exc}"
                    say(f"{system.name}: {system.error}")
                    continue
                result["bandwidth_gbs"] = bandwidth.gbs
                say(
                    f"round {r + 1}{'' if counted else ' (warm-up)'}: {system.name}: "
                    f"prefill {result['prefill_tok_s']:.1f} tok/s, decode {result['decode_tok_s']:.1f} tok/s"
                )
                if counted:
                    system.runs.append(result)
            _vision_round(systems, image, mmproj, llama, s, vision, vision_errors, counted, say)
    finally:
        for system in systems:
            if system.worker is not None:
                system.worker.close()
    return {"rounds": rounds, "vision": vision, "vision_errors": vision_errors, "prompt_ids": ids}


def _vision_round(
    systems: list[System],
    image: Path,
    mmproj: Path,
    llama: Any,
    s: Settings,
    vision: dict[str, list[Any]],
    errors: dict[str, str],
    counted: bool,
    say: Progress,
) -> None:
    for onnx in (x for x in systems if x.name in VISION_KEYS):
        for mode in ("16x", "4x"):
            key = f"{VISION_KEYS[onnx.name]}_{mode}"
            if onnx.error is None and key not in errors:
                try:
                    out = onnx.worker.reply_to({"op": "vision", "image": str(image), "mode": mode})
                    if counted:
                        vision[key].append(out)
                except RuntimeError as exc:
                    errors[key] = str(exc)
    q4 = next(x for x in systems if x.name == LLAMA[0])
    if llama is not None and q4.error is None and "llama_cpp_mmproj" not in errors:
        try:
            slices = llama.encode_slices_ms(q4.path, mmproj, image, s.threads, "16x mmproj f16")
            if counted:
                vision["llama_cpp_mmproj"].append({"vision_slice_ms": slices})
        except llama_cpp_peer.PeerError as exc:
            errors["llama_cpp_mmproj"] = str(exc)
            say(f"llama.cpp mmproj: {exc}")


# ---------------------------------------------------------------------------------------------------
# The report


def summarize(s: Settings, systems: list[System], measured: dict[str, Any], machine: dict[str, Any]) -> dict:
    bandwidth = statistics.median(r["bandwidth_gbs"] for r in measured["rounds"] if r["counted"])
    table: dict[str, Any] = {}
    for system in systems:
        entry: dict[str, Any] = {"kind": system.kind, "build": system.build, "error": system.error}
        if system.runs:
            entry["prefill_tok_s"] = stats([r["prefill_tok_s"] for r in system.runs])
            entry["decode_tok_s"] = stats([r["decode_tok_s"] for r in system.runs])
            entry["weight_bytes_per_token"] = system.weight_bytes_per_token
            if system.weight_bytes_per_token:
                bounds = [r["bandwidth_gbs"] * 1e9 / system.weight_bytes_per_token for r in system.runs]
                fractions = [r["decode_tok_s"] / b for r, b in zip(system.runs, bounds, strict=True)]
                entry["decode_fraction_of_bound"] = statistics.median(fractions)
        table[system.name] = entry

    def median(name: str, key: str) -> float | None:
        value = table.get(name, {}).get(key)
        return value["median"] if isinstance(value, dict) else None

    peers = [n for n in (GENAI, *LLAMA) if median(n, "decode_tok_s")]
    ours = [n for n, e in table.items() if e["kind"] == "ours" and median(n, "decode_tok_s")]
    best_peer = max(peers, key=lambda n: median(n, "decode_tok_s")) if peers else None
    best_peer_prefill = max(peers, key=lambda n: median(n, "prefill_tok_s")) if peers else None
    best_ours = max(ours, key=lambda n: median(n, "decode_tok_s")) if ours else None
    best_ours_prefill = max(ours, key=lambda n: median(n, "prefill_tok_s")) if ours else None

    def ratio(a: str | None, b: str | None, key: str) -> float | None:
        x, y = (median(a, key) if a else None), (median(b, key) if b else None)
        return x / y if x and y else None

    vision = _vision_summary(measured["vision"])
    ratios = {
        "best_ours_decode": best_ours,
        "best_peer_decode": best_peer,
        "decode_ratio_vs_best_peer": ratio(best_ours, best_peer, "decode_tok_s"),
        "best_ours_prefill": best_ours_prefill,
        "best_peer_prefill": best_peer_prefill,
        "prefill_ratio_vs_best_peer": ratio(best_ours_prefill, best_peer_prefill, "prefill_tok_s"),
        "onnx_vs_genai_decode_ratio": ratio(OURS[0], GENAI, "decode_tok_s"),
        "onnx_vs_genai_prefill_ratio": ratio(OURS[0], GENAI, "prefill_tok_s"),
        "best_ours_decode_fraction_of_bound": table.get(best_ours or "", {}).get("decode_fraction_of_bound"),
        "ttft_16x_over_4x": _div(
            vision.get("ours_16x", {}).get("ttft_ms"), vision.get("ours_4x", {}).get("ttft_ms")
        ),
        "vision_slice_ratio_vs_llama_cpp": _div(
            vision.get("ours_16x", {}).get("slice_ms"), vision.get("llama_cpp_mmproj", {}).get("slice_ms")
        ),
        # the opt-in 4-bit vision weights (export --vision-quant int4): the same slice, the same peer
        "int4_vision_slice_ratio_vs_llama_cpp": _div(
            vision.get("ours_int4_vision_16x", {}).get("slice_ms"),
            vision.get("llama_cpp_mmproj", {}).get("slice_ms"),
        ),
        "int4_vision_ttft_16x_over_4x": _div(
            vision.get("ours_int4_vision_16x", {}).get("ttft_ms"),
            vision.get("ours_int4_vision_4x", {}).get("ttft_ms"),
        ),
    }
    targets = [
        ("decode_ratio_vs_best_peer", ">=", 1.2),
        ("best_ours_decode_fraction_of_bound", ">=", 0.75),
        ("prefill_ratio_vs_best_peer", ">=", 1.0),
        ("onnx_vs_genai_decode_ratio", ">=", 1.0),
        ("ttft_16x_over_4x", "<=", 0.5),
        ("vision_slice_ratio_vs_llama_cpp", "<=", 1.0),
        ("int4_vision_ttft_16x_over_4x", "<=", 0.5),
        ("int4_vision_slice_ratio_vs_llama_cpp", "<=", 1.0),
    ]
    checks = [
        {"ratio": k, "target": f"{op} {t}", "value": ratios[k],
         "met": None if ratios[k] is None else (ratios[k] >= t if op == ">=" else ratios[k] <= t)}
        for k, op, t in targets
    ]  # fmt: skip
    return {
        "schema": "minicpmv-edge/bench-peers/1",
        "date": datetime.date.today().isoformat(),
        "settings": {
            "checkpoint": shown_path(s.checkpoint),
            "rounds": s.rounds,
            "warmup_rounds": s.warmup,
            "threads": s.threads,
            "prompt_tokens": s.prompt_tokens,
            "decode_tokens": s.decode_tokens,
            "context_capacity": s.max_context,
            "vision_image": f"{VISION_SIDE}x{VISION_SIDE} synthetic PNG",
        },
        "machine": {**machine, "bandwidth_gbs_median": bandwidth},
        "rounds": measured["rounds"],
        "systems": table,
        "vision": vision,
        "vision_errors": measured["vision_errors"],
        "ratios": ratios,
        "targets": checks,
    }


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _vision_summary(vision: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, runs in vision.items():
        if not runs:
            continue
        slices = [r["vision_slice_ms"][0] for r in runs if r["vision_slice_ms"]]
        entry: dict[str, Any] = {"slice_ms": statistics.median(slices) if slices else None,
                                 "slice_ms_stats": stats(slices), "n_slices": len(runs[0]["vision_slice_ms"])}  # fmt: skip
        if "ttft_ms" in runs[0]:
            entry["ttft_ms"] = statistics.median(r["ttft_ms"] for r in runs)
            entry["ttft_ms_stats"] = stats([r["ttft_ms"] for r in runs])
        out[key] = entry
    return out


def to_markdown(report: dict[str, Any]) -> str:
    st, m = report["settings"], report["machine"]
    lines = [
        "# Peer benchmark: minicpmv-edge against llama.cpp and onnxruntime-genai",
        "",
        f"{report['date']}, {m['cpu']}, {m['cpu_count']} CPUs, {st['threads']} threads for every system, "
        f"memory bandwidth {m['bandwidth_gbs_median']:.1f} GB/s (median of the rounds). "
        f"{st['rounds']} rounds after {st['warmup_rounds']} warm-up, interleaved; prompt {st['prompt_tokens']} "
        f"tokens, {st['decode_tokens']} decode steps after it, context capacity {st['context_capacity']}. "
        f"Checkpoint: `{st['checkpoint']}`. Generated by `make bench-peers` (tools/bench_peers.py).",
        "",
        "| system | decode tok/s, median (min-max) | prefill tok/s, median (min-max) | decode / bandwidth bound "
        "| weight MB read per token |",
        "|---|---|---|---|---|",
    ]
    for name, e in report["systems"].items():
        if e.get("error"):
            lines.append(f"| {name} | failed: {e['error']} | | | |")
            continue
        if "decode_tok_s" not in e:
            continue
        d, p = e["decode_tok_s"], e["prefill_tok_s"]
        frac = e.get("decode_fraction_of_bound")
        mb = e.get("weight_bytes_per_token")
        lines.append(
            f"| {name} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {p['median']:.0f} "
            f"({p['min']:.0f}-{p['max']:.0f}) | {'' if frac is None else f'{frac:.2f}'} | "
            f"{'' if mb is None else f'{mb / 1e6:.0f}'} |"
        )
    v = report["vision"]
    lines += ["", "| vision, one 448x448 slice | slice ms (median) | TTFT ms (median) |", "|---|---|---|"]
    for key, label in (("ours_16x", "ours onnx, 16x"), ("ours_4x", "ours onnx, 4x"),
                       ("ours_int4_vision_16x", "ours onnx, int4 vision, 16x"),
                       ("ours_int4_vision_4x", "ours onnx, int4 vision, 4x"),
                       ("llama_cpp_mmproj", "llama.cpp mmproj f16, 16x")):  # fmt: skip
        if key in v:
            ttft = v[key].get("ttft_ms")
            lines.append(f"| {label} | {v[key]['slice_ms']:.0f} | {'' if ttft is None else f'{ttft:.0f}'} |")
        elif key in report["vision_errors"]:
            lines.append(f"| {label} | failed: {report['vision_errors'][key]} | |")
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for c in report["targets"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        lines.append(
            f"| {c['ratio']} | {value} | {c['target']} | {'n/a' if c['met'] is None else c['met']} |"
        )
    r = report["ratios"]
    lines += [
        "",
        f"Best ours (decode): {r['best_ours_decode']}; best peer (decode): {r['best_peer_decode']}.",
        "",
        "Rounds (CPU busy before each, bandwidth): "
        + ", ".join(
            f"{x['round']}: {x['busy_before']:.0%} {x['bandwidth_gbs']:.1f} GB/s" for x in report["rounds"]
        ),
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n, e in report["systems"].items() if "decode_tok_s" in e]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("decode_tok_s", "prefill_tok_s"), strict=True):
        med = [report["systems"][n][key]["median"] for n in names]
        lo = [m - report["systems"][n][key]["min"] for n, m in zip(names, med, strict=True)]
        hi = [report["systems"][n][key]["max"] - m for n, m in zip(names, med, strict=True)]
        ax.barh(
            names,
            med,
            xerr=[lo, hi],
            color=["tab:blue" if report["systems"][n]["kind"] == "ours" else "tab:gray" for n in names],
        )
        ax.set_xlabel(key.replace("_", " "))
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": "minicpmv-edge bench-peers"})
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def vision_image(work: Path) -> Path:
    """A deterministic 448x448 test image (gradients and shapes), one slice in either mode."""
    import numpy as np
    from PIL import Image

    path = work / f"image-{VISION_SIDE}.png"
    if not path.is_file():
        y, x = np.mgrid[0:VISION_SIDE, 0:VISION_SIDE]
        rgb = np.stack([x * 255 // VISION_SIDE, y * 255 // VISION_SIDE, (x ^ y) & 255], axis=-1).astype(
            np.uint8
        )
        work.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
    return path


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=["tiny", "full"], default="full")
    parser.add_argument("--checkpoint", type=Path, help="A MiniCPM-V 4.6 checkpoint (default: a random one)")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument(
        "--idle-max", type=float, default=0.10, help="Wait while other processes use more CPU."
    )
    parser.add_argument(
        "--bundle", action="append", default=[], type=Path, help="More of our bundles to run alongside."
    )
    parser.add_argument(
        "--skip", action="append", default=[], choices=[*OUR_BUILDS, GENAI, *LLAMA],
        help="Leave a system out of this run (the report says so).",
    )  # fmt: skip
    parser.add_argument(
        "--prepare-only", action="store_true", help="Build every system's model, time nothing."
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "bench-peers", help="Report stem (.md/.json/.png)"
    )
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main()
    if min(args.rounds, args.threads, args.prompt_tokens, args.decode_tokens) < 1 or args.warmup < 0:
        print("error: --rounds, --threads, --prompt-tokens, --decode-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        work = args.work / args.preset if args.checkpoint is None else args.work
        checkpoint = args.checkpoint or _default_checkpoint(work, args.preset)
        s = Settings(checkpoint, work, args.rounds, args.warmup, args.threads, args.prompt_tokens,
                     args.decode_tokens, args.idle_max)  # fmt: skip
        systems = prepare(s, log, args.skip)
        for bundle in args.bundle:
            extra = System(f"ours {bundle.name}", "ours", bundle, {"given": str(bundle)})
            extra.weight_bytes_per_token = _guard(extra, log, lambda x=extra: weight_bytes_per_token(x))
            systems.insert(len(OUR_BUILDS), extra)
        if args.prepare_only:
            for system in systems:
                log(f"{system.name}: {'ready' if system.error is None else system.error}")
            return 0
        llama = None
        try:
            llama = llama_cpp_peer.ensure_built(log)
        except llama_cpp_peer.PeerError:
            pass  # already recorded against the llama.cpp systems
        measured = run_rounds(s, systems, vision_image(work), llama, log)
        report = summarize(s, systems, measured, machine_info())
    except (EdgeError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    write_atomic(
        args.out.with_suffix(".json"), json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    )
    write_atomic(args.out.with_suffix(".md"), to_markdown(report))
    plot(report, args.out.with_suffix(".png"))
    print(to_markdown(report))
    log(f"wrote {args.out}.md, .json and .png")
    return 0


def _default_checkpoint(work: Path, preset: str) -> Path:
    from edge_runtime.init_checkpoint import init_checkpoint

    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        log(f"writing a random {preset} MiniCPM-V 4.6 checkpoint to {checkpoint} (bf16)")
        init_checkpoint("minicpm-v-4.6", preset, checkpoint, seed=0, dtype="bf16")
    return checkpoint


if __name__ == "__main__":
    sys.exit(main())
