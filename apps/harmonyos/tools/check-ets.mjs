#!/usr/bin/env node
// Type-check and ArkTS-lint every .ets file of the app (entry/src: main and test).
//
//   node check-ets.mjs [--root DIR]     (default DIR: apps/harmonyos/entry/src)
//
// The compiler is ohos-typescript (OpenHarmony's TypeScript fork, the one DevEco's ets-loader runs:
// it parses `struct`, decorators and the UI builder syntax), checked against @arkts/declarations,
// an unofficial API-13 snapshot of the SDK's .d.ts/.d.ets. The `ets` compiler option (which
// identifiers are components, which decorators render) is derived from those declarations.
// Then ArkTS linter 1.1 (ts.ArkTSLinter_1_1) runs over the same builder program.
// Bare imports resolve to the SDK kits (@kit.*, @ohos.*) and to this tools dir's node_modules
// (@huggingface/tokenizers, @ohos/hypium, both with their own .d.ts).
//
// Prints the file count, the diagnostics count per kind (syntax, type, lint), each diagnostic as
// `file:line: message`, and exits 1 on any diagnostic (or when no .ets file was found).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const modules = path.join(here, 'node_modules');
if (!fs.existsSync(path.join(modules, 'ohos-typescript'))) {
  console.error(`error: ${modules} has no ohos-typescript; run tools/harmonyos_toolchain.py (or make harmonyos-toolchain)`);
  process.exit(2);
}
const ts = require('ohos-typescript');

function parseArgs(argv) {
  let root = path.resolve(here, '..', 'entry', 'src');
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--root' && i + 1 < argv.length) {
      root = path.resolve(argv[++i]);
    } else if (argv[i] === '-h' || argv[i] === '--help') {
      console.log('usage: node check-ets.mjs [--root DIR]');
      process.exit(0);
    } else {
      console.error(`error: unknown argument ${argv[i]}`);
      process.exit(2);
    }
  }
  if (!fs.existsSync(root) || !fs.statSync(root).isDirectory()) {
    console.error(`error: ${root} is not a directory`);
    process.exit(2);
  }
  return root;
}

function etsFiles(dir) {
  const out = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory() && e.name !== 'node_modules' && !e.name.startsWith('.')) out.push(...etsFiles(p));
    else if (e.isFile() && e.name.endsWith('.ets')) out.push(p);
  }
  return out.sort();
}

/** The `ets` compiler option, as ets-loader builds it from the SDK's component list. */
function etsOption(componentDir) {
  const components = new Set(['ForEach', 'LazyForEach']);
  const extend = [];
  for (const f of fs.readdirSync(componentDir).sort()) {
    if (!f.endsWith('.d.ts')) continue;
    const text = fs.readFileSync(path.join(componentDir, f), 'utf8');
    for (const m of text.matchAll(/^declare const (\w+)Instance: (\w+)Attribute\b/gm)) {
      components.add(m[1]);
      extend.push({ name: m[1], type: `${m[2]}Attribute`, instance: `${m[1]}Instance` });
    }
  }
  return {
    render: { method: ['build', 'pageTransition'], decorator: ['Builder', 'LocalBuilder'] },
    components: [...components].sort(),
    extend: { decorator: ['Extend', 'AnimatableExtend'], components: extend },
    styles: {
      decorator: 'Styles',
      component: { name: 'Common', type: 'T', instance: 'CommonInstance' },
      property: 'stateStyles',
    },
    concurrent: { decorator: 'Concurrent' },
    customComponent: 'CustomComponent',
    propertyDecorators: [
      { name: 'Link', needInitialization: false },
      { name: 'Prop', needInitialization: false },
      { name: 'ObjectLink', needInitialization: false },
      { name: 'Consume', needInitialization: false },
    ],
    emitDecorators: [],
    libs: [],
  };
}

// Drops line and block comments and trailing commas: enough JSON5 for our own oh-package.json5 files.
function parseJson5(text) {
  const noComments = text.replace(/("(?:[^"\\\n]|\\.)*")|\/\/[^\n]*|\/\*[\s\S]*?\*\//g, (m, str) => str ?? '');
  return JSON.parse(noComments.replace(/,(\s*[}\]])/g, '$1'));
}

/**
 * The entry module's local ohpm dependencies (`"name": "file:folder"`), typed the way ohpm resolves
 * them: the folder's oh-package.json5 `types`, else its index.d.ts. This is how DevEco types the
 * NAPI module (`"libxxx.so": "file:./src/main/cpp/types/libxxx"`).
 */
function ohpmFilePaths() {
  const entry = path.resolve(here, '..', 'entry');
  const manifest = path.join(entry, 'oh-package.json5');
  const out = {};
  if (!fs.existsSync(manifest)) return out;
  const deps = parseJson5(fs.readFileSync(manifest, 'utf8')).dependencies || {};
  for (const [name, spec] of Object.entries(deps)) {
    if (typeof spec !== 'string' || !spec.startsWith('file:')) continue;
    const folder = path.resolve(entry, spec.slice('file:'.length));
    let types = path.join(folder, 'index.d.ts');
    const pkg = path.join(folder, 'oh-package.json5');
    if (fs.existsSync(pkg)) {
      const t = parseJson5(fs.readFileSync(pkg, 'utf8')).types;
      if (t) types = path.join(folder, t);
    }
    if (fs.existsSync(types)) out[name] = [types];
  }
  return out;
}

