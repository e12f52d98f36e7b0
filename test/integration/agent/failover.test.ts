/**
 * The agent's failover between replicas, against fixture KDCs and a fixture Auditserver: a
 * dead Auditserver URL first in the list (enrollment and attestation go to the live one), the
 * KDC replica the agent is attached to going away (it attaches to the other and gets what is
 * activated there), and replicas that shed load with a retry hint (the agent leaves them alone
 * and lands where it is let in). The same with real processes: test/integration/ha/failover.test.ts.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { AgentConfig } from "../../../src/agent/config.js";
import { AgentServer } from "../../../src/agent/server.js";
import { stableIndex } from "../../../src/clients/endpoints.js";
import { createLogger } from "../../../src/common/logger.js";
import { FixtureAudit } from "../../fixtures/agent/fixture-audit.js";
import { FixtureKdc } from "../../fixtures/agent/fixture-kdc.js";
import { AgentGrpcClient } from "../../fixtures/agent/grpc-client.js";
import { makeInfra, type TestInfra } from "../../fixtures/agent/infra.js";
import { intermediateSecret, makeIntermediate, makeRoot, type TestIntermediate, type TestRoot } from "../../fixtures/agent/tenant-ca.js";

const DAY = 86_400_000;
let dir: string;
let infra: TestInfra;
let root: TestRoot;
let v1: TestIntermediate;
let deadUrl: string;
let n = 0;
const cleanup: (() => Promise<void>)[] = [];

/** A URL nothing listens on (a port bound, then closed). */
async function closedPortUrl(): Promise<string> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return `https://localhost:${port}`;
}

async function startKdc(audit: FixtureAudit): Promise<FixtureKdc> {
  const kdc = new FixtureKdc(infra, audit.tokenKey.publicKey, { heartbeatMs: 1000 });
  kdc.tenants.set("acme", [intermediateSecret(v1)]);
  await kdc.start();
  cleanup.push(() => kdc.stop());
  return kdc;
}

async function setup(kdcs: FixtureKdc[], audit: FixtureAudit) {
  const i = ++n;
  audit.joinTokens.set(`kmij_f${i}`, "edge");
  // A host name whose hash starts enrollment at the dead Auditserver URL (first in the list).
  let h = 0;
  while (stableIndex(`proxy-${i}-${h}`, 2) !== 0) h++;
  const lines: Record<string, unknown>[] = [];
  const logger = createLogger({ level: "debug", write: (l) => void lines.push(JSON.parse(l) as Record<string, unknown>) });
  const config: AgentConfig = {
    socketPath: join(dir, `f${i}.sock`),
    socketGroup: undefined,
    stateDir: join(dir, `fstate${i}`),
    auditUrls: [deadUrl, audit.url],
    kdcUrls: kdcs.map((k) => k.url),
    sealingKey: { kind: "file" },
    caPem: infra.pem,
    joinToken: `kmij_f${i}`,
    hostname: `proxy-${i}-${h}`,
    measurements: { files: { "agent.config": [join(dir, "agent.json")] }, softwareVersion: true },
    policy: { maxLifetimeMs: 47 * DAY, backdateMs: 3_600_000 },
    timing: { reconnectInitialMs: 100, reconnectMaxMs: 300, heartbeatTimeoutMs: 5_000, reopenSpreadMs: 50 },
    shutdownTimeoutMs: 300,
    metricsListen: undefined,
    logLevel: "debug",
  };
  const agent = AgentServer.create(config, { logger });
  const bound = await agent.start();
  const client = new AgentGrpcClient(bound.unix!);
  cleanup.push(async () => {
    client.close();
    await agent.destroy();
  });
  return { agent, client, lines };
}

async function waitFor<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 8000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "kmi-agent-failover-"));
  writeFileSync(join(dir, "agent.json"), "{}\n");
  infra = makeInfra();
  root = makeRoot(Date.now() - DAY);
  v1 = makeIntermediate(root, "acme", 1, { now: Date.now() - DAY });
  deadUrl = await closedPortUrl();
});

afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("agent failover", () => {
  it("enrolls past a dead Auditserver URL, and moves to the other KDC replica when its own goes away", async () => {
    const audit = new FixtureAudit(infra);
    await audit.start();
    cleanup.push(() => audit.stop());
    const kdcs = [await startKdc(audit), await startKdc(audit)];
    const r = await setup(kdcs, audit);
    expect(r.lines.some((l) => l["msg"] === "auditserver replica failed; enrolling at the next" && l["audit"] === deadUrl)).toBe(true);

    const before = await waitFor("the first attachment", async () => {
      const s = await r.client.unary("getStatus", {});
      return s.kdcConnected ? s : undefined;
    });
    expect(before.kdcFailovers).toBe(0);
    const attached = kdcs.find((k) => k.url === before.kdcUrl)!;
    const other = kdcs.find((k) => k !== attached)!;
    expect(other.calls.watch).toBe(0);

    await attached.stop();
    const after = await waitFor("the attachment to the other replica", async () => {
      const s = await r.client.unary("getStatus", {});
      return s.kdcConnected && s.kdcUrl === other.url ? s : undefined;
    });
    expect(after.kdcFailovers).toBe(1);

    // A rotation made on the replica it moved to reaches it.
    const v2 = makeIntermediate(root, "acme", 2, { now: Date.now() - DAY });
    other.activate("acme", [intermediateSecret(v2)]);
    await waitFor("version 2", async () => (await r.client.unary("getStatus", {})).keys.some((k) => k.tenantId === "acme" && k.version === 2));
    expect(r.lines.some((l) => l["msg"] === "kdc replica failed; moving to the next" && l["kdc"] === attached.url && l["next"] === other.url)).toBe(true);
  });

  it("leaves replicas that shed load alone for the time they ask, and lands where it is let in", async () => {
    const audit = new FixtureAudit(infra);
    await audit.start();
    cleanup.push(() => audit.stop());
    const [a, b] = [await startKdc(audit), await startKdc(audit)];
    a!.shedRetryAfterMs = 400;
    b!.shedRetryAfterMs = 400;
    const r = await setup([a!, b!], audit);
    // Both refuse at first: the agent tries one, then the other.
    await waitFor("both replicas tried", () => a!.calls.shed > 0 && b!.calls.shed > 0);
    b!.shedRetryAfterMs = undefined;
    const s = await waitFor("the attachment to the replica that lets it in", async () => {
      const st = await r.client.unary("getStatus", {});
      return st.kdcConnected ? st : undefined;
    });
    expect(s.kdcUrl).toBe(b!.url);
    expect(a!.calls.watch + a!.calls.fetch).toBe(0);
    const hinted = r.lines.filter((l) => l["msg"] === "kdc replica failed; moving to the next" && l["retry_after_ms"] === 400);
    expect(hinted.length).toBeGreaterThanOrEqual(1);
    expect(s.keys.some((k) => k.tenantId === "acme" && k.version === 1)).toBe(true);
  });
});
