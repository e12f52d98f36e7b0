/**
 * The ICAP client against a real c-icap (virus_scan over clamd): OPTIONS read and cached,
 * clean bodies answered 204, infected ones 200 with the threat named, bodies larger than the
 * preview streamed after 100 Continue, keep-alive connections reused, and a dead service
 * reported as an error (the caller's fail mode decides).
 */
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import type { BodyInspector, InspectionVerdict } from "../../../src/proxy/body-relay.js";
import { EICAR } from "../../../src/proxy/eicar.js";
import { IcapPool } from "../../../src/proxy/icap/pool.js";
import { IcapService, type IcapServiceConfig } from "../../../src/proxy/icap/service.js";
import { formatHttpRequestHead, formatHttpResponseHead, parseIcapUrl } from "../../../src/proxy/icap/wire.js";
import { MARKER, MARKER_THREAT, startIcapPeer, type IcapPeer } from "../../fixtures/icap/c-icap.js";

let peer: IcapPeer;
beforeAll(async () => {
  peer = await startIcapPeer();
});
afterAll(async () => {
  await peer?.stop();
});

function counters() {
  const c = { requests: [] as string[], trips: 0 };
  return { c, counters: { request: (_s: string, m: string, r: string) => c.requests.push(`${m}:${r}`), roundTrips: (_s: string, n: number) => (c.trips += n) } };
}

function service(failMode: "open" | "closed" = "closed", url = peer.url) {
  const config: IcapServiceConfig = { name: "clamav", url: parseIcapUrl(url, "url"), failMode, connectTimeoutMs: 2000, readTimeoutMs: 20_000, maxConnections: 4 };
  const pool = new IcapPool({ host: config.url.host, port: config.url.port, maxConnections: 4, connectTimeoutMs: 2000, idleTimeoutMs: 30_000 });
  const { c, counters: k } = counters();
  return { svc: new IcapService(config, pool, k, createNopLogger()), pool, c };
}

/** Feeds `body` in `chunk`-byte pieces (honouring backpressure) and resolves with the verdict. */
async function scan(insp: BodyInspector, body: Buffer, chunk = 16 * 1024): Promise<InspectionVerdict> {
  const verdict = new Promise<InspectionVerdict>((resolve) => insp.onVerdict(resolve));
  let settled = false;
  void verdict.then(() => (settled = true));
  for (let i = 0; i < body.length && !settled; i += chunk) {
    if (!insp.write(body.subarray(i, i + chunk))) await new Promise<void>((r) => insp.onDrain(r));
  }
  if (!settled) insp.end();
  return verdict;
}

function respmod(svc: IcapService, path = "/file.bin") {
  return svc.inspector({
    method: "RESPMOD",
    reqHdr: formatHttpRequestHead("GET", path, [["Host", "origin.example"]]),
    resHdr: formatHttpResponseHead(200, "OK", [["Content-Type", "application/octet-stream"]]),
    path,
  });
}

