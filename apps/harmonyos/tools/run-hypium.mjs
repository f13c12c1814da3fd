#!/usr/bin/env node
// Run the app's hypium suites on Node against a conformance kit.
//
//   CONFORMANCE_KIT=DIR [MODEL_DIR=DIR] node run-hypium.mjs [--tests DIR]
//                                                 (default --tests: apps/harmonyos/entry/src/test)
//
// Every `*.test.ets` under the tests dir (sorted by path) is a suite module whose default export
// declares its `describe`s. The suites and the ArkTS code they import are transpiled with
// ohos-typescript (the compiler DevEco uses) and bundled with esbuild into
// build/harmonyos/hypium/run.mjs, which installs a Node fs KitReader rooted at $CONFORMANCE_KIT
// (entry/src/test/support/KitFiles.ets setKitReader) and a reader of the model's own files
// (tokenizer.json ...; support/Assets.ets setAssetReader) rooted at $MODEL_DIR, by default the copies
// the kit carries in KIT/assets/ (an older kit: its `source.path`), then runs hypium with a console delegator.
// Prints one line per test and `N passed, M failed`; exits 1 on any failure or error, on a
// failing beforeAll/afterAll hook, or when no test ran; 2 on a usage or setup error.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const app = path.resolve(here, '..');
const repo = path.resolve(app, '..', '..');
const modules = path.join(here, 'node_modules');
const outDir = path.join(repo, 'build', 'harmonyos', 'hypium');
const kitFiles = path.join(app, 'entry', 'src', 'test', 'support', 'KitFiles.ets');
const assetFiles = path.join(app, 'entry', 'src', 'test', 'support', 'Assets.ets');

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

if (!fs.existsSync(path.join(modules, 'esbuild'))) {
  fail(`${modules} has no esbuild; run tools/harmonyos_toolchain.py (or make harmonyos-toolchain)`);
}
// after the check: the shared bundler loads esbuild from the toolchain as it is imported
const { bundleEts } = await import('./ets-esbuild.mjs');

function parseArgs(argv) {
  let tests = path.join(app, 'entry', 'src', 'test');
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--tests' && i + 1 < argv.length) tests = path.resolve(argv[++i]);
    else if (argv[i] === '-h' || argv[i] === '--help') {
      console.log('usage: CONFORMANCE_KIT=DIR node run-hypium.mjs [--tests DIR]');
      process.exit(0);
    } else fail(`unknown argument ${argv[i]}`);
  }
  return tests;
}

function suiteFiles(dir) {
  if (!fs.existsSync(dir)) return [];
  const out = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory() && e.name !== 'node_modules' && !e.name.startsWith('.')) out.push(...suiteFiles(p));
    else if (e.isFile() && e.name.endsWith('.test.ets')) out.push(p);
  }
  return out.sort();
}

/** $MODEL_DIR, else the model files the kit carries (KIT/assets/, docs/conformance.md), else
 *  conformance.json `source.path` (an older kit; relative paths are relative to the kit). */
function modelDir(kit) {
  if (process.env.MODEL_DIR) {
    const dir = path.resolve(process.env.MODEL_DIR);
    if (!fs.existsSync(dir)) fail(`MODEL_DIR=${process.env.MODEL_DIR} does not exist`);
    return dir;
  }
  const carried = path.join(kit, 'assets');
  if (fs.existsSync(path.join(carried, 'tokenizer.json'))) return carried;
  const source = JSON.parse(fs.readFileSync(path.join(kit, 'conformance.json'), 'utf8')).source || {};
  if (typeof source.path !== 'string') fail(`${kit}/conformance.json has no source.path: set MODEL_DIR to the model directory`);
  const dir = path.resolve(kit, source.path);
  if (!fs.existsSync(dir)) {
    fail(`the kit's model (source.path ${source.path}) does not exist here: set MODEL_DIR to a copy of it`);
  }
  return dir;
}

function kitDir() {
  const kit = process.env.CONFORMANCE_KIT;
  if (!kit) {
    fail('CONFORMANCE_KIT is not set: point it at a conformance kit directory (minicpmv-edge conformance --out DIR)');
  }
  const dir = path.resolve(kit);
  if (!fs.existsSync(path.join(dir, 'conformance.json'))) {
    fail(`CONFORMANCE_KIT=${kit}: ${path.join(dir, 'conformance.json')} does not exist (not a conformance kit)`);
  }
  return dir;
}

