"""The iOS app's Swift core (apps/ios, package MiniCPMVCore), checked on Linux: `swift build` and
`swift test` (XCTest) with Swift 6.0.3 in a Debian trixie chroot against a conformance kit written by
the CLI; `swift-format lint` clean over the package; the lint and the suite each shown to fail when
they should. The SwiftUI app and its Core ML engine (Apple-only frameworks) are not compiled here.

The chroot is built once, outside the repo, by tools/ios_toolchain.py (root, debootstrap, the Debian
mirror). A missing toolchain fails these tests: it is not a reason to skip them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit_tampering import copy_kit, flip_refine_pixel, write_index

from edge_runtime.bench import check_device_report, read_device_report

REPO = Path(__file__).resolve().parent.parent
TOOLCHAIN = REPO / "tools" / "ios_toolchain.py"
MINICPMV_EDGE = REPO / ".venv" / "bin" / "minicpmv-edge"
SWIFT_FORMAT = "/usr/libexec/swift/bin/swift-format"
SCRATCH = "/build/ios"  # SwiftPM's build directory inside the chroot (incremental between runs)
EXECUTED = re.compile(r"Executed (\d+) tests?, with (\d+) failures? \((\d+) unexpected\)")

sys.path.insert(0, str(REPO / "tools"))
import ios_toolchain  # noqa: E402


@pytest.fixture(scope="session")
def ios_toolchain_ready() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(TOOLCHAIN)], cwd=REPO, capture_output=True, text=True, timeout=1800, check=False
    )
    if done.returncode != 0:
        pytest.fail(
            f"the Swift toolchain is not available (tools/ios_toolchain.py exit {done.returncode}):\n"
            f"{done.stderr.strip()}",
            pytrace=False,
        )
    print(f"ios toolchain ready in {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="session")
def ios_kit(tmp_path_factory) -> Path:
    """A conformance kit from the embedded demo model, written by the CLI as a user would."""
    out = tmp_path_factory.mktemp("ios") / "kit"
    done = subprocess.run(
        [str(MINICPMV_EDGE), "conformance", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "conformance.json").is_file()
    return out


def _swift(command: str, **kwargs) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = ios_toolchain.run_swift(command, **kwargs)
    return done, time.monotonic() - started


def _executed(output: str) -> tuple[int, int]:
    """(tests, failures) of XCTest's last summary line (the whole run)."""
    found = EXECUTED.findall(output)
    assert found, output[-3000:]
    tests, failures, _ = (int(n) for n in found[-1])
    return tests, failures


def test_swift_format_lint_clean(ios_toolchain_ready):
    done, seconds = _swift(f"{SWIFT_FORMAT} lint --strict -r Sources Tests Package.swift")
    files = sorted((REPO / "apps" / "ios").glob("Sources/**/*.swift")) + sorted(
        (REPO / "apps" / "ios").glob("Tests/**/*.swift")
    )
    print(f"swift-format lint: {len(files) + 1} files clean in {seconds:.1f} s")
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    assert len(files) >= 20  # the core, the app and the tests are all linted


def test_swift_format_fixture_fails(ios_toolchain_ready):
    done, _ = _swift(f"{SWIFT_FORMAT} lint --strict tools/fixtures/format-violation/Bad.swift")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert re.search(
        r"Bad\.swift:4:\d+: (warning|error): \[(Indentation|OneVariableDeclarationPerLine|\w+)\]", out
    ), out


def test_swift_test_passes_on_the_kit(ios_toolchain_ready, ios_kit, tmp_path):
    build, build_s = _swift(f"swift build --build-tests --scratch-path {SCRATCH} 2>&1")
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-2000:]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done, test_s = _swift(f"swift test --skip-build --scratch-path {SCRATCH} 2>&1", kit=ios_kit, out=out_dir)
    output = done.stdout + done.stderr
    tests, failures = _executed(output)
    counts = dict(re.findall(r"^\[ios-core\] (\w[\w ]*): (.*)$", output, re.M))
    print(
        f"swift test: {tests} XCTest tests, {failures} failures; swift build {build_s:.1f} s, "
        f"swift test {test_s:.1f} s; {counts}"
    )
    assert done.returncode == 0 and failures == 0, output[-8000:]
    assert tests >= 19, output[-3000:]
    # every part of the kit was reached, with the kit's own counts
    kit = json.loads((ios_kit / "conformance.json").read_text(encoding="utf-8"))
    assert counts["rng"] == f"{len(kit['rng']['vectors'])} vectors"
    assert counts["sampling"] == f"{len(kit['sampling'])} cases"
    assert counts["texts"] == f"{len(kit['texts'])} cases"
    assert counts["prompts"] == f"{len(kit['prompts'])} cases"
    slices = sum(len(c["slices"]) for c in kit["images"])
    assert counts["images"] == f"{len(kit['images'])} cases, {slices} slices"
    rows = sum(g["logits"]["shape"][0] for g in kit["generations"])
    assert counts["generations"] == f"{len(kit['generations'])} greedy runs, {rows} logits rows replayed"
    # the device report the Swift builder wrote is one that bench --device-report accepts
    raw = read_device_report(out_dir / "device-report.json")
    assert raw["platform"] == "ios" and raw["bundle"]["format"] == "coreml" and len(raw["runs"]) == 2
    assert check_device_report(raw)


def test_swift_test_fails_on_a_tampered_kit(ios_toolchain_ready, ios_kit, tmp_path):
    """A level off in a resized image, a changed prompt id and a flipped greedy token each fail."""
    kit, index = copy_kit(ios_kit, tmp_path / "kit")
    case = flip_refine_pixel(kit, index)
    prompt = next(p for p in index["prompts"] if p["images"])
    prompt["ids"][-1] += 1
    run = index["generations"][0]
    run["token_ids"][0] = (run["token_ids"][0] + 1) % index["model"]["vocab_size"]
    write_index(kit, index)
    build, _ = _swift(f"swift build --build-tests --scratch-path {SCRATCH} 2>&1")
    assert build.returncode == 0, build.stdout[-5000:]
    done, _ = _swift(f"swift test --skip-build --scratch-path {SCRATCH} 2>&1", kit=kit)
    output = done.stdout + done.stderr
    tests, failures = _executed(output)
    assert done.returncode != 0 and failures >= 3, output[-8000:]
    assert re.search(
        rf"error: ImageTests.testEveryImageCase : .*image case {re.escape(case['name'])} resized refine",
        output,
    )
    assert re.search(
        rf"error: TextPromptTests.testEveryPromptCase : .*ids of prompt case {re.escape(prompt['name'])}",
        output,
    )
    assert re.search(
        rf"error: GenerationTests.testEveryGreedyRunReplayed : .*{re.escape(run['name'])}: greedy tokens",
        output,
    )
    assert tests >= 19
