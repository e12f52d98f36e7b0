/**
 * Row 2: leaf minting in the proxy. The first connection to a new host (the proxy's origin
 * handshake, key generation, IssueLeafCertificate on the agent, the TLS context, the client's
 * handshake) against a connection to a host whose leaf is cached, one connection at a time,
 * new and cached interleaved. Each new host is a distinct origin certificate (h<N>.bench.kmi.test,
 * made ahead of time by the origin process), so each is a cache miss.
 */
import type { OriginChildInfo } from "../children/origin.js";
import { DEFAULT_HOST, hostName } from "../lib/hosts.js";
import type { ProxyChildConfig, ProxyChildInfo, StepTrace } from "../children/proxy.js";
import type { Child } from "../lib/child.js";
import type { Env } from "../lib/env.js";
import { ROW_TITLES } from "./titles.js";
import { openTls, type ConnectTimes, type Destination } from "../lib/https-client.js";
import { RowBuilder, fmtPct } from "../lib/results.js";
import { fmt, mean, percentiles } from "../lib/stats.js";
import { agentChild, TENANT } from "./signing.js";
import type { AgentChildInfo } from "../children/agent.js";

/** The origin process (shared by rows 2 and 3). */
export function originChild(env: Env): Promise<Child<OriginChildInfo>> {
  return env.shared<OriginChildInfo>("origin", () => ({}));
}

/** The proxy process (shared by rows 2 and 3), with the agent and origin it needs. */
export async function proxyStack(env: Env): Promise<{ agent: Child<AgentChildInfo>; origin: Child<OriginChildInfo>; proxy: Child<ProxyChildInfo> }> {
  const [agent, origin] = await Promise.all([agentChild(env), originChild(env)]);
  const proxy = await env.shared<ProxyChildInfo>(
    "proxy",
    (): ProxyChildConfig => ({ dir: env.dir, agentSocket: agent.info.socketPath, originCaPem: origin.info.caPem, tenant: TENANT }),
  );
  return { agent, origin, proxy };
}

/** `n` origin host names not used before in this run (h0 is never handed out). */
function takeHosts(env: Env, n: number): string[] {
  const out: string[] = [];
  for (let i = 0; i < n; i++) out.push(hostName(env.counter("origin-host", 1)));
  return out;
}

/** The steps of a new-host connection, in order, with how each is computed. */
const STEPS: { key: string; label: string; of: (c: ConnectTimes, t: StepTrace) => number }[] = [
  { key: "connect", label: "CONNECT answered (proxy's TCP connect to the origin)", of: (c) => c.tTunnel - c.t0 },
  { key: "hello", label: "ClientHello sent and read by the proxy", of: (c, t) => t.originStart! - c.tTunnel },
  { key: "origin", label: "origin TLS handshake and chain check", of: (_c, t) => t.originEnd! - t.originStart! },
  { key: "lookup", label: "leaf cache lookup", of: (_c, t) => t.mintStart! - t.originEnd! },
  { key: "keygen", label: "leaf key generation (P-256) and request", of: (_c, t) => t.rpcStart! - t.mintStart! },
  { key: "issue", label: "IssueLeafCertificate on the agent (round trip)", of: (_c, t) => t.rpcEnd! - t.rpcStart! },
  { key: "context", label: "leaf checks and TLS context", of: (_c, t) => t.mintEnd! - t.rpcEnd! },
  { key: "client", label: "client TLS handshake with the new leaf", of: (c, t) => c.tSecure - t.mintEnd! },
];

