#!/usr/bin/env node
// Runs the app's NAPI module (entry/src/main/cpp/ort_engine.cpp, built for Linux by
// build-napi-host.mjs) under Node through the app's own ArkTS engine code, and checks it against
// a conformance kit's greedy runs.
//
//   node napi-engine-check.mjs --bundle DIR [--kit DIR] [--threads N]   (kit default: DIR/conformance)
//   node napi-engine-check.mjs --open MODEL.onnx [--threads N]
//
// engine/NapiOrtRuntime.ets imports 'libortengine.so'; here that import is the built addon, so
// OrtEngine.ets, core/Generator.ets and NapiOrtRuntime.ets run unchanged over ORT's C API. For each
// kit generation: the vision graph on each kit slice (patches, position ids), the features spliced
// into the prompt's embeddings (spliceEmbeddings), greedy generate (argmax, first maximum, as
// numpy) with the kit's stop ids and limit. Token ids, stop reason and stop id must equal the
// kit's; every step's logits must be within the kit's atol. Then the handle checks: after
// OrtEngine.close(), a run or a second release on a released session is a JS error.
// Prints one line per check and `N passed, M failed`; exit 0 all passed, 1 a mismatch, 2 a usage
// or setup error.
//
// --open MODEL: opens one model with NapiOrtRuntime and prints `opened` (exit 0) or
// `rejected: <message>` (exit 1), for the error-path test (a bad path must be a JS error carrying
// ORT's message, not a crash).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { bundleEts } from './ets-esbuild.mjs';
import { buildNapiHost, outDir } from './build-napi-host.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const app = path.resolve(here, '..');
const ets = path.join(app, 'entry', 'src', 'main', 'ets');

function usage(message) {
  console.error(`error: ${message}`);
  console.error('usage: node napi-engine-check.mjs --bundle DIR [--kit DIR] [--threads N] | --open MODEL [--threads N]');
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { bundle: null, kit: null, open: null, threads: 2 };
  for (let i = 0; i < argv.length; i++) {
    const value = () => (i + 1 < argv.length ? argv[++i] : usage(`${argv[i]} needs a value`));
    if (argv[i] === '--bundle') opts.bundle = path.resolve(value());
    else if (argv[i] === '--kit') opts.kit = path.resolve(value());
    else if (argv[i] === '--open') opts.open = path.resolve(value());
    else if (argv[i] === '--threads') {
      opts.threads = Number(value());
      if (!Number.isInteger(opts.threads) || opts.threads < 0) usage('--threads takes an integer >= 0');
    } else if (argv[i] === '-h' || argv[i] === '--help') {
      console.log('usage: node napi-engine-check.mjs --bundle DIR [--kit DIR] [--threads N] | --open MODEL [--threads N]');
      process.exit(0);
    } else usage(`unknown argument ${argv[i]}`);
  }
  if ((opts.bundle === null) === (opts.open === null)) usage('give --bundle DIR or --open MODEL');
  if (opts.bundle !== null) {
    if (!fs.existsSync(path.join(opts.bundle, 'manifest.json'))) usage(`${opts.bundle} has no manifest.json (not a bundle)`);
    opts.kit = opts.kit ?? path.join(opts.bundle, 'conformance');
    if (!fs.existsSync(path.join(opts.kit, 'conformance.json'))) {
      usage(`${opts.kit} has no conformance.json (minicpmv-edge conformance --bundle B --in-bundle, or --kit DIR)`);
    }
  }
  return opts;
}

/** The app modules the check drives, bundled with 'libortengine.so' bound to the built addon. */
async function loadApp(addon) {
  const addonPlugin = {
    name: 'libortengine-host',
    setup(build) {
      build.onResolve({ filter: /^libortengine\.so$/ }, () => ({ path: 'libortengine.so', namespace: 'napi-host' }));
      build.onLoad({ filter: /.*/, namespace: 'napi-host' }, () => ({
        loader: 'js',
        contents: [
          "import { createRequire } from 'node:module';",
          `const addon = createRequire(import.meta.url)(${JSON.stringify(addon)});`,
          'export const createSession = addon.createSession;',
          'export const run = addon.run;',
          'export const releaseSession = addon.releaseSession;',
        ].join('\n'),
      }));
    },
  };
  const entry = [
    `export { NapiOrtRuntime } from ${JSON.stringify(path.join(ets, 'engine', 'NapiOrtRuntime.ets'))};`,
    `export { OrtEngine } from ${JSON.stringify(path.join(ets, 'engine', 'OrtEngine.ets'))};`,
    `export { BundleManifest } from ${JSON.stringify(path.join(ets, 'core', 'Manifest.ets'))};`,
    `export { spliceEmbeddings, generate, GenerationLimits } from ${JSON.stringify(path.join(ets, 'core', 'Generator.ets'))};`,
    `import * as native from 'libortengine.so';`,
    'export { native };',
  ].join('\n');
  const outfile = await bundleEts({ contents: entry, resolveDir: here }, path.join(outDir, 'check.mjs'), [addonPlugin]);
  process.setSourceMapsEnabled(true);
  return import(`${pathToFileURL(outfile).href}?t=${Date.now()}`);
}

/** A kit array reference -> typed array (a copy, so the view is aligned). */
function readRef(kit, ref, Type) {
  const b = fs.readFileSync(path.join(kit, ref.file));
  const copy = new Uint8Array(b.length);
  copy.set(b);
  const arr = new Type(copy.buffer);
  const want = ref.shape.reduce((a, d) => a * d, 1);
  if (arr.length !== want) throw new Error(`${ref.file}: ${arr.length} values, shape ${JSON.stringify(ref.shape)} wants ${want}`);
  return arr;
}

