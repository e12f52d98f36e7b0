/**
 * A revoke seen on WatchKeys: the proxy drops the revoked tenant's cached leaves (and only
 * those), asks the agent again on the next connection and answers its refusal with a 503
 * page, and after a new version is activated serves leaves from it without letting a session
 * from before the revoke resume. The fixture agent revokes as the real agent's key holder does.
 */
import { createHash } from "node:crypto";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, requestOver, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

const GLOBEX_USER = "bob:globex-token";
const REASON = "drill: intermediate key exposed";

let h: Harness;
let origin: Origin;
/** A session of acme's v1 leaf, taken before the revoke. */
let v1Session: Buffer | undefined;

beforeAll(async () => {
  h = await startHarness({
    tenants: [{ id: "acme" }, { id: "globex", users: [{ name: "bob", passwordSha256: createHash("sha256").update("globex-token").digest("hex") }] }],
    defaultTenant: "acme",
  });
  origin = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await origin?.close();
  await h?.close();
});

/** CONNECT (as globex when `user` is given), then TLS to the origin; `ca` undefined accepts any certificate. */
async function viaProxy(o: { ca?: string; user?: string; session?: Buffer }): Promise<TLSSocket> {
  const headers: Record<string, string> = o.user === undefined ? {} : { "Proxy-Authorization": `Basic ${Buffer.from(o.user).toString("base64")}` };
  const { socket, status, head } = await connectTunnel(h.port, `localhost:${origin.port}`, headers);
  if (status !== 200) {
    socket.destroy();
    throw new Error(`CONNECT answered ${head}`);
  }
  return new Promise((resolve, reject) => {
    const t = tlsConnect({ socket, servername: "localhost", ALPNProtocols: ["http/1.1"], session: o.session, ...(o.ca === undefined ? { rejectUnauthorized: false } : { ca: o.ca }) });
    t.once("secureConnect", () => resolve(t));
    t.once("error", (err) => {
      socket.destroy();
      reject(err);
    });
  });
}

async function waitUntil(what: string, cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("WatchKeys REVOKED", () => {
  it("drops the revoked tenant's cached leaves; the next CONNECT is answered 503 naming the revoke", async () => {
    const acmeRoot = h.agent.rootPem("acme");
    const globexRoot = h.agent.rootPem("globex");
    // One cached leaf per tenant.
    const a = await viaProxy({ ca: acmeRoot });
    const ticket = new Promise<Buffer>((resolve) => a.once("session", resolve));
    expect((await requestOver(a, "/hello", { host: "localhost" })).status).toBe(200);
    v1Session = await ticket;
    const g = await viaProxy({ ca: globexRoot, user: GLOBEX_USER });
    expect(g.authorized).toBe(true);
    g.destroy();
    expect(h.proxy.leaves.size).toBe(2);
    expect([h.agent.issueCount("acme"), h.agent.issueCount("globex")]).toEqual([1, 1]);
    // Baseline: while nothing happens, a new acme connection is served from the cache.
    (await viaProxy({ ca: acmeRoot })).destroy();
    expect(h.agent.issueCount("acme")).toBe(1);

    h.agent.revoke("acme", REASON);
    await waitUntil("the proxy drops acme's leaf", () => h.proxy.leaves.size === 1);

    // The proxy knows from the REVOKED event: it answers the CONNECT itself with the reason (not a
    // page under an untrusted CA, which a client reports as broken trust) and does not ask the agent.
    const refused = await connectTunnel(h.port, `localhost:${origin.port}`);
    refused.socket.destroy();
    expect(refused.status).toBe(503);
    expect(refused.head).toContain(`x-kmi-reason: the intermediate of tenant "acme" was revoked (${REASON}); wait for a new version to be activated`);
    expect(refused.head).toContain("x-kmi-rule: tenant-revoked");
    expect(refused.head).toContain(`was revoked (${REASON})`);
    expect(h.agent.refused.filter((c) => c.tenantId === "acme")).toHaveLength(0);
    expect(h.agent.issueCount("acme")).toBe(1);
    const rec = await h.log.waitFor((r) => r.path === `localhost:${origin.port}` && r.rule === "tenant-revoked");
    expect(rec).toMatchObject({ tenant: "acme", decision: "error", status: 503, method: "CONNECT" });
    expect(h.proxy.leaves.size).toBe(1);

    // The other tenant keeps its cached leaf: no new issuance, still trusted under its root.
    const g2 = await viaProxy({ ca: globexRoot, user: GLOBEX_USER });
    expect(g2.authorized).toBe(true);
    expect(String(g2.getPeerCertificate().issuer.CN)).toBe("globex MITM CA v1");
    g2.destroy();
    expect(h.agent.issueCount("globex")).toBe(1);
  });

  it("after a new version is activated, leaves come from it and a session from before the revoke does not resume", async () => {
    expect(v1Session).toBeDefined();
    h.agent.rotate("acme");
    const t = await viaProxy({ ca: h.agent.rootPem("acme"), session: v1Session });
    // Why this matters: a resumed session would skip the certificate, authenticated by the revoked key's leaf.
    expect(t.isSessionReused()).toBe(false);
    expect(t.authorized).toBe(true);
    expect(String(t.getPeerCertificate().issuer.CN)).toBe("acme MITM CA v2");
    expect((await requestOver(t, "/hello", { host: "localhost" })).body.toString()).toBe("hello from origin over http/1.1\n");
    expect(h.agent.issueCount("acme")).toBe(2);
    expect(h.proxy.leaves.size).toBe(2);
  });

  it("a session resumes under its own tenant's leaves only; a revoke keeps the other tenants' sessions", async () => {
    const acmeRoot = h.agent.rootPem("acme");
    const globexRoot = h.agent.rootPem("globex");
    const sessionOf = async (o: { ca: string; user?: string }): Promise<Buffer> => {
      const t = await viaProxy(o);
      const s = new Promise<Buffer>((resolve) => t.once("session", resolve));
      expect((await requestOver(t, "/hello", { host: "localhost" })).status).toBe(200);
      return s;
    };
    const acme = await sessionOf({ ca: acmeRoot });
    const globex = await sessionOf({ ca: globexRoot, user: GLOBEX_USER });
    // Same tenant: resumes (tickets are shared by a tenant's leaves).
    const again = await viaProxy({ ca: acmeRoot, session: acme });
    expect(again.isSessionReused()).toBe(true);
    again.destroy();
    // Another tenant's client offering acme's ticket gets a full handshake under globex's leaf.
    const cross = await viaProxy({ ca: globexRoot, user: GLOBEX_USER, session: acme });
    expect(cross.isSessionReused()).toBe(false);
    expect(String(cross.getPeerCertificate().issuer.CN)).toBe("globex MITM CA v1");
    cross.destroy();
    // Revoking acme leaves globex's sessions alone.
    h.agent.revoke("acme", REASON);
    await waitUntil("the proxy drops acme's leaf", () => h.proxy.leaves.size === 1);
    const g = await viaProxy({ ca: globexRoot, user: GLOBEX_USER, session: globex });
    expect(g.isSessionReused()).toBe(true);
    g.destroy();
  });
});
