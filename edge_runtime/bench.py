"""Speed measurement: TTFT split by stage, decode tok/s, peak RSS, size, and the memory-bandwidth bound.

Every model under test (a checkpoint or a bundle) runs in its own worker process, so each gets its
own peak RSS and none pays for another's memory; the parent drives them interleaved (A B C A B C
...) so machine drift lands on all of them alike, after warm-up runs that are not counted. Each run
is one full chat turn through the shared Session: image file in -> first token (TTFT, split into
preprocess, vision per slice, embed + splice, prefill, first sample), then N decode steps with the
stop ids ignored so every run decodes exactly N tokens.

The bandwidth bound: decode on a phone or a CPU is limited by reading the weights once per token,
so bound_tok_s = measured bandwidth / weight bytes read per decoded token (decoder layers + final
norm + vocabulary head; the embedding table is read one row per token and state reads are small,
so both are left out). Bandwidth is measured here, with numpy copies of a large array.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EdgeError, InputError
from .jsonfile import read_json_file
from .worker_process import WorkerDied, WorkerProcess, serve

SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "samples"
DEVICE_TARGETS_FILE = Path(__file__).resolve().parent / "data" / "device_targets.json"
DEFAULT_IMAGE = SAMPLES_DIR / "wide.png"
DEFAULT_PROMPT = "Describe the image."
DEFAULT_DECODE_TOKENS = 64
TTFT_PARTS = ("preprocess_ms", "vision_ms", "embed_ms", "prefill_ms", "first_sample_ms")
RUN_METRICS = (*TTFT_PARTS, "ttft_ms", "decode_tok_s")
RATIO_KEYS = (
    "ttft_ms",
    "preprocess_ms",
    "vision_ms",
    "prefill_ms",
    "decode_tok_s",
    "peak_rss_mb",
    "size_bytes",
)

Progress = Callable[[str], None]


REPORT_HEADER = "# Benchmark report"
PNG_SOFTWARE = "minicpmv-edge bench"


def is_bench_report(head: bytes) -> bool:
    return head.startswith(REPORT_HEADER.encode())


def is_bench_chart(head: bytes) -> bool:
    return head.startswith(b"\x89PNG") and PNG_SOFTWARE.encode() in head


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write a report file via a temp file and rename: a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """median / min / max of repeated measurements."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


# ---------------------------------------------------------------------------------------------------
# Memory bandwidth


@dataclass
class Bandwidth:
    gbs: float  # median, 1e9 bytes/s
    samples_gbs: list[float]
    array_bytes: int
    method: str


