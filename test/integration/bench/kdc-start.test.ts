/**
 * A KDC that does not start is a failure of the bench, not "not measured": row 5 (and row 4,
 * which shares its servers) rejects with the reason, and `bench/run.ts` turns any rejected row
 * into a non-zero exit. Runs the built bench (dist/), whose servers are dist/cmd/kmi.js.
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { describe, expect, it } from "vitest";

const ROOT = resolve(import.meta.dirname, "../../..");
const dist = (p: string) => resolve(ROOT, "dist", p);

describe("bench: the KDC does not start", () => {
  it("row 5 fails with the reason", async () => {
    // `npm test` builds first; build here only when run on its own without dist.
    if (!existsSync(dist("bench/rows/kdc.js"))) spawnSync("npx", ["tsc", "-p", "tsconfig.json"], { cwd: ROOT, stdio: "ignore" });
    const { Env } = (await import(pathToFileURL(dist("bench/lib/env.js")).href)) as typeof import("../../../bench/lib/env.js");
    const { runKdc } = (await import(pathToFileURL(dist("bench/rows/kdc.js")).href)) as typeof import("../../../bench/rows/kdc.js");
    const env = await Env.create("quick", false, false);
    try {
      // A file where the servers' data directories go: `kmi kdc init` cannot create them.
      await writeFile(join(env.dir, "mesh"), "");
      await expect(runKdc(env)).rejects.toThrow(/^the KDC and Auditserver did not start: .*kdc init/s);
    } finally {
      await env.close();
    }
    expect(existsSync(env.dir)).toBe(false);
  });
});
