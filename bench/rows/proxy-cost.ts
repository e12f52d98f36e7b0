/**
 * Row 10: what the proxy costs per request and per connection (issue 18). The same load
 * generator and origin as row 3, directly and through the kmi proxy, in one run:
 *   - throughput with 1 worker (the in-process proxy of row 3), and through `kmi proxy --workers 1`
 *     and `--workers 2` as a user starts them (primary + workers, node:cluster);
 *   - CPU µs per request of the proxy's processes against the origin's own (/proc utime + stime);
 *   - p99 latency added;
 *   - peak RSS per worker (each process of `kmi proxy --workers 2`);
 *   - new connections with full and with resumed TLS handshakes (session tickets), side by side;
 *   - RSS and descriptors per idle HTTP/2 connection at two counts, and RSS after they close.
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { IdleResult, LoadResult, LoadSpec } from "../children/loadgen.js";
import type { Child } from "../lib/child.js";
import type { Env } from "../lib/env.js";
import { count, ERROR_SHARE_LIMIT_TEXT, notJudgedReason, tallyFailures } from "../lib/failures.js";
import { DEFAULT_HOST } from "../lib/hosts.js";
import type { Destination } from "../lib/https-client.js";
import { fdCount, processTree, rssBytes } from "../lib/proc.js";
import { RowBuilder, type Figure } from "../lib/results.js";
import { peakRss, resetPeakRss } from "../lib/serve.js";
import { fmt } from "../lib/stats.js";
import { proxyStack } from "./minting.js";
import { profileProxy } from "./throughput.js";
import { ROW_TITLES } from "./titles.js";
import { TENANT } from "./signing.js";
import { cleanEnv, startKmi, type KmiProcess } from "../lib/kmi-process.js";
import { workerAllocator, type AllocatorChoice } from "../../src/proxy/allocator.js";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";

/** Keep-alive loads: as row 3 (16 HTTP/1.1 connections; 4 h2 connections × 4 streams). */
const LOADS = [
  { key: "h1_1k", label: "HTTP/1.1 keep-alive, 1 KiB", mode: "h1", path: "/1k", target: true },
  { key: "h1_1m", label: "HTTP/1.1 keep-alive, 1 MiB", mode: "h1", path: "/1m", target: true },
  { key: "h2_1k", label: "HTTP/2 keep-alive, 1 KiB", mode: "h2", path: "/1k", target: false },
] as const;

type Load = (typeof LOADS)[number];
type Via = "direct" | "kmi";
/** The `kmi proxy --workers N` processes measured beside the in-process proxy. */
const WORKER_COUNTS = [1, 2] as const;

/** Idle connections held open, per mode. */
const IDLE_COUNTS = { quick: [40, 80], full: [1000, 5000] } as const;
/** Idle connections opened at once. */
const IDLE_CONCURRENCY = 16;

/** One measured window. */
type Window = LoadResult;

const MIB = 2 ** 20;

