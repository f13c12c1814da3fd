#!/usr/bin/env node
// Build the app's NAPI module (entry/src/main/cpp/ort_engine.cpp) for Linux, as a Node addon.
//
//   node build-napi-host.mjs [--force]     prints the addon's path on stdout
//
// HarmonyOS's NAPI is the Node-API surface, so the very source the phone build compiles loads in
// Node: <napi/native_api.h> resolves to napi-host/napi/native_api.h (Node's <node_api.h> from the
// pinned node-api-headers), "onnxruntime_c_api.h" to napi-host/onnxruntime_c_api.h (the subset of
// ORT's C API the module uses; onnxruntime-node ships no headers), and the module links
// onnxruntime-node's own libonnxruntime.so.1 (rpath to its directory in the toolchain).
// Output: build/harmonyos/napi-host/libortengine.node, rebuilt only when the key (compiler, command,
// sources and headers, the ORT library's path and size) changes. Exit 1 when the compile fails,
// 2 when the toolchain or the compiler is missing or the platform has no onnxruntime-node library.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const app = path.resolve(here, '..');
const repo = path.resolve(app, '..', '..');
const modules = path.join(here, 'node_modules');
const source = path.join(app, 'entry', 'src', 'main', 'cpp', 'ort_engine.cpp');
const shimDir = path.join(here, 'napi-host');
const napiInclude = path.join(modules, 'node-api-headers', 'include');
export const outDir = path.join(repo, 'build', 'harmonyos', 'napi-host');
export const addonPath = path.join(outDir, 'libortengine.node');

export class BuildError extends Error {
  constructor(message, code = 1) {
    super(message);
    this.code = code;
  }
}

/** onnxruntime-node's CPU library for this platform (through the tools/node_modules link). */
function ortLibDir() {
  if (process.platform !== 'linux') {
    throw new BuildError(`the host build of the NAPI module is Linux-only (this is ${process.platform})`, 2);
  }
  const dir = path.join(modules, 'onnxruntime-node', 'bin', 'napi-v6', 'linux', process.arch);
  if (!fs.existsSync(path.join(dir, 'libonnxruntime.so.1'))) {
    throw new BuildError(`${dir}/libonnxruntime.so.1 is missing: run tools/harmonyos_toolchain.py ` +
      `(onnxruntime-node 1.31.1 ships linux x64 and arm64 only)`, 2);
  }
  return dir;
}

function headers() {
  if (!fs.existsSync(path.join(napiInclude, 'node_api.h'))) {
    throw new BuildError(`${napiInclude}/node_api.h is missing: run tools/harmonyos_toolchain.py`, 2);
  }
  const list = [];
  const walk = (dir) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.h')) list.push(p);
    }
  };
  walk(shimDir);
  walk(napiInclude);
  return list;
}

/** The g++ command line (argv), with the ORT library linked by path and found at run time by rpath. */
export function compileCommand(output = addonPath) {
  const lib = ortLibDir();
  const cxx = process.env.CXX || 'g++';
  return [cxx, '-std=c++17', '-O2', '-shared', '-fPIC', '-Wall', '-Werror',
    `-I${shimDir}`, `-I${napiInclude}`, source, '-o', output,
    path.join(lib, 'libonnxruntime.so.1'), `-Wl,-rpath,${lib}`];
}

function buildKey(argv) {
  const h = crypto.createHash('sha256');
  let version;
  try {
    version = execFileSync(argv[0], ['--version'], { encoding: 'utf8' });
  } catch (err) {
    throw new BuildError(`${argv[0]} not found: the host build needs a C++17 compiler (g++); set CXX to use another`, 2);
  }
  h.update(version);
  h.update(JSON.stringify(argv));
  for (const f of [source, ...headers()]) {
    h.update(f);
    h.update(fs.readFileSync(f));
  }
  const lib = path.join(ortLibDir(), 'libonnxruntime.so.1');
  h.update(`${fs.realpathSync(lib)} ${fs.statSync(lib).size}`);
  return h.digest('hex');
}

/** Build (or reuse) the addon. Returns {path, cached, command, seconds}. */
export function buildNapiHost({ force = false } = {}) {
  const started = Date.now();
  const argv = compileCommand();
  const key = buildKey(argv);
  const keyFile = `${addonPath}.key`;
  if (!force && fs.existsSync(addonPath) && fs.existsSync(keyFile) && fs.readFileSync(keyFile, 'utf8').trim() === key) {
    return { path: addonPath, cached: true, command: argv.join(' '), seconds: (Date.now() - started) / 1000 };
  }
  fs.mkdirSync(outDir, { recursive: true });
  // compile to a scratch name and rename: concurrent builds never load a half-written addon
  const scratch = `${addonPath}.partial-${process.pid}`;
  const run = compileCommand(scratch);
  const done = spawnSync(run[0], run.slice(1), { encoding: 'utf8' });
  if (done.error || done.status !== 0) {
    fs.rmSync(scratch, { force: true });
    const why = done.error ? done.error.message : `${done.stderr}${done.stdout}`.trim();
    throw new BuildError(`compiling ${path.relative(repo, source)} failed:\n${argv.join(' ')}\n${why}`);
  }
  fs.renameSync(scratch, addonPath);
  fs.writeFileSync(keyFile, `${key}\n`);
  return { path: addonPath, cached: false, command: argv.join(' '), seconds: (Date.now() - started) / 1000 };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const bad = args.filter((a) => a !== '--force');
  if (bad.length > 0) {
    console.error(`error: unknown argument ${bad[0]} (usage: node build-napi-host.mjs [--force])`);
    process.exit(2);
  }
  try {
    const r = buildNapiHost({ force: args.includes('--force') });
    console.error(`build-napi-host: ${r.cached ? 'up to date' : 'built'} in ${r.seconds.toFixed(2)} s: ${r.command}`);
    console.log(r.path);
  } catch (err) {
    console.error(`error: ${err.message}`);
    process.exit(err instanceof BuildError ? err.code : 1);
  }
}