/** Runs row 2. */
export async function runMinting(env: Env): Promise<RowBuilder> {
  const row = new RowBuilder(
    "2",
    ROW_TITLES["2"]!,
    "The real ProxyServer (src/proxy) in its own process, with the bench agent process (row 1) and an HTTPS origin process on 127.0.0.1. A client in the bench process opens one connection at a time through the proxy (CONNECT, then TLS with SNI) and stops at the end of its handshake; connections to a new host (a distinct origin certificate each: a leaf-cache miss) alternate with connections to a host whose leaf is cached. The proxy has no timing hooks, so the bench's proxy process wraps the origin connector, the leaf minter and the agent client that its server context hands the interceptor, and timestamps each step (CLOCK_MONOTONIC, the same clock as the client's); the client's own timestamps bound the CONNECT and the final handshake.",
  );
  const b = env.budget;
  const { agent, origin, proxy } = await proxyStack(env);
  const warmNew = 5;
  const hosts = takeHosts(env, warmNew + b.mintSamples * b.repeats);
  await origin.call("prepare", { count: env.counter("origin-host", 1, 0) });
  const dest = (servername: string): Destination => ({
    proxy: { host: "127.0.0.1", port: proxy.info.port },
    origin: { host: "127.0.0.1", port: origin.info.port },
    servername,
    ca: agent.info.rootPem,
  });
  const cached = DEFAULT_HOST;
  const connectOnce = async (servername: string): Promise<ConnectTimes> => {
    const times: ConnectTimes = { t0: 0, tTunnel: 0, tSecure: 0 };
    let timer: NodeJS.Timeout | undefined;
    const s = await Promise.race([
      openTls(dest(servername), ["http/1.1"], times),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`connection to ${servername} through the proxy did not complete within 15 s`)), 15_000);
      }),
    ]).finally(() => clearTimeout(timer));
    s.destroy();
    return times;
  };
  // Warm up: the cached host's leaf, and the new-host path (JIT), not recorded.
  for (let i = 0; i < 5; i++) await connectOnce(cached);
  for (let i = 0; i < warmNew; i++) await connectOnce(hosts[i]!);

  const newP = { p50: [] as number[], p99: [] as number[] };
  const cachedP = { p50: [] as number[], p99: [] as number[] };
  const addedRaw: number[] = [];
  const addedExOrigin: number[] = [];
  const stepSamples = new Map<string, number[]>(STEPS.map((s) => [s.key, []]));
  const stepP50 = new Map<string, number[]>(STEPS.map((s) => [s.key, []]));
  const totals: number[] = [];
  let idx = warmNew;
  for (let r = 0; r < b.repeats; r++) {
    env.log(`minting repeat ${r + 1}: ${b.mintSamples} new hosts, ${b.mintSamples} cached`);
    await proxy.call("trace", { on: true });
    const newTimes: { host: string; times: ConnectTimes }[] = [];
    const cachedTimes: ConnectTimes[] = [];
    for (let i = 0; i < b.mintSamples; i++) {
      const host = hosts[idx++]!;
      newTimes.push({ host, times: await connectOnce(host) });
      cachedTimes.push(await connectOnce(cached));
    }
    const traces = await proxy.call<Record<string, StepTrace[]>>("traces", { hosts: [...newTimes.map((n) => n.host), cached] });
    await proxy.call("trace", { on: false });
    const newTotal = newTimes.map((n) => n.times.tSecure - n.times.t0);
    const cachedTotal = cachedTimes.map((c) => c.tSecure - c.t0);
    const [n50, n99] = percentiles(newTotal, [0.5, 0.99]);
    const [c50, c99] = percentiles(cachedTotal, [0.5, 0.99]);
    newP.p50.push(n50!);
    newP.p99.push(n99!);
    cachedP.p50.push(c50!);
    cachedP.p99.push(c99!);
    addedRaw.push(n50! - c50!);
    // Excluding the origin's own handshake, on both sides.
    const newEx: number[] = [];
    for (const n of newTimes) {
      const t = traces[n.host]?.[0];
      if (t === undefined || t.mintEnd === undefined || t.originStart === undefined || t.rpcStart === undefined) {
        throw new Error(`no step trace for ${n.host}: the proxy did not mint a leaf for it (cache hit or failure?)`);
      }
      const total = n.times.tSecure - n.times.t0;
      totals.push(total);
      newEx.push(total - (t.originEnd! - t.originStart!));
      for (const s of STEPS) stepSamples.get(s.key)!.push(s.of(n.times, t));
    }
    for (const s of STEPS) stepP50.get(s.key)!.push(percentiles(stepSamples.get(s.key)!.slice(-newTimes.length), [0.5])[0]!);
    const cachedTraces = traces[cached] ?? [];
    const cachedEx = cachedTimes.map((c, i) => {
      const t = cachedTraces[i];
      return c.tSecure - c.t0 - (t?.originEnd !== undefined && t.originStart !== undefined ? t.originEnd - t.originStart : 0);
    });
    if (cachedTraces.length !== cachedTimes.length) throw new Error(`expected ${cachedTimes.length} traces of the cached host, got ${cachedTraces.length}`);
    addedExOrigin.push(percentiles(newEx, [0.5])[0]! - percentiles(cachedEx, [0.5])[0]!);
  }

  const fCached = row.figure("mint.cached", "connection to a cached host: CONNECT + TLS, p50", "ms", cachedP.p50, cachedP, true);
  const fNew = row.figure("mint.new", "first connection to a new host: CONNECT + TLS, p50", "ms", newP.p50, newP);
  row.ratio(fNew, fCached, "of cached");
  row.ratio(row.figure("mint.added_raw", "added by a new host (p50 new − p50 cached)", "ms", addedRaw), fCached, "of cached");
  const fAdded = row.figure("mint.added", "added by a new host, excluding the origin handshakes (p50 − p50)", "ms", addedExOrigin);
  row.ratio(fAdded, fCached, "of cached");
  row.target(fAdded, "< 5 ms p50", fAdded.value.median < 5);
  for (const s of STEPS) row.ratio(row.figure(`mint.step.${s.key}`, `new host step: ${s.label}, p50`, "ms", stepP50.get(s.key)!), fNew, "of new-host p50");

  const meanTotal = mean(totals);
  const shares = STEPS.map((s) => ({ s, m: mean(stepSamples.get(s.key)!) }));
  const covered = shares.reduce((a, x) => a + x.m, 0);
  row.note(
    `Share of a new-host connection's time (means over ${totals.length} connections, ${fmt(meanTotal)} ms on average): ` +
      shares.map((x) => `${x.s.label} ${fmt(x.m)} ms (${fmtPct(x.m / meanTotal)})`).join("; ") +
      (Math.abs(meanTotal - covered) > 0.01 ? `; unaccounted ${fmt(meanTotal - covered)} ms.` : "."),
  );
  const mintSteps = ["keygen", "issue", "context"].map((k) => mean(stepSamples.get(k)!));
  row.note(
    `Minting proper (key + issuance + context) is ${fmt(mintSteps.reduce((a, b) => a + b, 0))} ms of the new-host connection; the rest (CONNECT, origin handshake, client handshake) is paid by every connection, cached or not.`,
  );
  return row;
}
