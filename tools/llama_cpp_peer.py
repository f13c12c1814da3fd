"""llama.cpp as a benchmark peer: built from the pinned llama-cpp-python sdist, driven by its own tools.

Why the sdist: it is on PyPI (the only registry this project may reach) and vendors a full llama.cpp
tree, including `convert_hf_to_gguf.py`, `gguf-py`, `llama-bench`, `llama-quantize` and the
multimodal CLI. The build lands outside the repository, in
``${XDG_CACHE_HOME:-~/.cache}/minicpmv-edge/llama-cpp/<version>/`` (`src/`, `build/`), and counts as
done only once its stamp file is written; a later run reuses it.

Build flags: Release, ``GGML_NATIVE=ON`` (the peer gets every instruction set this CPU has, as a user
building on their own machine would), OpenMP, static libraries, no curl. On CPUs with AMX the AMX
kernels are compiled out: on the machine that filed issue 33 the native AMX matmul crashed.

Conversion: ``convert_hf_to_gguf.py`` reads our MiniCPM-V 4.6 checkpoint unchanged (it registers
``MiniCPMV4_6ForConditionalGeneration`` twice: the Qwen3.5 text model and, with ``--mmproj``, the
vision tower). Two things are set for it, both stated in the report: ``--no-mtp`` (our checkpoints
have no multi-token-prediction weights) and the BPE pre-tokenizer type. The converter recognises a
tokenizer by hashing its output on a test string; ours is trained locally (no hub downloads), so the
hash is unknown, but its pipeline is Qwen3.5's (``edge_runtime/tokenizer_build.py``: same
normalizer, split regex and byte-level stage), so the type is ``qwen35`` by construction.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BUILD_TARGETS = ("llama-bench", "llama-quantize", "llama-mtmd-cli")
STAMP = ".minicpmv-edge-complete"
PRE_TOKENIZER = "qwen35"
CONVERTER_FLAGS = ("--no-mtp",)

Progress = Callable[[str], None]


class PeerError(Exception):
    """A peer that could not be built, converted or run: the report records the message."""


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minicpmv-edge" / "llama-cpp" / LLAMA_CPP_PYTHON_VERSION


def cmake_flags() -> list[str]:
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_OPENMP=ON",
    ]
    if _cpu_has_amx():
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        flags += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    return flags


def _cpu_has_amx() -> bool:
    try:
        return " amx_" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _run(cmd: Sequence[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; on failure raise PeerError with its last output line."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise PeerError(f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    return proc.stdout + proc.stderr


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp tree: `src` (the vendored sources) and `bin` (the built tools)."""

    src: Path
    bin: Path

    @property
    def version(self) -> str:
        return f"llama.cpp vendored by llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"

    def tool(self, name: str) -> Path:
        return self.bin / name

    # -- conversion ---------------------------------------------------------------------------

    def convert(self, checkpoint: Path, out: Path, mmproj: bool = False) -> Path:
        """checkpoint -> f16 GGUF (the text model, or with mmproj the vision tower)."""
        script = (
            "import runpy, sys\n"
            f"sys.path[:0] = [{str(self.src / 'gguf-py')!r}, {str(self.src)!r}]\n"
            "from conversion import base\n"
            f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {PRE_TOKENIZER!r}\n"
            "sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[1:]\n"
            f"runpy.run_path({str(self.src / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
        )
        args = [str(checkpoint), "--outtype", "f16", "--outfile", str(out)]
        args += ["--mmproj"] if mmproj else list(CONVERTER_FLAGS)  # the mmproj class refuses --no-mtp
        tmp = out.with_name(out.name + ".partial")
        args[args.index(str(out))] = str(tmp)
        _run([sys.executable, "-c", script, *args], f"convert_hf_to_gguf {'--mmproj ' if mmproj else ''}")
        if not tmp.is_file():
            raise PeerError(f"convert_hf_to_gguf wrote no {tmp.name}")
        os.replace(tmp, out)
        return out

    def quantize(self, f16: Path, out: Path, qtype: str, threads: int) -> Path:
        tmp = out.with_name(out.name + ".partial")
        _run(
            [str(self.tool("llama-quantize")), str(f16), str(tmp), qtype, str(threads)],
            f"llama-quantize {qtype}",
        )
        os.replace(tmp, out)
        return out

    # -- measurement --------------------------------------------------------------------------

    def bench(self, gguf: Path, threads: int, n_prompt: int, n_gen: int) -> dict[str, float]:
        """One llama-bench call: prompt processing of n_prompt tokens from an empty context, and
        n_gen decode steps after n_prompt tokens of context (``-d``), so both match our run's shape.
        One repetition each; the caller interleaves calls round by round."""
        cmd = [
            str(self.tool("llama-bench")),
            "-m", str(gguf),
            "-t", str(threads),
            "-p", str(n_prompt),
            "-n", str(n_gen),
            "-d", f"0,{n_prompt}",
            "-r", "1",
            "-o", "json",
        ]  # fmt: skip
        out = _run(cmd, f"llama-bench {gguf.name}")
        rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
        found: dict[str, float] = {}
        for row in rows:
            depth = int(row.get("n_depth", 0))
            if row["n_prompt"] == n_prompt and row["n_gen"] == 0 and depth == 0:
                found["prefill_tok_s"] = float(row["avg_ts"])
            elif row["n_gen"] == n_gen and row["n_prompt"] == 0 and depth == n_prompt:
                found["decode_tok_s"] = float(row["avg_ts"])
        if len(found) != 2:
            raise PeerError(
                f"llama-bench {gguf.name}: no pp{n_prompt} / tg{n_gen}@d{n_prompt} rows in its JSON"
            )
        return found

    def encode_slices_ms(
        self, gguf: Path, mmproj: Path, image: Path, threads: int, mode_note: str
    ) -> list[float]:
        """Vision encoding time per slice of one image, from llama-mtmd-cli's log: "encoding mtmd batch,
        n_chunks = K" then "mtmd batch encoding done in N ms" (the mmproj graph over K slices, not the
        LLM's decode of the image tokens), so N / K per slice. The CLI's warm-up encode runs first, so
        the figure is a warm one, as ours."""
        cmd = [
            str(self.tool("llama-mtmd-cli")),
            "-m", str(gguf),
            "--mmproj", str(mmproj),
            "--image", str(image),
            "-p", "Describe the image.",
            "-n", "1",
            "-t", str(threads),
            "--temp", "0",
        ]  # fmt: skip
        out = _run(cmd, f"llama-mtmd-cli ({mode_note})")
        sizes = [int(k) for k in re.findall(r"encoding mtmd batch, n_chunks = (\d+)", out)]
        times = [float(ms) for ms in re.findall(r"mtmd batch encoding done in (\d+) ms", out)]
        if not times or len(sizes) != len(times):
            raise PeerError(f"llama-mtmd-cli ({mode_note}) logged no 'mtmd batch encoding done' line")
        return [ms / k for ms, k in zip(times, sizes, strict=True) for _ in range(k)]


