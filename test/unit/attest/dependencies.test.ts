import { execSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { dependenciesDirOf, dependencyClosure, FileDigestCache, measureFiles } from "../../../src/attest/index.js";

const root = mkdtempSync(join(tmpdir(), "kmi-deps-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function write(rel: string, content: string): string {
  const path = join(root, rel);
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, content);
  return path;
}

// app → a (→ nested b, → hoisted c), optional o (absent), @s/p; plus a stray package and a dev tool.
write("app/package.json", JSON.stringify({ dependencies: { a: "1", "@s/p": "1" }, optionalDependencies: { o: "1" }, devDependencies: { devtool: "1" } }));
write("app/dist/main.js", "import 'a';\n");
write("app/node_modules/a/package.json", JSON.stringify({ dependencies: { b: "2", c: "1" } }));
write("app/node_modules/a/index.js", "export const a = 1;\n");
write("app/node_modules/a/node_modules/b/package.json", "{}");
const bFile = write("app/node_modules/a/node_modules/b/index.js", "export const b = 2;\n");
write("app/node_modules/b/package.json", "{}");
write("app/node_modules/b/index.js", "the hoisted b 1.x, which app never loads\n");
write("app/node_modules/c/package.json", "{}");
const cFile = write("app/node_modules/c/lib/c.js", "export const c = 3;\n");
write("app/node_modules/@s/p/package.json", "{}");
const stray = write("app/node_modules/stray/index.js", "not a dependency\n");
const devtool = write("app/node_modules/devtool/index.js", "a dev tool\n");
const nodeModules = join(root, "app/node_modules");

const deps = async (cache?: FileDigestCache) => (await measureFiles({ "agent.deps": nodeModules }, { cache }))[0]!.sha256;

describe("dependencyClosure", () => {
  it("follows dependencies as Node resolves them: nested before hoisted, optional ones may be absent, dev tools left out", async () => {
    const dirs = await dependencyClosure("agent.deps", join(root, "app"));
    expect(dirs.map((d) => d.label)).toEqual(["node_modules/@s/p", "node_modules/a", "node_modules/a/node_modules/b", "node_modules/c"]);
  });

  it("refuses a tree where a required dependency is missing, naming it", async () => {
    write("broken/package.json", JSON.stringify({ dependencies: { missing: "1" } }));
    mkdirSync(join(root, "broken/node_modules"));
    await expect(measureFiles({ "agent.deps": join(root, "broken/node_modules") })).rejects.toThrow(/measurement agent\.deps: dependency missing of .*package\.json is not installed/);
  });

  it("finds the node_modules of an install directory at the nearest package.json above it", async () => {
    expect(await dependenciesDirOf(join(root, "app/dist"))).toBe(nodeModules);
    write("bundled/package.json", "{}");
    expect(await dependenciesDirOf(join(root, "bundled"))).toBeUndefined();
  });
});

describe("measuring a node_modules tree", () => {
  it("is the manifest digest of every file of every package in the closure", async () => {
    const files = ["node_modules/@s/p/package.json", "node_modules/a/index.js", "node_modules/a/node_modules/b/index.js", "node_modules/a/node_modules/b/package.json", "node_modules/a/package.json", "node_modules/c/lib/c.js", "node_modules/c/package.json"];
    const manifest = execSync(`sha256sum ${files.join(" ")}`, { cwd: join(root, "app"), encoding: "utf8" });
    const expected = execSync("sha256sum", { input: manifest, encoding: "utf8" }).split(" ")[0];
    expect(await deps()).toBe(expected);
  });

  it("changes when one file of a dependency changes, not when a package nothing loads does", async () => {
    const before = await deps();
    writeFileSync(stray, "changed\n");
    writeFileSync(devtool, "changed\n");
    expect(await deps()).toBe(before);
    writeFileSync(cFile, "export const c = 4;\n");
    expect(await deps()).not.toBe(before);
  });

  it("with a cache, still sees an edit that keeps the size and sets the mtime back (the ctime moves)", async () => {
    const cache = new FileDigestCache();
    utimesSync(bFile, 1_700_000_000, 1_700_000_000);
    const before = await deps(cache);
    expect(cache.size).toBe(7);
    await new Promise((r) => setTimeout(r, 20));
    writeFileSync(bFile, "export const b = 9;\n");
    utimesSync(bFile, 1_700_000_000, 1_700_000_000);
    expect(statSync(bFile).mtimeMs).toBe(1_700_000_000_000);
    const after = await deps(cache);
    expect(after).not.toBe(before);
    expect(after).toBe(await deps());
  });
});
