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
import type { RelayChildConfig, RelayChildInfo } from "../children/relay.js";
import type { Child } from "../lib/child.js";
import type { Env } from "../lib/env.js";
import { count, ERROR_SHARE_LIMIT_TEXT, notJudgedReason, tallyFailures } from "../lib/failures.js";
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

type Via = "direct" | "kmi" | "mitm" | "pipe" | "bare" | "parser";

const VIA_NAME: Record<Exclude<Via, "mitm">, string> = {
  direct: "directly to the origin",
  kmi: "through the kmi proxy",
  pipe: "through a bare TLS relay (Node's TLS both ways, bytes piped, no HTTP: a floor)",
  bare: "through a bare HTTP relay (node:http server + undici client, as kmi, and nothing else: a floor)",
  parser: "through an llhttp relay (Node's HTTP parser on the TLS socket + undici client, without node:http's server objects: a floor)",
};

/** The floors (bare relays) are measured for the HTTP/1.1 keep-alive loads. */
const FLOORS: readonly Via[] = ["pipe", "bare", "parser"];
/** The port of each floor in the relay process. */
const FLOOR_PORT = { pipe: "pipePort", bare: "httpPort", parser: "parserPort" } as const;

/** One measured window of one load: what the load generator returned. */
type Window = Pick<LoadResult, "ops" | "errors" | "firstError" | "perSecond" | "p50" | "p99">;