/** Runs row 10. */
export async function runProxyCost(env: Env): Promise<RowBuilder> {
  const idleCounts = IDLE_COUNTS[env.mode];
  const row = new RowBuilder(
    "10",
    ROW_TITLES["10"]!,
    `The load generator, origin and kmi proxy processes of row 3 (16 HTTP/1.1 keep-alive connections with one request in flight each, or 4 HTTP/2 connections × 4 streams; new connections: 16 at a time, one request each, CONNECT when proxied), directly to the origin and through the proxy, interleaved over the repeats. CPU per request is the utime + stime of the process and its descendants (/proc/<pid>/stat, every thread) over the measured window, divided by the requests that succeeded in it: the proxy's processes against the origin's own during the direct load. p99 added is p99 through kmi minus p99 direct, per repeat. New connections are measured with full handshakes and resumed ones (the client offers the latest TLS 1.3 session ticket it received), side by side. Idle connections: through \`kmi proxy --workers 1\` as a user starts it (primary and worker; idle timeout 10 minutes, origin side of an idle connection closed after 1 s, 15 s by default), with its default allocator (glibc's) and, where jemalloc is installed, again with \`--allocator jemalloc\`, one proxy after the other; the CPU per request of the HTTP/1.1 loads through \`kmi proxy --workers 1\` with each allocator is measured too, the two proxies interleaved. The load generator opens HTTP/2 connections (resuming the latest TLS session where it can; each answers one GET /1k, then stays open and idle) until ${count(idleCounts[0])} and then ${count(idleCounts[1])} are open; the proxy's RSS (VmRSS) and open descriptors, summed over its processes, are read before, 2 s after each count is reached, and 3 s after they all close (the proxy's memory release runs its full collections 1 s after the fall); the origin's own figure comes from the same connections opened directly (${count(idleCounts[0])}). Peak RSS per worker is the VmHWM of each proxy process over the row.`,
  );
  const b = env.budget;
  const { agent, origin, proxy } = await proxyStack(env);
  const loadgen = await env.shared<{ pid: number }>("loadgen", () => ({}));
  const pids = { proxy: proxy.info.pid, origin: origin.pid };
  const o = { host: "127.0.0.1", port: origin.info.port };
  const dest = (via: Via, port = proxy.info.port): Destination =>
    via === "direct" ? { origin: o, servername: DEFAULT_HOST, ca: origin.info.caPem } : { proxy: { host: "127.0.0.1", port }, origin: o, servername: DEFAULT_HOST, ca: agent.info.rootPem };
  const warmupMs = Math.min(500, Math.max(100, b.windowMs * 0.2));
  const spec = (mode: LoadSpec["mode"], path: string, via: Via, extra: Partial<LoadSpec> = {}): LoadSpec => ({
    mode,
    dest: dest(via),
    path,
    connections: mode === "h2" ? 4 : 16,
    ...(mode === "h2" ? { streams: 4 } : {}),
    durationMs: b.windowMs,
    warmupMs,
    cpuPids: pids,
    ...extra,
  });
  const run = (s: LoadSpec): Promise<Window> => loadgen.call<LoadResult>("run", s);

  for (const p of processTree(pids.proxy)) await resetPeakRss(p);
  const windows = new Map<string, Window[]>();
  const add = (k: string, w: Window) => windows.set(k, [...(windows.get(k) ?? []), w]);
  for (let r = 0; r < b.repeats; r++) {
    for (const load of LOADS) {
      for (const via of ["direct", "kmi"] as const) {
        env.log(`cost ${load.key} via ${via} repeat ${r + 1}`);
        add(`${load.key}:${via}`, await run(spec(load.mode, load.path, via)));
      }
    }
    for (const resume of [false, true]) {
      for (const via of ["direct", "kmi"] as const) {
        env.log(`cost newconn ${resume ? "resumed" : "full"} via ${via} repeat ${r + 1}`);
        add(`newconn_${resume ? "resumed" : "full"}:${via}`, await run(spec("newconn", "/1k", via, { resume })));
      }
    }
  }

  const workerHwm = await workerWindows(env, row, { agentSocket: agent.info.socketPath, originCaPem: origin.info.caPem }, b.repeats, (load, w, port, pid) => {
    env.log(`cost ${load.key} via kmi proxy --workers ${w}`);
    return run(spec(load.mode, load.path, "kmi", { dest: dest("kmi", port), cpuPids: { proxy: pid, origin: origin.pid } })).then((win) => void add(`${load.key}:w${w}`, win));
  });

  await allocatorFigures(env, row, { agentSocket: agent.info.socketPath, originCaPem: origin.info.caPem }, b.repeats, (load, port, pid) => {
    env.log(`cost ${load.key} via kmi proxy --workers 1 (allocator figures)`);
    return run(spec(load.mode, load.path, "kmi", { dest: dest("kmi", port), cpuPids: { proxy: pid, origin: origin.pid } }));
  });

  const missed: Load[] = [];
  for (const load of LOADS) {
    const judged = keepAliveFigures(row, load, windows.get(`${load.key}:direct`)!, windows.get(`${load.key}:kmi`)!);
    if (judged === "missed") missed.push(load);
    workerFigures(row, load, windows);
  }
  newConnectionFigures(row, windows);

  const hwm: number[] = [];
  for (const p of processTree(pids.proxy)) {
    const v = await peakRss(p);
    if (v !== undefined) hwm.push(v / MIB);
  }
  if (hwm.length > 0) row.figure("proxy.cost.rss_peak_worker", `peak RSS of the in-process proxy (1 worker) during the loads above`, "MiB", hwm, undefined, true);
  else row.notMeasured("proxy.cost.rss_peak_worker", "peak RSS per proxy worker", "/proc/<pid>/status has no VmHWM here");
  const inProcess = row.result.figures.find((f) => f.id === "proxy.cost.rss_peak_worker");
  if (workerHwm.length > 0) {
    const f = row.figure("proxy.cost.rss_peak_workers2", "peak RSS of each process of `kmi proxy --workers 2` (the primary and its 2 workers) during its loads", "MiB", workerHwm);
    if (inProcess !== undefined) row.ratio(f, inProcess, "of the in-process proxy's");
  }

  try {
    await idleFigures(env, row, loadgen, dest, { agentSocket: agent.info.socketPath, originCaPem: origin.info.caPem, originPid: origin.pid }, idleCounts);
  } catch (err) {
    // The figures above stand; the run fails with the reason.
    await loadgen.call("idle:close", undefined, 120_000).catch(() => undefined);
    row.notMeasured("proxy.cost.idle", "RSS and descriptors per idle connection", `the benchmark failed: ${(err as Error).message}`);
    row.fail(`idle connections: ${(err as Error).message}`);
  }

  scalingNote(row);
  if (missed.length > 0 && env.profile) {
    for (const load of missed) {
      const summary = await profileProxy(env, proxy, spec(load.mode, load.path, "kmi"), load, loadgen);
      row.note(`CPU profile of the kmi proxy process under "${load.label}" (V8 sampling profiler, self time): ${summary}`);
    }
  }
  return row;
}

