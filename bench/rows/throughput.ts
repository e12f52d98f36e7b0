/**
 * Row 3: proxy throughput. The same load from a separate load-generator process, directly to
 * the origin, through the kmi proxy and (when installed) through mitmdump: HTTP/1.1 and
 * HTTP/2 keep-alive with 1 KiB and 1 MiB bodies, and new TLS connections per second; peak
 * RSS of each proxy.
 */
import { mkdir } from "node:fs/promises";
import { cpus } from "node:os";
import type { LoadResult, LoadSpec } from "../children/loadgen.js";
import type { ProxyChildInfo } from "../children/proxy.js";
import type { Child } from "../lib/child.js";
import type { Env } from "../lib/env.js";
import { ROW_TITLES } from "./titles.js";
import { DEFAULT_HOST } from "../lib/hosts.js";
import type { Destination } from "../lib/https-client.js";
import { startMitm, mitmVersion, type Mitm } from "../lib/mitm.js";
import { profileSummary } from "../lib/profile.js";
import { RowBuilder, type Figure } from "../lib/results.js";
import { peakRss, resetPeakRss } from "../lib/serve.js";
import { fmt } from "../lib/stats.js";
import { proxyStack } from "./minting.js";

/** Connections of every load. */
const CONNECTIONS = 16;
/** HTTP/2: connections × streams in flight each = 16 requests in flight, as HTTP/1.1. */
const H2_CONNECTIONS = 4;
const H2_STREAMS = 4;

interface Load {
  readonly key: string;
  readonly label: string;
  readonly mode: LoadSpec["mode"];
  readonly path: string;
  readonly unit: string;
  readonly keepAlive: boolean;
}

const LOADS: Load[] = [
  { key: "h1_1k", label: "HTTP/1.1 keep-alive, 1 KiB", mode: "h1", path: "/1k", unit: "req/s", keepAlive: true },
  { key: "h1_1m", label: "HTTP/1.1 keep-alive, 1 MiB", mode: "h1", path: "/1m", unit: "req/s", keepAlive: true },
  { key: "h2_1k", label: "HTTP/2 keep-alive, 1 KiB", mode: "h2", path: "/1k", unit: "req/s", keepAlive: true },
  { key: "h2_1m", label: "HTTP/2 keep-alive, 1 MiB", mode: "h2", path: "/1m", unit: "req/s", keepAlive: true },
  { key: "newconn", label: "new TLS connections (1 request each, 1 KiB)", mode: "newconn", path: "/1k", unit: "conn/s", keepAlive: false },
];

type Via = "direct" | "kmi" | "mitm";