function compilerOptions() {
  const decl = path.join(modules, '@arkts', 'declarations', 'dist');
  const base = JSON.parse(fs.readFileSync(path.join(decl, 'tsconfig.base.json'), 'utf8'));
  const paths = { ...base.compilerOptions.paths, ...ohpmFilePaths() };
  // Third-party packages the app depends on (entry/oh-package.json5) or its tests import, from the
  // pinned npm install (the ohpm copy under vendor/ is the same package, made on demand).
  paths['@huggingface/tokenizers'] = [path.join(modules, '@huggingface', 'tokenizers', 'types', 'index.d.ts')];
  paths['@ohos/hypium'] = [path.join(modules, '@ohos', 'hypium', 'index.d.ts')];
  // The app's own NAPI module, declared as DevEco declares it (entry/oh-package.json5 file: dependency).
  paths['libortengine.so'] = [path.join(here, '..', 'entry', 'src', 'main', 'cpp', 'types', 'libortengine', 'index.d.ts')];
  const options = {
    target: ts.ScriptTarget.ES2021,
    module: ts.ModuleKind.ES2020,
    moduleResolution: ts.ModuleResolutionKind.NodeJs,
    lib: ['lib.es2021.d.ts'],
    strict: true,
    noEmit: true,
    experimentalDecorators: true,
    skipLibCheck: true,
    baseUrl: decl,
    paths,
    allowArbitraryExtensions: true,
    types: [],
    compatibleSdkVersion: 13,
    // as ets-loader sets them: imports of a NAPI module ('libx.so') then resolve to its declared .d.ts
    needDoArkTsLinter: true,
    isCompatibleVersion: false,
    ets: etsOption(path.join(decl, 'component')),
  };
  const sdkRoots = [path.join(decl, 'global.d.ts')];
  for (const f of fs.readdirSync(path.join(decl, 'component')).sort()) {
    if (f.endsWith('.d.ts')) sdkRoots.push(path.join(decl, 'component', f));
  }
  return { options, sdkRoots };
}

function where(d, root) {
  if (!d.file) return '(global)';
  const rel = path.relative(root, d.file.fileName);
  if (d.start === undefined) return rel;
  const { line } = d.file.getLineAndCharacterOfPosition(d.start);
  return `${rel}:${line + 1}`;
}

function main() {
  const root = parseArgs(process.argv.slice(2));
  const files = etsFiles(root);
  const started = Date.now();
  const { options, sdkRoots } = compilerOptions();
  const builder = ts.createIncrementalProgram({
    rootNames: [...files, ...sdkRoots],
    options,
    host: ts.createIncrementalCompilerHost(options),
  });
  const program = builder.getProgram();
  const ours = new Set(files.map((f) => path.resolve(f)));
  // Diagnostics in the SDK declarations themselves are not ours to fix (skipLibCheck covers most).
  const mine = (d) => !d.file || ours.has(path.resolve(d.file.fileName));

  const found = { syntax: [], type: [], lint: [] };
  const seen = new Set();
  const add = (kind, d) => {
    if (!mine(d)) return;
    const msg = ts.flattenDiagnosticMessageText(d.messageText, ' ');
    const key = `${d.file ? d.file.fileName : ''}:${d.start}:${msg}`;
    if (seen.has(key)) return; // the linter repeats some strict-mode tsc findings
    seen.add(key);
    found[kind].push({ at: where(d, root), msg, category: ts.DiagnosticCategory[d.category] });
  };
  for (const d of program.getOptionsDiagnostics()) add('type', d);
  for (const d of program.getGlobalDiagnostics()) add('type', d);
  for (const d of program.getSyntacticDiagnostics()) add('syntax', d);
  for (const d of program.getSemanticDiagnostics()) add('type', d);
  for (const d of ts.ArkTSLinter_1_1.runArkTSLinter(builder, undefined, undefined, '1.1')) add('lint', d);

  console.log(`check-ets: ${files.length} .ets files under ${root}`);
  console.log(
    `diagnostics: syntax ${found.syntax.length}, type ${found.type.length}, ` +
      `ArkTS linter 1.1 ${found.lint.length} (${((Date.now() - started) / 1000).toFixed(1)} s)`,
  );
  let total = 0;
  for (const kind of ['syntax', 'type', 'lint']) {
    for (const d of found[kind]) {
      const tag = kind === 'lint' && d.category !== 'Error' ? `lint ${d.category.toLowerCase()}` : kind;
      console.log(`${d.at}: [${tag}] ${d.msg}`);
      total++;
    }
  }
  if (files.length === 0) {
    console.log('error: no .ets file found');
    return 1;
  }
  return total === 0 ? 0 : 1;
}

process.exitCode = main();
