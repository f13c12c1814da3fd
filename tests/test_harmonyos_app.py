"""The HarmonyOS app (apps/harmonyos), checked on Node: every .ets type-checked with ohos-typescript and
linted with ArkTS linter 1.1 against unofficial API-13 declarations, the checker itself shown to catch
a type error and a lint violation, the ArkTS core's hypium suites run against a conformance kit, the
core end to end on onnxruntime-node against `chat --json`, and the NAPI module compiled and run under Node.

The Node toolchain is installed (once per lock file, outside the repo) by tools/harmonyos_toolchain.py;
node 20+ and npm must be on PATH. A missing node fails these tests: it is not a reason to skip them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "apps" / "harmonyos"
TOOLS = APP / "tools"
MINICPMV_EDGE = REPO / ".venv" / "bin" / "minicpmv-edge"


def _run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def node_toolchain() -> str:
    """Installs (or finds) the pinned Node packages; returns the node executable."""
    done = _run([sys.executable, str(REPO / "tools" / "harmonyos_toolchain.py")])
    if done.returncode != 0:
        pytest.fail(
            f"the HarmonyOS Node toolchain is not available (tools/harmonyos_toolchain.py exit {done.returncode}):\n"
            f"{done.stderr.strip()}",
            pytrace=False,
        )
    assert (TOOLS / "node_modules" / "ohos-typescript").is_dir()
    return "node"


@pytest.fixture(scope="session")
def harmonyos_kit(tmp_path_factory) -> Path:
    """A conformance kit from the embedded demo model, written by the CLI as a user would."""
    out = tmp_path_factory.mktemp("harmonyos") / "kit"
    done = _run([str(MINICPMV_EDGE), "conformance", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert (out / "conformance.json").is_file()
    return out


def _diagnostic_counts(stdout: str) -> tuple[int, dict[str, int]]:
    files = re.search(r"^check-ets: (\d+) \.ets files", stdout, re.M)
    counts = re.search(r"^diagnostics: syntax (\d+), type (\d+), ArkTS linter 1\.1 (\d+)", stdout, re.M)
    assert files and counts, stdout
    syntax, type_, lint = (int(g) for g in counts.groups())
    return int(files.group(1)), {"syntax": syntax, "type": type_, "lint": lint}


def test_app_type_checks_and_lints_clean(node_toolchain):
    done = _run([node_toolchain, str(TOOLS / "check-ets.mjs")])
    files, counts = _diagnostic_counts(done.stdout)
    print(f"check-ets: {files} .ets files, {counts}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts == {"syntax": 0, "type": 0, "lint": 0}
    # main and test sources are both covered
    listed = {p.relative_to(APP / "entry" / "src").parts[0] for p in (APP / "entry" / "src").rglob("*.ets")}
    assert listed >= {"main", "test"}
    assert files == len(list((APP / "entry" / "src").rglob("*.ets")))


def test_checker_fails_on_a_type_error_and_a_lint_violation(node_toolchain):
    fixture = TOOLS / "fixtures" / "type-error"
    done = _run([node_toolchain, str(TOOLS / "check-ets.mjs"), "--root", str(fixture)])
    assert done.returncode == 1, done.stdout + done.stderr
    files, counts = _diagnostic_counts(done.stdout)
    assert files == 1
    assert counts == {"syntax": 0, "type": 1, "lint": 1}, done.stdout
    assert re.search(
        r"^Broken\.ets:\d+: \[type\] Type 'number' is not assignable to type 'string'", done.stdout, re.M
    )
    assert re.search(r"^Broken\.ets:\d+: \[lint\] .*\(arkts-no-var\)", done.stdout, re.M)


def test_hypium_suites_pass_on_the_conformance_kit(node_toolchain, harmonyos_kit):
    suites = sorted((APP / "entry" / "src" / "test").rglob("*.test.ets"))
    assert suites, "no hypium suite under apps/harmonyos/entry/src/test"
    env = {**os.environ, "CONFORMANCE_KIT": str(harmonyos_kit)}
    done = _run([node_toolchain, str(TOOLS / "run-hypium.mjs")], env=env)
    summary = re.findall(r"^(\d+) passed, (\d+) failed$", done.stdout, re.M)
    assert summary, done.stdout + done.stderr
    passed, failed = (int(n) for n in summary[-1])
    print(f"hypium: {len(suites)} suites, {passed} passed, {failed} failed")
    assert done.returncode == 0 and failed == 0, done.stdout + done.stderr
    assert passed > 0


# --- Node end to end: the ArkTS core (core/Chat.ets) with the onnxruntime-node engine adapter on the
# --- demo model's ONNX bundles, token ids equal to `minicpmv-edge chat --json` on the same bundle.

SAMPLES = REPO / "edge_runtime" / "data" / "samples-demo"
N_DEMO_QUESTIONS = 8


_DEMO_BUNDLES: dict[str, Path] = {}


def _demo_bundle(quant: str, tmp_path_factory) -> Path:
    """The demo model exported as `make demo` exports it (int4) or in fp32, carrying the kit of its own
    model (conformance --in-bundle) with a greedy run for every demo sample question; once per session."""
    if quant not in _DEMO_BUNDLES:
        out = tmp_path_factory.mktemp("harmonyos-e2e") / f"harmonyos-{quant}"
        export = [str(MINICPMV_EDGE), "export", "--target", "harmonyos", "--quant", quant, "--out", str(out)]
        done = _run([*export, "--max-context", "1024", "--chunk-size", "32"])
        assert done.returncode == 0, done.stderr
        kit = [str(MINICPMV_EDGE), "conformance", "--bundle", str(out), "--in-bundle"]
        done = _run([*kit, "--questions", str(N_DEMO_QUESTIONS)])
        assert done.returncode == 0, done.stderr
        _DEMO_BUNDLES[quant] = out
    return _DEMO_BUNDLES[quant]


@pytest.fixture(scope="session", params=["fp32", "int4"])
def demo_onnx_bundle(request, tmp_path_factory) -> Path:
    return _demo_bundle(request.param, tmp_path_factory)


def _chat_json(bundle: Path, image: Path, question: str, max_new_tokens: int) -> dict:
    args = ["chat", "--bundle", str(bundle), "--image", str(image), "--prompt", question, "--json"]
    done = _run([str(MINICPMV_EDGE), *args, "--max-new-tokens", str(max_new_tokens)])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_node_end_to_end_matches_chat_json(node_toolchain, demo_onnx_bundle, tmp_path):
    report = tmp_path / "device-report.json"
    e2e = [node_toolchain, str(TOOLS / "e2e-node.mjs"), "--bundle", str(demo_onnx_bundle)]
    done = _run([*e2e, "--device-report", str(report), "--bench-runs", "2"])
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads(done.stdout)["runs"]
    kit = json.loads((demo_onnx_bundle / "conformance" / "conformance.json").read_text(encoding="utf-8"))
    assert len(runs) == len(kit["generations"]) == N_DEMO_QUESTIONS
    agree = right = 0
    for run, gen in zip(runs, kit["generations"], strict=True):
        reference = _chat_json(
            demo_onnx_bundle, SAMPLES / gen["image_file"], gen["question"], gen["max_new_tokens"]
        )
        assert run["prompt_ids"] == reference["prompt_token_ids"], run["question"]
        assert run["token_ids"] == reference["token_ids"], run["question"]
        assert run["text"] == run["streamed"] == reference["text"], run["question"]
        assert run["stop_reason"] == reference["stop_reason"]
        assert run["max_abs_logit_diff"] <= run["logits_atol"], run
        agree += run["token_ids"] == reference["token_ids"]
        right += run["text"].strip() == gen["expected_answer"]
    print(
        f"{demo_onnx_bundle.name}: {agree}/{len(runs)} runs token-identical to chat --json, "
        f"{right}/{len(runs)} demo answers right"
    )
    # fp32 answers every demo question right; int4 answers what the Python runtime answers on the same
    # bundle (token-identical, above): one of the 8 differs from the trained answer there
    assert right == len(runs) if demo_onnx_bundle.name.endswith("fp32") else right >= len(runs) - 1
    # the device report the app's Benchmark button writes (core/DeviceReport.ets) is one bench reads
    written = json.loads(report.read_text(encoding="utf-8"))
    assert written["platform"] == "harmonyos" and len(written["runs"]) == 2
    assert all(r["decode_tokens"] == 64 for r in written["runs"])
    assert (
        written["bundle"]["manifest_sha256"]
        == json.loads((demo_onnx_bundle / "manifest.json").read_text())["manifest_sha256"]
    )
    checked = _run([str(MINICPMV_EDGE), "bench", "--device-report", str(report), "--json"])
    assert checked.returncode in (0, 1), checked.stderr  # 2 would be a malformed report
    assert json.loads(checked.stdout)["device"] == written["device"]


# --- The NAPI module (apps/harmonyos/entry/src/main/cpp/ort_engine.cpp), compiled for Linux and run under
# --- Node: HarmonyOS NAPI is the Node-API surface, so the on-device source builds unchanged against Node's
# --- headers and onnxruntime-node's libonnxruntime (tools/build-napi-host.mjs); tools/napi-engine-check.mjs
# --- drives it through the app's own OrtEngine + NapiOrtRuntime and replays the bundle's kit greedy runs.

ADDON = REPO / "build" / "harmonyos" / "napi-host" / "libortengine.node"


@pytest.fixture(scope="module")
def addon(node_toolchain) -> Path:
    """The module compiled by the build script (cached by its sources; -Wall -Werror); needs g++."""
    assert (TOOLS / "node_modules" / "node-api-headers" / "include" / "node_api.h").is_file()
    done = _run([node_toolchain, str(TOOLS / "build-napi-host.mjs")], timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip() == str(ADDON)
    assert "-Wall -Werror" in done.stderr and "ort_engine.cpp" in done.stderr, done.stderr
    assert ADDON.is_file()
    return ADDON


@pytest.fixture(scope="module")
def bundle_with_kit(tmp_path_factory) -> Path:
    """The demo model's fp32 ONNX bundle with its own kit in BUNDLE/conformance/ (shared with the e2e test)."""
    return _demo_bundle("fp32", tmp_path_factory)


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
    # the chunked prefill ran more than one chunk (prompts are longer than the bundles' --chunk-size 32)
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
