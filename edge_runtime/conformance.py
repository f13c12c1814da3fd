"""The conformance kit: language-neutral vectors that every app's host code must reproduce.

`write_kit(session, out)` fills a directory with `conformance.json` (the index) and raw little-endian
arrays (`.bin`), all produced by this package's own host code: image slicing and patches, tokenization
and streaming detokenization, prompt layout, sampling with the portable RNG, and greedy runs on the
session's model. The format, every field and the tolerances are in docs/conformance.md.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InputError
from .families import case_mode
from .generation import Sampler, SamplingConfig, generate, softmax
from .portable_rng import SplitMix64
from .processing.image import load_image, resize
from .processing.slicing import PreparedImage, SliceConfig, slice_image
from .processing.tokenizer import StreamDecoder
from .session import Session

SCHEMA = "minicpmv-edge-conformance"
SCHEMA_VERSION = 1
INDEX = "conformance.json"
ASSETS_DIR = "assets"  # the model's host files, copied into the kit
DEMO_QUESTIONS = Path(__file__).resolve().parent / "data" / "samples-demo" / "questions.json"

# Tolerances (absolute). Integers are always exact (atol 0).
PATCH_ATOL = 1e-6  # the same uint8 pixels give bit-identical patches; one pixel level is 2/255
PROB_ATOL = 1e-9  # float64 softmax of the same float32 scores, any libm
LOGIT_ATOL = {"fp32": 1e-3, "fp16": 2e-2}  # an engine's logits against the kit's; quantized: below
QUANT_LOGIT_ATOL = 1e-1
N_DRAWS = 8  # draws per sampling case
N_RNG_OUTPUTS = 8

Say = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------
# The fixed inputs


def _pattern(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic uint8 RGB test picture: gradients, stripes and a little noise (stored in the kit,
    so how it was made does not matter to apps)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    noise = np.random.default_rng(seed).integers(0, 48, (height, width, 3))
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 127.5 * np.sin((x + 2 * y) / 7.0)
    img = np.stack([r, g, b], axis=-1) * 0.8 + noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _exif_jpeg(height: int, width: int, orientation: int = 6) -> bytes:
    """A JPEG whose stored pixels are `height x width` with an EXIF Orientation tag."""
    im = Image.fromarray(_pattern(height, width, seed=7))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()


# (name, what it exercises, (height, width) or "exif", downsample mode, max_slice_nums or None)
IMAGE_CASES: list[tuple[str, str, Any, str, int | None]] = [
    ("odd-16x", "odd size 217x333 (HxW), 16x merge", (217, 333), "16x", None),
    ("odd-4x", "the same odd size, 4x merge", (217, 333), "4x", None),
    ("wide-16x", "wide 120x900", (120, 900), "16x", None),
    ("tall-4x", "tall 700x100, 4x merge", (700, 100), "4x", None),
    ("big-16x", "big (3R+8)x(4R-20) for scale_resolution R, max_slice_nums 9: many slices", "big", "16x", 9),
    ("tiny-16x", "tiny 3x5", (3, 5), "16x", None),
    ("tiny-4x", "tiny 3x5, 4x merge", (3, 5), "4x", None),
    ("exif-16x", "JPEG stored 80x120 with EXIF Orientation 6 (decoded upright: 120x80)", "exif", "16x", None),
]

TEXT_CASES: list[tuple[str, str]] = [
    ("english", "Hello, world! How many shapes are in the picture?"),
    ("chinese", "图片里有几个形状？请用中文回答。"),
    ("emoji", "Nice 🙂👍🏽 — 🚀 and 👨‍👩‍👧!"),
    ("special", "<|im_start|>user\nWhat colour is the star?<|im_end|>\n<|im_start|>assistant\n"),
    ("mixed", "Café naïve 42 × 3 = 126; 数字 and ✓ done.\n\tTabs  and  spaces."),
]

# (name, temperature, top_k, top_p, repetition_penalty, seed, seen ids given as the prompt)
SAMPLING_CASES: list[tuple[str, float, int, float, float, int, list[int]]] = [
    ("greedy", 0.0, 0, 1.0, 1.0, 0, []),
    ("greedy-penalty", 0.0, 0, 1.0, 1.3, 0, [3, 5, 8, 13]),
    ("temperature", 0.7, 0, 1.0, 1.0, 0, []),
    ("hot", 1.5, 0, 1.0, 1.0, 1234567, []),
    ("top-k", 1.0, 20, 1.0, 1.0, 42, []),
    ("top-p", 1.2, 0, 0.9, 1.0, 7, []),
    ("all-knobs", 0.8, 50, 0.95, 1.2, 2**63 - 1, [1, 2, 3, 21, 34]),
    ("penalty-sampled", 1.0, 0, 1.0, 1.5, 99, [0, 10, 20]),
]

RNG_SEEDS = [0, 1, 1234567, 2**63 - 1, 2**64 - 1]


# ---------------------------------------------------------------------------------------------------
# Writing arrays


class _Arrays:
    """Writes `.bin` files (raw little-endian, C order) and returns their index entries."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, int] = {}

    def put(self, rel: str, array: np.ndarray, atol: float = 0.0) -> dict[str, Any]:
        array = np.ascontiguousarray(array)
        dtype = {"u1": "uint8", "i8": "int64", "f4": "float32", "f8": "float64"}[array.dtype.str[1:]]
        if array.dtype.kind in "ui" and atol != 0:
            raise ValueError("integer arrays are exact")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        path.write_bytes(data)
        self.files[rel] = len(data)
        return {"file": rel, "dtype": dtype, "shape": list(array.shape), "atol": float(atol)}


