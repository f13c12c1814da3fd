"""Install the Node toolchain of the HarmonyOS app checks, cached outside the repository.

apps/harmonyos/tools/package.json pins ohos-typescript, @arkts/declarations, @ohos/hypium, esbuild,
onnxruntime-node and @huggingface/tokenizers; package-lock.json pins their whole tree. This script
runs `npm ci` once per lock file into

    ${XDG_CACHE_HOME:-~/.cache}/minicpmv-edge/harmonyos-node/<first 16 hex of sha256(lock)>/

and points apps/harmonyos/tools/node_modules (gitignored) at that directory's node_modules. A
directory counts as installed only when it holds the completion stamp, which is written after the
install and a load check of the packages; a half-finished install is never used. Concurrent runs
are serialised by a lock file (the mechanism is tools/toolchain_cache.py, shared with
tools/android_toolchain.py).

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
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toolchain_cache import ToolchainError, npm_ci_cached, point_link, require_node  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "apps" / "harmonyos" / "tools"
LINK = TOOLS / "node_modules"
MIN_NODE = 20
LABEL = "harmonyos toolchain"
WHAT = "the HarmonyOS app checks"

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


def _load_check(scratch: Path) -> str:
    node, _ = require_node(WHAT, MIN_NODE)
    check = subprocess.run([node, "-e", LOAD_CHECK], cwd=scratch, capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise ToolchainError(f"installed packages do not load:\n{check.stderr.strip()}")
    return check.stdout.strip()


def ensure() -> Path:
    # onnxruntime-node's postinstall is not run (--ignore-scripts); the env var is belt and braces
    target = npm_ci_cached(
        TOOLS, "harmonyos-node", LABEL, _load_check, env={"ONNXRUNTIME_NODE_INSTALL": "skip"}
    )
    require_node(WHAT, MIN_NODE)  # the checks still need node on PATH
    point_link(LINK, target / "node_modules", LABEL)
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
