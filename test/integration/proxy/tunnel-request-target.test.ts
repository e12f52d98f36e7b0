/**
 * Inside an intercepted tunnel a request must be in origin form (`/path`). An origin that gets
 * an absolute-form target (`GET https://other.test/x HTTP/1.1`) takes its host over the Host
 * header (RFC 9112 3.2.2), so a request whose Host the policy judged could ask a virtual-hosting
 * origin (a CDN, a shared front) for a blocked host's pages.
 */
import { connect as h2connect } from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { requestOver, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;

beforeAll(async () => {
  h = await startHarness({ policy: { blockHosts: ["blocked.test"] } });
  good = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await good?.close();
  await h?.close();
});

describe("the request target inside a tunnel", () => {
  it.each([["https://blocked.test/hello"], ["http://blocked.test/hello"], ["blocked.test/hello"]])(
    "%s (not origin form) is refused with 400, and the origin is not asked",
    async (target) => {
      const before = good.requests;
      const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
      const r = await requestOver(t, target, { host: "localhost" }).catch((err: Error) => ({ status: -1, body: Buffer.from(err.message) }));
      t.destroy();
      expect(r.body.toString()).not.toContain("hello from origin");
      expect(r.status).toBe(400);
      expect(good.requests).toBe(before);
    },
  );

  it("over HTTP/2, a :path that is not origin form never reaches the origin (Node's h2 server resets it)", async () => {
    const before = good.requests;
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme"), alpn: ["h2"] });
    const session = h2connect("https://localhost", { createConnection: () => t });
    try {
      const { status, body } = await new Promise<{ status: number; body: string }>((resolve) => {
        const s = session.request({ ":path": "https://blocked.test/hello", ":authority": "localhost" });
        let status = 0;
        let body = "";
        s.on("response", (hd) => (status = Number(hd[":status"])));
        s.on("data", (c: Buffer) => (body += c.toString()));
        s.on("end", () => resolve({ status, body }));
        s.on("error", (err) => resolve({ status: -1, body: err.message }));
        s.end();
      });
      expect(body).not.toContain("hello from origin");
      expect([400, -1]).toContain(status);
      expect(good.requests).toBe(before);
    } finally {
      session.destroy();
    }
  });

  it("an origin-form request still passes", async () => {
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
    const r = await requestOver(t, "/hello", { host: "localhost" });
    t.destroy();
    expect(r.body.toString()).toContain("hello from origin");
  });
});