/** Sums of a figure's windows; undefined when too many requests failed (and the reason is recorded). */
function judge(row: RowBuilder, label: string, ws: readonly Window[]): string | undefined {
  const t = tallyFailures(ws);
  if (t.bad === 0) return undefined;
  const why = notJudgedReason(t, ws.length);
  row.fail(`${label}: ${why}`);
  return why;
}

/** CPU µs per successful request of process `who` in each window; undefined where /proc had nothing. */
function cpuPerRequest(ws: readonly Window[], who: "proxy" | "origin"): number[] | undefined {
  const out: number[] = [];
  for (const w of ws) {
    const s = w.cpu?.[who];
    if (s === undefined || w.ops === 0) return undefined;
    out.push((s * 1e6) / w.ops);
  }
  return out;
}

/** Throughput (1 and 2 workers), CPU per request and p99 added of one keep-alive load; "missed" when a target is missed. */
function keepAliveFigures(row: RowBuilder, load: Load, direct: readonly Window[], kmi: readonly Window[]): "met" | "missed" | "not judged" {
  const dLabel = `${load.label}, directly to the origin`;
  const kLabel = `${load.label}, through kmi, 1 worker`;
  const dWhy = judge(row, dLabel, direct);
  const kWhy = judge(row, kLabel, kmi);
  const lat = (ws: readonly Window[]) => ({ p50: ws.map((w) => w.p50), p99: ws.map((w) => w.p99) });
  const fd = row.figure(`proxy.cost.${load.key}.direct`, dLabel, "req/s", direct.map((w) => w.perSecond), lat(direct), true);
  const fk = row.figure(`proxy.cost.${load.key}.kmi1`, kLabel, "req/s", kmi.map((w) => w.perSecond), lat(kmi));
  if (dWhy !== undefined) row.notJudged(fd, dWhy);
  if (kWhy !== undefined) row.notJudged(fk, kWhy);
  if (dWhy !== undefined || kWhy !== undefined) return "not judged";
  const ratio = row.ratio(fk, fd, "of direct");
  const met = !load.target || row.target(fk, "≥ 40% of direct", ratio >= 0.4);

  const originCpu = cpuPerRequest(direct, "origin");
  const proxyCpu = cpuPerRequest(kmi, "proxy");
  if (originCpu !== undefined && proxyCpu !== undefined) {
    const fo = row.figure(`proxy.cost.${load.key}.cpu_origin`, `${load.label}: CPU per request of the origin itself (direct load)`, "µs", originCpu, undefined, true);
    const fp = row.figure(`proxy.cost.${load.key}.cpu_kmi`, `${load.label}: CPU per request of the kmi proxy's processes`, "µs", proxyCpu);
    row.ratio(fp, fo, "of the origin's own");
  } else {
    row.notMeasured(`proxy.cost.${load.key}.cpu`, `${load.label}: CPU per request`, "/proc/<pid>/stat is not readable here");
  }
  const added = kmi.map((w, i) => w.p99 - direct[i]!.p99);
  row.figure(`proxy.cost.${load.key}.p99_added`, `${load.label}: p99 latency added by kmi (p99 through kmi − p99 direct, per repeat)`, "ms", added);
  return met ? "met" : "missed";
}