def measure_bandwidth(size_mb: int = 256, repeats: int = 5) -> Bandwidth:
    """Copy a size_mb array into another `repeats` times (after one untimed copy that faults the pages
    in); each copy reads and writes size_mb, so bytes moved = 2 x size. Median of the samples."""
    n = max(size_mb, 1) * (1 << 20) // 8
    src = np.arange(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    samples = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        samples.append(2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return Bandwidth(
        gbs=float(statistics.median(samples)),
        samples_gbs=samples,
        array_bytes=int(src.nbytes),
        method=f"numpy copyto of a {src.nbytes >> 20} MiB float64 array, read + write bytes / time, median",
    )


# ---------------------------------------------------------------------------------------------------
# Candidates and their worker processes


@dataclass(frozen=True)
class Candidate:
    label: str
    kind: str  # checkpoint | bundle
    path: Path


@dataclass(frozen=True)
class BenchSettings:
    images: tuple[Path, ...] = (DEFAULT_IMAGE,)
    prompt: str = DEFAULT_PROMPT
    downsample_mode: str | None = None
    max_slice_nums: int | None = None
    decode_tokens: int = DEFAULT_DECODE_TOKENS
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None
    max_context: int | None = None
    bandwidth_mb: int = 256


def candidates_from(checkpoints: Sequence[Path], bundles: Sequence[Path]) -> list[Candidate]:
    """Checkpoints first, then bundles, each in the order given; labels are unique."""
    out: list[Candidate] = []
    seen: dict[str, int] = {}
    for kind, paths in (("checkpoint", checkpoints), ("bundle", bundles)):
        for path in paths:
            base = f"{kind}:{Path(path).name}"
            seen[base] = seen.get(base, 0) + 1
            out.append(Candidate(base if seen[base] == 1 else f"{base}#{seen[base]}", kind, Path(path)))
    return out


class Worker:
    """One candidate in its own `python -m edge_runtime.bench --worker` process (worker_process.py)."""

    def __init__(self, candidate: Candidate, settings: BenchSettings):
        self.candidate = candidate
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        spec = {"kind": candidate.kind, "path": str(candidate.path), "settings": _settings_json(settings)}
        self._process = WorkerProcess(
            [sys.executable, "-m", "edge_runtime.bench", "--worker"],
            spec,
            f"bench worker for {candidate.label}",
            _reply_error,
            env,
        )
        self.info: dict[str, Any] = {}

    def ready(self) -> dict[str, Any]:
        """Wait for the worker to finish loading; its reply describes the model."""
        self.info = self._receive()
        return self.info

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self._process.send(message)
        return self._receive()

    def _receive(self) -> dict[str, Any]:
        try:
            return self._process.receive()
        except WorkerDied as exc:
            raise EdgeError(str(exc)) from None

    def close(self) -> None:
        self._process.close()


def _reply_error(reply: dict[str, Any]) -> Exception:
    error = InputError(reply["error"])
    error.exit_code = int(reply.get("exit_code", 2))
    return error


def _settings_json(settings: BenchSettings) -> dict[str, Any]:
    out = asdict(settings)
    out["images"] = [str(p) for p in settings.images]
    return out


def _rss_mb(field_name: str) -> float | None:
    """VmHWM (peak) or VmRSS (now) of this process from /proc; getrusage's peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if field_name == "VmHWM":
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
    return None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _worker_open(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Load the candidate; report what bench needs to know about it."""
    from .bundle import decode_weight_numel, load_bundle, safetensors_tensors
    from .checkpoint import read_config, weight_files
    from .families import family_of
    from .runtime import open_session

    settings, path = spec["settings"], Path(spec["path"])
    baseline = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if spec["kind"] == "checkpoint":
        cfg, _ = read_config(path)
        session = open_session(
            checkpoint=path, max_context=settings["max_context"], threads=settings["threads"]
        )
        tensors = [t for f in weight_files(path) for t in safetensors_tensors(f)]
        info = {
            "format": "checkpoint (torch reference)",
            "quantization": "fp32",
            "size_bytes": _dir_bytes(path),
            # the reference computes in fp32
            "weight_bytes_per_token": decode_weight_numel(tensors, family_of(cfg)) * 4,
        }
    else:
        bundle = load_bundle(path)
        session = open_session(bundle=path, max_context=settings["max_context"], threads=settings["threads"])
        info = {
            "format": bundle.manifest.format,
            "quantization": bundle.manifest.quantization,
            "size_bytes": bundle.size_bytes,
            "weight_bytes_per_token": bundle.manifest.model.get("decode_weight_bytes"),
        }
    info.update(
        backend=session.backend.name,
        load_ms=(time.perf_counter() - t0) * 1000,
        baseline_rss_mb=baseline,
        threads=settings["threads"],
    )
    return session, info


def run_chat_turn(session: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """One measured chat turn (see the module docstring for what each figure covers); `settings` holds
    prompt, images, downsample_mode, max_slice_nums and decode_tokens."""
    t0 = time.perf_counter()
    prepared = session.prepare(
        settings["prompt"],
        settings["images"],
        downsample_mode=settings["downsample_mode"],
        max_slice_nums=settings["max_slice_nums"],
    )
    prepare_ms = (time.perf_counter() - t0) * 1000
    n = settings["decode_tokens"]
    result = session.generate(prepared, session.sampling(max_new_tokens=n + 1, stop_ids=()))
    t = result.generation.timings
    return {
        "preprocess_ms": prepared.preprocess_ms,
        "vision_ms": prepared.vision_ms,
        "vision_slice_ms": list(prepared.vision_slice_ms),
        "embed_ms": max(prepare_ms - prepared.preprocess_ms - prepared.vision_ms, 0.0),
        "prefill_ms": t.prefill_ms,
        "first_sample_ms": t.first_sample_ms,
        "ttft_ms": prepare_ms + t.ttft_ms,
        "decode_tok_s": t.decode_tok_s,
        "decode_tokens": len(t.step_ms),
        "n_prompt_tokens": len(prepared.prompt.ids),
        "n_slices": prepared.n_slices,
    }


def worker_main() -> int:
    """The worker loop: first line = spec (reply: info), then {"op": "run"|"rss"|"stop"}."""
    state: dict[str, Any] = {}

    def handle(message: dict[str, Any]) -> dict[str, Any] | None:
        if "session" not in state:
            state["settings"] = message["settings"]
            state["session"], info = _worker_open(message)
            return info
        if message.get("op") == "run":
            return run_chat_turn(state["session"], state["settings"])
        if message.get("op") == "rss":
            return {"peak_rss_mb": _rss_mb("VmHWM")}
        return None

    def describe(exc: Exception) -> dict[str, Any] | None:
        return {"error": str(exc), "exit_code": exc.exit_code} if isinstance(exc, EdgeError) else None

    return serve(handle, describe)


# ---------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class CandidateResult:
    candidate: Candidate
    info: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: stats([r[k] for r in self.runs]) for k in RUN_METRICS}
        n_slices = max((len(r["vision_slice_ms"]) for r in self.runs), default=0)
        out["vision_slice_ms"] = [
            stats([r["vision_slice_ms"][i] for r in self.runs if i < len(r["vision_slice_ms"])])
            for i in range(n_slices)
        ]
        return out


@dataclass
class BenchReport:
    settings: BenchSettings
    bandwidth: Bandwidth
    results: list[CandidateResult]
    machine: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The documented `bench --json` object (docs/json.md)."""
        first = None
        candidates = []
        for res in self.results:
            summary = res.summary()
            wbytes = res.info.get("weight_bytes_per_token")
            bound = self.bandwidth.gbs * 1e9 / wbytes if wbytes else None
            decode = summary["decode_tok_s"]["median"]
            entry = {
                "label": res.candidate.label,
                "kind": res.candidate.kind,
                "path": str(res.candidate.path),
                **{
                    k: res.info.get(k) for k in ("format", "quantization", "backend", "size_bytes", "load_ms")
                },
                **summary,
                "decode_tokens": min((r["decode_tokens"] for r in res.runs), default=0),
                "n_prompt_tokens": res.runs[0]["n_prompt_tokens"] if res.runs else None,
                "n_slices": res.runs[0]["n_slices"] if res.runs else None,
                "peak_rss_mb": res.peak_rss_mb,
                "baseline_rss_mb": res.info.get("baseline_rss_mb"),
                "weight_bytes_per_token": wbytes,
                "bandwidth_bound_tok_s": bound,
                "bandwidth_fraction": decode / bound if bound and decode is not None else None,
                "runs": res.runs,
            }
            first = first or entry
            entry["ratios"] = {k: _ratio(entry, first, k) for k in RATIO_KEYS}
            candidates.append(entry)
        settings = _settings_json(self.settings)
        settings.update(order="interleaved", stop_ids="ignored", timer="time.perf_counter")
        return {
            "machine": {
                **self.machine,
                "memory_bandwidth_gbs": self.bandwidth.gbs,
                "bandwidth": asdict(self.bandwidth),
            },
            "settings": settings,
            "candidates": candidates,
        }

    def to_markdown(self) -> str:
        data = self.to_json()
        m, s = data["machine"], data["settings"]
        out = [
            REPORT_HEADER,
            "",
            f"- machine: {m['platform']}, {m['cpu_count']} CPUs, python {m['python']}; "
            f"memory bandwidth **{m['memory_bandwidth_gbs']:.1f} GB/s** ({m['bandwidth']['method']})",
            f"- input: {', '.join(Path(p).name for p in s['images'])}, prompt {s['prompt']!r}, "
            f"downsample {s['downsample_mode'] or 'default'}, max slices {s['max_slice_nums'] or 'default'}",
            f"- {s['warmup']} warm-up + {s['repeats']} measured runs per model, interleaved; "
            f"{s['decode_tokens']} decode tokens per run (stop ids ignored); threads {s['threads'] or 'default'}",
            "",
            "## Medians (min) per model",
            "",
            "| model | TTFT ms | preprocess | vision (slices) | embed | prefill | first sample | "
            "decode tok/s | bound tok/s | of bound | peak RSS MB | size MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in data["candidates"]:
            out.append(
                f"| {c['label']} ({c['format']}, {c['quantization']}) | {_mm(c['ttft_ms'])} | "
                f"{_mm(c['preprocess_ms'])} | {_mm(c['vision_ms'])} ({c['n_slices']}) | {_mm(c['embed_ms'])} | "
                f"{_mm(c['prefill_ms'])} | {_mm(c['first_sample_ms'])} | "
                f"{_num(c['decode_tok_s']['median'])} ({_num(c['decode_tok_s']['max'])} best) | "
                f"{_num(c['bandwidth_bound_tok_s'])} | {_pct(c['bandwidth_fraction'])} | "
                f"{_num(c['peak_rss_mb'])} | {_num(c['size_bytes'] / 1e6 if c['size_bytes'] else None)} |"
            )
        if len(data["candidates"]) > 1:
            out += ["", f"## Ratios against {data['candidates'][0]['label']} (medians)", ""]
            out += ["| model | " + " | ".join(RATIO_KEYS) + " |", "|---|" + "---|" * len(RATIO_KEYS)]
            for c in data["candidates"]:
                out.append(
                    f"| {c['label']} | " + " | ".join(_num(c["ratios"][k], 3) for k in RATIO_KEYS) + " |"
                )
        out += [
            "",
            "TTFT = image file in -> first token. Decode tok/s = decode steps / their time. Bound = bandwidth / "
            "weight bytes read per decoded token; peak RSS is each model's own worker process, including "
            "Python and its libraries (baseline before loading: "
            + ", ".join(f"{c['label']} {_num(c['baseline_rss_mb'])} MB" for c in data["candidates"])
            + ").",
        ]
        return "\n".join(out) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Write `png()` to `path` (a report folder of ours: tools/bench.py)."""
        return write_atomic(path, self.png())

    def png(self) -> bytes:
        """PNG: stacked TTFT parts and decode tok/s (with the bandwidth bound) per model. It carries
        PNG_SOFTWARE as its Software text chunk, which is how `bench --plot` recognises a chart of ours."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install 'minicpmv-edge[plot]'") from None
        data = self.to_json()["candidates"]
        labels = [c["label"] for c in data]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.7 * len(labels) + 2))
        left = np.zeros(len(labels))
        for part in TTFT_PARTS:
            values = np.array([c[part]["median"] or 0.0 for c in data])
            ax1.barh(labels, values, left=left, label=part.removesuffix("_ms"))
            left += values
        ax1.set_xlabel("TTFT median (ms)")
        ax1.legend(fontsize=8)
        ax1.invert_yaxis()
        decode = [c["decode_tok_s"]["median"] or 0.0 for c in data]
        ax2.barh(labels, decode, color="tab:green")
        for i, c in enumerate(data):
            bound = c["bandwidth_bound_tok_s"]
            if bound and bound < 3 * max(decode + [1e-9]):
                ax2.plot([bound], [i], "k|", markersize=20)
            note = f" {decode[i]:.1f}" + (
                f" ({c['bandwidth_fraction']:.0%} of {bound:.0f} bound)" if bound else ""
            )
            ax2.text(0, i, note, va="center", fontsize=8)
        ax2.set_xlabel("decode tok/s median (| = bandwidth bound)")
        ax2.invert_yaxis()
        ax2.set_yticklabels([])
        fig.suptitle(f"minicpmv-edge bench, {self.bandwidth.gbs:.1f} GB/s memory bandwidth")
        fig.tight_layout()
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, format="png", dpi=100, metadata={"Software": PNG_SOFTWARE})
        finally:
            plt.close(fig)
        return buffer.getvalue()


def _ratio(entry: dict[str, Any], first: dict[str, Any], key: str) -> float | None:
    def value(e: dict[str, Any]) -> float | None:
        v = e.get(key)
        return v["median"] if isinstance(v, dict) else v

    a, b = value(entry), value(first)
    return a / b if a is not None and b else None


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _mm(s: dict[str, float | None]) -> str:
    return "-" if s["median"] is None else f"{s['median']:.1f} ({s['min']:.1f})"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on; `cpu` is the CPU's model name where /proc/cpuinfo has it."""
    processor = platform.processor() or platform.machine()
    return {
        "platform": platform.platform(),
        "processor": processor,
        "cpu": _cpu_model_name() or processor,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def _cpu_model_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_bench(
    candidates: Sequence[Candidate], settings: BenchSettings, progress: Progress | None = None
) -> BenchReport:
    """Measure bandwidth, start one worker per model, run them interleaved, collect peaks."""
    say = progress or (lambda _msg: None)
    if not candidates:
        raise InputError("give at least one --checkpoint or --bundle to benchmark")
    if settings.decode_tokens < 1 or settings.repeats < 1 or settings.warmup < 0:
        raise InputError("need decode_tokens >= 1, repeats >= 1, warmup >= 0")
    for image in settings.images:
        if not Path(image).is_file():
            raise InputError(f"image {image} does not exist")
    for cand in candidates:  # cheap checks here, before any worker pays for importing torch
        if cand.kind == "bundle":
            from .bundle import read_manifest

            read_manifest(cand.path)
        elif not (cand.path / "config.json").is_file():
            raise InputError(f"checkpoint {cand.path} does not exist or has no config.json")
    say(f"measuring memory bandwidth ({settings.bandwidth_mb} MiB copies)")
    bandwidth = measure_bandwidth(settings.bandwidth_mb)
    say(f"memory bandwidth {bandwidth.gbs:.1f} GB/s")
    workers: list[Worker] = []
    try:
        for cand in candidates:
            say(f"loading {cand.label} in a worker process")
            workers.append(Worker(cand, settings))
        results = [CandidateResult(w.candidate, w.ready()) for w in workers]
        total = settings.warmup + settings.repeats
        for i in range(total):
            kind = "warm-up" if i < settings.warmup else "run"
            for worker, res in zip(workers, results, strict=True):
                say(f"{kind} {i + 1}/{total}: {worker.candidate.label}")
                run = worker.request({"op": "run"})
                if i >= settings.warmup:
                    res.runs.append(run)
        for worker, res in zip(workers, results, strict=True):
            res.peak_rss_mb = worker.request({"op": "rss"})["peak_rss_mb"]
    finally:
        for worker in workers:
            worker.close()
    return BenchReport(settings, bandwidth, results, machine_info())


# ---------------------------------------------------------------------------------------------------
# Phone-measured numbers against published targets


@dataclass
class TargetCheck:
    target: str
    status: str  # pass | fail | skipped
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)


def load_device_targets(path: Path = DEVICE_TARGETS_FILE) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))["targets"]


