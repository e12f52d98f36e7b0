/**
 * Protocols through the proxy: WebSocket (inside an intercepted tunnel, and as a plain
 * ws:// proxy request), gRPC-style trailers over h2, and plain http:// forwarding with the
 * same inspection.
 */
import { randomBytes } from "node:crypto";
import { createServer as createHttpServer, type Server } from "node:http";
import { connect as h2connect } from "node:http2";
import { connect as netConnect, type AddressInfo, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import type { TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EICAR } from "../../../src/proxy/eicar.js";
import { decodeWsFrame, encodeWsFrame, startOrigin, wsAccept, type Origin } from "../../fixtures/proxy/origins.js";
import { run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
let plain: Server;
let plainPort: number;

beforeAll(async () => {
  h = await startHarness({ policy: { blockUrls: ["*/ws-blocked"] } });
  good = await startOrigin({ cert: h.pki.good });
  plain = createHttpServer((req, res) => {
    if (req.url === "/eicar") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end(EICAR);
      return;
    }
    let n = 0;
    req.on("data", (c: Buffer) => (n += c.length));
    req.on("end", () => {
      res.writeHead(200, { "content-type": "text/plain", "x-seen-host": req.headers.host ?? "", "x-seen-proxy-auth": req.headers["proxy-authorization"] ?? "none" });
      res.end(`plain ${req.method} ${req.url} ${n}\n`);
    });
  });
  plain.on("upgrade", (req, socket: Duplex) => {
    socket.on("end", () => socket.end());
    socket.on("error", () => {});
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${wsAccept(String(req.headers["sec-websocket-key"]))}\r\n\r\n`);
    socket.on("data", (d: Buffer) => {
      const f = decodeWsFrame(d);
      if (f !== undefined) socket.write(encodeWsFrame(Buffer.concat([Buffer.from("plain echo: "), f.payload]), false));
    });
  });
  await new Promise<void>((r) => plain.listen(0, "127.0.0.1", r));
  plainPort = (plain.address() as AddressInfo).port;
});

afterAll(async () => {
  await h?.close();
  await good?.close();
  plain?.closeAllConnections();
  await new Promise((r) => plain?.close(r));
});

/** Performs a WebSocket handshake on `s` and exchanges one message. */
async function wsEcho(s: TLSSocket | Socket, requestLine: string, host: string, message: string): Promise<{ status: string; reply?: string }> {
  const key = randomBytes(16).toString("base64");
  s.write(`${requestLine}\r\nHost: ${host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
  let buf = Buffer.alloc(0);
  const read = (): Promise<void> => new Promise((resolve) => s.once("data", (d: Buffer) => ((buf = Buffer.concat([buf, d])), resolve())));
  while (!buf.includes("\r\n\r\n")) await read();
  const end = buf.indexOf("\r\n\r\n");
  const head = buf.subarray(0, end).toString();
  buf = buf.subarray(end + 4);
  const status = head.split("\r\n")[0]!;
  if (!status.includes(" 101 ")) return { status };
  expect(head.toLowerCase()).toContain(`sec-websocket-accept: ${wsAccept(key).toLowerCase()}`);
  s.write(encodeWsFrame(Buffer.from(message), true));
  let f = decodeWsFrame(buf);
  while (f === undefined) {
    await read();
    f = decodeWsFrame(buf);
  }
  return { status, reply: f.payload.toString() };
}

describe("WebSocket", () => {
  it("echo through an intercepted tunnel, after the handshake is inspected", async () => {
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
    const r = await wsEcho(t, "GET /ws HTTP/1.1", "localhost", "hello ws");
    expect(r.status).toBe("HTTP/1.1 101 Switching Protocols");
    expect(r.reply).toBe("echo: hello ws");
    t.destroy();
    const rec = await h.log.waitFor((x) => x.path === "/ws" && x.proto === "websocket");
    expect(rec).toMatchObject({ status: 101, decision: "allow", tenant: "acme" });
    expect(rec.bytes_up).toBeGreaterThan(0);
    expect(rec.bytes_down).toBeGreaterThan(0);
  });

  it("a handshake that matches a block rule is refused with 403", async () => {
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
    const r = await wsEcho(t, "GET /ws-blocked HTTP/1.1", "localhost", "x");
    expect(r.status).toMatch(/^HTTP\/1.1 403/);
    t.destroy();
  });

  it("ws:// through the proxy as a plain request", async () => {
    const s = netConnect({ host: "127.0.0.1", port: h.port });
    await new Promise((r) => s.once("connect", r));
    const r = await wsEcho(s, `GET http://127.0.0.1:${plainPort}/chat HTTP/1.1`, `127.0.0.1:${plainPort}`, "hi");
    expect(r.reply).toBe("plain echo: hi");
    s.destroy();
  });
});

describe("HTTP/2 details", () => {
  it("gRPC-style trailers reach the client", async () => {
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme"), alpn: ["h2"] });
    expect(t.alpnProtocol).toBe("h2");
    const session = h2connect("https://localhost", { createConnection: () => t });
    const msg = Buffer.concat([Buffer.from([0, 0, 0, 0, 5]), Buffer.from("hello")]);
    const stream = session.request({ ":method": "POST", ":path": "/grpc", "content-type": "application/grpc", te: "trailers" });
    stream.end(msg);
    const chunks: Buffer[] = [];
    const [headers, trailers] = await new Promise<[Record<string, unknown>, Record<string, unknown>]>((resolve, reject) => {
      let hd: Record<string, unknown> = {};
      stream.on("response", (x) => (hd = x));
      stream.on("data", (c: Buffer) => chunks.push(c));
      stream.on("trailers", (tr) => resolve([hd, tr]));
      stream.on("error", reject);
    });
    expect(headers[":status"]).toBe(200);
    expect(headers["content-type"]).toBe("application/grpc");
    expect(trailers["grpc-status"]).toBe("0");
    expect(trailers["grpc-message"]).toBe("ok");
    await new Promise((r) => stream.on("close", r));
    expect(Buffer.concat(chunks).equals(msg)).toBe(true);
    session.close();
  });

  it("many concurrent streams on one connection", async () => {
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme"), alpn: ["h2"] });
    const session = h2connect("https://localhost", { createConnection: () => t });
    const get = (path: string) =>
      new Promise<string>((resolve, reject) => {
        const st = session.request({ ":path": path });
        let body = "";
        st.on("data", (d: Buffer) => (body += d.toString()));
        st.on("end", () => resolve(body));
        st.on("error", reject);
      });
    const bodies = await Promise.all(Array.from({ length: 20 }, () => get("/hello")));
    expect(new Set(bodies)).toEqual(new Set(["hello from origin over h2\n"]));
    const big = await get("/big?n=1500000");
    expect(big.length).toBe(1_500_000);
    session.close();
  });
});

describe("plain http://", () => {
  const curl = (...args: string[]) => run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, ...args]);

  it("is forwarded with the URL's host; proxy credentials are not passed on", async () => {
    const r = await curl("-i", "--proxy-basic", "-U", "someone:secret", `http://127.0.0.1:${plainPort}/path?q=1`);
    // Unknown proxy user: 407 with a Basic challenge.
    expect(r.stdout).toMatch(/^HTTP\/1.1 407/);
    expect(r.stdout.toLowerCase()).toContain('proxy-authenticate: basic realm="kmi proxy"');
    const ok = await curl("-i", "-X", "POST", "--data-binary", "abc", `http://127.0.0.1:${plainPort}/path?q=1`);
    expect(ok.stdout).toMatch(/^HTTP\/1.1 200/);
    expect(ok.stdout).toContain("plain POST /path?q=1 3");
    expect(ok.stdout.toLowerCase()).toContain(`x-seen-host: 127.0.0.1:${plainPort}`);
    expect(ok.stdout.toLowerCase()).toContain("x-seen-proxy-auth: none");
    const rec = await h.log.waitFor((x) => x.path === "/path?" && x.status === 200);
    expect(rec).toMatchObject({ method: "POST", bytes_up: 3, decision: "allow", host: "127.0.0.1" });
  });

  it("is inspected: EICAR and block rules apply", async () => {
    const r = await curl("-i", `http://127.0.0.1:${plainPort}/eicar`);
    expect(r.stdout).toMatch(/^HTTP\/1.1 403/);
    expect(r.stdout).toContain("eicar");
    const b = await curl("-i", `http://127.0.0.1:${plainPort}/ws-blocked`);
    expect(b.stdout).toMatch(/^HTTP\/1.1 403/);
    expect(b.stdout).toContain("block-url:*/ws-blocked");
  });

  it("a request that is not absolute-form gets a 400 that says how to use the proxy", async () => {
    const r = await run("curl", ["-sS", "-i", `http://127.0.0.1:${h.port}/`]);
    expect(r.stdout).toMatch(/^HTTP\/1.1 400/);
    expect(r.stdout).toContain("forward proxy");
  });

  it("an unreachable origin gets a 502 page", async () => {
    const r = await curl("-i", "http://127.0.0.1:1/x");
    expect(r.stdout).toMatch(/^HTTP\/1.1 502/);
    expect(r.stdout).toContain("ECONNREFUSED");
  });
});