/** First index of the maximum (numpy argmax). */
const argmax = {
  next(logits) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    return best;
  },
};

class Report {
  constructor() {
    this.passed = 0;
    this.failed = 0;
  }

  check(ok, line) {
    if (ok) this.passed++;
    else this.failed++;
    console.log(`${ok ? 'PASS' : 'FAIL'} ${line}`);
  }
}

async function replay(mod, opts, report) {
  const kit = JSON.parse(fs.readFileSync(path.join(opts.kit, 'conformance.json'), 'utf8'));
  const manifest = mod.BundleManifest.parse(fs.readFileSync(path.join(opts.bundle, 'manifest.json'), 'utf8'), 'manifest.json');
  const t0 = Date.now();
  const engine = await mod.OrtEngine.open(new mod.NapiOrtRuntime(), opts.bundle, manifest, opts.threads);
  console.log(`opened ${manifest.visionFiles.size + 3} sessions through libortengine.node in ${Date.now() - t0} ms`);
  if (kit.generations.length === 0) report.check(false, 'the kit has no generations');
  for (const g of kit.generations) {
    const started = Date.now();
    const features = [];
    for (const s of g.image.slices) {
      features.push(await engine.visionEncoder(readRef(opts.kit, s.patches, Float32Array),
        readRef(opts.kit, s.position_ids, BigInt64Array), g.image.downsample_mode));
    }
    const embeds = await mod.spliceEmbeddings(engine, g.prompt_ids, features, manifest.info.imageTokenId);
    const limits = new mod.GenerationLimits();
    limits.maxNewTokens = g.max_new_tokens;
    limits.stopIds = kit.stop_ids;
    const r = await mod.generate(engine, embeds, argmax, limits, null, true);
    const want = readRef(opts.kit, g.logits, Float32Array);
    const rows = g.logits.shape[0];
    const vocab = g.logits.shape[1];
    let maxDiff = 0;
    let worst = '';
    r.logits.forEach((row, k) => {
      if (k >= rows || row.length !== vocab) return;
      for (let i = 0; i < vocab; i++) {
        const d = Math.abs(row[i] - want[k * vocab + i]);
        if (!(d <= maxDiff)) {
          maxDiff = Number.isNaN(d) ? Infinity : d;
          worst = `step ${k} id ${i}`;
        }
      }
    });
    const sameTokens = JSON.stringify(r.tokenIds) === JSON.stringify(g.token_ids);
    const sameStop = r.stopReason === g.stop_reason && r.stopTokenId === g.stop_token_id;
    const sameRows = r.logits.length === rows && r.logits.every((row) => row.length === vocab);
    const ok = sameTokens && sameStop && sameRows && maxDiff <= g.logits.atol;
    const detail = [
      `${g.name}: ${r.tokenIds.length} tokens ${sameTokens ? 'equal' : `DIFFER (got ${JSON.stringify(r.tokenIds)}, kit ${JSON.stringify(g.token_ids)})`}`,
      `stop ${r.stopReason}/${r.stopTokenId}${sameStop ? '' : ` (kit ${g.stop_reason}/${g.stop_token_id})`}`,
      `${r.logits.length} logit rows${sameRows ? '' : ` (kit ${rows} x ${vocab})`}`,
      `max |dlogit| ${maxDiff.toExponential(2)}${worst ? ` at ${worst}` : ''} (atol ${g.logits.atol})`,
      `${g.image.slices.length} slices, ${r.nPromptTokens} prompt tokens, ${Date.now() - started} ms`,
    ];
    report.check(ok, detail.join(', '));
  }

  // Handle checks: OrtEngine.close() releases every session; a stale handle must be a JS error.
  const stale = await new mod.NapiOrtRuntime().open(path.join(opts.bundle, manifest.tokenEmbeddingFile), 1);
  stale.release();
  const feeds = new Map();
  engine.close();
  let runError = null;
  try {
    await stale.run(feeds);
  } catch (err) {
    runError = err;
  }
  report.check(runError instanceof Error && /not a live session handle/.test(runError.message),
    `run on a released session is rejected: ${runError ? runError.message : 'it resolved'}`);
  let releaseError = null;
  try {
    stale.release();
  } catch (err) {
    releaseError = err;
  }
  report.check(releaseError instanceof Error && /not a live session handle/.test(releaseError.message),
    `a second release throws: ${releaseError ? releaseError.message : 'it returned'}`);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  let addon;
  let mod;
  try {
    const built = buildNapiHost();
    console.log(`addon ${built.path} (${built.cached ? 'cached' : `built in ${built.seconds.toFixed(1)} s`})`);
    addon = built.path;
    mod = await loadApp(addon);
  } catch (err) {
    console.error(`error: ${err.message}`);
    return 2;
  }
  if (opts.open !== null) {
    try {
      const session = await new mod.NapiOrtRuntime().open(opts.open, opts.threads);
      session.release();
      console.log('opened');
      return 0;
    } catch (err) {
      console.log(`rejected: ${err instanceof Error ? `${err.constructor.name}: ${err.message}` : String(err)}`);
      return 1;
    }
  }
  const report = new Report();
  const started = Date.now();
  await replay(mod, opts, report);
  console.log(`${report.passed} passed, ${report.failed} failed (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  return report.failed === 0 ? 0 : 1;
}

process.exitCode = await main();