/** Runs row 3. */
export async function runThroughput(env: Env): Promise<RowBuilder> {
  const row = new RowBuilder(
    "3",
    ROW_TITLES["3"]!,
    `A load-generator process (Node, lean HTTP/1.1 client and node:http2) drives a fixed number of connections in a closed loop for each window: ${CONNECTIONS} HTTP/1.1 keep-alive connections (one request in flight each), ${H2_CONNECTIONS} HTTP/2 connections × ${H2_STREAMS} streams, or ${CONNECTIONS} workers each opening a new connection (CONNECT when proxied, full TLS handshake, no resumption) for one request. The same load goes directly to the origin process (HTTP/1.1 + h2, one process), through the kmi proxy process (leaf cached after the warm-up; access log to a file; bodies scanned as configured by default) and through mitmdump when installed (upstream verified against the same origin CA). Targets, configurations and repeats are interleaved. Peak RSS is each proxy process's VmHWM, reset at the start of each repeat.`,
  );
  const b = env.budget;
  const { agent, origin, proxy } = await proxyStack(env);
  const loadgen = await env.shared<{ pid: number }>("loadgen", () => ({}));

  let mitm: Mitm | undefined;
  const mv = mitmVersion();
  if (mv === undefined) {
    row.notMeasured("proxy.mitm", "mitmdump (the peer proxy)", "mitmdump is absent on this machine (Debian package `mitmproxy`: apt-get install -y mitmproxy); the comparisons with it are not judged");
  } else {
    try {
      mitm = await startMitm(`${env.dir}/mitm`, origin.info.caPem);
      env.onClose(() => mitm!.stop());
    } catch (err) {
      row.notMeasured("proxy.mitm", `mitmdump ${mv}`, `could not start: ${(err as Error).message}`);
    }
  }

  const dest = (via: Via): Destination => {
    const o = { host: "127.0.0.1", port: origin.info.port };
    if (via === "direct") return { origin: o, servername: DEFAULT_HOST, ca: origin.info.caPem };
    if (via === "kmi") return { proxy: { host: "127.0.0.1", port: proxy.info.port }, origin: o, servername: DEFAULT_HOST, ca: agent.info.rootPem };
    return { proxy: { host: "127.0.0.1", port: mitm!.port }, origin: o, servername: DEFAULT_HOST, ca: mitm!.caPem };
  };
  const vias: Via[] = ["direct", "kmi", ...(mitm !== undefined ? (["mitm"] as const) : [])];
  const spec = (load: Load, via: Via): LoadSpec => ({
    mode: load.mode,
    dest: dest(via),
    path: load.path,
    connections: load.mode === "h2" ? H2_CONNECTIONS : CONNECTIONS,
    ...(load.mode === "h2" ? { streams: H2_STREAMS } : {}),
    durationMs: b.windowMs,
    warmupMs: Math.min(500, Math.max(100, b.windowMs * 0.2)),
  });

  // One request each way first: the paths work, and the leaf is in the kmi proxy's cache.
  for (const via of vias) await loadgen.call<LoadResult>("run", { ...spec(LOADS[0]!, via), durationMs: 50, warmupMs: 0, connections: 1 });

  const results = new Map<string, LoadResult[]>();
  const rss: Record<"kmi" | "mitm", number[]> = { kmi: [], mitm: [] };
  for (let r = 0; r < b.repeats; r++) {
    await proxy.call("resetRss");
    if (mitm !== undefined) await resetPeakRss(mitm.pid);
    for (const load of LOADS) {
      for (const via of vias) {
        env.log(`throughput ${load.key} via ${via} repeat ${r + 1}`);
        const res = await loadgen.call<LoadResult>("run", spec(load, via));
        if (res.ops === 0) throw new Error(`${load.label} via ${via}: no request completed (${res.errors} errors: ${res.firstError ?? "none"})`);
        const k = `${load.key}:${via}`;
        results.set(k, [...(results.get(k) ?? []), res]);
      }
    }
    const p = await proxy.call<{ peakRss?: number }>("rss");
    if (p.peakRss !== undefined) rss.kmi.push(p.peakRss / 2 ** 20);
    if (mitm !== undefined) {
      const m = await peakRss(mitm.pid);
      if (m !== undefined) rss.mitm.push(m / 2 ** 20);
    }
  }

  const errorsNote: string[] = [];
  const missed: string[] = [];
  for (const load of LOADS) {
    const figs: Partial<Record<Via, Figure>> = {};
    for (const via of vias) {
      const rs = results.get(`${load.key}:${via}`)!;
      const name = via === "direct" ? "directly to the origin" : via === "kmi" ? "through the kmi proxy" : `through mitmdump ${mitm?.version ?? ""}`.trim();
      figs[via] = row.figure(`proxy.${load.key}.${via}`, `${load.label}, ${name}`, load.unit, rs.map((x) => x.perSecond), { p50: rs.map((x) => x.p50), p99: rs.map((x) => x.p99) }, via === "direct");
      const errs = rs.reduce((a, x) => a + x.errors, 0);
      if (errs > 0) errorsNote.push(`${load.label} ${via}: ${errs} failed requests (${rs.find((x) => x.firstError)?.firstError})`);
    }
    const kmi = figs.kmi!;
    const direct = figs.direct!;
    const ratioDirect = row.ratio(kmi, direct, "of direct");
    if (figs.mitm !== undefined) {
      row.ratio(figs.mitm, direct, "of direct");
      const vsMitm = row.ratio(kmi, figs.mitm, "of mitmdump");
      if (load.keepAlive) {
        if (!row.target(kmi, "≥ 5× mitmdump", vsMitm >= 5)) missed.push(`${load.key} vs mitmdump`);
      } else if (!row.target(kmi, "≥ 1.5× mitmdump", vsMitm >= 1.5)) missed.push(`${load.key} vs mitmdump`);
    }
    if (load.keepAlive && !row.target(kmi, "≥ 40% of direct", ratioDirect >= 0.4)) missed.push(`${load.key} vs direct`);
  }
  let rssKmi: Figure | undefined;
  if (rss.kmi.length > 0) rssKmi = row.figure("proxy.rss.kmi", "peak RSS of the kmi proxy process during the loads", "MiB", rss.kmi);
  else row.notMeasured("proxy.rss.kmi", "peak RSS of the kmi proxy process", "/proc/<pid>/status has no VmHWM here");
  if (mitm !== undefined) {
    if (rss.mitm.length > 0) {
      const rssMitm = row.figure("proxy.rss.mitm", "peak RSS of mitmdump during the same loads", "MiB", rss.mitm, undefined, true);
      if (rssKmi !== undefined) row.ratio(rssKmi, rssMitm, "of mitmdump");
    } else row.notMeasured("proxy.rss.mitm", "peak RSS of mitmdump", "/proc/<pid>/status has no VmHWM here");
  }
  for (const e of errorsNote) row.note(e);
  if (missed.length > 0) {
    if (env.profile) {
      env.log("profiling the kmi proxy (HTTP/1.1 keep-alive 1 KiB, and new connections)");
      for (const load of LOADS) {
        if (!missed.some((m) => m.startsWith(`${load.key} `))) continue;
        const summary = await profileProxy(env, proxy, spec(load, "kmi"), load, loadgen);
        row.note(`CPU profile of the kmi proxy process under "${load.label}" (V8 sampling profiler, self time): ${summary}`);
      }
    } else {
      row.note(`Missed: ${missed.join(", ")}; run without --quick (or with --profile) for a CPU profile of the proxy process.`);
    }
  }
  const med = (k: string) => row.result.figures.find((f) => f.id === `proxy.${k}`)!.value.median;
  row.note(
    `Machine time per request (1/throughput, ${CONNECTIONS} in flight, medians): HTTP/1.1 1 KiB direct ${fmt(1e6 / med("h1_1k.direct"))} µs, through kmi ${fmt(1e6 / med("h1_1k.kmi"))} µs; HTTP/2 1 KiB direct ${fmt(1e6 / med("h2_1k.direct"))} µs, through kmi ${fmt(1e6 / med("h2_1k.kmi"))} µs; a new connection direct ${fmt(1e6 / med("newconn.direct"))} µs, through kmi ${fmt(1e6 / med("newconn.kmi"))} µs. The load generator, the origin and the proxy share the machine's ${cpus().length} cores, so "direct" is the ceiling of this machine, not of the proxy.`,
  );
  return row;
}

/** Profiles the kmi proxy process (node:inspector, the --cpu-prof profiler) under `load`; a summary of the profile. */
async function profileProxy(env: Env, proxy: Child<ProxyChildInfo>, spec: LoadSpec, load: Load, loadgen: Child<{ pid: number }>): Promise<string> {
  const dir = `${env.dir}/prof-proxy-${load.key}`;
  await mkdir(dir, { recursive: true });
  await proxy.call("profile:start");
  try {
    await loadgen.call("run", { ...spec, durationMs: Math.max(1500, spec.durationMs), warmupMs: 200 } satisfies LoadSpec);
  } finally {
    await proxy.call("profile:stop", { path: `${dir}/proxy.cpuprofile` });
  }
  return profileSummary(dir);
}
