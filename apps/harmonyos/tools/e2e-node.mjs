// End to end on Node: the app's own ArkTS core (core/Chat.ets: slicing, prompt, tokenizer,
// splicing, generation loop, sampler, stream decoder) and engine adapter (engine/OrtEngine.ets)
// run an ONNX bundle through onnxruntime-node, for every greedy run of a conformance kit.
// Prints one JSON document: {runs: [{name, question, prompt_ids, token_ids, text, stop_reason,
// max_abs_logit_diff, logits_atol, ttft_ms, decode_tok_s}]}; tests/test_harmonyos_app.py compares
// it with `minicpmv-edge chat --json` and with the kit.
//
//   node apps/harmonyos/tools/e2e-node.mjs --bundle DIR [--kit KIT] [--device-report OUT [--bench-runs N]]
//   (KIT defaults to DIR/conformance; --device-report also times N turns of 64 decode steps on the first
//   run's image, as the app's Benchmark button does, and writes the report core/DeviceReport.ets builds)
import fs from 'fs';
import path from 'path';
import { fileURLToPath, pathToFileURL } from 'url';
import { bundleEts } from './ets-esbuild.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const app = path.resolve(here, '..');
const outfile = path.resolve(app, '..', '..', 'build', 'harmonyos', 'e2e', 'e2e.mjs');

function args(argv) {
  const out = { bundle: null, kit: null, report: null, benchRuns: 3 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--bundle') out.bundle = value;
    else if (flag === '--kit') out.kit = value;
    else if (flag === '--device-report') out.report = value;
    else if (flag === '--bench-runs') out.benchRuns = Number(value);
    else throw new Error(`unknown argument ${flag} (use --bundle DIR [--kit KIT] [--device-report OUT [--bench-runs N]])`);
  }
  if (!out.bundle) throw new Error('--bundle DIR is required');
  out.kit = out.kit || path.join(out.bundle, 'conformance');
  for (const f of [path.join(out.bundle, 'manifest.json'), path.join(out.kit, 'conformance.json')]) {
    if (!fs.existsSync(f)) throw new Error(`${f} does not exist`);
  }
  return out;
}

const entry = `
import fs from 'fs';
import { nodeOrtRuntime } from ${JSON.stringify(path.join(here, 'ort-node-runtime.mjs'))};
import { OrtEngine } from ${JSON.stringify(path.join(app, 'entry/src/main/ets/engine/OrtEngine.ets'))};
import { BundleManifest } from ${JSON.stringify(path.join(app, 'entry/src/main/ets/core/Manifest.ets'))};
import { AskOptions, BundleTexts, ChatSession } from ${JSON.stringify(path.join(app, 'entry/src/main/ets/core/Chat.ets'))};
import { SamplingConfig } from ${JSON.stringify(path.join(app, 'entry/src/main/ets/core/Sampler.ets'))};
import { ImagePixels } from ${JSON.stringify(path.join(app, 'entry/src/main/ets/core/Slicing.ets'))};
import { DeviceFacts, DeviceReportBuilder } from ${JSON.stringify(path.join(app, 'entry/src/main/ets/core/DeviceReport.ets'))};
import os from 'os';

function optional(file) { return fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : null; }

function read(kit, ref, Type) {
  const raw = fs.readFileSync(kit + '/' + ref.file);
  const copy = new Uint8Array(raw.length);
  copy.set(raw);
  return new Type(copy.buffer);
}

export async function run(bundle, kit, reportPath, benchRuns) {
  const manifest = BundleManifest.parse(fs.readFileSync(bundle + '/manifest.json', 'utf8'), bundle + '/manifest.json');
  const texts = new BundleTexts();
  texts.tokenizerJson = fs.readFileSync(bundle + '/tokenizer.json', 'utf8');
  texts.tokenizerConfigJson = optional(bundle + '/tokenizer_config.json');
  texts.generationConfigJson = optional(bundle + '/generation_config.json');
  texts.chatTemplate = fs.readFileSync(bundle + '/' + manifest.prompt.chat_template, 'utf8');
  const engine = await OrtEngine.open(nodeOrtRuntime, bundle, manifest, 0);
  const clock = () => performance.now();
  const session = new ChatSession(engine, manifest, texts, clock);
  const index = JSON.parse(fs.readFileSync(kit + '/conformance.json', 'utf8'));
  const runs = [];
  for (const g of index.generations) {
    const [h, w] = g.image.pixels.shape;
    const image = new ImagePixels(w, h, read(kit, g.image.pixels, Uint8Array));
    const options = new AskOptions();
    options.sampling = new SamplingConfig();
    options.sampling.maxNewTokens = g.max_new_tokens;
    options.downsampleMode = g.image.downsample_mode;
    options.maxSliceNums = g.image.max_slice_nums;
    options.recordLogits = true;
    let streamed = '';
    const stats = await session.ask(g.question, [image], (piece) => { streamed += piece; }, options);
    const want = read(kit, g.logits, Float32Array);
    const vocab = g.logits.shape[1];
    let diff = stats.logits.length === g.logits.shape[0] ? 0 : Infinity;
    stats.logits.forEach((row, k) => {
      for (let i = 0; i < vocab && k < g.logits.shape[0]; i++) diff = Math.max(diff, Math.abs(row[i] - want[k * vocab + i]));
    });
    runs.push({
      name: g.name, question: g.question, image_file: g.image_file, prompt_ids: stats.promptIds,
      token_ids: stats.tokenIds, text: stats.text, streamed, stop_reason: stats.stopReason,
      max_abs_logit_diff: diff, logits_atol: g.logits.atol, ttft_ms: stats.ttftMs, decode_tok_s: stats.decodeTokS,
    });
  }
  if (reportPath) {
    const g = index.generations[0];
    const [h, w] = g.image.pixels.shape;
    const facts = new DeviceFacts();
    facts.device = 'node ' + process.version + ' ' + os.cpus()[0].model;
    facts.osVersion = os.type() + ' ' + os.release();
    facts.appVersion = '0.1.0';
    const options = new AskOptions();
    options.sampling = new SamplingConfig();
    options.sampling.maxNewTokens = 65;
    options.ignoreStopTokens = true;
    const builder = new DeviceReportBuilder(manifest, facts, {
      image: g.image_file, width: w, height: h, downsample_mode: g.image.downsample_mode,
      max_slice_nums: g.image.max_slice_nums, decode_tokens: 64,
    });
    for (let i = 0; i < benchRuns; i++) {
      const image = new ImagePixels(w, h, read(kit, g.image.pixels, Uint8Array));
      const stats = await session.ask(g.question, [image], () => {}, options);
      builder.addRun(stats, 0);  // the kit's pixels are already decoded
    }
    fs.writeFileSync(reportPath, builder.toJson());
  }
  engine.close();
  return { bundle, kit, runs };
}
`;

try {
  const { bundle, kit, report, benchRuns } = args(process.argv.slice(2));
  await bundleEts({ contents: entry, resolveDir: here }, outfile);
  const mod = await import(pathToFileURL(outfile).href);
  const result = await mod.run(path.resolve(bundle), path.resolve(kit), report && path.resolve(report), benchRuns);
  console.log(JSON.stringify(result, null, 1));
} catch (err) {
  console.error(`error: ${err && err.message ? err.message : err}`);
  process.exitCode = 1;
}
