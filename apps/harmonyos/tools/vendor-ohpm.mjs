#!/usr/bin/env node
// Repackage the npm dependencies the app imports for ohpm, as local folders under apps/harmonyos/vendor/
// (gitignored), which entry/oh-package.json5 names with `file:` dependencies.
//
//   node tools/vendor-ohpm.mjs        (after tools/harmonyos_toolchain.py installed the pinned packages)
//
// @huggingface/tokenizers is plain ES2020 JavaScript with its own .d.ts and no dependencies; ohpm
// wants an oh-package.json5 (name, version, main, types) in the folder, which npm packages lack.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const vendor = path.resolve(here, '..', 'vendor');

const PACKAGES = [{ npm: '@huggingface/tokenizers', folder: 'huggingface-tokenizers', main: 'dist/tokenizers.mjs' }];

for (const p of PACKAGES) {
  const src = path.join(here, 'node_modules', p.npm);
  if (!fs.existsSync(path.join(src, 'package.json'))) {
    console.error(`error: ${src} is missing; run tools/harmonyos_toolchain.py first`);
    process.exit(2);
  }
  const pkg = JSON.parse(fs.readFileSync(path.join(src, 'package.json'), 'utf8'));
  const dst = path.join(vendor, p.folder);
  fs.rmSync(dst, { recursive: true, force: true });
  fs.mkdirSync(dst, { recursive: true });
  for (const entry of ['dist', 'types', 'LICENSE', 'README.md']) {
    if (fs.existsSync(path.join(src, entry))) fs.cpSync(path.join(src, entry), path.join(dst, entry), { recursive: true });
  }
  const oh = {
    name: p.npm,
    version: pkg.version,
    description: `${pkg.description || p.npm} (npm ${p.npm}@${pkg.version}, repackaged for ohpm)`,
    main: p.main,
    types: pkg.types,
    license: pkg.license,
    dependencies: {},
  };
  fs.writeFileSync(path.join(dst, 'oh-package.json5'), JSON.stringify(oh, null, 2) + '\n');
  console.log(`${p.npm}@${pkg.version} -> ${path.relative(process.cwd(), dst)}`);
}
