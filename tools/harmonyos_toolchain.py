"""Install the Node toolchain of the HarmonyOS app checks, cached outside the repository.

apps/harmonyos/tools/package.json pins ohos-typescript, @arkts/declarations, @ohos/hypium, esbuild,
onnxruntime-node and @huggingface/tokenizers; package-lock.json pins their whole tree. This script
runs `npm ci` once per lock file into

    ${XDG_CACHE_HOME:-~/.cache}/minicpmv-edge/harmonyos-node/<first 16 hex of sha256(lock)>/

and points apps/harmonyos/tools/node_modules (gitignored) at that directory's node_modules. A
directory counts as installed only when it holds the completion stamp, which is written after the
install and a load check of the packages; a half-finished install is never used. Concurrent runs
are serialised by a lock file.

The install touches nothing but the npm registry: lifecycle scripts are not run
(onnxruntime-node's postinstall would fetch CUDA providers from NuGet on linux-x64; its CPU
binary ships in the npm package, and esbuild's native binary comes as an optional dependency).

Called by `make harmonyos-toolchain` (a dependency of `make test`) and by the pytest session
fixture of tests/test_harmonyos_app.py. Standard library only.

Exit codes: 0 installed (prints the directory), 1 the install or its check failed, 2 node or npm
missing or too old.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "apps" / "harmonyos" / "tools"
LINK = TOOLS / "node_modules"
STAMP = ".minicpmv-edge-complete"
MIN_NODE = 20

# Loaded after the install: the packages the checks import, and onnxruntime-node's native binding
# for this platform (shipped in the npm package, no download).
LOAD_CHECK = """
const { createRequire } = require('module');
const req = createRequire(process.cwd() + '/');
const ts = req('ohos-typescript');
if (!ts.ArkTSLinter_1_1 || typeof ts.ArkTSLinter_1_1.runArkTSLinter !== 'function') {
  throw new Error('ohos-typescript has no ArkTSLinter_1_1.runArkTSLinter');
}
req('esbuild').transformSync('let x: number = 1', { loader: 'ts' });
const fs = require('fs');
for (const f of ['@arkts/declarations/dist/tsconfig.base.json', '@ohos/hypium/package.json']) {
  if (!fs.existsSync('node_modules/' + f)) throw new Error('missing node_modules/' + f);
}
const ort = req('onnxruntime-node');
if (typeof ort.InferenceSession.create !== 'function') throw new Error('onnxruntime-node: no InferenceSession');
import(require('path').resolve('node_modules/@huggingface/tokenizers/dist/tokenizers.mjs')).then((tok) => {
  if (typeof tok.Tokenizer !== 'function') throw new Error('@huggingface/tokenizers: no Tokenizer');
  console.log('load check: ohos-typescript ' + ts.version + ', onnxruntime-node ' + ort.env.versions.common);
});
"""


class ToolchainError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minicpmv-edge" / "harmonyos-node"


def lock_key(lock: Path) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16]


def require_node() -> tuple[str, str]:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        raise ToolchainError(
            f"{missing} not found on PATH: the HarmonyOS app checks need Node.js {MIN_NODE}+ with npm "
            "(https://nodejs.org, or your distribution's nodejs and npm packages)",
            2,
        )
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    m = re.match(r"v(\d+)\.", out)
    if m is None or int(m.group(1)) < MIN_NODE:
        raise ToolchainError(f"node {out or '(no version)'} at {node}: Node.js {MIN_NODE}+ is required", 2)
    return node, npm


def install(target: Path, node: str, npm: str) -> None:
    """npm ci into a scratch sibling of target, check it loads, stamp it, rename it into place."""
    scratch = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(TOOLS / name, scratch / name)
    env = dict(os.environ)
    env["ONNXRUNTIME_NODE_INSTALL"] = "skip"  # belt and braces: scripts are off anyway
    cmd = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    print(f"harmonyos toolchain: npm ci into {target}", file=sys.stderr)
    done = subprocess.run(cmd, cwd=scratch, env=env, check=False)
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ToolchainError(f"`npm ci` failed (exit {done.returncode}) in {scratch}")
    check = subprocess.run([node, "-e", LOAD_CHECK], cwd=scratch, capture_output=True, text=True, check=False)
    if check.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ToolchainError(f"installed packages do not load:\n{check.stderr.strip()}")
    print(f"harmonyos toolchain: {check.stdout.strip()}", file=sys.stderr)
    (scratch / STAMP).write_text(lock_key(TOOLS / "package-lock.json") + "\n")
    shutil.rmtree(target, ignore_errors=True)  # an unstamped leftover of an interrupted run
    os.rename(scratch, target)


def point_link(modules: Path) -> None:
    """Make tools/node_modules a symlink to modules, replacing an older link atomically."""
    if LINK.is_symlink():
        if Path(os.readlink(LINK)) == modules:
            return
    elif LINK.exists():
        if not (LINK / ".package-lock.json").is_file():
            raise ToolchainError(f"{LINK} is a directory that npm did not create; move it away and rerun")
        print(f"harmonyos toolchain: replacing the local npm install {LINK} by a link", file=sys.stderr)
        shutil.rmtree(LINK)
    tmp = LINK.with_name(f".node_modules.link-{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(modules, target_is_directory=True)
    os.replace(tmp, LINK)


def ensure() -> Path:
    lock = TOOLS / "package-lock.json"
    if not lock.is_file():
        raise ToolchainError(f"{lock} is missing")
    target = cache_root() / lock_key(lock)
    if not (target / STAMP).is_file():
        node, npm = require_node()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f"{target.name}.lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            if not (target / STAMP).is_file():  # another run may have finished it meanwhile
                install(target, node, npm)
    else:
        require_node()  # the checks still need node on PATH
    point_link(target / "node_modules")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        target = ensure()
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
