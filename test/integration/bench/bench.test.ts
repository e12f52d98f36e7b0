/**
 * The benchmarks cannot rot: `node dist/bench/run.js --quick --json` runs every benchmark for
 * a moment, exits 0, prints every row, and every row has measured figures that are positive
 * numbers. Only the comparisons with mitmdump (a peer tool that may be absent, or may fail its
 * requests) may be "not measured" or "not judged", and row 10's 2-worker throughput until
 * `kmi proxy --workers` exists; anything else that does not start or fails is a failure of the
 * bench (see kdc-start.test.ts). A difference (p99 added, RSS grown per connection) may be negative. No timing threshold.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { fmt } from "../../../bench/lib/stats.js";
import { JEMALLOC_PATHS } from "../../../src/proxy/allocator.js";

const ROOT = resolve(import.meta.dirname, "../../..");
const RUN = resolve(ROOT, "dist/bench/run.js");

/** The rows of issue 8, as the bench prints their headings. */
const ROWS = [
  "1. Agent signing over the Unix socket",
  "2. Leaf minting in the proxy",
  "3. Proxy throughput",
  "4. Rotation propagation",
  "5. KDC: Certificate menu and secret releases",
  "6. Proxy with ICAP scanning",
  "7. Store: conditional batches on LevelDB and on etcd",
  "8. Failover: kill -9 of an agent's KDC replica",
  "9. KDC replicas on etcd: rotation fan-out and the Certificate menu",
  "10. Proxy cost: CPU per request, resumption, memory per connection",
  "11. Reattachment: the agents of a killed KDC replica attach elsewhere",
  "12. Leaves signed through a token-held intermediate (KDC SignLeaf) vs escrowed",
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
    figures: {
      id: string;
      label: string;
      unit: string;
      value: Stat;
      p50?: Stat;
      p99?: Stat;
      ratios: { vs: string; value: number }[];
      targets: { text: string; met: boolean | undefined; verdict?: string }[];
      notJudged?: string;
    }[];
    notMeasured: { id: string; label: string; reason: string }[];
    notes: string[];
    failures: string[];
  }[];
}

type Row = Report["rows"][number];

/** Figure `id` of `row` (it must be there). */
function figureOf(row: Row, id: string): Row["figures"][number] {
  const f = row.figures.find((x) => x.id === id);
  expect(f, `figure ${id}`).toBeDefined();
  return f!;
}

/** The mitmdump comparisons: the only figures that may be not judged. */
const MITM = /^proxy\.(?:.+\.)?mitm$/;
/** What may be not measured: the mitmdump comparisons, and the 2-worker rows while `--workers` is pending. */
const MAY_BE_UNMEASURED = /^proxy\.(?:.+\.)?mitm$|^proxy\.cost\.[a-z0-9_]+\.workers2$/;
/** Figures that are differences of two readings (may be zero or negative): p99 added, RSS per idle connection. */
const DIFFERENCE = /\.p99_added$|^proxy\.cost\.idle\.(?:jemalloc\.)?(?:origin_)?rss(?:_\d+)?$/;

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
    // Row 9 starts three more KDC processes and an Auditserver on etcd.
    const timer = setTimeout(() => {
      p.kill("SIGTERM");
      fail(new Error(`bench --quick did not finish in 300 s; stderr: ${stderr.slice(-3000)}`));
    }, 300_000);
    p.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    p.once("exit", (c) => {
      clearTimeout(timer);
      code = c;
      done();
    });
  });
}, 340_000);

afterAll(() => {
  // If the run was cut short, SIGTERM makes it stop its servers and remove its temp dir.
  if (bench !== undefined && bench.exitCode === null && bench.signalCode === null) bench.kill("SIGTERM");
});