# ---------------------------------------------------------------------------------------------------
# Sections


def _image_cases(session: Session, arrays: _Arrays, root: Path, say: Say) -> list[dict[str, Any]]:
    out = []
    for name, description, size, mode, max_slices in IMAGE_CASES:
        entry: dict[str, Any] = {"name": name, "description": description}
        if size == "exif":
            rel = f"images/{name}/input.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(_exif_jpeg(80, 120))
            arrays.files[rel] = (root / rel).stat().st_size
            image = load_image(root / rel)  # the host's decode: EXIF orientation applied, RGB
            entry["encoded_file"] = rel
        else:
            if size == "big":  # many slices whatever the model's slice resolution
                res = session.assets.slice_config.scale_resolution
                size = (3 * res + 8, 4 * res - 20)
            image = Image.fromarray(_pattern(*size, seed=len(out)))
        config = session.slice_config(case_mode(session.backend.info.family, mode), max_slices)
        entry.update(
            _slice_entry(session, config, image, slice_image(image, config), f"images/{name}", arrays)
        )
        out.append(entry)
        say(f"image {name}: {entry['plan']['n_slices']} slices")
    return out


def _slice_entry(
    session: Session,
    config: SliceConfig,
    image: Image.Image,
    prepared: PreparedImage,
    prefix: str,
    arrays: _Arrays,
) -> dict[str, Any]:
    """The vectors of one image: its pixels, `prepared` (slice_image of it) and each slice's inputs."""
    pixels = np.asarray(image, dtype=np.uint8)
    plan = prepared.plan
    entry: dict[str, Any] = {
        "downsample_mode": config.downsample_mode,
        "max_slice_nums": config.max_slice_nums,
        "pixels": arrays.put(f"{prefix}/pixels.u8.bin", pixels),
        "plan": {
            "image_size": list(plan.image_size),
            "source_size": list(plan.source_size),
            "grid": None if plan.grid is None else list(plan.grid),
            "refine_size": None if plan.refine_size is None else list(plan.refine_size),
            "tile_size": None if plan.tile_size is None else list(plan.tile_size),
            "n_slices": len(prepared.slices),
            "slice_sizes": [list(s) for s in plan.slice_sizes],
            "patch_grids": [list(g) for g in plan.patch_grids],
            "token_counts": list(plan.token_counts),
            "num_tokens": prepared.num_tokens,
        },
        "resized": {
            "source": arrays.put(
                f"{prefix}/resized-source.u8.bin",
                np.asarray(resize(image, *plan.source_size, config.resample), dtype=np.uint8),
            ),
            "refine": None
            if plan.refine_size is None
            else arrays.put(
                f"{prefix}/resized-refine.u8.bin",
                np.asarray(resize(image, *plan.refine_size, config.resample), dtype=np.uint8),
            ),
        },
        "slices": [],
    }
    for i, (patches, positions, _mode) in enumerate(session._slice_inputs(prepared, config)):
        entry["slices"].append(
            {
                "index": i,
                "patch_grid": list(plan.patch_grids[i]),
                "tokens": plan.token_counts[i],
                "patches": arrays.put(f"{prefix}/slice{i}.patches.f32.bin", patches, PATCH_ATOL),
                "position_ids": arrays.put(f"{prefix}/slice{i}.positions.i64.bin", positions),
            }
        )
    return entry