/** New connections, full and resumed handshakes, directly and through kmi. */
function newConnectionFigures(row: RowBuilder, windows: ReadonlyMap<string, Window[]>): void {
  const figs: Record<string, Figure> = {};
  for (const kind of ["full", "resumed"] as const) {
    for (const via of ["direct", "kmi"] as const) {
      const ws = windows.get(`newconn_${kind}:${via}`)!;
      const label = `new TLS connections (1 request each, 1 KiB), ${kind === "full" ? "full handshakes" : "resumed (session tickets)"}, ${via === "direct" ? "directly to the origin" : "through kmi, 1 worker"}`;
      const why = judge(row, label, ws);
      const f = row.figure(`proxy.cost.newconn_${kind}.${via}`, label, "conn/s", ws.map((w) => w.perSecond), { p50: ws.map((w) => w.p50), p99: ws.map((w) => w.p99) }, via === "direct");
      if (why !== undefined) row.notJudged(f, why);
      figs[`${kind}:${via}`] = f;
      if (kind === "resumed") {
        const resumed = ws.reduce((n, w) => n + (w.resumed ?? 0), 0);
        const ops = ws.reduce((n, w) => n + w.ops, 0);
        const share = ops > 0 ? resumed / ops : 0;
        row.note(`${label}: ${count(resumed)} of ${count(ops)} measured connections resumed their TLS session (${fmt(share * 100)}%).`);
        if (via === "kmi" && why === undefined) row.target(f, "resumes ≥ 90% of connections", share >= 0.9, `${fmt(share * 100)}% resumed: ${share >= 0.9 ? "met" : "MISSED"}`);
      }
    }
  }
  const ok = (k: string) => figs[k]!.notJudged === undefined;
  if (ok("full:kmi") && ok("full:direct")) row.ratio(figs["full:kmi"]!, figs["full:direct"]!, "of direct full");
  if (ok("resumed:kmi") && ok("resumed:direct")) row.ratio(figs["resumed:kmi"]!, figs["resumed:direct"]!, "of direct resumed");
  if (ok("resumed:kmi") && ok("full:kmi")) row.ratio(figs["resumed:kmi"]!, figs["full:kmi"]!, "of kmi full");
  const cpu = (k: string, who: "proxy" | "origin") => cpuPerRequest(windows.get(k)!, who);
  const full = cpu("newconn_full:kmi", "proxy");
  const resumed = cpu("newconn_resumed:kmi", "proxy");
  const originFull = cpu("newconn_full:direct", "origin");
  if (full !== undefined && resumed !== undefined && originFull !== undefined && ok("full:kmi") && ok("resumed:kmi")) {
    const fo = row.figure("proxy.cost.newconn.cpu_origin", "new connection, full handshake: CPU of the origin itself (direct)", "µs", originFull, undefined, true);
    const ff = row.figure("proxy.cost.newconn_full.cpu_kmi", "new connection, full handshake: CPU of the kmi proxy's processes", "µs", full);
    const fr = row.figure("proxy.cost.newconn_resumed.cpu_kmi", "new connection, resumed: CPU of the kmi proxy's processes", "µs", resumed);
    row.ratio(ff, fo, "of the origin's own");
    row.ratio(fr, ff, "of a full handshake through kmi");
  }
}

