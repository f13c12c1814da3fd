#!/usr/bin/env python3
"""Compile the Android app's Kotlin core and its JUnit 5 tests with kotlinc, run them, and lint with ktlint.

    apps/android/tools/test-core.py [--kit KIT] [--lint-only | --no-lint] [--ktlint-paths PATH ...]
                                    [--build DIR] [--device-report-out FILE]

- Compiles apps/android/core/src/main/kotlin (the core: pure Kotlin, no android.*) and
  src/test/kotlin with kotlinc (kotlin-compiler 2.4.20 from npm, JVM target 1.8 like the app),
  into --build (default build/android-core), then runs the JUnit Platform console launcher
  (Debian junit5) over the test classes with CONFORMANCE_KIT=KIT (default: $CONFORMANCE_KIT).
  Prints `N passed, M failed` (and `lint: ...`) and exits 1 when a test fails, none ran, or
  the compile failed.
- ktlint (1.8.0, standard rules) over every .kt/.kts under apps/android (core, app and Gradle
  scripts, when they exist; build outputs, node_modules and tools/fixtures excluded) or over
  --ktlint-paths.
  Exit 1 on a violation, naming file:line and rule.

The toolchain comes from tools/android_toolchain.py (installed on first use, cached). The core
must not import android.*; that is checked too. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ANDROID = REPO / "apps" / "android"
CORE = ANDROID / "core"
sys.path.insert(0, str(REPO / "tools"))
from android_toolchain import AndroidToolchain, ToolchainError, ensure  # noqa: E402

FIXTURES = ANDROID / "tools" / "fixtures"
SKIP_DIRS = {"build", "node_modules", ".gradle", ".idea", "out"}


def kotlin_sources(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == FIXTURES:  # deliberately broken files for the checker's own test
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith((".kt", ".kts"))]
    return out


def check_pure(main_sources: list[Path]) -> list[str]:
    bad = []
    for f in main_sources:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"\s*import\s+(android|androidx|org\.pytorch)\.", line):
                bad.append(f"{f.relative_to(REPO)}:{n}: the core must stay platform-neutral: {line.strip()}")
    return bad


def run_ktlint(tc: AndroidToolchain, paths: list[Path]) -> int:
    files = [str(p) for p in paths]
    if not files:
        print("lint: no Kotlin files", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    done = subprocess.run(
        [str(tc.ktlint), "--relative", *files], cwd=REPO, capture_output=True, text=True, check=False
    )
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        print(out)
        print(f"lint: ktlint found violations in {len(files)} files ({time.monotonic() - t0:.1f}s)")
        return 1
    print(f"lint: ktlint clean on {len(files)} files ({time.monotonic() - t0:.1f}s)")
    return 0


def compile_and_test(tc: AndroidToolchain, kit: str, build: Path, report_out: str | None) -> int:
    main_src = kotlin_sources(CORE / "src" / "main" / "kotlin")
    test_src = kotlin_sources(CORE / "src" / "test" / "kotlin")
    impure = check_pure(main_src)
    if impure:
        print("\n".join(impure))
        return 1
    lib = tc.kotlin_lib
    cp = os.pathsep.join(
        str(p) for p in (lib / "kotlin-test.jar", lib / "kotlin-test-junit5.jar", tc.junit_console)
    )
    options = ["-jvm-target", "1.8", "-Werror", "-no-reflect", "-cp", cp]
    # classes live in build/classes-<key>, reused while the sources, the compiler and its options are
    # unchanged; a compile goes into a scratch sibling renamed into place, so concurrent runs never
    # see half-written classes (the loser of a race drops its own copy)
    key = hashlib.sha256("\0".join([str(tc.kotlinc), *options]).encode())
    for f in main_src + test_src:
        key.update(f"\0{f.relative_to(REPO)}\0".encode())
        key.update(f.read_bytes())
    classes = build / f"classes-{key.hexdigest()[:16]}"
    t0 = time.monotonic()
    if classes.is_dir():
        print(f"compile: sources unchanged, reusing {classes}")
    else:
        scratch = build / f".{classes.name}.partial-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        done = subprocess.run(
            [str(tc.kotlinc), *options, "-d", str(scratch), *(str(p) for p in main_src + test_src)],
            capture_output=True,
            text=True,
            check=False,
        )
        # kotlinc's notes about its own launcher are not warnings of the code
        noise = re.compile(r"^(info|warning): (kotlinc-jvm|unable to find kotlin-stdlib)")
        diag = "\n".join(ln for ln in (done.stdout + done.stderr).splitlines() if not noise.match(ln))
        if done.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            print(diag)
            print(f"compile: kotlinc failed (exit {done.returncode})")
            return 1
        for old in build.glob("classes-*"):  # older builds
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(scratch, classes)
        except OSError:  # another run put the same classes in place meanwhile
            shutil.rmtree(scratch, ignore_errors=True)
    t_compile = time.monotonic() - t0
    runtime_cp = os.pathsep.join(
        str(p)
        for p in (
            classes,
            CORE / "src" / "test" / "resources",
            lib / "kotlin-stdlib.jar",
            lib / "kotlin-test.jar",
            lib / "kotlin-test-junit5.jar",
        )
    )
    env = dict(os.environ, CONFORMANCE_KIT=kit)
    if report_out:
        env["DEVICE_REPORT_OUT"] = report_out
    t1 = time.monotonic()
    run = subprocess.run(
        [
            str(tc.java),
            "-jar",
            str(tc.junit_console),
            "--class-path",
            runtime_cp,
            "--select-package",
            "org.minicpmvedge.core",
            "--disable-banner",
            "--disable-ansi-colors",
            "--details=tree",
            "--details-theme=ascii",
            "--fail-if-no-tests",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    out = run.stdout + run.stderr
    print(out.rstrip())
    counts = {}
    for key in ("tests successful", "tests failed", "tests found", "tests aborted"):
        m = re.search(rf"\[\s*(\d+) {key}\s*\]", out)
        counts[key] = int(m.group(1)) if m else -1
    passed, failed = counts["tests successful"], counts["tests failed"] + max(counts["tests aborted"], 0)
    print(f"timing: compile {t_compile:.1f}s, run {time.monotonic() - t1:.1f}s")
    print(f"{passed} passed, {failed} failed")
    if run.returncode != 0 or passed <= 0 or failed != 0 or passed != counts["tests found"]:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", default=os.environ.get("CONFORMANCE_KIT", ""), help="conformance kit directory")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--lint-only", action="store_true", help="only run ktlint")
    mode.add_argument("--no-lint", action="store_true", help="skip ktlint")
    ap.add_argument("--ktlint-paths", nargs="+", type=Path, help="lint these files instead of apps/android")
    ap.add_argument("--build", type=Path, default=REPO / "build" / "android-core")
    ap.add_argument("--device-report-out", help="where the device-report test writes its JSON")
    args = ap.parse_args(argv)
    try:
        tc = ensure()
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    rc = 0
    if not args.no_lint:
        rc |= run_ktlint(tc, args.ktlint_paths or kotlin_sources(ANDROID))
    if not args.lint_only:
        if not args.kit or not (Path(args.kit) / "conformance.json").is_file():
            print(
                f"error: no conformance kit at {args.kit!r} (pass --kit or set CONFORMANCE_KIT)",
                file=sys.stderr,
            )
            return 2
        rc |= compile_and_test(
            tc, str(Path(args.kit).resolve()), args.build.resolve(), args.device_report_out
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
