import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { createAuditLog } from "../../../src/storage/audit-log.js";
import { openLevelStore } from "../../../src/storage/level-store.js";
import { CrashA, CrashB } from "../../fixtures/storage/crash-tables.js";
import { tempDir } from "./tmp-dir.js";

const fixture = fileURLToPath(new URL("../../fixtures/storage/append-burst.ts", import.meta.url));
const root = fileURLToPath(new URL("../../../", import.meta.url));

/**
 * Starts the fixture, waits until it has appended at least `atLeast` entries, then SIGKILLs it
 * mid-burst. Returns how many appends it had reported as done (acknowledged).
 */
async function burstAndKill(dir: string, start: number, atLeast: number): Promise<number> {
  const child = spawn(process.execPath, ["--import", "tsx", fixture, dir, String(start)], {
    cwd: root,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on("exit", (_code, signal) => resolve(signal)));
  let seen = 0;
  await new Promise<void>((resolve, reject) => {
    child.stdout.on("data", (d: Buffer) => {
      for (const m of d.toString().matchAll(/progress (\d+)/g)) seen = Math.max(seen, Number(m[1]));
      if (seen >= atLeast) resolve();
    });
    child.on("exit", () => reject(new Error(`fixture exited before the kill: ${stderr}`)));
  });
  // A random delay, so that the kill lands anywhere inside the burst, not just after a report.
  await new Promise((r) => setTimeout(r, 5 + Math.random() * 40));
  child.kill("SIGKILL");
  expect(await exited).toBe("SIGKILL");
  return seen;
}

describe("crash consistency", () => {
  it("keeps every change whole or absent and the chain intact across three SIGKILLs mid-burst", async () => {
    const dir = await tempDir();
    let start = 0;
    let acknowledged = 0;
    for (let round = 0; round < 3; round++) {
      acknowledged += await burstAndKill(dir, start, 150);
      const store = await openLevelStore(dir, { owner: "crash-test" });
      try {
        const a = new Set<string>();
        const b = new Set<string>();
        for await (const [key] of store.iterate(CrashA)) a.add(key);
        for await (const [key] of store.iterate(CrashB)) b.add(key);
        const log = createAuditLog(store);
        const targets = new Set<string>();
        for (let after = 0n; ; ) {
          const page = await log.tail({ afterSeq: after, limit: 1000 });
          if (page.length === 0) break;
          for (const e of page) targets.add(e.target.replace("item/", ""));
          after = page[page.length - 1]!.seq;
        }
        // Whole or absent: each change's two records exist together, and exactly when its entry does.
        expect([...a].filter((k) => !b.has(k))).toEqual([]);
        expect([...b].filter((k) => !a.has(k))).toEqual([]);
        expect([...a].filter((k) => !targets.has(k))).toEqual([]);
        expect([...targets].filter((k) => !a.has(k))).toEqual([]);
        // Every append acknowledged before a kill survived it.
        expect(a.size).toBeGreaterThanOrEqual(acknowledged);
        const result = await log.verify();
        expect(result).toMatchObject({ ok: true, problem: "" });
        expect(result.entries).toBe(targets.size);
        start = Math.max(...[...a].map(Number)) + 1000;
      } finally {
        await store.close();
      }
    }
  });
});
