/**
 * The ICAP client against a broken or hostile service (a scripted one on 127.0.0.1): every
 * way of not answering ends in a verdict under the fail mode within the read timeout, never a
 * hang: a head that never ends or is too large, a reset mid-answer, a service that stops
 * reading the body it asked for.
 */
import { createServer, type Server, type Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import type { BodyInspector, InspectionVerdict } from "../../../src/proxy/body-relay.js";
import { IcapPool } from "../../../src/proxy/icap/pool.js";
import { IcapService, type IcapServiceConfig } from "../../../src/proxy/icap/service.js";
import { formatHttpRequestHead, formatHttpResponseHead, parseIcapUrl } from "../../../src/proxy/icap/wire.js";

const OPTIONS = 'ICAP/1.0 200 OK\r\nMethods: RESPMOD\r\nISTag: "x"\r\nPreview: 10\r\nAllow: 204\r\nEncapsulated: null-body=0\r\n\r\n';

let server: Server | undefined;
let pool: IcapPool | undefined;
const sockets: Socket[] = [];

afterEach(() => {
  pool?.close();
  for (const s of sockets.splice(0)) s.destroy();
  server?.close();
});

/** A service that answers OPTIONS, then hands each RESPMOD's socket (once its preview is in) to `onPreview`. */
async function hostile(onPreview: (sock: Socket) => void): Promise<number> {
  server = createServer((sock) => {
    sockets.push(sock);
    sock.on("error", () => {});
    let buf = "";
    const onData = (d: Buffer): void => {
      buf += d.toString("latin1");
      if (buf.startsWith("OPTIONS") && buf.endsWith("\r\n\r\n")) {
        buf = "";
        sock.write(OPTIONS);
      } else if (buf.startsWith("RESPMOD") && /\r\n0(; ieof)?\r\n\r\n$/.test(buf)) {
        sock.off("data", onData);
        onPreview(sock);
      }
    };
    sock.on("data", onData);
  });
  await new Promise<void>((r) => server!.listen(0, "127.0.0.1", r));
  return (server.address() as { port: number }).port;
}

function inspector(port: number, failMode: "open" | "closed"): BodyInspector {
  const config: IcapServiceConfig = { name: "hostile", url: parseIcapUrl(`icap://127.0.0.1:${port}/x`, "url"), failMode, connectTimeoutMs: 2000, readTimeoutMs: 500, maxConnections: 2 };
  pool = new IcapPool({ host: "127.0.0.1", port, maxConnections: 2, connectTimeoutMs: 2000, idleTimeoutMs: 30_000 });
  const counters = { request: () => {}, roundTrips: () => {} };
  return new IcapService(config, pool, counters, createNopLogger()).inspector({
    method: "RESPMOD",
    reqHdr: formatHttpRequestHead("GET", "/f.bin", [["Host", "o.example"]]),
    resHdr: formatHttpResponseHead(200, "OK", [["Content-Type", "application/octet-stream"]]),
    path: "/f.bin",
  });
}

/** Feeds `size` bytes as a relay does (waiting for room), then ends; resolves with the verdict, or "hang" after `limitMs`. */
async function feed(insp: BodyInspector, size: number, limitMs = 5000): Promise<InspectionVerdict | "hang"> {
  const verdict = new Promise<InspectionVerdict>((resolve) => insp.onVerdict(resolve));
  let settled = false;
  void verdict.then(() => (settled = true));
  void (async () => {
    const piece = Buffer.alloc(64 * 1024, 0x61);
    for (let sent = 0; sent < size && !settled; sent += piece.length) {
      if (!insp.write(piece)) await new Promise<void>((r) => insp.onDrain(r));
    }
    if (!settled) insp.end();
  })();
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<"hang">((r) => (timer = setTimeout(() => r("hang"), limitMs)));
  const v = await Promise.race([verdict, hang]);
  clearTimeout(timer);
  if (v === "hang") insp.abort();
  return v;
}

describe("ICAP client against a hostile service", () => {
  it("a service that asks for the rest (100 Continue) and then stops reading it: fail mode after the read timeout, not a hang", async () => {
    const port = await hostile((sock) => {
      sock.write("ICAP/1.0 100 Continue\r\n\r\n");
      sock.pause();
    });
    // Far more than the socket buffers hold, so the client's writes must wait for the service.
    const v = await feed(inspector(port, "open"), 64 << 20);
    expect(v).not.toBe("hang");
    expect(v).toMatchObject({ kind: "pass", note: { result: "fail-open" } });
  });

  it.each([
    ["a head that never ends (slow drip)", (s: Socket) => {
      s.write("ICAP/1.0 204 No Content\r\n");
      const t = setInterval(() => s.write("X-Drip: 1\r\n"), 50);
      s.on("close", () => clearInterval(t));
    }],
    ["a head larger than 64 KiB", (s: Socket) => void s.write(`ICAP/1.0 204 No Content\r\nX-Big: ${"a".repeat(100_000)}\r\n\r\n`)],
    ["a malformed status line", (s: Socket) => void s.write("HTTP/1.1 204 No Content\r\n\r\n")],
    ["a reset mid-answer", (s: Socket) => {
      s.write("ICAP/1.0 204 No");
      setTimeout(() => s.resetAndDestroy(), 20);
    }],
  ])("%s: blocked under fail-closed", async (_n, answer) => {
    const port = await hostile(answer);
    const v = await feed(inspector(port, "closed"), 4096);
    expect(v).toMatchObject({ kind: "block", note: { result: "fail-closed" } });
  });
});
