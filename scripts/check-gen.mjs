// Fails when src/gen is not what `buf generate` makes from proto/ now (stale or hand-edited).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";

const root = new URL("..", import.meta.url).pathname;
const out = mkdtempSync(join(tmpdir(), "kmi-gen-"));
const template = JSON.stringify({
  version: "v2",
  plugins: [{ local: "protoc-gen-es", out, opt: ["target=ts", "import_extension=js"] }],
});
try {
  execFileSync("npx", ["--no-install", "buf", "generate", "--template", template], { cwd: root, stdio: "inherit" });
  const list = (dir) =>
    readdirSync(dir).flatMap((name) => {
      const p = join(dir, name);
      return statSync(p).isDirectory() ? list(p) : [p];
    });
  const fresh = new Map(list(out).map((p) => [relative(out, p), readFileSync(p, "utf8")]));
  const committed = new Map(list(join(root, "src/gen")).map((p) => [relative(join(root, "src/gen"), p), readFileSync(p, "utf8")]));
  const drift = [];
  for (const [name, text] of fresh) if (committed.get(name) !== text) drift.push(`changed or missing: src/gen/${name}`);
  for (const name of committed.keys()) if (!fresh.has(name)) drift.push(`no longer generated: src/gen/${name}`);
  if (drift.length > 0) {
    console.error(`src/gen is stale; run \`npm run generate\` and commit the result:\n  ${drift.join("\n  ")}`);
    process.exit(1);
  }
  console.log(`src/gen is up to date (${fresh.size} files)`);
} finally {
  rmSync(out, { recursive: true, force: true });
}
