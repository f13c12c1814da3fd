"""Make sure the offline APK toolchain of apps/android is on this machine, cached and idempotent.

Two halves (recipe and measurements: shared/design/native-toolchains.md, section 2):

1. Debian bookworm's Android SDK tools, installed system-wide with apt-get when missing (root only;
   otherwise the command to run is printed): aapt, zipalign, apksigner, dexdump and ProGuard
   (``proguard-cli``). These are ordinary packages of the machine's own Debian release.

2. From Debian *bullseye*, downloaded and unpacked but never installed, by
   tools/toolchain_cache.py's ``debs_cached`` (private apt configuration, pinned versions, the
   system untouched) into ``${XDG_CACHE_HOME:-~/.cache}/minicpmv-edge/android-sdk/<key>/root``:

   - android-sdk-platform-23 + libandroid-23-java: android.jar of API 23 (6.0.1_r72); bookworm and
     trixie ship no android.jar at all;
   - dalvik-exchange: Android's ``dx`` (com.android.dx.jar, 10.0.0+r36); bookworm's ``dx`` is IBM
     OpenDX, and d8/r8 are not in Debian.

Prints a JSON object with the paths (android_jar, dx_jar, aapt, zipalign, apksigner, dexdump,
proguard) on stdout; ``ensure()`` returns the same dict. Called by ``make android-apk-toolchain``
(a dependency of ``make test``), by apps/android/tools/build-apk.py and by
tests/test_android_apk.py. Standard library only.

Exit codes: 0 ready, 1 a download, unpack or install failed, 2 not root and tools missing (or
apt-get / dpkg-deb missing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toolchain_cache import ToolchainError, debs_cached  # noqa: E402

LABEL = "android apk toolchain"
BULLSEYE = "bullseye"
BULLSEYE_DEBS = (
    ("android-sdk-platform-23", "6.0.1+r72-6"),
    ("libandroid-23-java", "6.0.1+r72-6"),
    ("dalvik-exchange", "10.0.0+r36-1"),
)
ANDROID_JAR = "usr/lib/android-sdk/platforms/android-23/android.jar"
DX_JAR = "usr/share/java/com.android.dx.jar"

# command -> the Debian (bookworm) package that provides it
SYSTEM_TOOLS = {
    "aapt": "aapt",
    "zipalign": "zipalign",
    "apksigner": "apksigner",
    "dexdump": "dexdump",
    "proguard": "proguard-cli",
}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if done.returncode != 0:
        raise ToolchainError(
            f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}"
        )
    return done


def ensure_system_tools() -> dict[str, str]:
    missing = [cmd for cmd in SYSTEM_TOOLS if shutil.which(cmd) is None]
    if missing:
        packages = sorted({SYSTEM_TOOLS[c] for c in missing})
        if os.geteuid() != 0:
            raise ToolchainError(
                f"{', '.join(missing)} not found; install them with: sudo apt-get install {' '.join(packages)}",
                2,
            )
        print(f"android apk toolchain: apt-get install {' '.join(packages)}", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        base = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        done = subprocess.run(base, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:  # stale package lists: refresh once and retry
            run(["apt-get", "update", "-q"], env=env)
            run(base, env=env)
        still = [cmd for cmd in SYSTEM_TOOLS if shutil.which(cmd) is None]
        if still:
            raise ToolchainError(f"still missing after apt-get install: {', '.join(still)}")
    return {cmd: shutil.which(cmd) or "" for cmd in SYSTEM_TOOLS}


def _sdk_check(root: Path) -> str:
    for rel in (ANDROID_JAR, DX_JAR):
        if not (root / rel).is_file():
            raise ToolchainError(f"{rel} is not in the unpacked bullseye packages")
    dx = run(["java", "-cp", str(root / DX_JAR), "com.android.dx.command.Main", "--version"])
    return f"android.jar API 23; {(dx.stdout + dx.stderr).strip()}"


def ensure() -> dict[str, str]:
    tools = ensure_system_tools()
    if shutil.which("java") is None:
        raise ToolchainError("java not found on PATH: the APK build needs a JDK 17 (openjdk-17-jdk)", 2)
    root = debs_cached("android-sdk", BULLSEYE, BULLSEYE_DEBS, LABEL, _sdk_check)
    return {"android_jar": str(root / ANDROID_JAR), "dx_jar": str(root / DX_JAR), **tools}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        paths = ensure()
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