describe("ICAP client against c-icap", () => {
  it("reads the service's OPTIONS: methods, preview, ISTag, Allow 204", async () => {
    const { svc } = service();
    const o = await svc.options();
    expect([...o.methods].sort()).toEqual(["REQMOD", "RESPMOD"]);
    expect(o.preview).toBe(1024);
    expect(o.allow204).toBe(true);
    expect(o.istag).toMatch(/^CI0001-/);
    expect(o.transferPreview).toEqual(["*"]);
    expect(await svc.options()).toBe(o);
  });

  it.each([
    ["a small clean body (inside the preview)", () => Buffer.from("hello, clean world\n"), "clean"],
    ["a 3 MiB clean body (streamed past the preview)", () => randomBytes(3 << 20), "clean"],
    ["the EICAR file", () => EICAR, "infection"],
    ["a 3 MiB body with the marker at its end", () => Buffer.concat([randomBytes(3 << 20), MARKER]), "infection"],
    ["a body known by its MD5", () => peer.hashedBody, "infection"],
  ])("%s → %s", async (_n, body, result) => {
    const { svc, c } = service();
    const v = await scan(respmod(svc), body());
    expect(v.note.result).toBe(result);
    expect(v.kind).toBe(result === "clean" ? "pass" : "block");
    expect(c.requests).toEqual([`RESPMOD:${result}`]);
  });

  it("names the threat and rule of a finding", async () => {
    const { svc } = service();
    const v = await scan(respmod(svc), Buffer.concat([Buffer.from("prefix "), MARKER]));
    expect(v).toMatchObject({ kind: "block", rule: "icap:clamav", note: { service: "clamav", result: "infection", threat: MARKER_THREAT } });
  });

  it("REQMOD: an upload with the marker is found", async () => {
    const { svc } = service();
    const insp = svc.inspector({ method: "REQMOD", reqHdr: formatHttpRequestHead("POST", "/upload", [["Host", "origin.example"], ["Content-Type", "application/octet-stream"]]), path: "/upload" });
    const v = await scan(insp, Buffer.concat([randomBytes(5000), MARKER]));
    expect(v.note.result).toBe("infection");
  });

  it("a transaction the relay abandons is neither a verdict nor an error, and its connection is closed", async () => {
    const { svc, pool, c } = service();
    await svc.options();
    const insp = respmod(svc);
    let called = false;
    insp.onVerdict(() => (called = true));
    insp.write(randomBytes(5000));
    await new Promise((r) => setTimeout(r, 100));
    insp.abort();
    await new Promise((r) => setTimeout(r, 200));
    expect(called).toBe(false);
    expect(c.requests).toEqual([]);
    expect(pool.size).toBe(0);
    pool.close();
  });

  it("reuses one keep-alive connection for sequential transactions", async () => {
    const { svc, pool, c } = service();
    for (let i = 0; i < 5; i++) expect((await scan(respmod(svc), randomBytes(4000))).note.result).toBe("clean");
    expect(pool.size).toBe(1);
    // OPTIONS once, then preview + final answer per body larger than the preview.
    expect(c.trips).toBe(1 + 5 * 2);
    pool.close();
  });

  it("a service that does not answer is an error: blocked when fail-closed, passed when fail-open", async () => {
    const dead = `icap://127.0.0.1:${await (await import("../../fixtures/mesh/processes.js")).freePort()}/avscan`;
    const closed = await scan(respmod(service("closed", dead).svc), Buffer.from("x"));
    expect(closed).toMatchObject({ kind: "block", rule: "icap-unavailable:clamav", note: { result: "fail-closed" } });
    const open = await scan(respmod(service("open", dead).svc), Buffer.from("x"));
    expect(open).toMatchObject({ kind: "pass", note: { result: "fail-open" } });
    expect(open.note.error).toContain("ECONNREFUSED");
  });

  it("a method the service does not offer is a failure under the fail mode (OPTIONS fetched, then cached)", async () => {
    const { createServer } = await import("node:net");
    // A minimal service that offers RESPMOD only: enough to see the client read Methods.
    const server = createServer((sock) => {
      sock.on("data", () => sock.write('ICAP/1.0 200 OK\r\nMethods: RESPMOD\r\nISTag: "x"\r\nEncapsulated: null-body=0\r\n\r\n'));
      sock.on("error", () => {});
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as { port: number }).port;
    try {
      const { svc } = service("closed", `icap://127.0.0.1:${port}/only-resp`);
      for (let i = 0; i < 2; i++) {
        const insp = svc.inspector({ method: "REQMOD", reqHdr: formatHttpRequestHead("POST", "/u", [["Host", "o"]]), path: "/u" });
        const v = await scan(insp, Buffer.from("body"));
        expect(v).toMatchObject({ kind: "block", note: { result: "fail-closed", error: "the icap service does not offer REQMOD (it offers RESPMOD)" } });
      }
    } finally {
      server.close();
    }
  });

  it("a kept-alive connection the server drops as the next request arrives is replaced once, transparently", async () => {
    const { createServer } = await import("node:net");
    let connections = 0;
    // A minimal service: OPTIONS, then one RESPMOD per connection (204); the next one on the same connection is dropped unanswered.
    const server = createServer((sock) => {
      connections++;
      let buf = "";
      let served = 0;
      sock.on("error", () => {});
      sock.on("data", (d) => {
        buf += d.toString("latin1");
        if (buf.startsWith("OPTIONS") && buf.endsWith("\r\n\r\n")) {
          buf = "";
          sock.write('ICAP/1.0 200 OK\r\nMethods: RESPMOD\r\nISTag: "x"\r\nPreview: 10\r\nAllow: 204\r\nEncapsulated: null-body=0\r\n\r\n');
        } else if (buf.startsWith("RESPMOD") && buf.endsWith("0; ieof\r\n\r\n")) {
          buf = "";
          if (served++ > 0) sock.destroy();
          else sock.write('ICAP/1.0 204 No Content\r\nISTag: "x"\r\nEncapsulated: null-body=0\r\n\r\n');
        }
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as { port: number }).port;
    const { svc, pool } = service("closed", `icap://127.0.0.1:${port}/s`);
    try {
      await svc.options();
      for (let i = 0; i < 3; i++) expect((await scan(respmod(svc), Buffer.from("tiny"))).note.result).toBe("clean");
      // OPTIONS and the first body on one connection; each later body found its idle connection dropped and took a new one.
      expect(connections).toBe(3);
    } finally {
      pool.close();
      server.close();
    }
  });

  it("a service that accepts but never answers times out (read timeout), under the fail mode", async () => {
    const { createServer } = await import("node:net");
    const held: import("node:net").Socket[] = [];
    const silent = createServer((s) => held.push(s));
    await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
    const port = (silent.address() as { port: number }).port;
    try {
      const config: IcapServiceConfig = { name: "silent", url: parseIcapUrl(`icap://127.0.0.1:${port}/x`, "url"), failMode: "closed", connectTimeoutMs: 2000, readTimeoutMs: 300, maxConnections: 2 };
      const pool = new IcapPool({ host: "127.0.0.1", port, maxConnections: 2, connectTimeoutMs: 2000, idleTimeoutMs: 30_000 });
      const v = await scan(respmod(new IcapService(config, pool, counters().counters, createNopLogger())), Buffer.from("x"));
      expect(v).toMatchObject({ kind: "block", note: { result: "fail-closed", error: "no answer from the icap server within 300 ms" } });
      pool.close();
    } finally {
      for (const s of held) s.destroy();
      silent.close();
    }
  });
});
