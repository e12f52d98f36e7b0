/**
 * The kmi proxy under test, in its own process: the real ProxyServer (src/proxy) on
 * 127.0.0.1:0, talking to the bench's agent process over its Unix socket, trusting the bench
 * origin CA, access log to a file, new-host rate limit off (the minting row asks for hundreds
 * of new hosts from one client on purpose), idle timeout 10 minutes (row 10 holds thousands of
 * idle connections open while it opens more), idle origin sides closed after 1 s (15 s by
 * default: row 10 reads the memory of idle connections after 2 s, not 15).
 *
 * The proxy has no timing hooks, so the steps of a new-host connection are timed by wrapping
 * what the server's context hands its interceptor: the origin connector (origin TLS
 * handshake), the leaf minter (key + issuance + TLS context) and the agent client (the
 * IssueLeafCertificate call). Timestamps are CLOCK_MONOTONIC, comparable across processes.
 * Tracing is off unless the parent turns it on.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";
import { createLogger } from "../../src/common/logger.js";
import { createMetricsRegistry } from "../../src/common/metrics.js";
import { AgentClient } from "../../src/clients/agent-client.js";
import { ProxyServer, type ProxyAgent } from "../../src/proxy/server.js";
import { nowMs } from "../lib/loop.js";
import { childConfig, dieOnError, peakRss, resetPeakRss, serveParent } from "../lib/serve.js";

/** What the parent passes. */
export interface ProxyChildConfig {
  readonly dir: string;
  readonly agentSocket: string;
  readonly originCaPem: string;
  readonly tenant: string;
  /** A policy file (the ICAP row's proxy sends bodies to an ICAP service). */
  readonly policyFile?: string;
}

/** What the child answers when ready. */
export interface ProxyChildInfo {
  readonly port: number;
  readonly pid: number;
}

/** Timestamps (CLOCK_MONOTONIC ms) of one new-host connection's steps inside the proxy. */
export interface StepTrace {
  originStart?: number;
  originEnd?: number;
  mintStart?: number;
  rpcStart?: number;
  rpcEnd?: number;
  mintEnd?: number;
}

async function main(): Promise<void> {
  const cfg = childConfig<ProxyChildConfig>();
  const logFd = openSync(join(cfg.dir, "proxy.log"), "a", 0o600);
  const logger = createLogger({ level: "warn", write: (line) => void writeSync(logFd, line), fields: { program: "proxy" } });
  let tracing = false;
  // Per host, one entry per connection (a new entry starts at each origin handshake).
  const traces = new Map<string, StepTrace[]>();
  const trace = (host: string | undefined, fresh = false): StepTrace | undefined => {
    if (!tracing || host === undefined || host === "") return undefined;
    const k = host.toLowerCase();
    let list = traces.get(k);
    if (list === undefined) {
      list = [];
      traces.set(k, list);
    }
    if (fresh || list.length === 0) list.push({});
    return list[list.length - 1];
  };

  const client = new AgentClient({ socketPath: cfg.agentSocket, logger });
  const agent: ProxyAgent = {
    async issueLeafCertificate(req) {
      const t = trace(req.commonName || req.dnsNames[0]);
      if (t !== undefined) t.rpcStart = nowMs();
      const res = await client.issueLeafCertificate(req);
      if (t !== undefined) t.rpcEnd = nowMs();
      return res;
    },
    watchKeys: (onEvent, onState) => client.watchKeys(onEvent, onState),
    close: () => client.close(),
  };
  const metrics = createMetricsRegistry();
  const proxy = await ProxyServer.create({
    metrics,
    ...(cfg.policyFile !== undefined ? { policyFile: cfg.policyFile } : {}),
    host: "127.0.0.1",
    port: 0,
    agent,
    tenants: [{ id: cfg.tenant }],
    defaultTenant: cfg.tenant,
    accessLog: join(cfg.dir, "access.log"),
    extraCaPem: [cfg.originCaPem],
    systemRoots: false,
    allowPrivate: ["127.0.0.0/8"],
    issueRatePerSecond: 0,
    logger,
    shutdownGraceMs: 500,
    limits: { idleTimeoutMs: 600_000, originIdleTimeoutMs: 1_000 },
  });

  const origins = proxy.context.origins;
  const connect = origins.connect.bind(origins);
  origins.connect = async (target) => {
    // Only the handshake of a CONNECT (an already open TCP socket is handed over), not reconnects.
    const t = target.socket !== undefined ? trace(target.servername ?? target.host, true) : undefined;
    if (t !== undefined) t.originStart = nowMs();
    const r = await connect(target);
    if (t !== undefined) t.originEnd = nowMs();
    return r;
  };
  const minter = proxy.context.minter;
  const mint = minter.mint.bind(minter);
  minter.mint = async (tenant, origin, host) => {
    const t = trace(host);
    if (t !== undefined) t.mintStart = nowMs();
    const entry = await mint(tenant, origin, host);
    if (t !== undefined) t.mintEnd = nowMs();
    return entry;
  };

  const { port } = await proxy.start();
  const info: ProxyChildInfo = { port, pid: process.pid };
  await serveParent(
    info,
    {
      trace: (args) => {
        tracing = (args as { on: boolean }).on;
        traces.clear();
        return null;
      },
      traces: (args) => {
        const out: Record<string, StepTrace[]> = {};
        for (const h of (args as { hosts: string[] }).hosts) {
          const t = traces.get(h.toLowerCase());
          if (t !== undefined) out[h] = t;
        }
        return out;
      },
      rss: async () => ({ peakRss: await peakRss(), rss: process.memoryUsage().rss }),
      memory: () => process.memoryUsage(),
      resetRss: () => resetPeakRss(),
      stats: () => ({ leaves: proxy.leaves.size, open: proxy.openConnections }),
      // Totals of the ICAP counters (all services and results): transactions and round trips.
      icap: async () => {
        const text = await metrics.render();
        const sum = (name: string): number =>
          text
            .split("\n")
            .filter((l) => l.startsWith(`${name}{`))
            .reduce((n, l) => n + Number(l.slice(l.lastIndexOf(" ") + 1)), 0);
        return { requests: sum("kmi_proxy_icap_requests_total"), roundTrips: sum("kmi_proxy_icap_round_trips_total") };
      },
    },
    async () => {
      await proxy.destroy();
      closeSync(logFd);
    },
  );
}

dieOnError(main());
