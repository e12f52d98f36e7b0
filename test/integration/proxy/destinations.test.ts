/**
 * The destination check: a proxy with no private range allowed refuses loopback, private and
 * link-local destinations (as IP literals, in IPv6 spellings, and as names that resolve to
 * them) for CONNECT and for plain http:// requests, with a 403 that says why and an access
 * log record; the origin never sees a connection.
 */
import { connect as netConnect } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectTunnel, startHarness, type Harness } from "../../fixtures/proxy/harness.js";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";

let h: Harness;
let origin: Origin;
let plainServerHits = 0;
let plain: import("node:http").Server;
let plainPort = 0;

beforeAll(async () => {
  h = await startHarness({ proxy: { allowPrivate: [] } });
  origin = await startOrigin({ cert: h.pki.good });
  const { createServer } = await import("node:http");
  plain = createServer((_req, res) => {
    plainServerHits++;
    res.end("reached\n");
  });
  await new Promise<void>((r) => plain.listen(0, "127.0.0.1", r));
  plainPort = (plain.address() as import("node:net").AddressInfo).port;
});

afterAll(async () => {
  await h?.close();
  await origin?.close();
  await new Promise((r) => plain?.close(r));
});

/** A plain absolute-form request to the proxy; resolves with status, reason header and body. */
function plainRequest(url: string): Promise<{ status: number; reason: string; body: string }> {
  return new Promise((resolve, reject) => {
    const s = netConnect({ host: "127.0.0.1", port: h.port });
    let buf = "";
    s.on("error", reject);
    s.on("connect", () => s.write(`GET ${url} HTTP/1.1\r\nHost: ${new URL(url).host}\r\nConnection: close\r\n\r\n`));
    s.on("data", (d: Buffer) => (buf += d.toString("utf8")));
    s.on("end", () => {
      const [head = "", body = ""] = buf.split("\r\n\r\n");
      const reason = /\r\nx-kmi-reason: ([^\r]*)/i.exec(head)?.[1] ?? "";
      resolve({ status: Number(head.split(" ")[1]), reason, body });
    });
  });
}

describe("destinations: private and special-use addresses are refused by default", () => {
  it.each([
    ["an IPv4 loopback literal", () => `127.0.0.1:${origin.port}`, "127.0.0.1 is a loopback address"],
    ["a name that resolves to loopback", () => `localhost:${origin.port}`, "localhost ("],
    ["an IPv4-mapped IPv6 literal", () => `[::ffff:127.0.0.1]:${origin.port}`, "::ffff:127.0.0.1 is a loopback address"],
    ["the cloud metadata address", () => "169.254.169.254:80", "169.254.169.254 is a link-local address (cloud metadata lives here)"],
    ["a private address", () => "10.0.0.1:443", "10.0.0.1 is a private address"],
  ])("CONNECT to %s: 403 with the reason, logged, origin untouched", async (_name, target, reason) => {
    const before = origin.requests;
    const t = target();
    const { socket, status, head } = await connectTunnel(h.port, t);
    socket.destroy();
    expect(status).toBe(403);
    expect(head).toContain(reason);
    expect(head).toContain("--allow-private");
    const rec = await h.log.waitFor((r) => r.method === "CONNECT" && r.path === t.replace(/^\[|\](?=:)/g, "") && r.rule === "private-destination");
    expect(rec).toMatchObject({ decision: "block", status: 403 });
    expect(rec.error).toContain(reason);
    expect(origin.requests).toBe(before);
  });

  it.each([
    ["an IP literal", () => `http://127.0.0.1:${plainPort}/x`, "127.0.0.1 is a loopback address"],
    ["a name that resolves to loopback", () => `http://localhost:${plainPort}/x`, "localhost ("],
    ["an IPv6 loopback literal", () => `http://[::1]:${plainPort}/x`, "::1 is a loopback address"],
  ])("plain http:// to %s: 403 with the reason, logged, server untouched", async (_name, url, reason) => {
    const r = await plainRequest(url());
    expect(r.status).toBe(403);
    expect(r.reason).toContain(reason);
    expect(r.body).toContain(reason);
    const rec = await h.log.waitFor((x) => x.method === "GET" && x.rule === "private-destination" && (x.error ?? "").includes(reason));
    expect(rec).toMatchObject({ decision: "block", status: 403 });
    expect(plainServerHits).toBe(0);
  });
});

describe("destinations: an allowed range passes", () => {
  let h2: Harness;
  beforeAll(async () => {
    h2 = await startHarness({ proxy: { allowPrivate: ["127.0.0.0/8"] } });
  });
  afterAll(async () => h2?.close());

  it("CONNECT and plain http:// to loopback work once 127.0.0.0/8 is allowed; ::1 stays refused", async () => {
    const { socket, status } = await connectTunnel(h2.port, `127.0.0.1:${origin.port}`);
    socket.destroy();
    expect(status).toBe(200);
    const s = netConnect({ host: "127.0.0.1", port: h2.port });
    const text = await new Promise<string>((resolve, reject) => {
      let buf = "";
      s.on("error", reject);
      s.on("connect", () => s.write(`GET http://127.0.0.1:${plainPort}/ok HTTP/1.1\r\nHost: 127.0.0.1:${plainPort}\r\nConnection: close\r\n\r\n`));
      s.on("data", (d: Buffer) => (buf += d.toString()));
      s.on("end", () => resolve(buf));
    });
    expect(text).toMatch(/^HTTP\/1\.1 200 /);
    expect(text).toContain("reached");
    expect(plainServerHits).toBe(1);
    const v6 = await connectTunnel(h2.port, `[::1]:${origin.port}`);
    v6.socket.destroy();
    expect(v6.status).toBe(403);
  });
});
