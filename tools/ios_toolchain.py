"""Install the Swift toolchain of the iOS app checks (a Debian trixie chroot), and run Swift in it.

Swift for Linux is not reachable here except as Debian trixie's ``swiftlang`` package (Swift
6.0.3, with swift-format), which needs glibc 2.38 and so does not install on bookworm. This script
builds a minimal trixie root with ``debootstrap`` and installs ``swiftlang`` plus ``libc6-dev`` and
``libstdc++-14-dev`` into it (without those every compile warns that libc is missing), under
``${XDG_CACHE_HOME:-~/.cache}/minicpmv-edge/swift-trixie/<key>/root`` (about 2.6 GB; the key
hashes the suite and the pinned versions). The install goes into a scratch sibling that is renamed
into place with a completion stamp (tools/toolchain_cache.py), so a half-finished root is never used
and a second call is a stamp check. ``debootstrap`` itself is ``apt-get install``ed on the host when
missing. Needs root (debootstrap, chroot and mount do), Debian's apt, and the Debian mirror
(``$DEBIAN_MIRROR`` or deb.debian.org).

``run_swift(argv, ...)`` runs a command in the root. The package directory (apps/ios) is
**bind-mounted** at ``/src`` and a kit directory, when given, read-only at ``/kit``; /proc is
mounted too (swift resolves its libraries through /proc/self/exe). All mounts are made inside a
private mount namespace (``unshare --mount``), so they vanish when the command ends, even when it is
killed, and the host's mount table is never touched. Bind-mounting rather than copying keeps the
sources the ones in the work tree (nothing to go stale) at no copy cost; SwiftPM's build directory
is kept inside the root (``--scratch-path /build/<name>``) rather than in apps/ios/.build, so the
work tree gets no root-owned build output and builds stay incremental between runs.

CLI: ``python tools/ios_toolchain.py`` installs (or checks) and prints KEY=VALUE lines;
``python tools/ios_toolchain.py run [--kit DIR] -- swift test ...`` runs a command in /src inside
the root. Called by ``make ios-toolchain`` (a dependency of ``make test``) and by
tests/test_ios_core.py. Standard library only.

Exit codes: 0 done, 1 an install or check failed (or the command's own exit code for ``run``),
2 not root, or apt-get/unshare/chroot missing.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toolchain_cache import (  # noqa: E402
    DEFAULT_DEBIAN_MIRROR,
    ToolchainError,
    _locked_install,
    cache_base,
    content_key,
)

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "apps" / "ios"
LABEL = "ios toolchain"
SUITE = "trixie"
# Pinned so the root is reproducible; a mirror that no longer has a version fails with apt's message.
PACKAGES = (
    ("swiftlang", "6.0.3-2"),
    ("libc6-dev", None),
    ("libstdc++-14-dev", None),
)
SWIFT_VERSION = "6.0.3"
SWIFT_FORMAT = "/usr/libexec/swift/bin/swift-format"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class IosToolchain:
    root: Path  # the trixie root
    swift_version: str

    def env_lines(self) -> list[str]:
        return [
            f"SWIFT_ROOT={self.root}",
            f"SWIFT_VERSION={self.swift_version}",
            f"SWIFT_FORMAT={SWIFT_FORMAT}",
        ]


def _require_host() -> dict[str, str]:
    if os.geteuid() != 0:
        raise ToolchainError("the Swift chroot needs root (debootstrap, chroot and mount)", 2)
    tools = {}
    for name in ("apt-get", "unshare", "chroot", "mount"):
        path = shutil.which(name)
        if path is None:
            raise ToolchainError(f"{name} not found on PATH (a Debian system with util-linux is needed)", 2)
        tools[name] = path
    return tools


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 1800) -> str:
    started = time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise ToolchainError(f"{what} failed (exit {done.returncode}): `{' '.join(cmd)}`\n{tail}")
    print(f"{LABEL}: {what}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    return done.stdout


def _debootstrap(tools: dict[str, str]) -> str:
    path = shutil.which("debootstrap")
    if path is not None:
        return path
    # The host's own package lists may be missing or old: update once, then install.
    _run([tools["apt-get"], "update", "-q"], "apt-get update (host)")
    _run(
        [tools["apt-get"], "install", "-y", "-q", "--no-install-recommends", "debootstrap"],
        "apt-get install debootstrap (host)",
        env={"DEBIAN_FRONTEND": "noninteractive"},
    )
    path = shutil.which("debootstrap")
    if path is None:
        raise ToolchainError("debootstrap was installed but is not on PATH")
    return path


def _in_root(root: Path, tools: dict[str, str], script: str, what: str, timeout: float = 1800) -> str:
    """Run a shell script in the root, with /proc mounted in a private mount namespace."""
    wrapper = f'mount -t proc proc "{root}/proc" && exec chroot "{root}" /bin/sh -c "$1"'
    cmd = [tools["unshare"], "--mount", "--propagation", "private", "sh", "-c", wrapper, "sh", script]
    return _run(cmd, what, env={"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}, timeout=timeout)


def _install(scratch: Path, tools: dict[str, str]) -> None:
    debootstrap = _debootstrap(tools)
    mirror = os.environ.get("DEBIAN_MIRROR") or DEFAULT_DEBIAN_MIRROR
    root = scratch / "root"
    print(f"{LABEL}: debootstrap {SUITE} into {root} (about 2.6 GB once swiftlang is in)", file=sys.stderr)
    _run([debootstrap, "--variant=minbase", SUITE, str(root), mirror], f"debootstrap {SUITE}")
    shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
    pins = " ".join(n if v is None else f"{n}={v}" for n, v in PACKAGES)
    _in_root(root, tools, "apt-get update -q", "apt-get update (chroot)")
    _in_root(
        root,
        tools,
        f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {pins} && apt-get clean",
        f"apt-get install {pins} (chroot)",
    )
    out = _in_root(root, tools, "swift --version 2>&1", "swift --version")
    if f"Swift version {SWIFT_VERSION}" not in out:
        raise ToolchainError(f"expected Swift {SWIFT_VERSION}, got:\n{out.strip()}")
    fmt = _in_root(root, tools, f"{SWIFT_FORMAT} --version 2>&1", "swift-format --version").strip()
    for d in ("src", "kit", "build", "out"):
        (root / d).mkdir(exist_ok=True)
    print(f"{LABEL}: {out.strip().splitlines()[0]}; swift-format {fmt}", file=sys.stderr)


def root_dir() -> Path:
    pins = "\n".join(f"{n}={v or ''}" for n, v in PACKAGES)
    return cache_base() / "swift-trixie" / content_key(SUITE.encode(), pins.encode()) / "root"


def ensure() -> IosToolchain:
    tools = _require_host()
    root = root_dir()
    started = time.monotonic()
    fresh = not (root.parent / ".minicpmv-edge-complete").is_file()
    _locked_install(root.parent, lambda scratch: _install(scratch, tools))
    if fresh:
        print(f"{LABEL}: cold setup took {time.monotonic() - started:.0f} s", file=sys.stderr)
    return IosToolchain(root=root, swift_version=SWIFT_VERSION)


def run_swift(
    command: str,
    *,
    kit: Path | None = None,
    out: Path | None = None,
    package: Path = PACKAGE,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a shell command in /src (package bind-mounted) inside the root; kit read-only at /kit.

    ``out``, when given, is bind-mounted writable at /out (OUT_DIR=/out). ``env`` adds variables
    inside the root (CONFORMANCE_KIT=/kit is set when a kit is given). Runs are serialised by a
    lock file beside the root (they share SwiftPM's build directory /build).
    """
    tc = ensure()
    tools = _require_host()
    root = tc.root
    mounts = [f'mount -t proc proc "{root}/proc"', f'mount --bind "{package.resolve()}" "{root}/src"']
    inner_env = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    if kit is not None:
        mounts.append(f'mount --bind "{kit.resolve()}" "{root}/kit" && mount -o remount,bind,ro "{root}/kit"')
        inner_env["CONFORMANCE_KIT"] = "/kit"
    if out is not None:
        (root / "out").mkdir(exist_ok=True)
        mounts.append(f'mount --bind "{out.resolve()}" "{root}/out"')
        inner_env["OUT_DIR"] = "/out"
    inner_env.update(env or {})
    exports = " ".join(f"{k}={_sh_quote(v)}" for k, v in inner_env.items())
    inner = f"cd /src && exec env -i {exports} /bin/sh -c {_sh_quote(command)}"
    wrapper = " && ".join(mounts) + f' && exec chroot "{root}" /bin/sh -c {_sh_quote(inner)}'
    cmd = [tools["unshare"], "--mount", "--propagation", "private", "sh", "-c", wrapper]
    with open(root.parent / "swift-run.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        return subprocess.run(cmd, capture_output=capture, text=True, check=False, timeout=timeout)


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="run a shell command in apps/ios inside the root")
    run.add_argument("--kit", type=Path, help="a conformance kit, mounted read-only at /kit")
    run.add_argument("--out", type=Path, help="a writable directory, mounted at /out")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run":
            words = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not words:
                parser.error("run needs a command after --")
            if args.kit is not None and not (args.kit / "conformance.json").is_file():
                raise ToolchainError(f"{args.kit} is not a conformance kit (no conformance.json)", 2)
            done = run_swift(shlex.join(words), kit=args.kit, out=args.out, capture=False)
            return done.returncode
        tc = ensure()
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print("\n".join(tc.env_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
