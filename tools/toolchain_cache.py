"""Cached, pinned tool installs outside the repository, shared by the app toolchain scripts.

Two kinds of install, each into its own directory under ``${XDG_CACHE_HOME:-~/.cache}/minicpmv-edge/``:

- ``npm_ci_cached``: ``npm ci --ignore-scripts`` of a committed package.json + package-lock.json,
  into ``<cache name>/<first 16 hex of sha256(lock)>/``, then a caller-supplied load check;
  ``point_link`` makes ``<tools dir>/node_modules`` (gitignored) a symlink to it.
- ``debs_cached``: pinned Debian packages fetched with ``apt-get download`` through a private apt
  configuration (its own sources list, package lists and archive cache inside the cache
  directory; the system's sources, lists and installed packages are untouched, and no root is
  needed) and unpacked with ``dpkg-deb -x`` into ``<cache name>/<key>/root``. apt checks each
  package against the signed release files with the system's Debian archive keyring.

A directory counts as installed only when it holds the completion stamp, written after the
install and its check; installs go into a scratch sibling that is renamed into place, so a
half-finished install is never used. Concurrent runs are serialised by a lock file next to the
target. Standard library only. Used by tools/harmonyos_toolchain.py and tools/android_toolchain.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

STAMP = ".minicpmv-edge-complete"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"


class ToolchainError(Exception):
    """A failed install or check; ``code`` is the exit code the scripts return (1 failed, 2 missing tool)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def cache_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minicpmv-edge"


def content_key(*parts: bytes) -> str:
    """First 16 hex digits of sha256 over the parts (each length-prefixed, so the split matters)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def lock_key(lock: Path) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16]


def _locked_install(target: Path, install: Callable[[Path], None]) -> None:
    """Run install(scratch) unless target is stamped; serialised by a lock file; scratch renamed to target."""
    if (target / STAMP).is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if (target / STAMP).is_file():  # another run finished it meanwhile
            return
        scratch = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            install(scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        (scratch / STAMP).write_text(target.name + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an unstamped leftover of an interrupted run
        os.rename(scratch, target)


# ---- npm ------------------------------------------------------------------------------------------


def require_node(what: str, min_major: int = 20) -> tuple[str, str]:
    """Paths of node and npm; ToolchainError(code 2) when missing or older than min_major."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        raise ToolchainError(
            f"{missing} not found on PATH: {what} need Node.js {min_major}+ with npm "
            "(https://nodejs.org, or your distribution's nodejs and npm packages)",
            2,
        )
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    m = re.match(r"v(\d+)\.", out)
    if m is None or int(m.group(1)) < min_major:
        raise ToolchainError(f"node {out or '(no version)'} at {node}: Node.js {min_major}+ is required", 2)
    return node, npm


def npm_ci_cached(
    tools: Path,
    cache_name: str,
    label: str,
    check: Callable[[Path], str],
    env: dict[str, str] | None = None,
) -> Path:
    """npm ci of tools/package.json + package-lock.json into the cache (once per lock); returns the directory.

    ``check(scratch)`` runs on the fresh install (node_modules under scratch) and returns a line to
    print, or raises ToolchainError; a failed check leaves nothing behind.
    """
    lock = tools / "package-lock.json"
    if not lock.is_file():
        raise ToolchainError(f"{lock} is missing")
    target = cache_base() / cache_name / lock_key(lock)

    def install(scratch: Path) -> None:
        _, npm = require_node(label)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(tools / name, scratch / name)
        cmd = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
        print(f"{label}: npm ci into {target}", file=sys.stderr)
        done = subprocess.run(cmd, cwd=scratch, env={**os.environ, **(env or {})}, check=False)
        if done.returncode != 0:
            raise ToolchainError(f"`npm ci` failed (exit {done.returncode}) in {scratch}")
        print(f"{label}: {check(scratch)}", file=sys.stderr)

    _locked_install(target, install)
    return target


