#!/usr/bin/env node
/**
 * Bundles the portal (web/) with esbuild into one folder the KDC serves: app.js (the code and
 * every dependency: nothing is loaded from elsewhere), app.css and index.html.
 *
 *   node scripts/build-web.mjs [--out DIR]     (default dist/web; `npm run build:web`)
 */
import { copyFile, mkdir } from "node:fs/promises";
import { join, resolve } from "node:path";
import { build } from "esbuild";

const root = resolve(import.meta.dirname, "..");
const i = process.argv.indexOf("--out");
const out = resolve(i > 0 ? process.argv[i + 1] : join(root, "dist/web"));

await mkdir(out, { recursive: true });
const result = await build({
  entryPoints: [join(root, "web/src/main.ts")],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  minify: true,
  legalComments: "none",
  outfile: join(out, "app.js"),
  metafile: true,
  logLevel: "warning",
});
await copyFile(join(root, "web/index.html"), join(out, "index.html"));
await copyFile(join(root, "web/app.css"), join(out, "app.css"));
const bytes = Object.values(result.metafile.outputs).reduce((n, o) => n + o.bytes, 0);
process.stdout.write(`portal bundle: ${out} (app.js ${Math.round(bytes / 1024)} KiB)\n`);
