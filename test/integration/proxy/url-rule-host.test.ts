/**
 * URL block rules name a host: they must hold whatever the client writes in its Host header
 * (or :authority). Inside an intercepted tunnel the request goes to the tunnel's origin
 * whatever Host says, and most origins ignore Host or take `name.` for `name`, so neither a
 * Host naming another host nor a trailing dot may step around a rule for the origin's URLs.
 */
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { connect as h2connect } from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { requestOver, run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
let plain: HttpServer;
let plainPort = 0;
/** Paths the plain HTTP origin served. */
const served: string[] = [];

const POLICY = { blockUrls: [{ name: "local-hello", pattern: "localhost:*/hello*" }] };

beforeAll(async () => {
  h = await startHarness({ policy: POLICY });
  good = await startOrigin({ cert: h.pki.good });
  plain = createHttpServer((req, res) => {
    served.push(req.url ?? "");
    res.end(`plain ${req.url}`);
  });
  await new Promise<void>((r) => plain.listen(0, "127.0.0.1", r));
  plainPort = (plain.address() as { port: number }).port;
});

afterAll(async () => {
  plain?.closeAllConnections();
  await new Promise((r) => plain?.close(r));
  await good?.close();
  await h?.close();
});

describe("a URL rule for the tunnel's origin holds whatever Host the client sends", () => {
  it.each([
    ["its own name (the rule works)", () => `localhost:${good.port}`],
    ["a trailing dot", () => `localhost.:${good.port}`],
    ["another host's name", () => "unrelated.test"],
    ["another port", () => "localhost:1"],
  ])("HTTP/1.1, Host with %s: 403, and the origin is not asked", async (_n, host) => {
    const before = good.requests;
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
    const r = await requestOver(t, "/hello", { host: host() });
    t.destroy();
    expect(r.body.toString()).not.toContain("hello from origin");
    expect(r.status).toBe(403);
    expect(r.body.toString()).toContain("block-url:local-hello");
    expect(good.requests).toBe(before);
  });

  it.each([
    ["a trailing dot", () => `localhost.:${good.port}`],
    ["another host's name", () => "unrelated.test"],
  ])("HTTP/2, :authority with %s: 403", async (_n, authority) => {
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme"), alpn: ["h2"] });
    expect(t.alpnProtocol).toBe("h2");
    const session = h2connect("https://localhost", { createConnection: () => t });
    try {
      const { status, body } = await new Promise<{ status: number; body: string }>((resolve, reject) => {
        const s = session.request({ ":path": "/hello", ":authority": authority() });
        let status = 0;
        let body = "";
        s.on("response", (hd) => (status = Number(hd[":status"])));
        s.on("data", (c: Buffer) => (body += c.toString()));
        s.on("end", () => resolve({ status, body }));
        s.on("error", reject);
        s.end();
      });
      expect(body).not.toContain("hello from origin");
      expect(status).toBe(403);
    } finally {
      session.destroy();
    }
  });

  it.each(["/%68ello", "/./hello", "//hello", "/x/../hello"])("HTTP/1.1, the path spelled %s (the origin serves it as /hello): 403, the origin not asked", async (path) => {
    const before = good.requests;
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
    const r = await requestOver(t, path, { host: `localhost:${good.port}` });
    t.destroy();
    expect(r.status).toBe(403);
    expect(r.body.toString()).toContain("block-url:local-hello");
    expect(good.requests).toBe(before);
  });

  it("a plain http:// request to the host with a trailing dot: 403, the origin not asked", async () => {
    const before = served.length;
    const r = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "-i", `http://localhost.:${plainPort}/hello`]);
    expect(r.stdout).not.toContain("plain /hello");
    expect(r.stdout).toMatch(/^HTTP\/1.1 403 /);
    expect(r.stdout).toContain("block-url:local-hello");
    expect(served.length).toBe(before);
  });
});
