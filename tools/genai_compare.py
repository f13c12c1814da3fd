"""Decode tok/s of our ONNX int4 text decoder against onnxruntime-genai's model builder int4 output,
side by side in one run, on the same Qwen3.5 text weights.

    pip install -e .[bench,test]     # onnxruntime-genai (pinned); the builder also needs transformers (test)
    python tools/genai_compare.py --checkpoint CK --out-dir build/genai-compare \
        --tokens 64 --repeats 5 --threads 4 [--json]

1. convert: CK's text weights -> a Qwen3_5ForConditionalGeneration checkpoint (convert_checkpoint), the
   only Qwen3.5 input the builder reads.
2. build: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` with our int4 settings (BUILDER_OPTIONS:
   MatMulNBits block 32, symmetric, accuracy level 0, a tied int4 embedding shared with the head).
3. ours: `minicpmv-edge export --target harmonyos --quant int4` (or --bundle B).
4. time: both models loaded in this process, the same prompt token ids, one warm-up run each, then R runs
   interleaved (ours, theirs, ours, theirs ...). A run decodes N + 1 tokens; the first comes from prefill and
   is not counted, the N steps after it are (feed the last token, run the decoder, pick the next greedily).
   Ours is timed by the shared generation loop (Timings.decode_tok_s, as `bench`); theirs by the same rule
   around `Generator.generate_next_token`. Medians of tok/s; ratio = ours / theirs.
5. check: the greedy tokens of both runs, and the logits of both on one teacher-forced token path.
   --verify-fp32 also builds the builder's fp32 model and compares it with our fp32 torch reference, which
   isolates the weight conversion from the two different int4 roundings.

Outputs are reused on the next run while the checkpoint and the settings are unchanged (--rebuild forces).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from stamped_outputs import fingerprint, is_fresh, stamp  # noqa: E402

from edge_runtime.bench import stats, write_atomic  # noqa: E402
from edge_runtime.errors import EdgeError, InputError  # noqa: E402

GENAI_VERSION = "0.18.0"
INSTALL_HINT = "install with pip install -e .[bench]"
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper and a storm."
# The teacher-forced logits check feeds these tokens after the prompt: varied ids, where a random model's
# greedy output tends to repeat one token.
FORCED_TEXT = "The keeper climbed the stairs, lit the lamp and watched the waves break on the rocks."
HF_DIR, GENAI_INT4_DIR, GENAI_FP32_DIR, OURS_DIR = "hf-qwen3_5", "genai-int4", "genai-fp32", "ours-int4"

# Our int4 scheme (export/onnx/quantize.py): MatMulNBits, block 32, symmetric (zero point 8), accuracy level 0
# (fp32 compute; the builder's CPU default is 4 = int8 activations, so it is set explicitly), the DeltaNet
# gate projections in_proj_a / in_proj_b dense (the builder keeps them dense too), and the token embedding
# int4 GatherBlockQuantized sharing its bytes with the tied head (the builder's shared_embeddings).
BUILDER_OPTIONS = {
    "block_size": "32",
    "accuracy_level": "0",
    "is_symmetric": "true",
    "algo_config": "default",  # round to nearest, as ours
    "shared_embeddings": "true",
    "linear_attn_op": "linear_attention",  # the CPU recurrence (GatedDeltaNet is CUDA-only)
}
BUILDER_DEFAULTS_NOTE = (
    "builder CPU defaults: accuracy_level 4, block_size 32, is_symmetric true, algo default (RTN), "
    "shared_embeddings false, linear_attn_op linear_attention, fuse_qkv true"
)

# What still differs between the two sides after the settings above (measured on the tiny preset).
KNOWN_DIFFERENCES = [
    "int4 rounding: ours scale = amax/7, q in [-7, 7] (15 levels); the builder (MLAS) scale = -amax/8 signed, "
    "q in [-8, 7] (16 levels); same MatMulNBits kernel, same bytes per weight",
    "DeltaNet q/k l2-norm: the builder's LpNormalization has no epsilon, ours (and transformers) add 1e-6 "
    "inside the sqrt; this is the whole fp32 logit difference on random weights (with eps 1e-20 it drops to "
    "~2e-7), negligible for real activations",
    "attention state: both keep one KV buffer per layer updated in place by GroupQueryAttention (ours: a "
    "static max_context + chunk positions, bound as input and output, manifest onnx.in_place_state; theirs: "
    "max_length, past_present_share_buffer); ours passes the DeltaNet conv / recurrent state in and out; see "
    "decode_graph.ops for which attention / DeltaNet ops each side runs",
    "host loop: ours is Python (embedding session + decoder session + numpy argmax per step); "
    "onnxruntime-genai's is C++ (embedding inside the decoder graph)",
]

Progress = Callable[[str], None]


def log(message: str) -> None:
    print(f"[genai-compare] {message}", file=sys.stderr, flush=True)


class CompareError(EdgeError):
    """A step of the comparison failed (one line, no traceback)."""


# ---------------------------------------------------------------------------------------------------
# 1. Weight conversion


def convert_checkpoint(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Write CK's text half as a Hugging Face `Qwen3_5ForConditionalGeneration` checkpoint in `out`.

    Why: the model builder has no MiniCPM-V entry; its only dense Qwen3.5 path is keyed on
    `architectures[0] == "Qwen3_5ForConditionalGeneration"`, and it loads weights through transformers'
    `Qwen3_5ForConditionalGeneration.from_pretrained`, so it needs that class's config.json and tensor
    names. MiniCPM-V 4.6's LLM *is* a Qwen3.5 text model stored under the same `model.language_model.*`
    names and module layout (the same (1 + w) norms, the same rotate-half partial RoPE, the same fused
    in_proj_qkv order), so the text tensors are copied unchanged, as fp32, by name: nothing is permuted or
    offset, which is what makes both sides run identical weights. Everything else is dropped:
    - the SigLIP tower and merger (not Qwen3.5's vision model; the builder exports text only). A minimal
      vision_config stands in; transformers initialises its few random weights, which the builder skips;
    - legacy prefixes are normalised through our own loader's name mapping; `mtp.*` is not copied.
    rope_parameters gains Qwen3.5's `mrope_section` (the builder chooses MRotaryEmbedding from it); with
    text-only position ids (t = h = w) multimodal RoPE equals our 1-D RoPE, whatever the sections.
    tokenizer files and generation_config.json are copied (the builder reads the tokenizer for its config).

    Returns the conversion record: {source name: (target name, shape)} and the config written.
    """
    import torch
    from safetensors import safe_open

    from edge_runtime.checkpoint import read_config, weight_files, write_safetensors
    from edge_runtime.families import family_of

    cfg, raw = read_config(checkpoint)
    checkpoint_key_to_module = family_of(cfg).checkpoint_key_to_module
    text = dict(raw["text_config"])
    sources: dict[str, tuple[Path, str]] = {}
    mapping: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in weight_files(checkpoint):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                key = checkpoint_key_to_module(name)
                if key is None:
                    continue
                if key.startswith("language_model."):
                    target = "model." + key
                elif key == "lm_head.weight" and not cfg.tie_word_embeddings:
                    target = key
                else:
                    continue
                shape = tuple(handle.get_slice(name).get_shape())
                sources[target] = (file, name)
                mapping[name] = (target, shape)

    out.mkdir(parents=True, exist_ok=True)
    specs = [(target, shape, torch.float32) for target, shape in mapping.values()]

    def produce(target: str) -> torch.Tensor:
        file, name = sources[target]
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name).to(torch.float32)

    write_safetensors(out / "model.safetensors", specs, produce)

    rope = dict(text.get("rope_parameters") or {})
    half = cfg.text.rotary_dim // 2  # frequency pairs, split t/h/w as Qwen3.5 does: 32 -> [11, 11, 10]
    section = [half // 3 + (1 if i < half % 3 else 0) for i in range(3)]
    rope.update(mrope_section=section, mrope_interleaved=True)
    text.update(rope_parameters=rope, model_type="qwen3_5_text", torch_dtype="float32")
    text["tie_word_embeddings"] = cfg.tie_word_embeddings
    vision = {
        "model_type": "qwen3_5_vision",
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": cfg.text.hidden_size,
        "num_position_embeddings": 16,
    }
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
        "converted_from": {
            "checkpoint": str(checkpoint),
            "architecture": raw.get("architectures", [None])[0],
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "special_tokens_map.json",
    ):
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    return {"tensors": {k: [t, list(s)] for k, (t, s) in mapping.items()}, "config": config}


# ---------------------------------------------------------------------------------------------------
# 2. The model builder


def require_genai() -> Any:
    """Import onnxruntime_genai or fail with the install hint."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise CompareError(f"onnxruntime-genai is not installed ({INSTALL_HINT})")
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise CompareError(f"onnxruntime-genai does not import ({exc}); {INSTALL_HINT}") from None
    if importlib.util.find_spec("transformers") is None:  # the builder loads checkpoints through it
        raise CompareError("the model builder needs transformers (pip install -e .[bench,test])")
    if og.__version__ != GENAI_VERSION:
        log(f"warning: onnxruntime-genai {og.__version__} installed, the comparison pins {GENAI_VERSION}")
    return og


def builder_command(
    hf_dir: Path, out: Path, precision: str, cache: Path, options: dict[str, str] | None = None
) -> list[str]:
    """options: int4 --extra_options (None = BUILDER_OPTIONS, ours; {} = the builder's own defaults)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(cache)]
    extra = BUILDER_OPTIONS if options is None else options
    if precision == "int4" and extra:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    return cmd


def run_builder(
    hf_dir: Path, out: Path, precision: str, say: Progress, options: dict[str, str] | None = None
) -> dict[str, Any]:
    """Build the genai model (stdout/stderr to OUT.log); one-line CompareError on failure."""
    cmd = builder_command(hf_dir, out, precision, out.parent / "builder-cache", options)
    log_path = out.with_suffix(".log")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"model builder ({precision}, cpu): log in {log_path}")
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        fh.write(" ".join(cmd) + "\n\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=out.parent).returncode
    seconds = time.perf_counter() - t0
    if rc != 0 or not (out / "genai_config.json").is_file():
        raise CompareError(f"the model builder failed ({precision}, exit {rc}): {_last_error(log_path)}")
    say(f"model builder ({precision}) done in {seconds:.0f} s")
    return {"command": cmd, "seconds": seconds}


def _last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return f"{line[:300]} (full log: {log_path})"
    return f"{lines[-1][:300] if lines else 'no output'} (full log: {log_path})"


def graph_summary(model_file: Path) -> dict[str, Any]:
    """Op counts of an ONNX file as written (before onnxruntime's own fusions) and its MatMulNBits settings:
    which contrib ops each side runs."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    ops: dict[str, int] = {}
    nbits: set[tuple[int, int, int]] = set()
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            nbits.add((attrs.get("bits", 4), attrs.get("block_size", 0), attrs.get("accuracy_level", 0)))
    return {
        "ops": dict(sorted(ops.items())),
        "n_nodes": len(model.graph.node),
        "matmulnbits": [{"bits": b, "block_size": s, "accuracy_level": a} for b, s, a in sorted(nbits)],
    }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# ---------------------------------------------------------------------------------------------------
# 4. The runners


@dataclasses.dataclass
class Run:
    tokens: list[int]  # N + 1 greedy tokens: the one from prefill, then one per decode step
    step_ms: list[float]  # the N decode steps
    prefill_ms: float = 0.0  # the prompt through the model and the first token picked

    @property
    def tok_s(self) -> float:
        total = sum(self.step_ms)
        return len(self.step_ms) / (total / 1000) if total > 0 else 0.0


class Ours:
    """Our bundle behind the shared Session / generation loop (the onnxruntime backend)."""

    def __init__(self, bundle: Path, threads: int, prompt: str):
        from edge_runtime.runtime import open_session

        self.session = open_session(bundle=bundle, threads=threads)
        self.prepared = self.session.prepare(prompt, [])
        self.prompt_ids = [int(i) for i in self.prepared.prompt.ids]

    def run(self, n: int) -> Run:
        result = self.session.generate(
            self.prepared, self.session.sampling(max_new_tokens=n + 1, stop_ids=())
        )
        g = result.generation
        return Run(list(g.token_ids), list(g.timings.step_ms))

    def forced_logits(self, forced: Sequence[int]) -> list[np.ndarray]:
        from edge_runtime.generation import teacher_forced_logits

        return teacher_forced_logits(self.session.backend, self.prepared.embeds, forced)


class Theirs:
    """The builder's model through the onnxruntime-genai Python API (greedy search, CPU provider)."""

    def __init__(self, og: Any, model_dir: Path, threads: int, max_length: int):
        self.og = og
        self.view, self.config_changes = run_view(model_dir, threads, max_length)
        config = og.Config(str(self.view))
        config.clear_providers()  # the CPU provider
        try:
            self.model = og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError with the ORT message
            raise CompareError(f"onnxruntime-genai cannot load {model_dir}: {_first_line(exc)}") from None
        self.max_length = max_length

    def _generator(self) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=self.max_length)
        return self.og.Generator(self.model, params)

    def run(self, prompt_ids: Sequence[int], n: int) -> Run:
        try:
            gen = self._generator()  # KV cache / state allocation: load-time work, as our new_state()
            t0 = time.perf_counter()
            gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))  # prefill
            gen.generate_next_token()  # picks the first token from the prefill logits
            tokens = [int(gen.get_next_tokens()[0])]
            prefill_ms = (time.perf_counter() - t0) * 1000
            step_ms = []
            for _ in range(n):
                t0 = time.perf_counter()
                gen.generate_next_token()  # embeds + decodes the last token, picks the next
                tokens.append(int(gen.get_next_tokens()[0]))
                step_ms.append((time.perf_counter() - t0) * 1000)
        except RuntimeError as exc:  # onnxruntime-genai's errors
            raise CompareError(f"onnxruntime-genai failed while generating: {_first_line(exc)}") from None
        return Run(tokens, step_ms, prefill_ms)

    def forced_logits(self, prompt_ids: Sequence[int], forced: Sequence[int]) -> list[np.ndarray]:
        """Last-position logits after the prompt, then after each forced token (as teacher_forced_logits)."""
        try:
            gen = self._generator()
            gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
            out = [np.array(gen.get_logits(), np.float32).reshape(-1)]
            for token in forced:
                gen.append_tokens(np.array([token], dtype=np.int32))
                out.append(np.array(gen.get_logits(), np.float32).reshape(-1))
        except RuntimeError as exc:
            raise CompareError(f"onnxruntime-genai failed while scoring: {_first_line(exc)}") from None
        return out


