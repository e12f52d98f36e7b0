/**
 * Interception end to end: curl and openssl through the proxy to local origins, the fixture
 * agent certifying leaves over its Unix socket.
 */
import { X509Certificate } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { run, startHarness, tlsViaProxy, requestOver, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let origin: Origin;
let root: string;

beforeAll(async () => {
  h = await startHarness();
  origin = await startOrigin({ cert: h.pki.good });
  root = await h.rootFile();
});

afterAll(async () => {
  await origin?.close();
  await h?.close();
});

function certsOf(showcerts: string): X509Certificate[] {
  return [...showcerts.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)].map((m) => new X509Certificate(m[0]));
}

describe("interception", () => {
  it("curl through the proxy trusts only the tenant root and gets the origin's body", async () => {
    const r = await run("curl", ["-sS", "--http1.1", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, `https://localhost:${origin.port}/hello`]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toBe("hello from origin over http/1.1\n");
    const rec = await h.log.waitFor((x) => x.path === "/hello");
    expect(rec).toMatchObject({ tenant: "acme", host: "localhost", method: "GET", status: 200, decision: "allow", proto: "http/1.1" });
    expect(rec.bytes_down).toBe("hello from origin over http/1.1\n".length);
  });

  it("the leaf openssl sees is issued by the tenant's intermediate and carries the origin's names", async () => {
    const r = await run("openssl", [
      "s_client",
      "-proxy",
      `127.0.0.1:${h.port}`,
      "-connect",
      `localhost:${origin.port}`,
      "-servername",
      "localhost",
      "-showcerts",
      "-CAfile",
      root,
      "-verify_return_error",
    ]);
    expect(r.stdout).toContain("Verify return code: 0 (ok)");
    const [leaf, inter] = certsOf(r.stdout);
    expect(leaf).toBeDefined();
    expect(inter).toBeDefined();
    expect(inter!.subject).toContain("acme MITM CA v1");
    expect(leaf!.checkIssued(inter!)).toBe(true);
    expect(leaf!.verify(inter!.publicKey)).toBe(true);
    // An independent tool reads the leaf.
    const leafFile = join(h.dir, "leaf.pem");
    await writeFile(leafFile, leaf!.toString());
    const text = await run("openssl", ["x509", "-noout", "-text", "-in", leafFile]);
    expect(text.stdout).toMatch(/Subject: CN\s?=\s?localhost/);
    expect(text.stdout).toMatch(/DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1/);
    expect(text.stdout).toContain("CA:FALSE");
    expect(text.stdout).toContain("TLS Web Server Authentication");
    expect(text.stdout).toContain("ASN1 OID: prime256v1");
    // Validity: at most 47 days, and never past the origin certificate's end (90 days here).
    const days = (Date.parse(leaf!.validTo) - Date.parse(leaf!.validFrom)) / 86_400_000;
    expect(days).toBeLessThanOrEqual(47);
    expect(days).toBeGreaterThan(46);
  });

  it("a leaf never outlives the origin certificate", async () => {
    // `other` expires in 20 days: the leaf must end with it.
    const short = await startOrigin({ cert: h.pki.other });
    try {
      const t = await tlsViaProxy(h.port, "localhost", short.port, { ca: h.agent.rootPem("acme") });
      const leaf = t.getPeerX509Certificate()!;
      const originEnd = Date.parse(new X509Certificate(h.pki.other.cert).validTo);
      expect(Date.parse(leaf.validTo)).toBeLessThanOrEqual(originEnd);
      expect(Date.parse(leaf.validTo)).toBeGreaterThan(originEnd - 2000);
      expect(leaf.subjectAltName).toBe("DNS:localhost, DNS:alt.localhost, IP Address:127.0.0.1");
      t.destroy();
    } finally {
      await short.close();
    }
  });

  it("HTTP/2 through the proxy (curl --http2) reaches the origin over h2", async () => {
    const r = await run("curl", ["-sS", "--http2", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, "-w", "%{http_version}", `https://localhost:${origin.port}/hello`]);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe("hello from origin over h2\n2");
    const rec = await h.log.waitFor((x) => x.path === "/hello" && x.proto === "h2");
    expect(rec).toMatchObject({ status: 200, decision: "allow", tenant: "acme" });
  });

  it("answers the client with the protocol the origin chose", async () => {
    // An origin that speaks only http/1.1, a client that offers h2 first: the client must get http/1.1.
    const h1only = await startOrigin({ cert: h.pki.good, h2: false });
    try {
      const r = await run("curl", ["-sS", "--http2", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, "-w", "%{http_version}", `https://localhost:${h1only.port}/hello`]);
      expect(r.stderr).toBe("");
      expect(r.code).toBe(0);
      expect(r.stdout).toBe("hello from origin over http/1.1\n1.1");
      const t = await tlsViaProxy(h.port, "localhost", h1only.port, { ca: h.agent.rootPem("acme"), alpn: ["h2", "http/1.1"] });
      expect(t.alpnProtocol).toBe("http/1.1");
      const res = await requestOver(t, "/hello", { host: "localhost" });
      expect(res).toMatchObject({ status: 200, body: Buffer.from("hello from origin over http/1.1\n") });
      expect(res.headers["x-origin-proto"]).toBe("http/1.1");
    } finally {
      await h1only.close();
    }
    // The converse: an h2-capable origin and a client offering h2 get h2, end to end.
    const t2 = await tlsViaProxy(h.port, "localhost", origin.port, { ca: h.agent.rootPem("acme"), alpn: ["h2", "http/1.1"] });
    expect(t2.alpnProtocol).toBe("h2");
    const { connect: h2connect } = await import("node:http2");
    const session = h2connect("https://localhost", { createConnection: () => t2 });
    try {
      const { status, proto, body } = await new Promise<{ status: number; proto: string; body: string }>((resolve, reject) => {
        const req = session.request({ ":path": "/hello", ":authority": "localhost" });
        let status = 0;
        let proto = "";
        let body = "";
        req.on("response", (hd) => {
          status = Number(hd[":status"]);
          proto = String(hd["x-origin-proto"]);
        });
        req.on("data", (d: Buffer) => (body += d.toString()));
        req.on("end", () => resolve({ status, proto, body }));
        req.on("error", reject);
        req.end();
      });
      expect({ status, proto, body }).toEqual({ status: 200, proto: "h2", body: "hello from origin over h2\n" });
    } finally {
      session.destroy();
    }
  });

  it("keep-alive: several requests on one intercepted connection", async () => {
    const t = await tlsViaProxy(h.port, "localhost", origin.port, { ca: h.agent.rootPem("acme") });
    const { request } = await import("node:http");
    const { Agent } = await import("node:http");
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    (agent as unknown as { createConnection: () => unknown }).createConnection = () => t;
    const get = (path: string) =>
      new Promise<string>((resolve, reject) => {
        request({ agent, path, host: "localhost", headers: { host: "localhost" } }, (res) => {
          let s = "";
          res.on("data", (d: Buffer) => (s += d.toString()));
          res.on("end", () => resolve(s));
        }).on("error", reject).end();
      });
    const before = origin.requests;
    expect(await get("/hello")).toContain("hello");
    expect(await get("/hello")).toContain("hello");
    expect(await get("/hello")).toContain("hello");
    expect(origin.requests - before).toBe(3);
    agent.destroy();
  });

  it("the origin closing its connection does not end the client's: the next request opens a new one", async () => {
    const t = await tlsViaProxy(h.port, "localhost", origin.port, { ca: h.agent.rootPem("acme") });
    const { Agent, request } = await import("node:http");
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    (agent as unknown as { createConnection: () => unknown }).createConnection = () => t;
    const get = (path: string) =>
      new Promise<{ status: number; body: string }>((resolve, reject) => {
        request({ agent, path, host: "localhost", headers: { host: "localhost" } }, (res) => {
          let s = "";
          res.on("data", (d: Buffer) => (s += d.toString()));
          res.on("end", () => resolve({ status: res.statusCode ?? 0, body: s }));
        }).on("error", reject).end();
      });
    expect((await get("/close")).body).toBe("closing\n");
    await new Promise((r) => setTimeout(r, 50));
    expect(t.destroyed).toBe(false);
    expect(await get("/hello")).toEqual({ status: 200, body: "hello from origin over http/1.1\n" });
    agent.destroy();
  });

  it("a POST body reaches the origin", async () => {
    const t = await tlsViaProxy(h.port, "localhost", origin.port, { ca: h.agent.rootPem("acme") });
    const r = await requestOver(t, "/upload", { host: "localhost", method: "POST", body: [Buffer.alloc(5000, 1), Buffer.alloc(7000, 2)] });
    expect(r.status).toBe(200);
    expect(r.body.toString()).toBe("received 12000 bytes\n");
  });
});