describe("npm run bench -- --quick", () => {
  it("exits 0", () => {
    expect(code, stderr.slice(-4000)).toBe(0);
  });

  it("--help lists its flags and every row --only takes, and exits 0", () => {
    const r = spawnSync(process.execPath, [RUN, "--help"], { cwd: ROOT, encoding: "utf8", timeout: 30_000 });
    expect(r.status).toBe(0);
    for (const flag of ["--quick", "--json", "--only", "--out", "--profile", "--no-profile", "--quiet", "--sessions", "--agents"]) expect(r.stdout).toContain(`  ${flag}`);
    for (const row of ROWS) {
      const [id, title] = [row.slice(0, row.indexOf(".")), row.slice(row.indexOf(".") + 2)];
      expect(r.stdout).toContain(`${id.padStart(2)}  ${title}`);
    }
    // A row that does not exist is refused before anything starts.
    const bad = spawnSync(process.execPath, [RUN, "--only", "3,13"], { cwd: ROOT, encoding: "utf8", timeout: 30_000 });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toContain("--only: no row 13; the rows are 1, 2, 3");
  });

  it("prints every row's heading", () => {
    for (const heading of ROWS) expect(stderr, `missing row "${heading}"`).toContain(heading);
  });

  it("measures every row: only the mitmdump comparisons may be not measured or not judged", () => {
    const report = JSON.parse(stdout) as Report;
    expect(report.mode).toBe("quick");
    expect(report.rows.map((r) => `${r.id}. ${r.title}`)).toEqual(ROWS);
    for (const row of report.rows) {
      expect(row.failures, `row ${row.id} failed`).toEqual([]);
      const measured = row.figures.filter((f) => f.notJudged === undefined && !MITM.test(f.id));
      expect(measured.length, `row ${row.id} has no measured figure: ${JSON.stringify(row.notMeasured)}`).toBeGreaterThan(0);
      for (const n of row.notMeasured) {
        expect(n.id, `${n.id} not measured: ${n.reason}`).toMatch(MAY_BE_UNMEASURED);
        expect(n.reason.length).toBeGreaterThan(0);
        expect(stderr).toContain(`not measured: ${n.reason}`);
      }
    }
  });

  it("prints every figure; measured figures and ratios are positive numbers; nothing is judged against a not-judged figure", () => {
    const report = JSON.parse(stdout) as Report;
    for (const row of report.rows) {
      for (const f of row.figures) {
        expect(stderr, `figure "${f.label}" not printed`).toContain(f.label);
        if (f.notJudged !== undefined) {
          expect(f.id, `${f.id} not judged: ${f.notJudged}`).toMatch(MITM);
          expect(stderr).toContain(`not judged: ${f.notJudged}`);
          expect(f.ratios, `${f.id} is not judged but has ratios`).toEqual([]);
          expect(f.targets).toEqual([]);
          continue;
        }
        if (DIFFERENCE.test(f.id)) {
          expect(Number.isFinite(f.value.median), `${f.id}: ${JSON.stringify(f.value)}`).toBe(true);
          continue;
        }
        for (const s of [f.value, f.p50, f.p99]) {
          if (s === undefined) continue;
          expect(Number.isFinite(s.median) && s.median > 0, `${f.id}: ${JSON.stringify(s)}`).toBe(true);
          expect(s.min).toBeGreaterThan(0);
        }
        for (const r of f.ratios) expect(Number.isFinite(r.value) && r.value > 0, `${f.id} ratio ${r.vs}`).toBe(true);
        for (const t of f.targets) {
          // Undecided only when a figure it compares with is not judged, and then it says so.
          if (t.met === undefined) expect(t.verdict, `${f.id} target ${t.text}`).toMatch(/^not judged: /);
        }
      }
    }
  });

  it("explains the agent's targets from this run's no-op figures", () => {
    const report = JSON.parse(stdout) as Report;
    const row1 = report.rows.find((r) => r.id === "1")!;
    const notes = row1.notes.join("\n");
    const fig = (id: string) => row1.figures.find((f) => f.id === id)!;
    // The no-op's p50 at c=1 and its rate at c=64, as measured in this run, are in the notes.
    expect(notes).toContain(`p50 of ${fmt(fig("agent.noop.c1").p50!.median)} ms in this run`);
    expect(notes).toContain(`did ${fmt(fig("agent.noop.c64").value.median)} calls/s at c=64 in this run`);
    const issueTarget = row1.figures.flatMap((f) => f.targets).find((t) => t.text.startsWith("≥ 2,000/s"));
    expect(issueTarget?.text).toMatch(/median .*min /);
  });

  it("measures the floors beside kmi: a bare TLS relay, a bare HTTP relay and an llhttp relay on the same HTTP/1.1 loads", () => {
    const report = JSON.parse(stdout) as Report;
    const row3 = report.rows.find((r) => r.id === "3")!;
    const fig = (id: string) => figureOf(row3, id);
    for (const load of ["h1_1k", "h1_1m"]) {
      for (const floor of ["pipe", "bare", "parser"]) {
        expect(fig(`proxy.${load}.${floor}`).value.median).toBeGreaterThan(0);
        expect(fig(`proxy.${load}.${floor}`).ratios.map((r) => r.vs)[0]).toBe("of direct");
      }
      expect(fig(`proxy.${load}.kmi`).ratios.map((r) => r.vs)).toContain("of the bare HTTP relay");
      // What node:http's server side costs: the bare HTTP relay against the same relay on llhttp alone.
      expect(fig(`proxy.${load}.bare`).ratios.map((r) => r.vs)).toEqual(["of direct", "of the llhttp relay"]);
    }
    // HTTP/2 has no floor: the bare relays speak HTTP/1.1 only.
    expect(row3.figures.some((f) => f.id.startsWith("proxy.h2_1k.pipe"))).toBe(false);
  });

  it("measures the proxy's cost: CPU per request against the origin's own, resumed handshakes, idle connections that close", () => {
    const report = JSON.parse(stdout) as Report;
    const row10 = report.rows.find((r) => r.id === "10")!;
    const fig = (id: string) => figureOf(row10, id);
    for (const load of ["h1_1k", "h1_1m", "h2_1k"]) {
      expect(fig(`proxy.cost.${load}.cpu_kmi`).ratios.map((r) => r.vs)).toEqual(["of the origin's own"]);
      expect(fig(`proxy.cost.${load}.cpu_origin`).value.median).toBeGreaterThan(0);
      // The real `kmi proxy --workers 2` (primary and two workers) served the same load, against --workers 1.
      expect(fig(`proxy.cost.${load}.workers2`).ratios.map((r) => r.vs)).toEqual(["of 1 worker", "of direct"]);
      expect(fig(`proxy.cost.${load}.cpu_workers2`).value.median).toBeGreaterThan(0);
    }
    // Peak RSS of each of its three processes.
    expect(fig("proxy.cost.rss_peak_workers2").value.n).toBe(3);
    // Through kmi, a client that offers a ticket resumes its session.
    const resumed = fig("proxy.cost.newconn_resumed.kmi");
    expect(resumed.targets[0]?.text).toBe("resumes ≥ 90% of connections");
    expect(resumed.targets[0]?.met, resumed.targets[0]?.verdict).toBe(true);
    // One descriptor per idle intercepted h2 connection (its idle origin side is closed), all given back when they close.
    const fds = row10.figures.filter((f) => /^proxy\.cost\.idle\.fds_\d+$/.test(f.id));
    expect(fds.length).toBe(2);
    for (const f of fds) expect(f.value.median).toBeCloseTo(1, 1);
    const closed = row10.notes.filter((n) => n.startsWith("After the idle connections closed"));
    for (const n of closed) expect(n).toMatch(/: (\d[\d,]*) descriptors open \(\1 before they opened\)\.$/);
    // Measured through the real `kmi proxy --workers 1`, with its default allocator (glibc's) and, where jemalloc is installed, with jemalloc beside it.
    const jemalloc = JEMALLOC_PATHS.some((p) => existsSync(p));
    expect(closed).toHaveLength(jemalloc ? 2 : 1);
    expect(fig("proxy.cost.idle.rss_after").ratios.map((r) => r.vs)).toEqual(["of the peak"]);
    if (jemalloc) {
      expect(fig("proxy.cost.idle.jemalloc.rss_after").ratios.map((r) => r.vs)).toEqual(["of the peak"]);
      // And what jemalloc costs in CPU per request, against glibc's in the same run.
      for (const load of ["h1_1k", "h1_1m"]) expect(fig(`proxy.cost.${load}.cpu_alloc_jemalloc`).ratios.map((r) => r.vs)).toEqual(["of glibc's"]);
    }
  });

  it("measures leaves signed through a token-held intermediate against escrowed ones, and checks the KDC signed exactly the token-held ones", () => {
    const report = JSON.parse(stdout) as Report;
    const row12 = report.rows.find((r) => r.id === "12")!;
    const fig = (id: string) => {
      const f = row12.figures.find((x) => x.id === id);
      expect(f, `figure ${id}`).toBeDefined();
      return f!;
    };
    for (const c of [1, 16]) {
      for (const part of [`c${c}`, `c${c}.p50`, `c${c}.p99`]) {
        expect(fig(`token_leaf.escrow.${part}`).ratios).toEqual([]);
        expect(fig(`token_leaf.token.${part}`).ratios.map((r) => r.vs)).toEqual([`of escrowed c=${c}`]);
      }
      expect(fig(`token_leaf.token.c${c}`).p99?.median).toBeGreaterThan(0);
    }
    expect(fig("token_leaf.token.cpu").ratios.map((r) => r.vs)).toEqual(["of escrowed"]);
    expect(fig("token_leaf.token.cpu_kdc").value.median).toBeGreaterThan(0);
    // The row fails itself unless the KDC's log counts one signed leaf per token-held call.
    const signed = /The KDC logged (\d[\d,]*) leaves signed with the token-held intermediate, one per token-held call/.exec(row12.notes.join("\n"));
    expect(signed, row12.notes.join("\n")).not.toBeNull();
    expect(Number(signed![1]!.replace(/,/g, ""))).toBeGreaterThan(0);
  });

  it("removes its temp directory (sockets, data dirs) at the end", () => {
    const report = JSON.parse(stdout) as Report;
    expect(report.tempDir).toMatch(/kmi-bench-/);
    expect(existsSync(report.tempDir)).toBe(false);
  });
});
