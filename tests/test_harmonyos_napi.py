"""The HarmonyOS app's NAPI module (apps/harmonyos/entry/src/main/cpp/ort_engine.cpp), compiled for
Linux and run under Node: HarmonyOS NAPI is the Node-API surface, so the on-device source builds
unchanged against Node's headers and onnxruntime-node's libonnxruntime (tools/build-napi-host.mjs).
tools/napi-engine-check.mjs drives it through the app's own ArkTS engine (OrtEngine,
NapiOrtRuntime, core/Generator.ets) and replays a bundle's conformance-kit greedy runs: token ids
exact, every step's logits within the kit's atol.

Needs node 20+ with npm (the toolchain fixture installs the pinned packages) and g++; a missing
one fails these tests, it is not a reason to skip them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "apps" / "harmonyos" / "tools"
MINICPMV_EDGE = REPO / ".venv" / "bin" / "minicpmv-edge"
ADDON = REPO / "build" / "harmonyos" / "napi-host" / "libortengine.node"


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def node_toolchain() -> str:
    done = _run([sys.executable, str(REPO / "tools" / "harmonyos_toolchain.py")])
    if done.returncode != 0:
        pytest.fail(
            f"the HarmonyOS Node toolchain is not available (tools/harmonyos_toolchain.py exit {done.returncode}):\n"
            f"{done.stderr.strip()}",
            pytrace=False,
        )
    assert (TOOLS / "node_modules" / "node-api-headers" / "include" / "node_api.h").is_file()
    return "node"


@pytest.fixture(scope="module")
def addon(node_toolchain) -> Path:
    """The module compiled by the build script (cached by its sources; -Wall -Werror)."""
    done = _run([node_toolchain, str(TOOLS / "build-napi-host.mjs")], timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip() == str(ADDON)
    assert "-Wall -Werror" in done.stderr and "ort_engine.cpp" in done.stderr, done.stderr
    assert ADDON.is_file()
    return ADDON


@pytest.fixture(scope="module")
def bundle_with_kit(tmp_path_factory) -> Path:
    """A fresh fp32 ONNX bundle of the demo model, with its own kit in BUNDLE/conformance/."""
    out = tmp_path_factory.mktemp("napi") / "bundle"
    done = _run(
        [
            str(MINICPMV_EDGE),
            "export",
            "--target",
            "harmonyos",
            "--quant",
            "fp32",
            "--max-context",
            "512",
            "--chunk-size",
            "32",
            "--out",
            str(out),
        ]
    )
    assert done.returncode == 0, done.stderr
    done = _run([str(MINICPMV_EDGE), "conformance", "--bundle", str(out), "--in-bundle"])
    assert done.returncode == 0, done.stderr
    assert (out / "conformance" / "conformance.json").is_file()
    return out


def test_napi_module_replays_the_kit_generations(node_toolchain, addon, bundle_with_kit):
    kit = json.loads((bundle_with_kit / "conformance" / "conformance.json").read_text())
    names = [g["name"] for g in kit["generations"]]
    assert names, "the kit has no greedy runs"
    done = _run([node_toolchain, str(TOOLS / "napi-engine-check.mjs"), "--bundle", str(bundle_with_kit)])
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"addon {addon}" in done.stdout
    for name in names:
        # one PASS line per generation: tokens equal, logits within atol
        assert re.search(rf"^PASS {re.escape(name)}: \d+ tokens equal, ", done.stdout, re.M), done.stdout
    # the chunked prefill ran more than one chunk (prompts are longer than --chunk-size 32)
    assert max(len(g["prompt_ids"]) for g in kit["generations"]) > 32
    assert re.search(r"^PASS run on a released session is rejected: ", done.stdout, re.M)
    assert re.search(r"^PASS a second release throws: ", done.stdout, re.M)
    assert f"{len(names) + 2} passed, 0 failed" in done.stdout


def test_check_fails_when_the_kit_disagrees(node_toolchain, addon, bundle_with_kit, tmp_path):
    """The replay is a real comparison: one changed token and one logit moved past atol both fail."""
    kit_dir = tmp_path / "kit"
    subprocess.run(["cp", "-r", str(bundle_with_kit / "conformance"), str(kit_dir)], check=True)
    index = json.loads((kit_dir / "conformance.json").read_text())
    first, last = index["generations"][0], index["generations"][-1]
    assert first is not last
    first["token_ids"][0] += 1
    logits = kit_dir / last["logits"]["file"]
    raw = bytearray(logits.read_bytes())
    value = memoryview(raw).cast("f")
    value[3] += 10 * last["logits"]["atol"]
    logits.write_bytes(bytes(raw))
    (kit_dir / "conformance.json").write_text(json.dumps(index))
    done = _run(
        [
            node_toolchain,
            str(TOOLS / "napi-engine-check.mjs"),
            "--bundle",
            str(bundle_with_kit),
            "--kit",
            str(kit_dir),
        ]
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(rf"^FAIL {re.escape(first['name'])}: \d+ tokens DIFFER", done.stdout, re.M), done.stdout
    assert re.search(
        rf"^FAIL {re.escape(last['name'])}: .*max \|dlogit\| 1\.00e-2 at step 0 id 3", done.stdout, re.M
    ), done.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "File doesn't exist"),
        ("garbage", "Protobuf parsing failed"),
    ],
)
def test_bad_model_is_a_js_error_with_orts_message(node_toolchain, addon, tmp_path, case, message):
    model = tmp_path / "model.onnx"
    if case == "garbage":
        model.write_bytes(b"\x07not an onnx model\xff" * 8)
    done = _run([node_toolchain, str(TOOLS / "napi-engine-check.mjs"), "--open", str(model)])
    # exit 1 with the rejection printed by JS: not a signal (a crash would be negative or 134/139)
    assert done.returncode == 1, done.stdout + done.stderr
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("rejected: ")), None)
    assert line is not None, done.stdout + done.stderr
    assert line.startswith(f"rejected: Error: {model}: Load model from {model} failed"), line
    assert message in line, line