def _stream(session: Session, ids: list[int]) -> dict[str, Any]:
    decoder = StreamDecoder(session.assets.tokenizer)
    pieces = [decoder.push(i) for i in ids]
    return {"pieces": pieces, "flush": decoder.flush(), "decoded": session.assets.tokenizer.decode(ids)}


def _text_cases(session: Session) -> list[dict[str, Any]]:
    out = []
    for name, text in TEXT_CASES:
        ids = session.assets.tokenizer.encode(text)
        out.append({"name": name, "text": text, "ids": ids, **_stream(session, ids)})
    return out


def _prompt_cases(session: Session, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {im["name"]: im for im in images}

    def layout(name: str) -> dict[str, Any]:
        plan = by_name[name]["plan"]
        counts = plan["token_counts"]
        return {"image": name, "source_tokens": counts[0], "grid": plan["grid"], "tile_tokens": counts[1:]}

    cases = [
        ("text-only", "What is two plus two?", []),
        ("single-image", "How many shapes are there?", ["odd-16x"]),
        ("multi-image", "Compare these two pictures.", ["odd-16x", "wide-16x"]),
        ("many-slices", "图片里有什么？", ["big-16x"]),
    ]
    from .processing.prompt import ImageLayout

    out = []
    for name, text, image_names in cases:
        layouts = [layout(n) for n in image_names]
        parts = [
            ImageLayout(x["source_tokens"], None if x["grid"] is None else tuple(x["grid"]), x["tile_tokens"])
            for x in layouts
        ]
        prompt = session.assets.prompts.chat(text, parts)
        out.append(
            {"name": name, "text": text, "images": layouts, "prompt_text": prompt.text, "ids": prompt.ids}
        )
    return out


def _rng_vectors() -> list[dict[str, Any]]:
    out = []
    for seed in RNG_SEEDS:
        a, b = SplitMix64(seed), SplitMix64(seed)
        out.append(
            {
                "seed": str(seed),
                "u64": [str(a.next_u64()) for _ in range(N_RNG_OUTPUTS)],
                "random": [b.random() for _ in range(N_RNG_OUTPUTS)],
            }
        )
    return out


def _sampling_cases(vocab: int, arrays: _Arrays) -> list[dict[str, Any]]:
    out = []
    for i, (name, temperature, top_k, top_p, penalty, seed, seen) in enumerate(SAMPLING_CASES):
        rng = np.random.default_rng(1000 + i)  # only makes the stored logits; apps read them
        logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
        logits[rng.integers(0, vocab, 3)] += 6.0  # a few clear favourites, so filters matter
        cfg = SamplingConfig(
            max_new_tokens=N_DRAWS, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=penalty, seed=seed,
        )  # fmt: skip
        sampler = Sampler(cfg, prompt_ids=seen)
        first_probs = None if cfg.greedy else softmax(sampler.process(logits))
        tokens = [sampler(logits) for _ in range(N_DRAWS)]
        probe = SplitMix64(seed)  # one uniform per sampled (non-greedy) draw
        uniforms = [] if cfg.greedy else [probe.random() for _ in range(N_DRAWS)]
        entry = {
            "name": name,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "repetition_penalty": penalty,
            "seed": str(seed),
            "seen_ids": seen,
            "logits": arrays.put(f"sampling/{name}.logits.f32.bin", logits),
            "first_probs": None
            if first_probs is None
            else arrays.put(f"sampling/{name}.first-probs.f64.bin", first_probs, PROB_ATOL),
            "uniforms": uniforms,
            "tokens": tokens,
        }
        out.append(entry)
    return out


def _generations(
    session: Session, arrays: _Arrays, logit_atol: float, n_questions: int, max_new_tokens: int, say: Say
) -> list[dict[str, Any]]:
    questions = json.loads(DEMO_QUESTIONS.read_text(encoding="utf-8"))["questions"][:n_questions]
    out = []
    for i, q in enumerate(questions):
        image_path = DEMO_QUESTIONS.parent / q["image"]
        config = session.slice_config()
        image = load_image(image_path, max_pixels=config.max_pixels)
        prefix = f"generations/{i}"
        sliced = slice_image(image, config)  # once: the kit's vectors and the run use the same slices
        image_entry = _slice_entry(session, config, image, sliced, f"{prefix}/image", arrays)
        prepared = session.prepare(q["question"], [sliced])
        sampling = session.sampling(max_new_tokens=max_new_tokens)
        result = generate(
            session.backend, prepared.embeds, sampling, prompt_ids=prepared.prompt.ids, record_logits=True,
            rope=prepared.rope,
        )  # fmt: skip
        logits = np.stack(result.logits).astype(np.float32)
        top2 = np.sort(logits, axis=1)[:, -2:]
        ids = list(result.token_ids)
        out.append(
            {
                "name": f"question-{i}",
                "question": q["question"],
                "image_file": q["image"],
                "expected_answer": q.get("answer"),
                "image": image_entry,
                "max_new_tokens": max_new_tokens,
                "prompt_ids": list(prepared.prompt.ids),
                "token_ids": ids,
                "stop_reason": result.stop_reason,
                "stop_token_id": result.stop_token_id,
                "text": session.assets.tokenizer.decode(ids),
                "stream": _stream(session, ids),
                "logits": arrays.put(f"{prefix}/logits.f32.bin", logits, logit_atol),
                "top1_margins": [float(m) for m in top2[:, 1] - top2[:, 0]],
            }
        )
        say(f"greedy run {i}: {q['question']!r} -> {out[-1]['text']!r} ({len(ids)} tokens)")
    return out


# ---------------------------------------------------------------------------------------------------
# The kit


def _copy_assets(model_dir: Path, root: Path, arrays: _Arrays, is_bundle: bool) -> dict[str, str]:
    """Copy the model's host files (tokenizer, template, configs; a bundle's manifest) into KIT/assets/,
    so an app's tests build their tokenizer and prompts from the kit alone. {name: kit path}."""
    from .bundle import HOST_FILES, MANIFEST

    names = [*HOST_FILES, *([MANIFEST] if is_bundle else [])]
    out: dict[str, str] = {}
    for name in names:
        src = model_dir / name
        if not src.is_file():
            continue
        rel = f"{ASSETS_DIR}/{name}"
        data = src.read_bytes()
        (root / ASSETS_DIR).mkdir(exist_ok=True)
        (root / rel).write_bytes(data)
        arrays.files[rel] = len(data)
        out[name] = rel
    return out


def is_kit(path: Path) -> str | None:
    """None when `path` holds a conformance kit of ours (recognised by its index's schema), else why not."""
    index = Path(path) / INDEX
    if not index.is_file():
        return f"no {INDEX}"
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{INDEX} is not readable JSON"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return f"{INDEX} is not a {SCHEMA} index"
    return None


def write_kit(
    session: Session,
    root: Path,
    source: dict[str, Any],
    n_questions: int = 3,
    max_new_tokens: int = 64,
    say: Say | None = None,
) -> dict[str, Any]:
    """Fill `root` (an empty directory) with the kit; return the index that was written."""
    say = say or (lambda _msg: None)
    root = Path(root)
    arrays = _Arrays(root)
    info = session.backend.info
    quant = source.get("quantization") or "fp32"
    logit_atol = LOGIT_ATOL.get(quant, QUANT_LOGIT_ATOL)
    if n_questions < 0:
        raise InputError(f"--questions must be >= 0, got {n_questions}")
    say("images")
    images = _image_cases(session, arrays, root, say)
    say("texts and prompts")
    texts = _text_cases(session)
    prompts = _prompt_cases(session, images)
    say("sampling")
    sampling = _sampling_cases(info.vocab_size, arrays)
    generations = _generations(session, arrays, logit_atol, n_questions, max_new_tokens, say)
    assets = _copy_assets(Path(source["path"]), root, arrays, source.get("kind") == "bundle")
    cfg = session.assets.slice_config
    index = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "model": {**asdict(info), "num_patches_per_side": session.assets.num_patches_per_side},
        "slice_config": {
            "max_slice_nums": cfg.max_slice_nums,
            "scale_resolution": cfg.scale_resolution,
            "patch_size": cfg.patch_size,
            "slice_mode": cfg.slice_mode,
            "downsample_mode": cfg.downsample_mode,
            "image_mean": list(cfg.image_mean),
            "image_std": list(cfg.image_std),
            "rescale_factor": cfg.rescale_factor,
            "resample": cfg.resample,
            "use_image_id": cfg.use_image_id,
        },
        "stop_ids": list(session.assets.stop_ids),
        "rng": {"algorithm": "splitmix64", "float": "(next_u64 >> 11) * 2^-53", "vectors": _rng_vectors()},
        "images": images,
        "texts": texts,
        "prompts": prompts,
        "sampling": sampling,
        "generations": generations,
        "assets": assets,
        "files": dict(sorted(arrays.files.items())),
    }
    (root / INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return index


# ---------------------------------------------------------------------------------------------------
# The kit inside a bundle

BUNDLE_KIT_DIR = "conformance"


def kit_source(session: Session, checkpoint: Path | None, bundle: Path | None) -> dict[str, Any]:
    """The kit's `source` field: the model its greedy runs used."""
    source: dict[str, Any] = {"kind": "checkpoint", "path": str(checkpoint)}
    if bundle is not None:
        from .bundle import read_manifest

        manifest = read_manifest(bundle)
        source = {
            "kind": "bundle", "path": str(bundle), "target": manifest.target, "format": manifest.format,
            "quantization": manifest.quantization,
        }  # fmt: skip
    source["backend"] = session.backend.name
    return source


def attach_kit(bundle: Path, n_questions: int = 3, max_new_tokens: int = 64, say: Say | None = None) -> Path:
    """Write the kit of `bundle`'s own model into BUNDLE/conformance/ and list it in the manifest, so
    the bundle an app is given carries the vectors its tests check (`make demo` does this)."""
    from .outputs import atomic_output_dir
    from .runtime import open_session

    out = Path(bundle) / BUNDLE_KIT_DIR
    session = open_session(bundle=bundle)
    source = kit_source(session, None, bundle)
    with atomic_output_dir(out, "conformance kit", is_kit, say=say) as tmp:
        write_kit(session, tmp, source, n_questions=n_questions, max_new_tokens=max_new_tokens, say=say)
    list_kit_in_manifest(bundle)
    return out


def list_kit_in_manifest(bundle_dir: Path) -> int:
    """List the files under `bundle/conformance/` in the bundle's manifest (re-signed), so the bundle
    verifies with its kit and an app finds the kit through the manifest; returns how many were listed.
    Entries of an earlier kit that are gone are dropped."""
    from .bundle import MANIFEST, file_entry, read_manifest, write_manifest

    bundle_dir = Path(bundle_dir)
    raw = read_manifest(bundle_dir).to_dict()
    prefix = BUNDLE_KIT_DIR + "/"
    files = {rel: entry for rel, entry in raw["files"].items() if not rel.startswith(prefix)}
    kit_files = sorted(p for p in (bundle_dir / BUNDLE_KIT_DIR).rglob("*") if p.is_file())
    for path in kit_files:
        rel = path.relative_to(bundle_dir).as_posix()
        if rel != MANIFEST:
            files[rel] = file_entry(path)
    raw["files"] = dict(sorted(files.items()))
    write_manifest(bundle_dir, raw)
    return len(kit_files)
