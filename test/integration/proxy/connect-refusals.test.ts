/**
 * Where the proxy knows before the 200 that it cannot intercept, it answers the CONNECT itself:
 * 503 with the reason in `X-Kmi-Reason` and the body (no key for the tenant, a quarantined
 * machine), so curl says "CONNECT tunnel failed, response 503" instead of a certificate error
 * from the untrusted kmi-blocked CA. (The revoke and the new-host limit: revoke.test.ts and
 * leaves.test.ts.)
 */
import { createHash } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let origin: Origin;
const CAROL = "carol:initech-token";

beforeAll(async () => {
  // The agent holds keys for acme only; the proxy also knows tenant initech (user carol).
  h = await startHarness({
    tenants: [{ id: "acme" }],
    proxy: {
      tenants: [{ id: "acme" }, { id: "initech", users: [{ name: "carol", passwordSha256: createHash("sha256").update("initech-token").digest("hex") }] }],
    },
  });
  origin = await startOrigin({ cert: h.pki.good });
  // The agent's WatchKeys snapshot has reached the proxy.
  for (let i = 0; i < 200 && h.proxy.context.keys.refusal("initech") === undefined; i++) await new Promise((r) => setTimeout(r, 25));
});

afterAll(async () => {
  await origin?.close();
  await h?.close();
});

const auth = (user: string): Record<string, string> => ({ "Proxy-Authorization": `Basic ${Buffer.from(user).toString("base64")}` });

function curl(...args: string[]) {
  return run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, ...args]);
}

describe("answered on the CONNECT", () => {
  it("a target that is not host:port: 400, logged as bad-request without a user and password it carried", async () => {
    const { socket, status } = await connectTunnel(h.port, "alice:s3cret-pw@example.com:443");
    socket.destroy();
    expect(status).toBe(400);
    const rec = await h.log.waitFor((r) => r.method === "CONNECT" && r.rule === "bad-request");
    expect(rec.path).toBe("…@example.com:443");
    expect(JSON.stringify(h.log.records)).not.toContain("s3cret-pw");
  });

  it("a tenant the agent holds no key for: 503, rule no-key, the reason says how to fix it", async () => {
    const r = await connectTunnel(h.port, `localhost:${origin.port}`, auth(CAROL));
    r.socket.destroy();
    expect(r.status).toBe(503);
    expect(r.head).toContain("x-kmi-rule: no-key");
    expect(r.head).toContain('x-kmi-reason: the key agent holds no active intermediate for tenant "initech"; activate one (kmi ctl ca rotate --tenant initech --activate)');
    // The body says it too, for a person.
    expect(r.head).toContain("kmi ctl ca rotate --tenant initech --activate");
    const rec = await h.log.waitFor((x) => x.tenant === "initech" && x.rule === "no-key");
    expect(rec).toMatchObject({ decision: "error", status: 503, method: "CONNECT" });
    expect(h.agent.issueCount("initech")).toBe(0);
    const c = await curl("-U", CAROL, `https://localhost:${origin.port}/hello`);
    expect(c.code).toBe(56);
    expect(c.stderr).toContain("CONNECT tunnel failed, response 503");
  });

  it("a tenant with a key is intercepted as before", async () => {
    const t = await tlsViaProxy(h.port, "localhost", origin.port, { ca: h.agent.rootPem("acme") });
    expect(t.authorized).toBe(true);
    t.destroy();
  });

  it("a quarantined machine: 503, rule quarantined, naming the quarantine and the release", async () => {
    h.agent.quarantine("drill: tampered binary");
    for (let i = 0; i < 200 && h.proxy.context.keys.refusal("acme")?.rule !== "quarantined"; i++) await new Promise((r) => setTimeout(r, 25));
    const r = await connectTunnel(h.port, `localhost:${origin.port}`);
    r.socket.destroy();
    expect(r.status).toBe(503);
    expect(r.head).toContain("x-kmi-rule: quarantined");
    expect(r.head).toContain("x-kmi-reason: this proxy machine is quarantined (drill: tampered binary)");
    expect(r.head).toContain("kmi ctl machine release");
    const c = await curl(`https://localhost:${origin.port}/hello`);
    expect(c.code).toBe(56);
    expect(c.stderr).toContain("CONNECT tunnel failed, response 503");
    const rec = await h.log.waitFor((x) => x.tenant === "acme" && x.rule === "quarantined");
    expect(rec).toMatchObject({ decision: "error", status: 503 });
  });
});
