/**
 * The decision a connection gets when it never sends a request: `no-request`, not `error`;
 * `client-rejected-leaf` (an error) only when the client sent a TLS alert about the certificate.
 * Real clients: openssl s_client, curl, Node's TLS client.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;

beforeAll(async () => {
  h = await startHarness();
  good = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await good?.close();
  await h?.close();
});

const target = (): string => `localhost:${good.port}`;

describe("connections without a request", () => {
  it("openssl s_client that handshakes and leaves: no-request", async () => {
    const before = h.log.records.length;
    const r = await run("openssl", ["s_client", "-proxy", `127.0.0.1:${h.port}`, "-connect", target(), "-servername", "localhost"]);
    expect(r.stdout).toContain("BEGIN CERTIFICATE");
    const rec = await h.log.waitFor((x) => h.log.records.indexOf(x as never) >= before && x.path === target());
    expect(rec).toMatchObject({ decision: "no-request", method: "CONNECT", tenant: "acme" });
    expect(rec.rule).toMatch(/^(client-closed-after-handshake|no-request)$/);
  });

  it("a client that handshakes, stays a while and closes without a request: no-request", async () => {
    const before = h.log.records.length;
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
    await new Promise((r) => setTimeout(r, 1100));
    t.destroy();
    const rec = await h.log.waitFor((x) => h.log.records.indexOf(x as never) >= before && x.path === target());
    expect(rec).toMatchObject({ decision: "no-request", rule: "no-request" });
  });

  it("a CONNECT that closes before its ClientHello: no-request", async () => {
    const before = h.log.records.length;
    const { socket } = await connectTunnel(h.port, target());
    socket.end();
    const rec = await h.log.waitFor((x) => h.log.records.indexOf(x as never) >= before && x.path === target());
    expect(rec).toMatchObject({ decision: "no-request", rule: "client-hello" });
  });
});

describe("a client that refuses the leaf with a TLS alert", () => {
  it("curl that does not trust the tenant's CA sends unknown_ca: error, client-rejected-leaf", async () => {
    const before = h.log.records.length;
    // No --cacert: curl's own trust store does not hold the tenant's root, so it alerts.
    const r = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, `https://${target()}/hello`]);
    expect(r.code).toBe(60);
    const rec = await h.log.waitFor((x) => h.log.records.indexOf(x as never) >= before && x.path === target());
    expect(rec).toMatchObject({ decision: "error", rule: "client-rejected-leaf" });
    expect(rec.error).toMatch(/UNKNOWN_CA|unknown ca/i);
  });
});