# ---------------------------------------------------------------------------------------------------
# The build


def ensure_built(say: Progress, jobs: int | None = None) -> LlamaCpp:
    """The cached llama.cpp build; downloaded and built on first use (tens of minutes on 2 cores)."""
    root = cache_root()
    tree = LlamaCpp(root / "src", root / "build" / "bin")
    if (root / STAMP).is_file() and all(tree.tool(t).is_file() for t in BUILD_TARGETS):
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (tree.src / "CMakeLists.txt").is_file():
            _fetch_sources(tree.src, say)
        build = root / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        if shutil.which("cmake") is None:
            raise PeerError("cmake is not installed (apt-get install cmake, or pip install cmake)")
        say(f"configuring llama.cpp ({' '.join(cmake_flags())})")
        _run(["cmake", "-S", str(tree.src), "-B", str(build), *generator, *cmake_flags()], "cmake configure")
        _build(build, jobs or os.cpu_count() or 1, say)
        missing = [t for t in BUILD_TARGETS if not tree.tool(t).is_file()]
        if missing:
            raise PeerError(f"the llama.cpp build produced no {', '.join(missing)}")
        (root / STAMP).write_text(json.dumps({"flags": cmake_flags(), "machine": platform.machine()}) + "\n")
    return tree


def _fetch_sources(dest: Path, say: Progress) -> None:
    say(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (llama.cpp sources)")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp,
            ],
            "pip download llama-cpp-python",
        )  # fmt: skip
        archives = list(Path(tmp).glob("*.tar.gz"))
        if not archives:
            raise PeerError("pip download llama-cpp-python gave no sdist")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(Path(tmp) / prefix, dest)


def _build(build: Path, jobs: int, say: Progress) -> None:
    """cmake --build, reporting ninja's [n/N] every tenth of the way."""
    cmd = ["cmake", "--build", str(build), "-j", str(jobs), "--target", *BUILD_TARGETS]
    started, last_tenth, tail = time.perf_counter(), -1, []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-5:]
            step = re.match(r"\[(\d+)/(\d+)\]", line)
            if step:
                tenth = 10 * int(step.group(1)) // int(step.group(2))
                if tenth > last_tenth:
                    last_tenth = tenth
                    say(f"building llama.cpp: {step.group(0)} after {time.perf_counter() - started:.0f} s")
    if proc.returncode != 0:
        raise PeerError(f"building llama.cpp failed (exit {proc.returncode}): {tail[-1] if tail else ''}")
