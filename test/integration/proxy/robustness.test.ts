/**
 * Bad clients: garbage instead of TLS, clients that vanish mid-handshake or mid-body,
 * oversized headers, slow clients. Each connection closes, the proxy keeps serving, and the
 * process's open file descriptors return to where they were.
 */
import { connect as h2connect, type ClientHttp2Session } from "node:http2";
import { connect as netConnect, createServer, type Socket } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, fdCount, run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";
import { waitFor } from "../../helpers/process.js";

let h: Harness;
let good: Origin;
let root: string;
let clientHello: Buffer;

const LIMITS = {
  clientHelloTimeoutMs: 300,
  handshakeTimeoutMs: 300,
  headersTimeoutMs: 400,
  requestTimeoutMs: 1500,
  keepAliveTimeoutMs: 300,
  idleTimeoutMs: 1500,
  originIdleTimeoutMs: 300,
  maxHeaderBytes: 8192,
};

/** A real ClientHello, captured from Node's TLS client. */
async function captureClientHello(): Promise<Buffer> {
  return new Promise((resolve) => {
    const srv = createServer((s) => {
      s.once("data", (d: Buffer) => {
        resolve(d);
        s.destroy();
        srv.close();
      });
    });
    srv.listen(0, "127.0.0.1", () => {
      const t = tlsConnect({ host: "127.0.0.1", port: (srv.address() as { port: number }).port, servername: "localhost", ALPNProtocols: ["h2", "http/1.1"] });
      t.on("error", () => {});
    });
  });
}

function closed(s: Socket): Promise<number> {
  const start = Date.now();
  return new Promise((resolve) => {
    if (s.destroyed) resolve(0);
    s.on("error", () => {});
    s.once("close", () => resolve(Date.now() - start));
    s.resume();
  });
}

async function curlOk(): Promise<void> {
  const r = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, `https://localhost:${good.port}/hello`]);
  expect(r.stdout).toContain("hello from origin");
}

beforeAll(async () => {
  h = await startHarness({ proxy: { limits: LIMITS } });
  good = await startOrigin({ cert: h.pki.good });
  root = await h.rootFile();
  clientHello = await captureClientHello();
});

afterAll(async () => {
  await h?.close();
  await good?.close();
});