/** RSS (summed) and descriptors of `pid` and its descendants now. */
function footprint(pid: number): { rss: number; fds: number } | undefined {
  let rss = 0;
  let fds = 0;
  for (const p of processTree(pid)) {
    const r = rssBytes(p);
    const f = fdCount(p);
    if (r === undefined || f === undefined) return undefined;
    rss += r;
    fds += f;
  }
  return { rss, fds };
}

/** The allocators the idle connections are measured with: the default (glibc's), and jemalloc beside it where installed. */
function idleAllocators(): AllocatorChoice[] {
  return workerAllocator("auto", cleanEnv()).name === "jemalloc" ? ["system", "jemalloc"] : ["system"];
}

/**
 * Idle HTTP/2 connections: RSS and descriptors per connection at each count, and RSS after
 * they close, through `kmi proxy --workers 1` as a user starts it (primary and worker summed),
 * once with the default allocator (glibc's) and once with `--allocator jemalloc` where installed.
 */
async function idleFigures(
  env: Env,
  row: RowBuilder,
  loadgen: Child<{ pid: number }>,
  dest: (via: Via, port?: number) => Destination,
  stack: { agentSocket: string; originCaPem: string; originPid: number },
  counts: readonly number[],
): Promise<void> {
  const open = async (via: Via, n: number, port?: number): Promise<void> => {
    env.log(`idle: opening ${count(n)} h2 connections ${via === "kmi" ? "through kmi" : "directly"}`);
    const r = await loadgen.call<IdleResult>("idle:open", { dest: dest(via, port), count: n, concurrency: IDLE_CONCURRENCY, path: "/1k" }, 600_000);
    if (r.open < n) throw new Error(`idle connections ${via === "kmi" ? "through kmi" : "directly"}: ${count(r.open)} of ${count(n)} open (${count(r.errors)} failed; first error: ${r.firstError ?? "none"})`);
  };
  const close = async (): Promise<void> => {
    await loadgen.call("idle:close", undefined, 120_000);
  };
  // Past the bench proxy's origin idle timeout (1 s): idle connections in their steady state.
  const settle = () => sleep(env.mode === "quick" ? 1500 : 2000);

  // The origin's own cost of the same connections, opened directly.
  const o0 = footprint(stack.originPid);
  await open("direct", counts[0]!);
  await settle();
  const o1 = footprint(stack.originPid);
  await close();
  if (o0 === undefined || o1 === undefined) {
    row.notMeasured("proxy.cost.idle", "RSS and descriptors per idle connection", "/proc/<pid>/status or /proc/<pid>/fd is not readable here");
    return;
  }
  const originKb = row.figure("proxy.cost.idle.origin_rss", `RSS per idle h2 connection of the origin itself (node:http2 server), ${count(counts[0]!)} open directly`, "KB", [(o1.rss - o0.rss) / 1000 / counts[0]!], undefined, true);

  for (const a of idleAllocators()) {
    const { p, port, pid } = await startWorkersProxy(env, stack, 1, ["--allocator", a]);
    try {
      await idleRun(env, row, { open: (n) => open("kmi", n, port), close, settle }, pid, counts, originKb, a);
    } finally {
      await p.kill("SIGTERM");
    }
  }
}

