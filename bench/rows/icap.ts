/**
 * Row 6: the proxy with ICAP scanning. The same 1 MiB load through two kmi proxy processes in
 * the same run: one with the built-in EICAR scan only (the default), one that also sends every
 * response to a real c-icap (virus_scan over clamd, RESPMOD with preview and 204). Plus the
 * ICAP round trips each request costs, from the proxy's own counters.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { LoadResult, LoadSpec } from "../children/loadgen.js";
import type { ProxyChildConfig, ProxyChildInfo } from "../children/proxy.js";
import type { Env } from "../lib/env.js";
import { count, ERROR_SHARE_LIMIT_TEXT, notJudgedReason, tallyFailures } from "../lib/failures.js";
import { DEFAULT_HOST } from "../lib/hosts.js";
import type { Destination } from "../lib/https-client.js";
import { startIcapPeer } from "../lib/icap-peer.js";
import { RowBuilder } from "../lib/results.js";
import { fmt } from "../lib/stats.js";
import { proxyStack } from "./minting.js";
import { TENANT } from "./signing.js";
import { ROW_TITLES } from "./titles.js";

const CONNECTIONS = 16;
const H2_CONNECTIONS = 4;
const H2_STREAMS = 4;

const LOADS = [
  { key: "h1_1m", label: "HTTP/1.1 keep-alive, 1 MiB", mode: "h1" as const },
  { key: "h2_1m", label: "HTTP/2 keep-alive, 1 MiB", mode: "h2" as const },
];

type Via = "off" | "on";
const VIA_LABEL: Record<Via, string> = { off: "through kmi, ICAP off (built-in EICAR scan)", on: "through kmi, ICAP on (c-icap + clamd)" };

type Window = Pick<LoadResult, "ops" | "errors" | "firstError" | "perSecond" | "p50" | "p99">;

/** Runs row 6. */
export async function runIcap(env: Env): Promise<RowBuilder> {
  const row = new RowBuilder(
    "6",
    ROW_TITLES["6"]!,
    `The load generator of row 3 (${CONNECTIONS} HTTP/1.1 keep-alive connections, or ${H2_CONNECTIONS} HTTP/2 connections × ${H2_STREAMS} streams, closed loop) fetches 1 MiB bodies from the origin process through two kmi proxy processes of the same run, alternating: the proxy of rows 2 and 3 (built-in EICAR scan only) and a second one whose policy sends every response body to c-icap 0.5 (virus_scan in mode=simple over clamd, the service alias with allow204=on, a test signature database made with sigtool) over ICAP: RESPMOD with the service's 1,024-byte preview, then the rest after 100 Continue, answered 204. c-icap and clamd run on this machine too (one c-icap server process with 20 threads). ICAP round trips per request are the proxy's kmi_proxy_icap_round_trips_total (OPTIONS, preview, final answer) over its kmi_proxy_icap_requests_total (one transaction per request) in each window; when more than ${ERROR_SHARE_LIMIT_TEXT} of a window's requests fail, the figure is "not judged" and the run fails.`,
  );
  const b = env.budget;
  const { agent, origin } = await proxyStack(env);
  const peer = await env.memo("icap-peer", () => startIcapPeer(), (p) => p.stop());
  const policyFile = join(env.dir, "icap-policy.json");
  await writeFile(policyFile, JSON.stringify({ icap: { respmod: { name: "clamav", url: peer.url, failMode: "closed" } } }), { mode: 0o600 });
  const icapDir = join(env.dir, "proxy-icap");
  await mkdir(icapDir, { recursive: true, mode: 0o700 });
  const onConfig: ProxyChildConfig = { dir: icapDir, agentSocket: agent.info.socketPath, originCaPem: origin.info.caPem, tenant: TENANT, policyFile };
  const [off, on] = await Promise.all([proxyStack(env).then((s) => s.proxy), env.own<ProxyChildInfo>("proxy", onConfig)]);
  const loadgen = await env.shared<{ pid: number }>("loadgen", () => ({}));
  const dest = (via: Via): Destination => ({
    proxy: { host: "127.0.0.1", port: (via === "on" ? on : off).info.port },
    origin: { host: "127.0.0.1", port: origin.info.port },
    servername: DEFAULT_HOST,
    ca: agent.info.rootPem,
  });
  const spec = (load: (typeof LOADS)[number], via: Via): LoadSpec => ({
    mode: load.mode,
    dest: dest(via),
    path: "/1m",
    connections: load.mode === "h2" ? H2_CONNECTIONS : CONNECTIONS,
    ...(load.mode === "h2" ? { streams: H2_STREAMS } : {}),
    durationMs: b.windowMs,
    warmupMs: Math.min(500, Math.max(100, b.windowMs * 0.2)),
  });
  // One request each way first: the paths work, the leaf is cached, the service's OPTIONS are known.
  for (const via of ["off", "on"] as Via[]) {
    const res = await loadgen.call<LoadResult>("run", { ...spec(LOADS[0]!, via), durationMs: 50, warmupMs: 0, connections: 1 });
    if (res.ops === 0) throw new Error(`${VIA_LABEL[via]}: no request completed (${res.errors} failed; first error: ${res.firstError ?? "none"})`);
  }
  const results = new Map<string, Window[]>();
  const trips: number[] = [];
  const perRequest: number[] = [];
  for (let r = 0; r < b.repeats; r++) {
    for (const load of LOADS) {
      for (const via of ["off", "on"] as Via[]) {
        env.log(`icap ${load.key} ${via} repeat ${r + 1}`);
        const before = via === "on" ? await on.call<{ requests: number; roundTrips: number }>("icap") : undefined;
        const w = await loadgen.call<LoadResult>("run", spec(load, via));
        if (before !== undefined) {
          const after = await on.call<{ requests: number; roundTrips: number }>("icap");
          // Warm-up requests are scanned too; the proxy's counters include them, so divide by its own count.
          if (after.requests > before.requests) {
            trips.push((after.roundTrips - before.roundTrips) / (after.requests - before.requests));
            perRequest.push(after.requests - before.requests);
          }
        }
        const k = `${load.key}:${via}`;
        results.set(k, [...(results.get(k) ?? []), w]);
      }
    }
  }
  for (const load of LOADS) {
    const figs: Partial<Record<Via, ReturnType<RowBuilder["figure"]>>> = {};
    let judged = true;
    for (const via of ["off", "on"] as Via[]) {
      const ws = results.get(`${load.key}:${via}`)!;
      const label = `${load.label}, ${VIA_LABEL[via]}`;
      const f = row.figure(`icap.${load.key}.${via}`, label, "req/s", ws.map((x) => x.perSecond), { p50: ws.map((x) => x.p50), p99: ws.map((x) => x.p99) }, via === "off");
      figs[via] = f;
      const t = tallyFailures(ws);
      if (t.bad > 0) {
        judged = false;
        row.notJudged(f, notJudgedReason(t, ws.length));
        row.fail(`${label}: ${f.notJudged}`);
      } else if (t.failed > 0) {
        row.note(`${label}: ${count(t.failed)} of ${count(t.total)} requests failed (first error: ${t.firstError ?? "none"}), within the ${ERROR_SHARE_LIMIT_TEXT} limit.`);
      }
    }
    if (judged) row.ratio(figs.on!, figs.off!, "of ICAP off");
  }
  if (trips.length > 0) {
    row.figure("icap.round_trips", "ICAP round trips per scanned request (OPTIONS amortized, preview, final answer)", "round trips", trips);
    row.note(`ICAP transactions per measured window: ${perRequest.map((n) => count(n)).join(", ")}; each 1 MiB body is one RESPMOD (preview of 1,024 bytes, 100 Continue, the rest, 204): ${fmt(trips.reduce((a, x) => a + x, 0) / trips.length)} round trips on average.`);
  } else {
    row.fail("no ICAP transaction was counted while ICAP was on");
  }
  return row;
}
