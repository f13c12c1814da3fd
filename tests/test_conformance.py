"""`conformance`: the kit is written from the host code, and a replay that reads only the kit's files
reproduces every vector within its stated tolerances (and fails on a tampered kit)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.bundle import load_bundle
from edge_runtime.cli import main
from edge_runtime.errors import BundleError
from edge_runtime.generation import build_input_embeddings, teacher_forced_logits
from edge_runtime.portable_rng import SplitMix64
from edge_runtime.processing.image import load_image, resize
from edge_runtime.processing.patches import slice_to_patches
from edge_runtime.processing.prompt import ImageLayout, PromptBuilder
from edge_runtime.processing.slicing import SliceConfig, slice_image
from edge_runtime.processing.tokenizer import StreamDecoder, Tokenizer
from edge_runtime.runtime import open_session

DTYPES = {"uint8": "<u1", "int64": "<i8", "float32": "<f4", "float64": "<f8"}


# ---------------------------------------------------------------------------------------------------
# An independent reader of the kit: the files only, plus a hand-written RNG and sampler


def reference_splitmix64(seed: int):
    """SplitMix64 as published (Steele, Lea, Flood 2014; Vigna's splitmix64.c), written again here."""
    state = seed % 2**64
    while True:
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        yield z ^ (z >> 31)


def reference_sample(logits, temperature, top_k, top_p, penalty, seen, seed, n):
    """docs/conformance.md's sampling recipe, step by step, with the reference RNG."""
    stream = reference_splitmix64(seed)
    seen = set(seen)
    tokens, first_probs, uniforms = [], None, []
    for _ in range(n):
        x = logits.astype(np.float32).copy()
        ids = sorted(i for i in seen if 0 <= i < len(x))
        if penalty != 1.0 and ids:
            x[ids] = np.where(x[ids] < 0, x[ids] * np.float32(penalty), x[ids] / np.float32(penalty))
        if temperature == 0:
            token = int(np.argmax(x))
        else:
            if temperature != 1.0:
                x = x / np.float32(temperature)
            if 0 < top_k < len(x):
                kth = np.sort(x)[len(x) - top_k]
                x = np.where(x < kth, -np.inf, x).astype(np.float32)
            if top_p < 1.0:
                order = np.argsort(x, kind="stable")
                e = np.exp(x[order].astype(np.float64) - x.max())
                remove = np.cumsum(e / e.sum()) <= 1 - top_p
                remove[-1] = False
                x[order[remove]] = -np.inf
            e = np.exp(x.astype(np.float64) - x.max())
            probs = e / e.sum()
            first_probs = probs if first_probs is None else first_probs
            u = (next(stream) >> 11) * 2.0**-53
            uniforms.append(u)
            candidates = [i for i in range(len(probs)) if probs[i] > 0]
            total, cdf = 0.0, []
            for i in candidates:
                total += probs[i]
                cdf.append(total)
            target = u * cdf[-1]
            k = next((j for j, c in enumerate(cdf) if c > target), len(cdf) - 1)
            token = candidates[k]
        tokens.append(token)
        seen.add(token)
    return tokens, first_probs, uniforms


def load(kit: Path, ref: dict) -> np.ndarray:
    data = (kit / ref["file"]).read_bytes()
    array = np.frombuffer(data, dtype=DTYPES[ref["dtype"]])
    assert array.size == int(np.prod(ref["shape"])), ref["file"]
    return array.reshape(ref["shape"])


def replay(kit: Path, model_dir: Path | None = None, bundle: Path | None = None) -> list[str]:
    """Every mismatch between the kit and a fresh run of the host code / model, as text."""
    index = json.loads((kit / "conformance.json").read_text(encoding="utf-8"))
    problems: list[str] = []

    def close(what: str, ref: dict, got: np.ndarray) -> None:
        want = load(kit, ref)
        if want.shape != got.shape:
            problems.append(f"{what}: shape {got.shape} != {want.shape}")
        elif ref["atol"] == 0:
            if not np.array_equal(want, got):
                problems.append(f"{what}: not exactly equal")
        elif not np.allclose(got, want, rtol=0, atol=ref["atol"]):
            problems.append(f"{what}: max diff {np.abs(got - want).max()} > atol {ref['atol']}")

    def same(what: str, want, got) -> None:
        if want != got:
            problems.append(f"{what}: {got!r} != {want!r}")

    for name, size in index["files"].items():
        same(f"size of {name}", size, (kit / name).stat().st_size)

    for vec in index["rng"]["vectors"]:
        stream = reference_splitmix64(int(vec["seed"]))
        outputs = [next(stream) for _ in vec["u64"]]
        same(f"rng {vec['seed']}", vec["u64"], [str(x) for x in outputs])
        same(f"rng floats {vec['seed']}", vec["random"], [(x >> 11) * 2.0**-53 for x in outputs])

    for case in index["sampling"]:
        logits = load(kit, case["logits"])
        tokens, probs, uniforms = reference_sample(
            logits, case["temperature"], case["top_k"], case["top_p"], case["repetition_penalty"],
            case["seen_ids"], int(case["seed"]), len(case["tokens"]),
        )  # fmt: skip
        same(f"sampling {case['name']}", case["tokens"], tokens)
        same(f"sampling {case['name']} uniforms", case["uniforms"], uniforms)
        if case["first_probs"] is not None:
            close(f"sampling {case['name']} probs", case["first_probs"], probs)

    source = index["source"]
    host_dir = Path(source["path"]) if model_dir is None else model_dir
    tokenizer = Tokenizer(host_dir)
    cfg = index["slice_config"]
    base = SliceConfig(
        max_slice_nums=cfg["max_slice_nums"], scale_resolution=cfg["scale_resolution"],
        patch_size=cfg["patch_size"], slice_mode=cfg["slice_mode"], downsample_mode=cfg["downsample_mode"],
        image_mean=tuple(cfg["image_mean"]), image_std=tuple(cfg["image_std"]),
        rescale_factor=cfg["rescale_factor"], resample=cfg["resample"], use_image_id=cfg["use_image_id"],
    )  # fmt: skip
    side = index["model"]["num_patches_per_side"]

    def check_image(what: str, entry: dict) -> list[tuple[np.ndarray, np.ndarray, str]]:
        config = SliceConfig(**{**base.__dict__, "downsample_mode": entry["downsample_mode"],
                                "max_slice_nums": entry["max_slice_nums"]})  # fmt: skip
        image = Image.fromarray(load(kit, entry["pixels"]))
        prepared = slice_image(image, config)
        plan = entry["plan"]
        same(f"{what} grid", plan["grid"], None if prepared.grid is None else list(prepared.grid))
        same(f"{what} token counts", plan["token_counts"], list(prepared.token_counts))
        same(f"{what} patch grids", plan["patch_grids"], [list(g) for g in prepared.patch_grids])
        close(f"{what} resized source", entry["resized"]["source"],
              np.asarray(resize(image, *plan["source_size"], config.resample)))  # fmt: skip
        if entry["resized"]["refine"] is not None:
            close(f"{what} resized refine", entry["resized"]["refine"],
                  np.asarray(resize(image, *plan["refine_size"], config.resample)))  # fmt: skip
        same(f"{what} slices", len(entry["slices"]), len(prepared.slices))
        inputs = []
        for s, pixels in zip(entry["slices"], prepared.slices, strict=False):
            patches, positions = slice_to_patches(pixels, config.downsample_mode, config.patch_size, side)
            close(f"{what} slice {s['index']} patches", s["patches"], patches)
            close(f"{what} slice {s['index']} positions", s["position_ids"], positions)
            inputs.append((load(kit, s["patches"]), load(kit, s["position_ids"]), config.downsample_mode))
        return inputs

    for entry in index["images"]:
        if "encoded_file" in entry:
            decoded = np.asarray(load_image(kit / entry["encoded_file"]))
            close(f"image {entry['name']} decode", entry["pixels"], decoded)
        check_image(f"image {entry['name']}", entry)

    for case in index["texts"]:
        ids = tokenizer.encode(case["text"])
        same(f"text {case['name']} ids", case["ids"], ids)
        decoder = StreamDecoder(tokenizer)
        same(f"text {case['name']} pieces", case["pieces"], [decoder.push(i) for i in case["ids"]])
        same(f"text {case['name']} flush", case["flush"], decoder.flush())

    prompts = PromptBuilder.from_dir(host_dir, tokenizer, use_image_id=cfg["use_image_id"])
    for case in index["prompts"]:
        layouts = [ImageLayout(x["source_tokens"], None if x["grid"] is None else tuple(x["grid"]),
                               x["tile_tokens"]) for x in case["images"]]  # fmt: skip
        same(f"prompt {case['name']}", case["ids"], prompts.chat(case["text"], layouts).ids)

    if index["generations"]:
        if source["kind"] == "bundle":
            session = open_session(bundle=bundle or source["path"])
        else:
            session = open_session(checkpoint=host_dir)
        backend = session.backend
        for run in index["generations"]:
            what = f"generation {run['name']}"
            inputs = check_image(f"{what} image", run["image"])
            features = [backend.vision_encoder(p, pos, mode) for p, pos, mode in inputs]
            embeds = build_input_embeddings(backend, run["prompt_ids"], features)
            path = run["token_ids"] + ([run["stop_token_id"]] if run["stop_token_id"] is not None else [])
            logits = np.stack(teacher_forced_logits(backend, embeds, path[:-1])).astype(np.float32)
            close(f"{what} logits", run["logits"], logits)
            same(f"{what} greedy tokens", path, [int(np.argmax(row)) for row in load(kit, run["logits"])])
            same(f"{what} text", run["text"], tokenizer.decode(run["token_ids"]))
            decoder = StreamDecoder(tokenizer)
            same(f"{what} stream", run["stream"]["pieces"], [decoder.push(i) for i in run["token_ids"]])
    return problems


# ---------------------------------------------------------------------------------------------------
# Tests


def test_portable_rng_matches_published_splitmix64():
    rng = SplitMix64(1234567)
    assert [rng.next_u64() for _ in range(3)] == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
    ]
    rng = SplitMix64(0)
    assert [rng.next_u64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    for seed in (0, 1, 2**63 - 1, 2**64 - 1):
        ours, ref = SplitMix64(seed), reference_splitmix64(seed)
        assert all(ours.next_u64() == next(ref) for _ in range(100))
    values = [SplitMix64(5).random() for _ in range(1)] + [SplitMix64(2**64 - 1).random()]
    assert all(0.0 <= v < 1.0 for v in values)
    assert SplitMix64(None).seed != SplitMix64(None).seed  # OS entropy (2^-64 chance of a false failure)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance") / "bundle"
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--target", "harmonyos", "--quant", "fp32"]
    assert main([*args, "--out", str(out), "--max-context", "512"]) == 0
    return out


@pytest.fixture(scope="module")
def bundle_kit(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance") / "kit"
    assert main(["conformance", "--bundle", str(tiny_bundle), "--out", str(out), "--questions", "2"]) == 0
    return out


def test_checkpoint_kit_replays_and_reports_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "kit"
    args = ["conformance", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--questions", "1"]
    assert main([*args, "--max-new-tokens", "12", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "[conformance] images" in captured.err
    assert summary["counts"] == {"images": 8, "texts": 5, "prompts": 4, "sampling": 8, "generations": 1}
    assert summary["size_bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert summary["source"]["kind"] == "checkpoint"
    index = json.loads((out / "conformance.json").read_text(encoding="utf-8"))
    assert len(index["generations"][0]["token_ids"]) <= 12
    assert replay(out) == []
    # a kit of ours is replaced; anything else is refused before the model loads
    assert main([*args, "--questions", "0"]) == 0
    assert "replaced the previous conformance kit" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["conformance", "--checkpoint", str(tiny_checkpoint), "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to replace") and err.count("\n") == 1
    assert (foreign / "notes.txt").read_text() == "mine"


def test_bad_input_is_one_error_line(tmp_path, capsys):
    assert main(["conformance", "--bundle", str(tmp_path / "missing"), "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "k").exists()


def test_onnx_bundle_kit_replays_through_the_graphs(bundle_kit, tiny_bundle):
    index = json.loads((bundle_kit / "conformance.json").read_text(encoding="utf-8"))
    assert index["source"]["format"] == "onnx" and index["source"]["quantization"] == "fp32"
    assert {e["name"] for e in index["images"]} >= {"big-16x", "exif-16x", "tiny-4x"}
    assert max(e["plan"]["n_slices"] for e in index["images"]) >= 9
    assert [len(g["logits"]["shape"]) for g in index["generations"]] == [2, 2]
    assert replay(bundle_kit, bundle=tiny_bundle) == []


def test_kit_written_into_a_bundle_is_listed_and_verified(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    args = [
        "conformance",
        "--bundle",
        str(bundle),
        "--in-bundle",
        "--questions",
        "1",
        "--max-new-tokens",
        "4",
    ]
    assert main(args) == 0
    assert "kit files in" in capsys.readouterr().err
    listed = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["files"]
    kit_files = {p.relative_to(bundle).as_posix() for p in (bundle / "conformance").rglob("*") if p.is_file()}
    assert "conformance/conformance.json" in kit_files and kit_files <= set(listed)
    load_bundle(bundle)  # every listed file, kit included, matches its checksum
    assert main(["inspect", "--bundle", str(bundle)]) == 0
    # written again: the old kit's entries are replaced, and the bundle still verifies
    assert main([*args[:5], "2", *args[6:]]) == 0
    assert "replaced the previous conformance kit" in capsys.readouterr().err
    load_bundle(bundle)
    assert replay(bundle / "conformance", bundle=bundle) == []
    # a changed kit file is a changed bundle file
    (bundle / "conformance" / "conformance.json").write_text("{}", encoding="utf-8")
    with pytest.raises(BundleError, match="conformance/conformance.json"):
        load_bundle(bundle)
    # the flag needs a bundle and no --out
    assert main(["conformance", "--in-bundle", "--out", str(tmp_path / "k")]) == 2
    assert "--in-bundle" in capsys.readouterr().err


def _tamper(kit: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the kit whose files are links to the original (replace one before changing it)."""
    copy = tmp_path / name
    shutil.copytree(kit, copy, copy_function=os.symlink)
    return copy


def _rewrite(path: Path, data: bytes | str) -> None:
    path.unlink()
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")


def test_a_tampered_kit_fails_the_replay(bundle_kit, tiny_bundle, tmp_path):
    index = json.loads((bundle_kit / "conformance.json").read_text(encoding="utf-8"))
    # a patch value off by one pixel level
    kit = _tamper(bundle_kit, tmp_path, "patches")
    big = next(e for e in index["images"] if e["name"] == "big-16x")
    ref = big["slices"][4]["patches"]
    patches = load(kit, ref).copy()
    patches[3, 5] += 2 / 255
    _rewrite(kit / ref["file"], patches.astype("<f4").tobytes())
    assert any("patches" in p for p in replay(kit, bundle=tiny_bundle))
    # one sampled token, one prompt id, one logit beyond its tolerance
    kit = _tamper(bundle_kit, tmp_path, "json")
    changed = json.loads((kit / "conformance.json").read_text(encoding="utf-8"))
    changed["sampling"][3]["tokens"][5] += 1
    changed["prompts"][2]["ids"][-1] += 1
    _rewrite(kit / "conformance.json", json.dumps(changed))
    ref = index["generations"][0]["logits"]
    logits = load(kit, ref).copy()
    logits[0, 7] += 3 * ref["atol"]
    _rewrite(kit / ref["file"], logits.astype("<f4").tobytes())
    problems = replay(kit, bundle=tiny_bundle)
    assert any(p.startswith("sampling hot") for p in problems)
    assert any(p.startswith("prompt multi-image") for p in problems)
    assert any("logits" in p for p in problems)