def point_link(link: Path, modules: Path, label: str) -> None:
    """Make link (a tools dir's node_modules) a symlink to modules, replacing an older link atomically."""
    if link.is_symlink():
        if Path(os.readlink(link)) == modules:
            return
    elif link.exists():
        if not (link / ".package-lock.json").is_file():
            raise ToolchainError(f"{link} is a directory that npm did not create; move it away and rerun")
        print(f"{label}: replacing the local npm install {link} by a link", file=sys.stderr)
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(modules, target_is_directory=True)
    os.replace(tmp, link)


# ---- Debian packages ------------------------------------------------------------------------------


def debs_cached(
    cache_name: str,
    suite: str,
    packages: Sequence[tuple[str, str]],
    label: str,
    check: Callable[[Path], str] | None = None,
) -> Path:
    """Pinned Debian packages of ``suite`` unpacked into the cache; returns the root they unpack into.

    ``packages`` are (name, exact version) pairs; no dependencies are resolved (name each one).
    The mirror is ``$DEBIAN_MIRROR`` or deb.debian.org. ``check(root)`` may verify the result.
    """
    pins = "\n".join(f"{n}={v}" for n, v in packages)
    target = cache_base() / cache_name / content_key(suite.encode(), pins.encode())

    def install(scratch: Path) -> None:
        apt_get = shutil.which("apt-get")
        dpkg_deb = shutil.which("dpkg-deb")
        if apt_get is None or dpkg_deb is None:
            raise ToolchainError(f"{label}: apt-get and dpkg-deb are needed (a Debian or Ubuntu system)", 2)
        if not Path(DEBIAN_KEYRING).is_file():
            raise ToolchainError(f"{label}: {DEBIAN_KEYRING} is missing (package debian-archive-keyring)", 2)
        apt = scratch / "apt"
        for d in ("etc/parts", "lists/partial", "cache/archives/partial", "debs"):
            (apt / d).mkdir(parents=True)
        mirror = os.environ.get("DEBIAN_MIRROR") or DEFAULT_DEBIAN_MIRROR
        (apt / "etc" / "sources.list").write_text(f"deb [signed-by={DEBIAN_KEYRING}] {mirror} {suite} main\n")
        opts = [
            f"-oDir::Etc::SourceList={apt / 'etc' / 'sources.list'}",
            f"-oDir::Etc::SourceParts={apt / 'etc' / 'parts'}",
            f"-oDir::State::Lists={apt / 'lists'}",
            f"-oDir::Cache={apt / 'cache'}",
            "-q",
        ]
        if os.geteuid() == 0:  # apt's _apt user could not write into root's cache directory
            opts.append("-oAPT::Sandbox::User=root")
        print(
            f"{label}: apt-get download {' '.join(f'{n}={v}' for n, v in packages)} ({suite})",
            file=sys.stderr,
        )
        for cmd, cwd in (
            ([apt_get, *opts, "update"], scratch),
            ([apt_get, *opts, "download", *(f"{n}={v}" for n, v in packages)], apt / "debs"),
        ):
            done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise ToolchainError(f"`{' '.join(cmd[:1] + cmd[-1:])}` failed:\n{done.stderr.strip()}")
        root = scratch / "root"
        root.mkdir()
        debs = sorted((apt / "debs").glob("*.deb"))
        if len(debs) != len(packages):
            raise ToolchainError(f"expected {len(packages)} .deb files, got {[d.name for d in debs]}")
        for deb in debs:
            done = subprocess.run(
                [dpkg_deb, "-x", str(deb), str(root)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise ToolchainError(f"dpkg-deb -x {deb.name} failed:\n{done.stderr.strip()}")
        shutil.rmtree(apt)  # lists and archives are not needed any more
        if check is not None:
            print(f"{label}: {check(root)}", file=sys.stderr)

    _locked_install(target, install)
    return target / "root"