function entrySource(suites, kit, model) {
  const lines = [
    "import { Hypium } from '@ohos/hypium';",
    `import { setKitReader } from ${JSON.stringify(kitFiles)};`,
    "import fs from 'node:fs';",
    "import path from 'node:path';",
  ];
  if (model !== null) lines.push(`import { setAssetReader } from ${JSON.stringify(assetFiles)};`);
  suites.forEach((s, i) => lines.push(`import suite${i} from ${JSON.stringify(s)};`));
  lines.push(`const KIT = ${JSON.stringify(kit)};`);
  lines.push(`const MODEL = ${JSON.stringify(model)};`);
  lines.push(`const SUITES = [${suites.map((_, i) => `suite${i}`).join(', ')}];`);
  lines.push(`const NAMES = ${JSON.stringify(suites.map((s) => path.relative(app, s)))};`);
  lines.push(`export async function run(report) {
  setKitReader({
    readText: (p) => fs.readFileSync(path.join(KIT, p), 'utf8'),
    readBytes: (p) => { const b = fs.readFileSync(path.join(KIT, p)); return new Uint8Array(b.buffer, b.byteOffset, b.byteLength); },
  });
  if (MODEL !== null) {
    setAssetReader({
      readText: (p) => fs.readFileSync(path.join(MODEL, p), 'utf8'),
      exists: (p) => fs.existsSync(path.join(MODEL, p)),
    });
  }
  SUITES.forEach((s, i) => { if (typeof s !== 'function') throw new Error(NAMES[i] + ': the default export is not a function'); });
  await new Promise((resolve) => {
    const delegator = {
      printSync: (m) => report(m),
      print: async (m) => report(m),
      finishTest: (msg, code, cb) => { if (cb) cb(); resolve(); },
      executeShellCommand: async () => ({ exitCode: 0, stdResult: '' }),
      getAppContext: () => ({}),
    };
    Hypium.hypiumTest(delegator, { bundleName: 'minicpmv.edge', parameters: { timeout: process.env.HYPIUM_TIMEOUT_MS || '600000' } },
      () => { for (const s of SUITES) s(); });
  });
}`);
  return lines.join('\n');
}

/** Turns hypium's OHOS_REPORT blocks into per-test lines and counts. */
class Tally {
  constructor() {
    this.passed = 0;
    this.failed = 0;
    this.hookErrors = [];
    this.failedClasses = new Set();
    this.summary = null;
  }

  field(block, name) {
    const m = block.match(new RegExp(`^OHOS_REPORT_STATUS: ${name}=(.*)$`, 'm'));
    return m ? m[1] : null;
  }

  feed(block) {
    const code = block.match(/^OHOS_REPORT_STATUS_CODE: (-?\d+)$/m);
    const cls = this.field(block, 'class');
    if (code && code[1] !== '1') {
      const name = `${cls}.${this.field(block, 'test')}`;
      const ms = this.field(block, 'consuming');
      if (code[1] === '0') {
        this.passed++;
        console.log(`PASS ${name} (${ms} ms)`);
      } else {
        this.failed++;
        this.failedClasses.add(cls);
        const kind = code[1] === '-1' ? 'ERROR' : 'FAIL';
        console.log(`${kind} ${name} (${ms} ms): ${this.field(block, 'stack') ?? '(no message)'}`);
      }
    } else if (!code && cls && this.field(block, 'suiteconsuming') !== null) {
      const extra = block.match(/^OHOS_REPORT_STATUS: (?!class=|suiteconsuming=)(.+)$/m);
      // a failing beforeAll/afterAll: counted once per suite unless a test of it already failed
      if (extra && !this.failedClasses.has(cls)) {
        this.hookErrors.push(`${cls}: ${extra[1]}`);
        console.log(`ERROR ${cls} (hook): ${extra[1]}`);
      }
    }
    const sum = block.match(/OHOS_REPORT_RESULT: stream=(Tests run: .*)$/m);
    if (sum) this.summary = sum[1];
  }
}

async function main() {
  const testsDir = parseArgs(process.argv.slice(2));
  const kit = kitDir();
  const suites = suiteFiles(testsDir);
  const model = fs.existsSync(assetFiles) ? modelDir(kit) : null;
  console.log(`run-hypium: ${suites.length} suite files under ${testsDir}, kit ${kit}` + (model ? `, model ${model}` : ''));
  for (const s of suites) console.log(`  ${path.relative(app, s)}`);
  if (suites.length === 0) {
    console.log('0 passed, 0 failed');
    console.log('error: no test ran');
    return 1;
  }
  fs.mkdirSync(outDir, { recursive: true });
  const outfile = path.join(outDir, 'run.mjs');
  try {
    await bundleEts({ contents: entrySource(suites, kit, model), resolveDir: here }, outfile);
  } catch (err) {
    console.log(err.message.split(`${repo}/`).join(''));
    return 1;
  }

  process.setSourceMapsEnabled(true);
  const tally = new Tally();
  const quiet = !process.env.HYPIUM_VERBOSE;
  const info = console.info;
  const debug = console.debug;
  if (quiet) {
    console.info = () => {}; // hypium's own chatter ([Hypium]... print success)
    console.debug = () => {};
  }
  let finished = false;
  process.on('exit', (code) => {
    if (!finished) {
      console.log(`${tally.passed} passed, ${tally.failed + 1} failed`);
      console.log('error: the suites never finished (a test awaited a promise that never settles?)');
      process.exitCode = 1;
    }
  });
  const started = Date.now();
  try {
    const mod = await import(pathToFileURL(outfile).href);
    await mod.run((m) => tally.feed(String(m)));
  } catch (err) {
    finished = true;
    console.info = info;
    console.debug = debug;
    console.log(`${tally.passed} passed, ${tally.failed + 1} failed`);
    console.log(`error: ${err && err.stack ? err.stack : err}`);
    return 1;
  }
  finished = true;
  console.info = info;
  console.debug = debug;
  if (tally.summary) console.log(`hypium: ${tally.summary} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  const failed = tally.failed + tally.hookErrors.length;
  console.log(`${tally.passed} passed, ${failed} failed`);
  if (tally.passed + failed === 0) {
    console.log('error: no test ran');
    return 1;
  }
  return failed === 0 ? 0 : 1;
}

process.exitCode = await main();