def run_view(model_dir: Path, threads: int, max_length: int) -> tuple[Path, dict[str, Any]]:
    """MODEL-run/: links to the builder's files plus a genai_config.json changed for timing, so the
    builder's own output stays as built. Changes: no eos ids (every run decodes exactly N tokens, as ours,
    which ignores stop ids; a config overlay cannot empty the list), intra-op threads as ours, one
    inter-op thread, and max_length = our max context (past_present_share_buffer sizes the KV cache by it)."""
    view = model_dir.with_name(model_dir.name + "-run")
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.name != "genai_config.json":
            (view / path.name).symlink_to(path.resolve())
    config = json.loads((model_dir / "genai_config.json").read_text())
    model = config["model"]
    session = model["decoder"].setdefault("session_options", {})
    changes = {
        "model.eos_token_id": [model.get("eos_token_id"), []],
        "model.decoder.session_options.intra_op_num_threads": [session.get("intra_op_num_threads"), threads],
        "model.decoder.session_options.inter_op_num_threads": [session.get("inter_op_num_threads"), 1],
        "search.max_length": [config["search"].get("max_length"), max_length],
    }
    model["eos_token_id"] = []
    session.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    config["search"]["max_length"] = max_length
    (view / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
    return view, changes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def forced_path(session: Any, steps: int) -> list[int]:
    """`steps` token ids of FORCED_TEXT (repeated if short) for the teacher-forced logits check."""
    ids = session.assets.tokenizer.encode(FORCED_TEXT) or [0]
    return [int(ids[i % len(ids)]) for i in range(steps)]


def compare_tokens(a: Sequence[int], b: Sequence[int], steps: int) -> dict[str, Any]:
    """Greedy agreement over the first `steps` tokens: the common prefix and where it ends."""
    steps = min(steps, len(a), len(b))
    prefix = next((i for i in range(steps) if a[i] != b[i]), steps)
    return {
        "steps": steps,
        "agree": prefix == steps,
        "common_prefix": prefix,
        "first_divergence": None if prefix == steps else prefix,
        "ours": list(a[:steps]),
        "theirs": list(b[:steps]),
    }


def compare_logits(a: list[np.ndarray], b: list[np.ndarray], forced: Sequence[int] = ()) -> dict[str, Any]:
    """Per position on one token path: max |diff|, that over std(ours), argmax agreement."""
    rows = []
    for x, y in zip(a, b, strict=True):
        diff = float(np.abs(x - y).max())
        rows.append(
            {
                "max_abs": diff,
                "rel_to_std": diff / float(x.std() or 1.0),
                "same_argmax": bool(x.argmax() == y.argmax()),
            }
        )
    return {
        "forced_ids": [int(i) for i in forced],
        "positions": len(rows),
        "max_abs": max(r["max_abs"] for r in rows),
        "max_rel_to_std": max(r["rel_to_std"] for r in rows),
        "same_argmax": sum(r["same_argmax"] for r in rows),
        "per_position": rows,
    }


# ---------------------------------------------------------------------------------------------------
# The comparison


@dataclasses.dataclass
class Settings:
    checkpoint: Path
    out_dir: Path
    tokens: int
    repeats: int
    threads: int
    warmup: int
    check_steps: int
    max_context: int
    prompt: str
    bundle: Path | None
    verify_fp32: bool
    rebuild: bool
    note: str | None = None


def prepare_models(s: Settings, og: Any, say: Progress) -> dict[str, Any]:
    """Steps 1-3: converted checkpoint, builder outputs, our bundle; reused while fresh."""
    from edge_runtime.checkpoint import read_config

    read_config(s.checkpoint)  # a clear error for a wrong --checkpoint before any work
    s.out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    hf = s.out_dir / HF_DIR
    fp = fingerprint(s.checkpoint, {"step": "convert"})
    if s.rebuild or not is_fresh(hf, fp, "model.safetensors"):
        say(f"converting the text weights to the Qwen3.5 layout in {hf}")
        shutil.rmtree(hf, ignore_errors=True)
        conversion = convert_checkpoint(s.checkpoint, hf)
        stamp(hf, fp)
        say(f"converted {len(conversion['tensors'])} text tensors")
    else:
        say(f"reusing {hf}")

    precisions = ["int4", "fp32"] if s.verify_fp32 else ["int4"]
    for precision in precisions:
        out = s.out_dir / (GENAI_INT4_DIR if precision == "int4" else GENAI_FP32_DIR)
        fp = fingerprint(s.checkpoint, {"step": "builder", "precision": precision, "genai": og.__version__})
        fp["command"] = builder_command(hf, out, precision, out.parent / "builder-cache")[3:]
        if s.rebuild or not is_fresh(out, fp, "genai_config.json"):
            record[f"builder_{precision}"] = run_builder(hf, out, precision, say)
            stamp(out, fp)
        else:
            say(f"reusing {out}")
            record[f"builder_{precision}"] = {"command": fp["command"], "seconds": None, "reused": True}

    if s.bundle is not None:
        bundle = s.bundle
        say(f"using our bundle {bundle}")
    else:
        bundle = s.out_dir / OURS_DIR
        fp = fingerprint(
            s.checkpoint,
            {
                "step": "export",
                "max_context": s.max_context,
                "accuracy_level": BUILDER_OPTIONS["accuracy_level"],
            },
        )
        if s.rebuild or not is_fresh(bundle, fp, "manifest.json"):
            from export.pipeline import ExportRequest, export_bundle

            say(f"exporting our int4 bundle to {bundle} (target harmonyos)")
            request = ExportRequest(
                s.checkpoint, bundle, "harmonyos", quantization="int4", max_context=s.max_context,
                int4_compute={"0": "fp32", "4": "int8"}[BUILDER_OPTIONS["accuracy_level"]],  # as theirs
            )  # fmt: skip
            export_bundle(request, progress=lambda m: say(f"export: {m}"))
            stamp(bundle, fp)
        else:
            say(f"reusing {bundle}")
    record["bundle"] = bundle
    return record


def run_compare(s: Settings, say: Progress = log) -> dict[str, Any]:
    if s.tokens < 1 or s.repeats < 1 or s.warmup < 0 or s.threads < 1:
        raise InputError("need --tokens >= 1, --repeats >= 1, --warmup >= 0, --threads >= 1")
    og = require_genai()
    built = prepare_models(s, og, say)
    bundle: Path = built["bundle"]
    from edge_runtime.bundle import load_bundle

    loaded = load_bundle(bundle)
    manifest = loaded.manifest
    if manifest.format != "onnx" or manifest.quantization != "int4":
        raise InputError(f"{bundle} is a {manifest.format} {manifest.quantization} bundle; need onnx int4")
    max_context = int(manifest.max_context)

    say(f"loading ours ({bundle.name}) and theirs ({GENAI_INT4_DIR}), {s.threads} thread(s) each")
    ours = Ours(bundle, s.threads, s.prompt)
    n_total = len(ours.prompt_ids) + s.tokens + 1
    if n_total > max_context:
        raise InputError(f"prompt {len(ours.prompt_ids)} + {s.tokens + 1} tokens > max context {max_context}")
    theirs = Theirs(og, s.out_dir / GENAI_INT4_DIR, s.threads, max_context)

    runs: dict[str, list[Run]] = {"ours": [], "theirs": []}
    total = s.warmup + s.repeats
    for i in range(total):
        kind = "warm-up" if i < s.warmup else "run"
        for label in ("ours", "theirs"):
            run = ours.run(s.tokens) if label == "ours" else theirs.run(ours.prompt_ids, s.tokens)
            say(f"{kind} {i + 1}/{total}: {label} {run.tok_s:.1f} tok/s")
            if i >= s.warmup:
                runs[label].append(run)

    summary = {k: stats([r.tok_s for r in v]) for k, v in runs.items()}
    ratio = summary["ours"]["median"] / summary["theirs"]["median"]
    greedy = compare_tokens(runs["ours"][0].tokens, runs["theirs"][0].tokens, s.check_steps)
    forced = forced_path(ours.session, s.check_steps)
    logits = compare_logits(ours.forced_logits(forced), theirs.forced_logits(ours.prompt_ids, forced), forced)
    say(f"int4 greedy tokens: {'agree' if greedy['agree'] else 'differ'} over {greedy['steps']} steps")

    report: dict[str, Any] = {
        "ours": {
            "label": "minicpmv-edge onnx int4 (onnxruntime backend)",
            "bundle": str(bundle),
            "decode_tok_s": summary["ours"],
            "runs_tok_s": [r.tok_s for r in runs["ours"]],
            "bundle_size_bytes": loaded.size_bytes,  # every graph, vision included
            "decode_graph": graph_summary(bundle / manifest.graphs["text_decoder"]["files"]["decode"]),
        },
        "theirs": {
            "label": f"onnxruntime-genai {og.__version__} model builder int4",
            "model_dir": str(s.out_dir / GENAI_INT4_DIR),
            "decode_tok_s": summary["theirs"],
            "runs_tok_s": [r.tok_s for r in runs["theirs"]],
            "run_config_changes": theirs.config_changes,
            "size_bytes": _dir_bytes(s.out_dir / GENAI_INT4_DIR),
            "decode_graph": graph_summary(s.out_dir / GENAI_INT4_DIR / "model.onnx"),
        },
        "ratio_ours_over_theirs": ratio,
        "greedy_int4": greedy,
        "logits_int4": _drop_rows(logits),
        "settings": _settings_record(s, built, len(ours.prompt_ids), max_context),
        "known_differences": KNOWN_DIFFERENCES,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": _version("onnxruntime"),
        },
    }
    if s.verify_fp32:
        report["verify_fp32"] = verify_fp32(s, og, max_context, say)
    write_atomic(s.out_dir / "report.json", json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return report


def verify_fp32(s: Settings, og: Any, max_context: int, say: Progress) -> dict[str, Any]:
    """The conversion check free of int4 rounding: builder fp32 vs our fp32 torch reference on CK."""
    from edge_runtime.generation import teacher_forced_logits
    from edge_runtime.runtime import open_session

    say("fp32 check: our torch reference vs the builder's fp32 model")
    ref = open_session(checkpoint=s.checkpoint, max_context=max_context, threads=s.threads)
    prepared = ref.prepare(s.prompt, [])
    prompt_ids = [int(i) for i in prepared.prompt.ids]
    steps = s.check_steps
    result = ref.generate(prepared, ref.sampling(max_new_tokens=steps, stop_ids=()))
    theirs = Theirs(og, s.out_dir / GENAI_FP32_DIR, s.threads, max_context)
    their_run = theirs.run(prompt_ids, steps - 1)
    greedy = compare_tokens(result.generation.token_ids, their_run.tokens, steps)
    forced = forced_path(ref, steps)
    logits = compare_logits(
        teacher_forced_logits(ref.backend, prepared.embeds, forced),
        theirs.forced_logits(prompt_ids, forced),
        forced,
    )
    say(
        f"fp32 greedy tokens: {'agree' if greedy['agree'] else 'differ'} over {greedy['steps']} steps; "
        f"max |logit diff| {logits['max_abs']:.2e}"
    )
    graph = graph_summary(s.out_dir / GENAI_FP32_DIR / "model.onnx")
    return {"greedy": greedy, "logits": _drop_rows(logits), "decode_graph": graph}


def _drop_rows(logits: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in logits.items() if k != "per_position"}


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def _settings_record(s: Settings, built: dict[str, Any], n_prompt: int, max_context: int) -> dict[str, Any]:
    from export.onnx.quantize import BLOCK

    return {
        "checkpoint": str(s.checkpoint),
        "note": s.note,
        "prompt": s.prompt,
        "n_prompt_tokens": n_prompt,
        "decode_tokens": s.tokens,
        "warmup": s.warmup,
        "repeats": s.repeats,
        "order": "interleaved (ours, theirs) per repeat, one process",
        "threads": s.threads,
        "inter_op_threads": 1,
        "max_context": max_context,
        "timer": "time.perf_counter around each decode step (embed + decoder + greedy pick)",
        "sampling": "greedy; stop ids ignored (ours) / eos list emptied in the run config (theirs)",
        "ours_quant": {
            "matmulnbits_block_size": BLOCK,
            "accuracy_level": int(BUILDER_OPTIONS["accuracy_level"]),  # ours is exported at the builder's
            "symmetric": True,
            "embedding": "int4 GatherBlockQuantized shared with the tied head",
            "state": f"static, {max_context} + chunk KV positions; KV updated in place (onnx.in_place_state)",
        },
        "builder_options": dict(BUILDER_OPTIONS),
        "builder_defaults": BUILDER_DEFAULTS_NOTE,
        "builder_runs": {k: v for k, v in built.items() if k.startswith("builder_")},
        "genai_search": {"do_sample": False, "max_length": max_context},
    }


def format_table(report: dict[str, Any]) -> str:
    o, t = report["ours"], report["theirs"]
    s = report["settings"]
    g, lg = report["greedy_int4"], report["logits_int4"]
    lines = [
        f"decode tok/s, median of {s['repeats']} interleaved runs of {s['decode_tokens']} tokens "
        f"({s['threads']} thread(s), prompt {s['n_prompt_tokens']} tokens, max context {s['max_context']}):",
        f"  ours   {o['decode_tok_s']['median']:10.1f}  (min {o['decode_tok_s']['min']:.1f}, "
        f"max {o['decode_tok_s']['max']:.1f})  {o['label']}",
        f"  theirs {t['decode_tok_s']['median']:10.1f}  (min {t['decode_tok_s']['min']:.1f}, "
        f"max {t['decode_tok_s']['max']:.1f})  {t['label']}",
        f"  ratio ours/theirs = {report['ratio_ours_over_theirs']:.3f}",
        f"greedy int4 tokens: {'agree' if g['agree'] else 'differ at step ' + str(g['first_divergence'])} "
        f"over {g['steps']} steps; teacher-forced logits max |diff| {lg['max_abs']:.3g} "
        f"({lg['max_rel_to_std']:.2f} x the logits' std), same argmax {lg['same_argmax']}/{lg['positions']}",
        f"builder options: {' '.join(f'{k}={v}' for k, v in s['builder_options'].items())}",
        f"ours ops ({o['decode_graph']['n_nodes']} nodes): "
        + ", ".join(f"{k} {v}" for k, v in o["decode_graph"]["ops"].items()),
        f"theirs ops ({t['decode_graph']['n_nodes']} nodes): "
        + ", ".join(f"{k} {v}" for k, v in t["decode_graph"]["ops"].items()),
    ]
    if "verify_fp32" in report:
        v = report["verify_fp32"]
        lines.append(
            f"fp32 check (torch reference vs builder fp32): greedy {'agree' if v['greedy']['agree'] else 'differ'} "
            f"over {v['greedy']['steps']} steps, logits max |diff| {v['logits']['max_abs']:.3g}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="MiniCPM-V 4.6 checkpoint directory.")
    parser.add_argument("--out-dir", type=Path, required=True, help="Converted checkpoint, builds, report.")
    parser.add_argument(
        "--preset-note",
        default=None,
        help="Free text recorded in the report (e.g. 'full preset, quiet machine').",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="Our onnx int4 bundle, exported from --checkpoint (default: export one into --out-dir).",
    )
    parser.add_argument("--tokens", type=int, default=64, help="Decode steps timed per run.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, both sides.")
    parser.add_argument("--check-steps", type=int, default=8, help="Greedy / logits check length.")
    parser.add_argument("--max-context", type=int, default=4096, help="Our export's max context.")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--verify-fp32", action="store_true", help="Also check fp32 vs the torch reference.")
    parser.add_argument("--rebuild", action="store_true", help="Redo conversion, builds and export.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args(argv)
    settings = Settings(
        checkpoint=args.checkpoint,
        out_dir=args.out_dir,
        tokens=args.tokens,
        repeats=args.repeats,
        threads=args.threads,
        warmup=args.warmup,
        check_steps=args.check_steps,
        max_context=args.max_context,
        prompt=args.prompt,
        bundle=args.bundle,
        verify_fp32=args.verify_fp32,
        rebuild=args.rebuild,
        note=args.preset_note,
    )
    try:
        report = run_compare(settings)
    except EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    else:
        sys.stdout.write(format_table(report))
    log(f"wrote {settings.out_dir / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
