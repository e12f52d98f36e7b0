import { createServer } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { beforeAll, describe, expect, it } from "vitest";
import { parseClientHello } from "../../../src/proxy/clienthello.js";

/** Captures the first bytes a TLS client sends. */
function capture(opts: { servername?: string; alpn?: string[] }): Promise<Buffer> {
  return new Promise((resolve) => {
    const srv = createServer((s) => {
      s.once("data", (d: Buffer) => {
        resolve(d);
        s.destroy();
        srv.close();
      });
    });
    srv.listen(0, "127.0.0.1", () => {
      const t = tlsConnect({ host: "127.0.0.1", port: (srv.address() as { port: number }).port, servername: opts.servername, ALPNProtocols: opts.alpn });
      t.on("error", () => {});
    });
  });
}

/** Re-frames a single-record ClientHello into records of at most `size` bytes of fragment. */
function fragment(hello: Buffer, size: number): Buffer {
  const body = hello.subarray(5);
  const parts: Buffer[] = [];
  for (let o = 0; o < body.length; o += size) {
    const frag = body.subarray(o, o + size);
    const head = Buffer.from([0x16, hello[1]!, hello[2]!, frag.length >> 8, frag.length & 0xff]);
    parts.push(head, frag);
  }
  return Buffer.concat(parts);
}

let withAll: Buffer;
let bare: Buffer;

beforeAll(async () => {
  withAll = await capture({ servername: "www.Example.com", alpn: ["h2", "http/1.1"] });
  bare = await capture({});
});

describe("parseClientHello", () => {
  it("reads SNI (lowercased) and the ALPN list in order from a real ClientHello", () => {
    const r = parseClientHello(withAll);
    expect(r).toEqual({ kind: "ok", hello: { serverName: "www.example.com", alpn: ["h2", "http/1.1"], legacyVersion: 0x0303 } });
  });

  it("a ClientHello without SNI or ALPN", () => {
    const r = parseClientHello(bare);
    expect(r.kind).toBe("ok");
    if (r.kind === "ok") {
      expect(r.hello.serverName).toBeUndefined();
      expect(r.hello.alpn).toEqual([]);
    }
  });

  it("says incomplete for every prefix, and parses once whole", () => {
    for (let n = 0; n < withAll.length; n++) expect(parseClientHello(withAll.subarray(0, n)).kind).toBe("incomplete");
    expect(parseClientHello(withAll).kind).toBe("ok");
  });

  it.each([1, 7, 100, 512])("reassembles a ClientHello fragmented into %i-byte records", (size) => {
    const framed = fragment(withAll, size);
    const r = parseClientHello(framed);
    expect(r.kind).toBe("ok");
    if (r.kind === "ok") expect(r.hello.serverName).toBe("www.example.com");
    expect(parseClientHello(framed.subarray(0, framed.length - 1)).kind).toBe("incomplete");
  });

  it("does not modify its input", () => {
    const copy = Buffer.from(withAll);
    parseClientHello(withAll);
    expect(withAll.equals(copy)).toBe(true);
  });

  it.each([
    ["plain HTTP", Buffer.from("GET / HTTP/1.1\r\n"), "not-tls"],
    ["SSH", Buffer.from("SSH-2.0-OpenSSH\r\n"), "not-tls"],
    ["a handshake record of another major version", Buffer.from([0x16, 0x02, 0x00, 0x00, 0x01]), "not-tls"],
    ["an empty record", Buffer.from([0x16, 0x03, 0x01, 0x00, 0x00]), "invalid"],
    ["a server hello", Buffer.from([0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]), "invalid"],
    ["a truncated hello body", Buffer.from([0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x03]), "invalid"],
    ["an oversized record length", Buffer.from([0x16, 0x03, 0x01, 0xff, 0xff]), "invalid"],
  ])("%s → %s", (_n, input, kind) => {
    expect(parseClientHello(input).kind).toBe(kind);
  });

  it("refuses a server name that is not a DNS name", () => {
    // Replace the SNI bytes with a name containing a slash (same length).
    const name = Buffer.from("www.example.com");
    const at = withAll.indexOf(Buffer.from("www.Example.com"));
    expect(at).toBeGreaterThan(0);
    const bad = Buffer.from(withAll);
    Buffer.from("www/example.com").copy(bad, at);
    expect(parseClientHello(bad)).toEqual({ kind: "invalid", reason: "clienthello: server name is not a dns name" });
    expect(name.length).toBe(15);
  });

  it("refuses a ClientHello longer than 64 KiB", () => {
    const huge = Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x02, 0x00, 0x00]);
    expect(parseClientHello(huge).kind).toBe("invalid");
  });
});
