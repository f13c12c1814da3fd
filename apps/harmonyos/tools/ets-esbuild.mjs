// Bundles ArkTS (.ets) sources for Node: ohos-typescript transpiles each .ets (types are
// check-ets.mjs's job; syntax errors stop the bundle), esbuild links them. Shared by every Node
// runner of the app's code (run-hypium.mjs, e2e-node.mjs, napi-engine-check.mjs).
import fs from 'fs';
import path from 'path';
import { createRequire } from 'module';
import { fileURLToPath } from 'url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const modules = path.join(here, 'node_modules');
const require = createRequire(path.join(modules, 'noop.js'));
const esbuild = require('esbuild');
const ts = require('ohos-typescript');

/** .ets -> JS with an inline source map, so stack traces name .ets lines. */
export const etsPlugin = {
  name: 'ets',
  setup(build) {
    build.onLoad({ filter: /\.ets$/ }, (args) => {
      const source = fs.readFileSync(args.path, 'utf8');
      const out = ts.transpileModule(source, {
        fileName: args.path,
        reportDiagnostics: true,
        compilerOptions: {
          target: ts.ScriptTarget.ES2021,
          module: ts.ModuleKind.ES2020,
          experimentalDecorators: true,
          inlineSourceMap: true,
          inlineSources: true,
        },
      });
      const errors = (out.diagnostics || []).map((d) => {
        const pos = d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start) : null;
        return {
          text: ts.flattenDiagnosticMessageText(d.messageText, ' '),
          location: pos ? { file: args.path, line: pos.line + 1, column: pos.character } : null,
        };
      });
      return { contents: out.outputText, loader: 'js', errors };
    });
    // Native addons cannot be bundled: load them from the toolchain's node_modules at run time.
    build.onResolve({ filter: /^onnxruntime-node$/ }, () => ({ path: require.resolve('onnxruntime-node'), external: true }));
  },
};

/**
 * Bundle `entry` (a file path, or {contents, resolveDir} for generated source) into one ESM file.
 * `plugins` run before the .ets plugin (e.g. one that maps 'libortengine.so' to a built addon).
 * Throws an Error whose message lists every bundle error as `file:line: text`.
 */
export async function bundleEts(entry, outfile, plugins = []) {
  const input = typeof entry === 'string'
    ? { entryPoints: [entry] }
    : { stdin: { contents: entry.contents, resolveDir: entry.resolveDir, loader: 'js', sourcefile: 'entry.js' } };
  fs.mkdirSync(path.dirname(outfile), { recursive: true });
  try {
    await esbuild.build({
      ...input,
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      outfile,
      sourcemap: 'inline',
      nodePaths: [modules],
      resolveExtensions: ['.ets', '.ts', '.js', '.mjs'],
      plugins: [...plugins, etsPlugin],
      logLevel: 'silent',
    });
  } catch (err) {
    const lines = (err.errors || []).map((e) => {
      const at = e.location ? `${e.location.file}:${e.location.line}: ` : '';
      return `bundle error: ${at}${e.text}`;
    });
    throw new Error(lines.length ? lines.join('\n') : `bundle error: ${err.message}`);
  }
  return outfile;
}
