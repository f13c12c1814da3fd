"""The HarmonyOS app (apps/harmonyos), checked on Node: every .ets type-checked with ohos-typescript and
linted with ArkTS linter 1.1 against unofficial API-13 declarations, the checker itself shown to catch
a type error and a lint violation, and the ArkTS core's hypium suites run against a conformance kit.

The Node toolchain is installed (once per lock file, outside the repo) by tools/harmonyos_toolchain.py;
node 20+ and npm must be on PATH. A missing node fails these tests: it is not a reason to skip them.
"""

from __future__ import annotations

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


# --- Node end to end (the lead adds it here): the ArkTS core with the onnxruntime-node engine adapter
# --- on the demo model's ONNX bundle, token ids equal to `minicpmv-edge chat --json`.
