"""The Android app's Kotlin core (apps/android/core), checked on the JVM: compiled with kotlinc (the Kotlin
compiler from npm) and its JUnit 5 suite run against a conformance kit written by the CLI; ktlint clean
over apps/android; the lint step and the suite each shown to fail when they should.

The toolchain (kotlin-compiler + ktlint from npm, Debian's junit5 jars) is installed once, outside the
repo, by tools/android_toolchain.py; java, node and npm must be on PATH. A missing tool fails these
tests: it is not a reason to skip them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kit_tampering import copy_kit, flip_refine_pixel, write_index

from edge_runtime.bench import check_device_report, read_device_report

REPO = Path(__file__).resolve().parent.parent
TEST_CORE = REPO / "apps" / "android" / "tools" / "test-core.py"
FIXTURE = REPO / "apps" / "android" / "tools" / "fixtures" / "ktlint-violation" / "Bad.kt"
MINICPMV_EDGE = REPO / ".venv" / "bin" / "minicpmv-edge"
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def android_toolchain() -> None:
    done = _run([sys.executable, str(REPO / "tools" / "android_toolchain.py")])
    if done.returncode != 0:
        pytest.fail(
            f"the Android JVM toolchain is not available (tools/android_toolchain.py exit {done.returncode}):\n"
            f"{done.stderr.strip()}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def android_kit(tmp_path_factory) -> Path:
    """A conformance kit from the embedded demo model, written by the CLI as a user would."""
    out = tmp_path_factory.mktemp("android") / "kit"
    done = _run([str(MINICPMV_EDGE), "conformance", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert (out / "conformance.json").is_file()
    return out


def _summary(stdout: str) -> tuple[int, int]:
    found = SUMMARY.findall(stdout)
    assert found, stdout
    passed, failed = (int(n) for n in found[-1])
    return passed, failed


def test_ktlint_clean(android_toolchain):
    done = _run([sys.executable, str(TEST_CORE), "--lint-only"])
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    m = re.search(r"^lint: ktlint clean on (\d+) files", done.stdout, re.M)
    assert m and int(m.group(1)) >= 10, done.stdout


def test_ktlint_fixture_fails(android_toolchain):
    done = _run([sys.executable, str(TEST_CORE), "--lint-only", "--ktlint-paths", str(FIXTURE)])
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"Bad\.kt:6:\d+: .*\(standard:no-semi\)", done.stdout), done.stdout


def test_junit_suite_passes_on_the_kit(android_toolchain, android_kit, tmp_path):
    report = tmp_path / "device-report.json"
    done = _run(
        [
            sys.executable,
            str(TEST_CORE),
            "--no-lint",
            "--kit",
            str(android_kit),
            "--device-report-out",
            str(report),
        ]
    )
    passed, failed = _summary(done.stdout)
    timing = re.search(r"^timing: .*$", done.stdout, re.M)
    print(f"android core JUnit: {passed} passed, {failed} failed ({timing.group(0) if timing else ''})")
    assert done.returncode == 0 and failed == 0, done.stdout + done.stderr
    # every image case, generation image and prompt case of the kit ran as its own test
    kit = json.loads((android_kit / "conformance.json").read_text(encoding="utf-8"))
    for case in kit["images"]:
        assert f"image {case['name']} [OK]" in done.stdout
    for case in kit["prompts"]:
        assert f"prompt {case['name']} [OK]" in done.stdout
    for gen in kit["generations"]:
        assert f"generation {gen['name']} prompt [OK]" in done.stdout
        if gen.get("image"):
            assert f"generation {gen['name']} image [OK]" in done.stdout
    assert passed >= len(kit["images"]) + len(kit["prompts"]) + len(kit["generations"]) + 5
    # the report the Kotlin builder wrote is one that bench --device-report accepts
    raw = read_device_report(report)
    assert raw["platform"] == "android" and len(raw["runs"]) == 2
    assert check_device_report(raw)  # judged against the published targets (skipped ones included)


def test_junit_suite_fails_on_a_tampered_kit(android_toolchain, android_kit, tmp_path):
    """One level off in a resized image and one changed prompt character must each fail their test."""
    kit, index = copy_kit(android_kit, tmp_path / "kit")
    case = flip_refine_pixel(kit, index)
    prompt = next(p for p in index["prompts"] if p["images"])
    prompt["prompt_text"] = prompt["prompt_text"].replace("<slice>", "<slice>\n", 1)
    write_index(kit, index)
    done = _run([sys.executable, str(TEST_CORE), "--no-lint", "--kit", str(kit)])
    passed, failed = _summary(done.stdout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"image {case['name']} [X]" in done.stdout, done.stdout
    assert f"prompt {prompt['name']} [X]" in done.stdout, done.stdout
    assert failed == 2 and passed > 0, done.stdout