/** One proxy's idle figures (see {@link idleFigures}); `a` names its allocator. */
async function idleRun(
  env: Env,
  row: RowBuilder,
  io: { open: (n: number) => Promise<void>; close: () => Promise<void>; settle: () => Promise<unknown> },
  pid: number,
  counts: readonly number[],
  originKb: Figure,
  a: AllocatorChoice,
): Promise<void> {
  const adopted = a === "system";
  const id = (k: string) => `proxy.cost.idle.${adopted ? "" : `${a}.`}${k}`;
  const via = `through \`kmi proxy --workers 1\`${adopted ? "" : ` --allocator ${a}`}`;
  await sleep(env.mode === "quick" ? 300 : 2000);
  const before = footprint(pid)!;
  let peak = before;
  for (const n of counts) {
    await io.open(n);
    await io.settle();
    const now = footprint(pid)!;
    peak = now;
    const kb = row.figure(id(`rss_${n}`), `RSS per idle h2 connection ${via}, ${count(n)} open`, "KB", [(now.rss - before.rss) / 1000 / n]);
    // A difference of two RSS readings: at small counts the heap's own growth and GC can outweigh it.
    if (kb.value.median > 0 && originKb.value.median > 0) row.ratio(kb, originKb, "of the origin's own");
    if (adopted) row.target(kb, "≤ 50 KB", kb.value.median <= 50);
    if (adopted) row.figure(id(`fds_${n}`), `descriptors per idle h2 connection ${via}, ${count(n)} open`, "fds", [(now.fds - before.fds) / n]);
    row.note(`${count(n)} idle connections ${via}: RSS ${fmt(now.rss / MIB)} MiB (${fmt(before.rss / MIB)} MiB before), ${count(now.fds)} descriptors (${count(before.fds)} before).`);
  }
  await io.close();
  await sleep(env.mode === "quick" ? 1000 : 3000);
  const after = footprint(pid)!;
  const last = counts[counts.length - 1]!;
  const fPeak = row.figure(id("rss_peak"), `RSS ${via} with ${count(last)} idle connections open (${fmt(before.rss / MIB)} MiB before they opened)`, "MiB", [peak.rss / MIB], undefined, true);
  const fAfter = row.figure(id("rss_after"), `RSS ${via} 3 s after every idle connection closed`, "MiB", [after.rss / MIB]);
  row.ratio(fAfter, fPeak, "of the peak");
  row.note(`After the idle connections closed ${via}: ${count(after.fds)} descriptors open (${count(before.fds)} before they opened).`);
}

/** What `workerWindows` hands each load: the load, the worker count, the proxy's port and primary pid. */
type WorkerRun = (load: Load, workers: number, port: number, pid: number) => Promise<void>;

/**
 * The keep-alive loads through `kmi proxy --workers 1` and `--workers 2` (dist/cmd/kmi.js, the
 * bench agent and origin, the in-process proxy's settings), interleaved over the repeats; the
 * peak RSS of each process of the 2-worker proxy, MiB. A proxy that does not start is a failure
 * of the run, with its reason.
 */
async function workerWindows(env: Env, row: RowBuilder, stack: { agentSocket: string; originCaPem: string }, repeats: number, measure: WorkerRun): Promise<number[]> {
  const procs: { workers: number; p: KmiProcess; port: number; pid: number }[] = [];
  try {
    for (const workers of WORKER_COUNTS) procs.push({ workers, ...(await startWorkersProxy(env, stack, workers)) });
    for (const p of procs) for (const pid of processTree(p.pid)) await resetPeakRss(pid);
    for (let r = 0; r < repeats; r++) {
      for (const load of LOADS) for (const p of procs) await measure(load, p.workers, p.port, p.pid);
    }
    const two = procs.find((p) => p.workers === 2)!;
    const hwm: number[] = [];
    for (const pid of processTree(two.pid)) {
      const v = await peakRss(pid);
      if (v !== undefined) hwm.push(v / MIB);
    }
    return hwm;
  } catch (err) {
    row.fail(`kmi proxy --workers: ${(err as Error).message}`);
    return [];
  } finally {
    for (const p of procs) await p.p.kill("SIGTERM");
  }
}

/**
 * CPU per request of the HTTP/1.1 loads through \`kmi proxy --workers 1\` with glibc's allocator
 * and with jemalloc (\`--allocator jemalloc\`), the two proxies interleaved over the repeats;
 * nothing where jemalloc is not installed.
 */