/** Runs row 3. */
export async function runThroughput(env: Env): Promise<RowBuilder> {
  const row = new RowBuilder(
    "3",
    ROW_TITLES["3"]!,
    `A load-generator process (Node, lean HTTP/1.1 client and node:http2) drives a fixed number of connections in a closed loop for each window: ${CONNECTIONS} HTTP/1.1 keep-alive connections (one request in flight each), ${H2_CONNECTIONS} HTTP/2 connections × ${H2_STREAMS} streams, or ${CONNECTIONS} workers each opening a new connection (CONNECT when proxied, full TLS handshake, no resumption) for one request. The same load goes directly to the origin process (HTTP/1.1 + h2, one process), through the kmi proxy process (leaf cached after the warm-up; access log to a file; bodies scanned as configured by default) and through mitmdump when installed (upstream verified against the same origin CA). Three floors take the HTTP/1.1 loads too, from one more process (bench/children/relay.ts): a bare TLS relay (Node's TLS in and out, bytes piped, no HTTP), the bound of any Node relay that decrypts; a bare HTTP relay (node:http server, one undici client per connection toward the origin, body held and written with its headers: the stacks kmi uses, without CONNECT, policy, scanning or log), so "of the bare HTTP relay" is what kmi's own work costs; and an llhttp relay (the parser node:http uses, driven directly on the TLS socket, with the same undici client and held body, answering the load's bodiless GETs only: node:http's server side without its request and response objects, streams and timers), so the bare HTTP relay "of the llhttp relay" is what node:http's server side costs. Targets, configurations and repeats are interleaved. Peak RSS is each proxy process's VmHWM, reset at the start of each repeat. Rates and latencies count successful requests only; when more than ${ERROR_SHARE_LIMIT_TEXT} of a window's requests fail, that figure is "not judged" and no ratio or target is computed against it (through the origin or kmi, that also fails the run).`,
  );
  const b = env.budget;
  const { agent, origin, proxy } = await proxyStack(env);
  const loadgen = await env.shared<{ pid: number }>("loadgen", () => ({}));
  const relay = await env.shared<RelayChildInfo>("relay", (): RelayChildConfig => ({ originPort: origin.info.port, originCaPem: origin.info.caPem }));

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
    if (via === "pipe" || via === "bare" || via === "parser") return { origin: { host: "127.0.0.1", port: relay.info[FLOOR_PORT[via]] }, servername: DEFAULT_HOST, ca: relay.info.caPem };
    return { proxy: { host: "127.0.0.1", port: mitm!.port }, origin: o, servername: DEFAULT_HOST, ca: mitm!.caPem };
  };
  const vias: Via[] = ["direct", "kmi", ...(mitm !== undefined ? (["mitm"] as const) : [])];
  const viasOf = (load: Load): Via[] => (load.mode === "h1" ? [...vias, ...FLOORS] : vias);
  const spec = (load: Load, via: Via): LoadSpec => ({
    mode: load.mode,
    dest: dest(via),
    path: load.path,
    connections: load.mode === "h2" ? H2_CONNECTIONS : CONNECTIONS,
    ...(load.mode === "h2" ? { streams: H2_STREAMS } : {}),
    durationMs: b.windowMs,
    warmupMs: Math.min(500, Math.max(100, b.windowMs * 0.2)),
  });

  // One request each way first: the paths work, and the leaf is in the kmi proxy's cache. The
  // origin and kmi must answer; mitmdump's failures are judged with its figures below.
  for (const via of viasOf(LOADS[0]!)) {
    const probe = loadgen.call<LoadResult>("run", { ...spec(LOADS[0]!, via), durationMs: 50, warmupMs: 0, connections: 1 });
    if (via === "mitm") {
      await probe.catch(() => undefined);
      continue;
    }
    const res = await probe;
    if (res.ops === 0) throw new Error(`${LOADS[0]!.label} ${VIA_NAME[via]}: no request completed (${res.errors} failed; first error: ${res.firstError ?? "none"})`);
  }

  const results = new Map<string, Window[]>();
  const rss: Record<"kmi" | "mitm", number[]> = { kmi: [], mitm: [] };
  for (let r = 0; r < b.repeats; r++) {
    await proxy.call("resetRss");
    if (mitm !== undefined) await resetPeakRss(mitm.pid);
    for (const load of LOADS) {
      for (const via of viasOf(load)) {
        env.log(`throughput ${load.key} via ${via} repeat ${r + 1}`);
        let w: Window;
        try {
          w = await loadgen.call<LoadResult>("run", spec(load, via));
        } catch (err) {
          // The origin and kmi must take the load; mitmdump refusing it is judged with its figure.
          if (via !== "mitm") throw err;
          w = { ops: 0, errors: 0, firstError: `the load could not start: ${(err as Error).message}`, perSecond: 0, p50: NaN, p99: NaN };
        }
        const k = `${load.key}:${via}`;
        results.set(k, [...(results.get(k) ?? []), w]);
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
    const failedShort: Partial<Record<Via, string>> = {};
    for (const via of viasOf(load)) {
      const ws = results.get(`${load.key}:${via}`)!;
      const name = via === "mitm" ? `through mitmdump ${mitm?.version ?? ""}`.trim() : VIA_NAME[via];
      const label = `${load.label}, ${name}`;
      // Rates and latencies count successful requests only (closedLoop's ops).
      const f = row.figure(`proxy.${load.key}.${via}`, label, load.unit, ws.map((x) => x.perSecond), { p50: ws.map((x) => x.p50), p99: ws.map((x) => x.p99) }, via === "direct");
      figs[via] = f;
      const t = tallyFailures(ws);
      if (t.bad > 0) {
        failedShort[via] = t.total === 0 ? "the load could not start" : `${count(t.failed)} of ${count(t.total)} requests failed`;
        row.notJudged(f, notJudgedReason(t, ws.length));
        // Only mitmdump, the peer tool, may fail without failing the run.
        if (via !== "mitm") row.fail(`${label}: ${f.notJudged}`);
      } else if (t.failed > 0) {
        errorsNote.push(`${label}: ${count(t.failed)} of ${count(t.total)} requests failed (first error: ${t.firstError ?? "none"}), within the ${ERROR_SHARE_LIMIT_TEXT} limit in every window; the rate counts successful requests only.`);
      }
    }
    const kmi = figs.kmi!;
    const direct = figs.direct!;
    const mitmFig = figs.mitm;
    // Why a comparison of `vs` cannot be judged: the figures among them that are not judged.
    const notJudgedWhy = (vs: Via[]) =>
      vs
        .filter((v) => failedShort[v] !== undefined)
        .map((v) => `${v === "mitm" ? "through mitmdump" : VIA_NAME[v]}, ${failedShort[v]}`)
        .join("; ");
    const judged = (...vs: Via[]) => vs.every((v) => failedShort[v] === undefined);
    if (mitmFig !== undefined && judged("mitm", "direct")) row.ratio(mitmFig, direct, "of direct");
    const ratioDirect = judged("kmi", "direct") ? row.ratio(kmi, direct, "of direct") : undefined;
    for (const floor of FLOORS) {
      const f = figs[floor];
      if (f !== undefined && judged(floor, "direct")) row.ratio(f, direct, "of direct");
    }
    if (figs.bare !== undefined && judged("kmi", "bare")) row.ratio(kmi, figs.bare, "of the bare HTTP relay");
    if (figs.bare !== undefined && figs.parser !== undefined && judged("bare", "parser")) row.ratio(figs.bare, figs.parser, "of the llhttp relay");
    if (mitmFig !== undefined) {
      const [text, need] = load.keepAlive ? ["≥ 5× mitmdump", 5] : ["≥ 1.5× mitmdump", 1.5];
      if (judged("kmi", "mitm")) {
        const vsMitm = row.ratio(kmi, mitmFig, "of mitmdump");
        if (!row.target(kmi, text, vsMitm >= need)) missed.push(`${load.key} vs mitmdump`);
      } else row.targetNotJudged(kmi, text, notJudgedWhy(["kmi", "mitm"]));
    }
    if (load.keepAlive) {
      if (ratioDirect === undefined) row.targetNotJudged(kmi, "≥ 40% of direct", notJudgedWhy(["kmi", "direct"]));
      else if (!row.target(kmi, "≥ 40% of direct", ratioDirect >= 0.4)) missed.push(`${load.key} vs direct`);
    }
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
  const perReq = (k: string) => {
    const f = row.result.figures.find((x) => x.id === `proxy.${k}`)!;
    return f.notJudged !== undefined ? "not judged" : `${fmt(1e6 / f.value.median)} µs`;
  };
  row.note(
    `Machine time per request (1/throughput, ${CONNECTIONS} in flight, medians): HTTP/1.1 1 KiB direct ${perReq("h1_1k.direct")}, through kmi ${perReq("h1_1k.kmi")}; HTTP/2 1 KiB direct ${perReq("h2_1k.direct")}, through kmi ${perReq("h2_1k.kmi")}; a new connection direct ${perReq("newconn.direct")}, through kmi ${perReq("newconn.kmi")}. The load generator, the origin and the proxy share the machine's ${cpus().length} cores, so "direct" is the ceiling of this machine, not of the proxy.`,
  );
  return row;
}

/** Profiles the kmi proxy process (node:inspector, the --cpu-prof profiler) under `load`; a summary of the profile. */
export async function profileProxy(env: Env, proxy: Child<ProxyChildInfo>, spec: LoadSpec, load: { key: string }, loadgen: Child<{ pid: number }>): Promise<string> {
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