def read_device_report(path: str | Path) -> dict[str, Any]:
    """Validate the JSON an app writes (docs/bundle.md#device-report); one InputError line per problem."""
    path = Path(path)
    raw = read_json_file(path, "device report", InputError)
    where = f"device report {path}"
    if raw.get("schema_version") != 1:
        raise InputError(f"{where}: schema_version must be 1, got {raw.get('schema_version')!r}")
    for key in ("family", "device", "platform"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise InputError(f"{where}: {key} must be a non-empty string")
    bundle = raw.get("bundle")
    if not isinstance(bundle, dict) or not all(
        isinstance(bundle.get(k), str) for k in ("format", "quantization")
    ):
        raise InputError(f"{where}: bundle must be an object with string format and quantization")
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise InputError(f"{where}: runs must be a non-empty list")
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise InputError(f"{where}: runs[{i}] is not an object")
        for key in ("ttft_ms", "decode_tok_s"):
            if not _positive_number(run.get(key)):
                raise InputError(f"{where}: runs[{i}].{key} must be a positive number, got {run.get(key)!r}")
        for key, value in run.items():
            if (
                key.endswith(("_ms", "_tok_s", "_mb"))
                and value is not None
                and not _positive_number(value, zero=True)
            ):
                raise InputError(f"{where}: runs[{i}].{key} must be a number >= 0, got {value!r}")
    return raw


def _positive_number(value: Any, zero: bool = False) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    return ok and (value >= 0 if zero else value > 0)


def check_device_report(
    report: dict[str, Any], targets: list[dict[str, Any]] | None = None
) -> list[TargetCheck]:
    """Median of the report's runs against every published target; a target for another family,
    platform or quantization is skipped with the reason."""
    targets = load_device_targets() if targets is None else targets
    out = []
    for target in targets:
        reason = _not_applicable(target, report)
        if reason:
            out.append(TargetCheck(target["id"], "skipped", reason))
            continue
        checks = []
        for metric, bound in target["metrics"].items():
            values = [r[metric] for r in report["runs"] if r.get(metric) is not None]
            if not values:
                checks.append({"metric": metric, "value": None, **bound, "passed": False})
                continue
            value = float(statistics.median(values))
            ok = ("max" not in bound or value <= bound["max"]) and (
                "min" not in bound or value >= bound["min"]
            )
            checks.append({"metric": metric, "value": value, **bound, "passed": ok})
        status = "pass" if all(c["passed"] for c in checks) else "fail"
        out.append(TargetCheck(target["id"], status, f"{target['model']} on {target['device']}", checks))
    return out


def _not_applicable(target: dict[str, Any], report: dict[str, Any]) -> str:
    if report["family"] not in target["applies_to"]:
        return f"target is for {', '.join(target['applies_to'])}, report is {report['family']}"
    if target.get("platform") and target["platform"] != report["platform"]:
        return f"target platform {target['platform']}, report {report['platform']}"
    quant = target.get("quantization")
    if quant and quant != report["bundle"]["quantization"]:
        return f"target quantization {quant}, report {report['bundle']['quantization']}"
    return ""


def device_check_lines(checks: list[TargetCheck]) -> list[str]:
    lines = []
    for c in checks:
        detail = "; ".join(
            f"{x['metric']} {_num(x['value'])} "
            + " ".join(f"{'<=' if k == 'max' else '>='} {x[k]}" for k in ("max", "min") if k in x)
            + (" ok" if x["passed"] else " MISSED")
            for x in c.checks
        )
        lines.append(
            f"{c.status.upper():7} {c.target}: {detail or c.reason}" + (f" ({c.reason})" if detail else "")
        )
    if not any(c.status != "skipped" for c in checks):
        lines.append("no published target applies to this report")
    return lines


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(worker_main())
    sys.exit("usage: python -m edge_runtime.bench --worker (internal; use `minicpmv-edge bench`)")