async function allocatorFigures(env: Env, row: RowBuilder, stack: { agentSocket: string; originCaPem: string }, repeats: number, measure: (load: Load, port: number, pid: number) => Promise<Window>): Promise<void> {
  if (!idleAllocators().includes("jemalloc")) return;
  const allocators = ["system", "jemalloc"] as const;
  const procs: { a: (typeof allocators)[number]; p: KmiProcess; port: number; pid: number }[] = [];
  const loads = LOADS.filter((l) => l.mode === "h1");
  const ws = new Map<string, Window[]>();
  try {
    for (const a of allocators) procs.push({ a, ...(await startWorkersProxy(env, stack, 1, ["--allocator", a])) });
    for (let r = 0; r < repeats; r++) {
      for (const load of loads) for (const p of procs) ws.set(`${load.key}:${p.a}`, [...(ws.get(`${load.key}:${p.a}`) ?? []), await measure(load, p.port, p.pid)]);
    }
  } catch (err) {
    row.fail(`kmi proxy --allocator: ${(err as Error).message}`);
    return;
  } finally {
    for (const p of procs) await p.p.kill("SIGTERM");
  }
  for (const load of loads) {
    const [sys, jem] = allocators.map((a) => ws.get(`${load.key}:${a}`)!);
    const label = (a: string) => `${load.label}: CPU per request of \`kmi proxy --workers 1 --allocator ${a}\``;
    const whySys = judge(row, label("system"), sys!);
    const whyJem = judge(row, label("jemalloc"), jem!);
    const cs = cpuPerRequest(sys!, "proxy");
    const cj = cpuPerRequest(jem!, "proxy");
    if (cs === undefined || cj === undefined) continue;
    const fs = row.figure(`proxy.cost.${load.key}.cpu_alloc_system`, label("system"), "µs", cs, undefined, true);
    const fj = row.figure(`proxy.cost.${load.key}.cpu_alloc_jemalloc`, label("jemalloc"), "µs", cj);
    if (whySys !== undefined) row.notJudged(fs, whySys);
    if (whyJem !== undefined) row.notJudged(fj, whyJem);
    if (whySys === undefined && whyJem === undefined) row.ratio(fj, fs, "of glibc's");
  }
}

/** `kmi proxy --workers N` as a user starts it; its port and the primary's pid. */
async function startWorkersProxy(env: Env, stack: { agentSocket: string; originCaPem: string }, workers: number, extra: readonly string[] = []): Promise<{ p: KmiProcess; port: number; pid: number }> {
  const caFile = join(env.dir, "cost-origin-ca.pem");
  await writeFile(caFile, stack.originCaPem, { mode: 0o600 });
  // prettier-ignore
  const p = await startKmi([
    "proxy", "--workers", String(workers), "--listen", "127.0.0.1:0", "--agent-socket", stack.agentSocket, "--default-tenant", TENANT,
    "--extra-ca", caFile, "--no-system-roots", "--allow-private", "127.0.0.0/8", "--access-log", join(env.dir, `cost-access-w${workers}.log`),
    "--issue-rate", "0", "--idle-timeout-ms", "600000", "--origin-idle-timeout-ms", "1000", "--shutdown-grace-ms", "500", ...extra,
  ], `kmi proxy --workers ${workers}`, /^(?!.*"worker":).*"msg":"started"/);
  const started = JSON.parse(p.started) as { bound: { port: number }; pid: number };
  return { p, port: started.bound.port, pid: started.pid };
}

/** Throughput through `kmi proxy --workers 1` and `--workers 2`, and what 2 workers add. */
function workerFigures(row: RowBuilder, load: Load, windows: ReadonlyMap<string, Window[]>): void {
  const ws = WORKER_COUNTS.map((w) => windows.get(`${load.key}:w${w}`));
  if (ws.some((w) => w === undefined)) return row.notMeasured(`proxy.cost.${load.key}.workers2`, `${load.label}, through \`kmi proxy --workers 2\``, "the proxy did not start (see the failures)");
  const lat = (w: readonly Window[]) => ({ p50: w.map((x) => x.p50), p99: w.map((x) => x.p99) });
  const figs = WORKER_COUNTS.map((w, i) => {
    const label = `${load.label}, through \`kmi proxy --workers ${w}\``;
    const f = row.figure(`proxy.cost.${load.key}.workers${w}`, label, "req/s", ws[i]!.map((x) => x.perSecond), lat(ws[i]!), w === 1);
    const why = judge(row, label, ws[i]!);
    if (why !== undefined) row.notJudged(f, why);
    return { f, why };
  });
  const [one, two] = figs as [(typeof figs)[number], (typeof figs)[number]];
  if (one.why !== undefined || two.why !== undefined) return;
  row.ratio(two.f, one.f, "of 1 worker");
  const direct = row.result.figures.find((f) => f.id === `proxy.cost.${load.key}.direct`);
  if (direct !== undefined && direct.notJudged === undefined) row.ratio(two.f, direct, "of direct");
  const cpu = cpuPerRequest(ws[1]!, "proxy");
  const origin = row.result.figures.find((f) => f.id === `proxy.cost.${load.key}.cpu_origin`);
  if (cpu === undefined || origin === undefined) return;
  const fc = row.figure(`proxy.cost.${load.key}.cpu_workers2`, `${load.label}: CPU per request of \`kmi proxy --workers 2\` (primary and workers)`, "µs", cpu);
  row.ratio(fc, origin, "of the origin's own");
}