describe("bad clients", () => {
  it("survives every kind of bad client, and file descriptors return to the baseline", async () => {
    // Warm up: agent channel, leaf cache, origin sessions, curl once.
    await curlOk();
    await waitFor(() => (h.proxy.openConnections === 0 ? true : undefined), 10_000, "curl's connection to close");
    const baseline = await fdCount();

    // 1. TLS-looking garbage after the CONNECT: closed, logged.
    {
      const { socket } = await connectTunnel(h.port, `localhost:${good.port}`);
      socket.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x08, 0x02, 0, 0, 4, 1, 2, 3, 4]));
      await closed(socket);
      const rec = await h.log.waitFor((r) => r.rule === "client-hello");
      expect(rec.error).toContain("bad clienthello");
    }
    // 2. Non-TLS garbage (not HTTP) to a TLS origin: refused.
    {
      const { socket } = await connectTunnel(h.port, `localhost:${good.port}`);
      socket.write("\x00\x01garbage garbage garbage\r\n\r\n");
      await closed(socket);
    }
    // 3. Half a ClientHello, then gone.
    {
      const { socket } = await connectTunnel(h.port, `localhost:${good.port}`);
      socket.write(clientHello.subarray(0, 60));
      socket.destroy();
    }
    // 4. A whole ClientHello, then gone before finishing the handshake.
    {
      const { socket } = await connectTunnel(h.port, `localhost:${good.port}`);
      socket.write(clientHello);
      // The proxy's first handshake flight: it read the ClientHello and is mid-handshake.
      const flight = new Promise((r) => socket.once("data", r));
      socket.resume();
      await flight;
      socket.destroy();
    }
    // 5. Gone in the middle of an upload.
    {
      const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
      t.write(`POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n`);
      // Flushed to the kernel before the close, so the proxy reads the partial body, then the end.
      await new Promise((r) => t.write(Buffer.alloc(20_000, 0x41), r));
      t.destroy();
    }
    // 6. Gone in the middle of a download.
    {
      const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
      t.write(`GET /big?n=5000000 HTTP/1.1\r\nHost: localhost\r\n\r\n`);
      await new Promise((r) => t.once("data", r));
      t.destroy();
    }
    // 7. Oversized headers, to the proxy and inside a tunnel: 431, then closed.
    {
      const s = netConnect({ host: "127.0.0.1", port: h.port });
      s.write(`GET http://localhost:${good.port}/ HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(20_000)}\r\n\r\n`);
      let got = "";
      s.on("data", (d: Buffer) => (got += d.toString()));
      await closed(s);
      expect(got).toMatch(/^HTTP\/1.1 431/);
      const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
      t.write(`GET /hello HTTP/1.1\r\nHost: localhost\r\nX-Big: ${"a".repeat(20_000)}\r\n\r\n`);
      let inner = "";
      t.on("data", (d: Buffer) => (inner += d.toString()));
      await new Promise((r) => t.once("close", r));
      expect(inner).toMatch(/^HTTP\/1.1 431/);
    }
    // 8. Slow clients: each is cut off by its timeout.
    {
      const idle = netConnect({ host: "127.0.0.1", port: h.port }); // says nothing at all
      const slowHeaders = netConnect({ host: "127.0.0.1", port: h.port });
      slowHeaders.write("GET http://localhost/ HTTP/1.1\r\nHost: x\r\n"); // never finishes its head
      const { socket: silentTunnel } = await connectTunnel(h.port, `localhost:${good.port}`); // no ClientHello
      const { socket: stalledTls } = await connectTunnel(h.port, `localhost:${good.port}`);
      stalledTls.write(clientHello); // and never answers the server's flight
      const times = await Promise.all([closed(idle), closed(slowHeaders), closed(silentTunnel), closed(stalledTls)]);
      for (const t of times) expect(t).toBeLessThan(5000);
      const rec = await h.log.waitFor((r) => r.rule === "client-hello" && (r.error ?? "").includes("timeout"));
      expect(rec.decision).toBe("no-request");
    }

    // Still serving.
    await curlOk();
    // Descriptors back to the baseline once the last connections are gone.
    let now = await fdCount();
    for (let i = 0; i < 60 && now > baseline; i++) {
      await new Promise((r) => setTimeout(r, 100));
      now = await fdCount();
    }
    expect(now).toBeLessThanOrEqual(baseline);
    expect(h.proxy.socketsHeld).toBe(0);
  });

  it("keeps no memory from bad clients: the heap after GC stays flat across rounds of them", async () => {
    // A collectable heap reading: expose gc to this process (the proxy runs in it).
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as () => void;
    const heapAfterGc = async (): Promise<number> => {
      await new Promise((r) => setTimeout(r, 50));
      for (let i = 0; i < 3; i++) gc();
      const m = process.memoryUsage();
      return m.heapUsed + m.external; // buffers live outside the JS heap
    };
    /** One round: 40 bad clients of four kinds, each gone before it finished. */
    const round = async (): Promise<void> => {
      for (let i = 0; i < 10; i++) {
        const a = await connectTunnel(h.port, `localhost:${good.port}`);
        a.socket.write(clientHello.subarray(0, 60));
        a.socket.destroy();
        const b = await connectTunnel(h.port, `localhost:${good.port}`);
        b.socket.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x08, 0x02, 0, 0, 4, 1, 2, 3, 4]));
        await closed(b.socket);
        const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
        t.write(`POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n`);
        t.write(Buffer.alloc(10_000, 0x41));
        t.destroy();
        const s = netConnect({ host: "127.0.0.1", port: h.port });
        s.write(`GET http://localhost:${good.port}/ HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(20_000)}\r\n\r\n`);
        await closed(s);
      }
      for (let i = 0; i < 50 && h.proxy.socketsHeld > 0; i++) await new Promise((r) => setTimeout(r, 50));
    };
    await round(); // warm-up: caches, sessions, JIT
    const heaps: number[] = [];
    for (let r = 0; r < 3; r++) {
      await round();
      heaps.push(await heapAfterGc());
    }
    expect(h.proxy.socketsHeld).toBe(0);
    // 120 bad clients after the warm-up: a leak of even 20 KiB each would add ~2.4 MiB.
    expect(heaps[2]! - heaps[0]!, `heap after GC per round: ${heaps.map((x) => (x / 1048576).toFixed(1)).join(", ")} MiB`).toBeLessThan(1.5 * 1024 * 1024);
  });

  for (const [name, path, body] of [["upload", "/upload", true], ["download", "/big?n=5000000", false]] as const) {
    it(`a client gone mid-${name} is cleaned up at once`, async () => {
      const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme") });
      if (body) {
        t.write(`POST ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n`);
        // Flushed to the kernel before the close, so the proxy reads the partial body, then the end.
        await new Promise((r) => t.write(Buffer.alloc(20_000, 0x41), r));
      } else {
        t.write(`GET ${path} HTTP/1.1\r\nHost: localhost\r\n\r\n`);
        await new Promise((r) => t.once("data", r));
      }
      t.destroy();
      const start = Date.now();
      while (h.proxy.socketsHeld > 0 && Date.now() - start < 3000) await new Promise((r) => setTimeout(r, 20));
      expect(h.proxy.socketsHeld).toBe(0);
    });
  }
});

describe("idle HTTP/2 connections", () => {
  /** One GET on the session; the status and body. */
  const get = (session: ClientHttp2Session, path: string): Promise<{ status: number; body: string }> =>
    new Promise((resolve, reject) => {
      const req = session.request({ ":path": path });
      let status = 0;
      let body = "";
      req.on("response", (hd) => (status = Number(hd[":status"])));
      req.on("data", (c: Buffer) => (body += c.toString()));
      req.on("end", () => resolve({ status, body }));
      req.on("error", reject);
    });

  it("closes the origin side of an idle connection, keeps the client's open, and reopens it on the next request", async () => {
    const before = good.openConnections;
    const t = await tlsViaProxy(h.port, "localhost", good.port, { ca: h.agent.rootPem("acme"), alpn: ["h2"] });
    expect(t.alpnProtocol).toBe("h2");
    const session = h2connect("https://localhost", { createConnection: () => t });
    session.on("error", () => {});
    try {
      expect(await get(session, "/hello")).toEqual({ status: 200, body: expect.stringContaining("hello from origin") as string });
      expect(good.openConnections).toBe(before + 1);
      // Idle past originIdleTimeoutMs (300 ms), well before idleTimeoutMs (1500 ms): the origin side goes.
      await waitFor(() => (good.openConnections === before ? true : undefined), 5_000, "the idle origin connection to close");
      expect(session.closed || session.destroyed).toBe(false);
      expect(t.destroyed).toBe(false);
      // The next request opens (and verifies) a new origin connection on the same client connection.
      expect(await get(session, "/hello")).toEqual({ status: 200, body: expect.stringContaining("hello from origin") as string });
      expect(good.openConnections).toBe(before + 1);
    } finally {
      session.destroy();
    }
  });
});
