/**
 * Leaves and the agent: rotation seen on WatchKeys, one issuance for concurrent first
 * requests, the per-client issuance rate limit, session resumption across connections.
 */
import { X509Certificate } from "node:crypto";
import type { TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, requestOver, run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;

beforeAll(async () => {
  h = await startHarness({ issueDelayMs: 150, proxy: { issueRatePerSecond: 0.01, issueBurst: 3 } });
  good = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await good?.close();
  await h?.close();
});

function chainOf(t: TLSSocket): { leafSerial: string; issuer: string } {
  const c = t.getPeerCertificate(true);
  return { leafSerial: c.serialNumber, issuer: String(c.issuer.CN ?? "") };
}

describe("leaves", () => {
  it("concurrent first requests to a new host cause exactly one IssueLeafCertificate", async () => {
    const before = h.agent.issueCount("acme");
    const ca = h.agent.rootPem("acme");
    const sockets = await Promise.all(Array.from({ length: 12 }, () => tlsViaProxy(h.port, "localhost", good.port, { ca })));
    expect(h.agent.issueCount("acme") - before).toBe(1);
    const serials = new Set(sockets.map((t) => chainOf(t).leafSerial));
    expect(serials.size).toBe(1);
    const bodies = await Promise.all(sockets.map((t) => requestOver(t, "/hello", { host: "localhost" })));
    expect(bodies.every((b) => b.status === 200)).toBe(true);
    expect(h.agent.calls.at(-1)).toMatchObject({ tenantId: "acme", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1", "::1"], commonName: "localhost" });
    // A later connection is served from the cache.
    const again = await tlsViaProxy(h.port, "localhost", good.port, { ca });
    expect(chainOf(again).leafSerial).toBe([...serials][0]);
    expect(h.agent.issueCount("acme") - before).toBe(1);
    again.destroy();
  });

  it("WatchKeys ROTATED: the next new connection gets a leaf from the new intermediate, without a restart", async () => {
    const ca = h.agent.rootPem("acme");
    const first = await tlsViaProxy(h.port, "localhost", good.port, { ca });
    expect(chainOf(first).issuer).toBe("acme MITM CA v1");
    first.destroy();
    h.agent.rotate("acme");
    let issuer = "";
    for (let i = 0; i < 40 && issuer !== "acme MITM CA v2"; i++) {
      await new Promise((r) => setTimeout(r, 25));
      const t = await tlsViaProxy(h.port, "localhost", good.port, { ca });
      issuer = chainOf(t).issuer;
      t.destroy();
    }
    expect(issuer).toBe("acme MITM CA v2");
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca });
    const leaf = t.getPeerX509Certificate()!;
    const v2 = new X509Certificate(h.agent.intermediatePem("acme"));
    expect(leaf.checkIssued(v2)).toBe(true);
    expect(leaf.verify(v2.publicKey)).toBe(true);
    t.destroy();
  });

  it("TLS sessions resume across connections (shared ticket keys)", async () => {
    const ca = h.agent.rootPem("acme");
    const t1 = await tlsViaProxy(h.port, "localhost", good.port, { ca });
    const ticket = new Promise<Buffer>((resolve) => t1.once("session", resolve));
    expect(t1.isSessionReused()).toBe(false);
    await requestOver(t1, "/hello", { host: "localhost" });
    const session = await ticket;
    const t2 = await tlsViaProxy(h.port, "localhost", good.port, { ca, session });
    expect(t2.isSessionReused()).toBe(true);
    const r = await requestOver(t2, "/hello", { host: "localhost" });
    expect(r.body.toString()).toContain("hello from origin");
  });
});

describe("issuance rate limit", () => {
  let rl: Harness;
  beforeAll(async () => {
    rl = await startHarness({ proxy: { issueRatePerSecond: 0.001, issueBurst: 2 } });
  });
  afterAll(async () => {
    await rl?.close();
  });

  it("a client that keeps asking for new hosts gets 429 pages; cached hosts stay served", async () => {
    const certs = [rl.pki.issue(["localhost"], []), rl.pki.issue(["localhost"], []), rl.pki.issue(["localhost"], [])];
    const origins = await Promise.all(certs.map((cert) => startOrigin({ cert })));
    try {
      const ca = rl.agent.rootPem("acme");
      const a = await tlsViaProxy(rl.port, "localhost", origins[0]!.port, { ca });
      const b = await tlsViaProxy(rl.port, "localhost", origins[1]!.port, { ca });
      a.destroy();
      b.destroy();
      // Past the limit, a new host's CONNECT is answered by the proxy itself: the reason, not a certificate error.
      const refused = await connectTunnel(rl.port, `localhost:${origins[2]!.port}`);
      refused.socket.destroy();
      expect(refused.status).toBe(429);
      expect(refused.head).toContain("x-kmi-rule: issue-rate-limit");
      expect(refused.head).toMatch(/x-kmi-reason: too many new hosts from this address/);
      expect(refused.head).toContain("retry-after: 1");
      expect(rl.agent.issueCount()).toBe(2);
      const rec = await rl.log.waitFor((x) => x.path === `localhost:${origins[2]!.port}`);
      expect(rec).toMatchObject({ decision: "error", rule: "issue-rate-limit", status: 429, method: "CONNECT" });
      // curl says why.
      const curl = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${rl.port}`, `https://localhost:${origins[2]!.port}/`]);
      expect(curl.code).toBe(56);
      expect(curl.stderr).toMatch(/CONNECT tunnel failed, response 429/);
      // A host whose leaf is cached costs nothing.
      const again = await tlsViaProxy(rl.port, "localhost", origins[0]!.port, { ca });
      again.destroy();
      expect(rl.agent.issueCount()).toBe(2);
    } finally {
      await Promise.all(origins.map((o) => o.close()));
    }
  });
});
