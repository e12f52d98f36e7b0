/**
 * The benchmarks cannot rot: `node dist/bench/run.js --quick --json` runs every benchmark for
 * a moment, exits 0, prints every row (a row whose dependency is missing prints its "not
 * measured" line), and every figure it did measure is a positive number. No timing threshold.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const ROOT = resolve(import.meta.dirname, "../../..");
const RUN = resolve(ROOT, "dist/bench/run.js");

/** The rows of issue 8, as the bench prints their headings. */
const ROWS = [
  "1. Agent signing over the Unix socket",
  "2. Leaf minting in the proxy",
  "3. Proxy throughput",
  "4. Rotation propagation",
  "5. KDC: Certificate menu and secret releases",
];

interface Stat {
  median: number;
  min: number;
  max: number;
  n: number;
}

interface Report {
  mode: string;
  tempDir: string;
  rows: {
    id: string;
    title: string;
    figures: { id: string; label: string; unit: string; value: Stat; p50?: Stat; p99?: Stat; ratios: { vs: string; value: number }[] }[];
    notMeasured: { id: string; label: string; reason: string }[];
  }[];
}

let code: number | null = null;
let bench: ReturnType<typeof spawn> | undefined;
let stdout = "";
let stderr = "";

beforeAll(async () => {
  // `npm test` builds first; build here only when run on its own without dist.
  if (!existsSync(RUN)) spawnSync("npx", ["tsc", "-p", "tsconfig.json"], { cwd: ROOT, stdio: "ignore" });
  expect(existsSync(RUN), "dist/bench/run.js is missing: the build failed").toBe(true);
  await new Promise<void>((done, fail) => {
    const p = spawn(process.execPath, [RUN, "--quick", "--json"], { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
    bench = p;
    const timer = setTimeout(() => {
      p.kill("SIGTERM");
      fail(new Error(`bench --quick did not finish in 200 s; stderr: ${stderr.slice(-3000)}`));
    }, 200_000);
    p.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    p.once("exit", (c) => {
      clearTimeout(timer);
      code = c;
      done();
    });
  });
}, 240_000);

afterAll(() => {
  // If the run was cut short, SIGTERM makes it stop its servers and remove its temp dir.
  if (bench !== undefined && bench.exitCode === null && bench.signalCode === null) bench.kill("SIGTERM");
});

describe("npm run bench -- --quick", () => {
  it("exits 0", () => {
    expect(code, stderr.slice(-4000)).toBe(0);
  });

  it("prints every row's heading", () => {
    for (const heading of ROWS) expect(stderr, `missing row "${heading}"`).toContain(heading);
  });

  it("prints every figure and every not-measured line, and measured figures are positive numbers", () => {
    const report = JSON.parse(stdout) as Report;
    expect(report.mode).toBe("quick");
    expect(report.rows.map((r) => `${r.id}. ${r.title}`)).toEqual(ROWS);
    for (const row of report.rows) {
      expect(row.figures.length + row.notMeasured.length, `row ${row.id} reports nothing`).toBeGreaterThan(0);
      for (const n of row.notMeasured) {
        expect(n.reason.length).toBeGreaterThan(0);
        expect(stderr).toContain(`not measured: ${n.reason}`);
      }
      for (const f of row.figures) {
        expect(stderr, `figure "${f.label}" not printed`).toContain(f.label);
        for (const s of [f.value, f.p50, f.p99]) {
          if (s === undefined) continue;
          expect(Number.isFinite(s.median) && s.median > 0, `${f.id}: ${JSON.stringify(s)}`).toBe(true);
          expect(s.min).toBeGreaterThan(0);
        }
        for (const r of f.ratios) expect(Number.isFinite(r.value) && r.value > 0, `${f.id} ratio ${r.vs}`).toBe(true);
      }
    }
  });

  it("removes its temp directory (sockets, data dirs) at the end", () => {
    const report = JSON.parse(stdout) as Report;
    expect(report.tempDir).toMatch(/kmi-bench-/);
    expect(existsSync(report.tempDir)).toBe(false);
  });
});
