/**
 * Tenants: by client address range, by proxy credentials, or the default; each gets leaves
 * from its own intermediate.
 */
import { createHash } from "node:crypto";
import { connect as netConnect } from "node:net";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { run, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
const sha = (s: string) => createHash("sha256").update(s).digest("hex");

beforeAll(async () => {
  h = await startHarness({
    tenants: [
      { id: "acme" },
      { id: "globex", cidrs: ["127.0.0.2/32", "10.0.0.0/8"], users: [{ name: "bob", passwordSha256: sha("s3cret-token") }] },
      { id: "initech", users: [{ name: "carol", passwordSha256: sha("other-token") }] },
    ],
    defaultTenant: "acme",
  });
  good = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await h?.close();
  await good?.close();
});

/** CONNECT from `localAddress` with optional credentials; TLS trusting `ca`; resolves with the leaf's issuer CN or the CONNECT status. */
function viaProxy(localAddress: string, ca: string, auth?: string): Promise<{ status: number; issuer?: string }> {
  return new Promise((resolve, reject) => {
    const s = netConnect({ host: "127.0.0.1", port: h.port, localAddress });
    s.on("error", reject);
    s.on("connect", () => {
      const hdr = auth === undefined ? "" : `Proxy-Authorization: Basic ${Buffer.from(auth).toString("base64")}\r\n`;
      s.write(`CONNECT localhost:${good.port} HTTP/1.1\r\nHost: localhost\r\n${hdr}\r\n`);
    });
    let buf = "";
    const onData = (d: Buffer) => {
      buf += d.toString("latin1");
      if (!buf.includes("\r\n\r\n")) return;
      s.off("data", onData);
      const status = Number(buf.split(" ")[1]);
      if (status !== 200) {
        s.destroy();
        resolve({ status });
        return;
      }
      const t: TLSSocket = tlsConnect({ socket: s, servername: "localhost", ca });
      t.once("secureConnect", () => {
        resolve({ status, issuer: String(t.getPeerCertificate().issuer.CN) });
        t.destroy();
      });
      t.once("error", reject);
    };
    s.on("data", onData);
  });
}

describe("tenants", () => {
  it("a client in a tenant's address range gets that tenant's leaves", async () => {
    expect(await viaProxy("127.0.0.2", h.agent.rootPem("globex"))).toEqual({ status: 200, issuer: "globex MITM CA v1" });
  });

  it("a client outside every range gets the default tenant", async () => {
    expect(await viaProxy("127.0.0.3", h.agent.rootPem("acme"))).toEqual({ status: 200, issuer: "acme MITM CA v1" });
    const rec = await h.log.waitFor((r) => r.tenant === "acme" && r.client.startsWith("127.0.0.3:"));
    expect(rec.tenant).toBe("acme");
  });

  it("proxy credentials pick the tenant, whatever the address", async () => {
    expect(await viaProxy("127.0.0.2", h.agent.rootPem("initech"), "carol:other-token")).toEqual({ status: 200, issuer: "initech MITM CA v1" });
  });

  it.each([
    ["wrong password", "bob:guess"],
    ["unknown user", "mallory:s3cret-token"],
    ["no password", "bob"],
  ])("%s: 407 with a Basic challenge", async (_n, auth) => {
    expect(await viaProxy("127.0.0.1", h.agent.rootPem("acme"), auth)).toEqual({ status: 407 });
  });

  it("curl with --proxy-user reaches the origin under its tenant", async () => {
    const root = await h.rootFile("globex");
    const r = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--proxy-user", "bob:s3cret-token", "--cacert", root, `https://localhost:${good.port}/hello`]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("hello from origin");
    const rec = await h.log.waitFor((x) => x.path === "/hello" && x.tenant === "globex");
    expect(rec.decision).toBe("allow");
  });
});