/** Assumed share of the extra workers' CPU that turns into throughput (a 2-core run cannot measure it: see the note). */
const SCALING_EFFICIENCY = 0.8;
/** Cores of the machine the extrapolation is for, and the workers it would run. */
const TARGET_CORES = 16;
const TARGET_WORKERS = 15;

/** What this run measured of a second worker, and why it is not a scaling measurement on a small machine. */
function twoWorkers(row: RowBuilder): string {
  const gains = LOADS.flatMap((load) => {
    const f = row.result.figures.find((x) => x.id === `proxy.cost.${load.key}.workers2`);
    const r = f?.ratios.find((x) => x.vs === "of 1 worker");
    return r === undefined ? [] : [`${load.label} ${fmt(r.value)}×`];
  });
  if (gains.length === 0) return "the 2-worker figures were not measured in this run";
  return `this run measured \`kmi proxy --workers 2\` against \`--workers 1\` at ${gains.join(", ")}, on a machine whose cores the load generator and the origin share with the proxy, so a second worker adds throughput only where the proxy, not the machine, was the limit; it does not measure how far workers scale`;
}

/**
 * How throughput grows with cores, extrapolated from this run's CPU per request (a figure per
 * core-second, then times the workers), with its assumptions written out.
 */
function scalingNote(row: RowBuilder): void {
  const med = (id: string): number | undefined => {
    const f = row.result.figures.find((x) => x.id === id);
    return f === undefined || f.notJudged !== undefined ? undefined : f.value.median;
  };
  const parts: string[] = [];
  const perCore = (us: number | undefined) => (us === undefined || !(us > 0) ? undefined : 1e6 / us);
  const line = (what: string, us: number | undefined, unit: string) => {
    const c = perCore(us);
    if (c === undefined) return;
    const at16 = c * TARGET_WORKERS * SCALING_EFFICIENCY;
    parts.push(`${what}: ${fmt(us!)} µs of proxy CPU each, so one busy core serves ~${fmt(c)} ${unit} and ${TARGET_CORES} cores ~${fmt(at16)} ${unit}`);
  };
  line("HTTP/1.1 keep-alive 1 KiB", med("proxy.cost.h1_1k.cpu_kmi"), "req/s");
  line("HTTP/1.1 keep-alive 1 MiB", med("proxy.cost.h1_1m.cpu_kmi"), "req/s");
  line("HTTP/2 1 KiB", med("proxy.cost.h2_1k.cpu_kmi"), "req/s");
  line("new connections, full handshake", med("proxy.cost.newconn_full.cpu_kmi"), "conn/s");
  line("new connections, resumed", med("proxy.cost.newconn_resumed.cpu_kmi"), "conn/s");
  if (parts.length === 0) return;
  row.note(
    `How throughput grows with cores (an extrapolation from this run's CPU per request, not a measurement): ${parts.join("; ")}. ` +
      `Assumptions: the proxy's CPU per request does not change with the number of workers (each worker serves its own connections; leaves and ticket keys are shared, so only a new host's first leaf involves more than one worker); ` +
      `the ${TARGET_CORES}-core machine runs ${TARGET_WORKERS} workers (one core left to the kernel's network stack, the key agent and the primary) and nothing else (origins and clients elsewhere, unlike this run, where the load generator and the origin share the cores); ` +
      `${SCALING_EFFICIENCY * 100}% of each added worker's CPU turns into throughput (an assumption for the kernel's shared socket and memory bandwidth costs: ${twoWorkers(row)}); ` +
      `CPU is the limit (a 1 MiB row at ~${fmt((perCore(med("proxy.cost.h1_1m.cpu_kmi")) ?? 0) * TARGET_WORKERS * SCALING_EFFICIENCY * 8 / 1024)} Gbit/s each way must also fit the NIC).`,
  );
}

