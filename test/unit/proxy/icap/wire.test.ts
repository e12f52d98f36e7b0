import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../../src/common/errors.js";
import { parseOptions, transferOf } from "../../../../src/proxy/icap/service.js";
import { findingOf, formatHttpRequestHead, formatIcapRequest, HeadReader, parseIcapResponse, parseIcapUrl } from "../../../../src/proxy/icap/wire.js";

describe("parseIcapUrl", () => {
  it("takes host, port (1344 by default) and the service path with its query", () => {
    expect(parseIcapUrl("icap://127.0.0.1:11344/avscan?allow204=on", "f")).toEqual({ host: "127.0.0.1", port: 11344, authority: "127.0.0.1:11344", href: "icap://127.0.0.1:11344/avscan?allow204=on" });
    expect(parseIcapUrl("icap://[::1]/srv", "f")).toMatchObject({ host: "::1", port: 1344, authority: "[::1]:1344" });
  });

  it.each([
    ["not icap", "http://x/y", "must be an icap:// url"],
    ["no service", "icap://host:1344/", "names no service"],
    ["credentials", "icap://u:p@host/srv", "must not carry credentials"],
    ["not a string", 5, "must be an icap:// url"],
  ])("refuses %s, naming the field", (_n, url, message) => {
    expect(() => parseIcapUrl(url, "policy.icap.respmod.url")).toThrow(InvalidArgument);
    expect(() => parseIcapUrl(url, "policy.icap.respmod.url")).toThrow(`policy.icap.respmod.url: `);
    expect(() => parseIcapUrl(url, "policy.icap.respmod.url")).toThrow(message);
  });
});

describe("request formatting", () => {
  it("encapsulates the request and response heads with their offsets, Allow 204 and the preview", () => {
    const reqHdr = formatHttpRequestHead("GET", "/a", [["Host", "o.example"]]);
    const resHdr = Buffer.from("HTTP/1.1 200 OK\r\n\r\n");
    const text = formatIcapRequest({ method: "RESPMOD", url: parseIcapUrl("icap://i:1/s", "f"), reqHdr, resHdr, body: true, preview: 1024 }).toString();
    expect(text).toBe(
      "RESPMOD icap://i:1/s ICAP/1.0\r\nHost: i:1\r\nAllow: 204\r\nPreview: 1024\r\n" +
        `Encapsulated: req-hdr=0, res-hdr=${reqHdr.length}, res-body=${reqHdr.length + resHdr.length}\r\n\r\n` +
        "GET /a HTTP/1.1\r\nHost: o.example\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    );
  });

  it("withholds credentials and cookies from the service", () => {
    const h = formatHttpRequestHead("POST", "/u", [["Host", "o"], ["Authorization", "Bearer t0ken"], ["Cookie", "sid=1"], ["X-Ok", "1"]]).toString();
    expect(h).not.toMatch(/t0ken|sid=1/);
    expect(h).toContain("X-Ok: 1");
  });
});

describe("response parsing", () => {
  const c_icap_200 =
    'ICAP/1.0 200 OK\r\nServer: C-ICAP/0.5.10\r\nConnection: keep-alive\r\nISTag: "CI0001-x"\r\n' +
    "X-Infection-Found: Type=0; Resolution=2; Threat=Kmi.Test.Marker.UNOFFICIAL;\r\n" +
    "X-Violations-Found: 1\r\n\t-\r\n\tKmi.Test.Marker.UNOFFICIAL\r\n\t0\r\n\t0\r\nEncapsulated: res-hdr=0, res-body=161\r\n\r\nHTTP/1.0 403";

  it("reads a head split anywhere, folded lines included, leaving the encapsulated bytes", () => {
    const bytes = Buffer.from(c_icap_200);
    for (const cut of [1, 20, 100, bytes.indexOf("\r\n\r\n") + 2]) {
      const r = new HeadReader();
      expect(r.push(bytes.subarray(0, cut))).toBeUndefined();
      const head = r.push(bytes.subarray(cut))!;
      expect(head.status).toBe(200);
      expect(head.headers.get("x-violations-found")).toBe("1 - Kmi.Test.Marker.UNOFFICIAL 0 0");
      expect(r.pending).toBe("HTTP/1.0 403".length);
    }
  });

  it("names the threat of X-Infection-Found, else of X-Violations-Found, else says modified", () => {
    expect(findingOf(parseIcapResponse(c_icap_200.split("\r\n\r\n")[0]!))).toEqual({ kind: "infection", threat: "Kmi.Test.Marker.UNOFFICIAL" });
    expect(findingOf(parseIcapResponse("ICAP/1.0 200 OK\r\nX-Violations-Found: 1\r\n\tf\r\n\tPolicy.X\r\n\t0\r\n\t0"))).toEqual({ kind: "violation", threat: "Policy.X" });
    expect(findingOf(parseIcapResponse("ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0"))).toEqual({ kind: "modified" });
  });

  it("refuses what is not ICAP, and an endless head", () => {
    expect(() => parseIcapResponse("HTTP/1.1 200 OK")).toThrow("not an ICAP response");
    expect(() => new HeadReader().push(Buffer.alloc(70 * 1024, 0x61))).toThrow("larger than");
  });
});

describe("OPTIONS", () => {
  const o = parseOptions(
    parseIcapResponse('ICAP/1.0 200 OK\r\nMethods: RESPMOD, REQMOD\r\nISTag: "CI0001-x"\r\nTransfer-Preview: *\r\nTransfer-Ignore: jpg, mp4\r\nTransfer-Complete: exe\r\nOptions-TTL: 60\r\nPreview: 1024\r\nAllow: 204\r\nMax-Connections: 8'),
    1000,
  );

  it("reads methods, preview, ISTag, TTL, Allow 204 and Max-Connections", () => {
    expect(o).toMatchObject({ preview: 1024, istag: "CI0001-x", allow204: true, maxConnections: 8, expires: 61_000 });
    expect([...o.methods]).toEqual(["RESPMOD", "REQMOD"]);
  });

  it.each([
    ["/a/file.bin", { kind: "send", preview: 1024 }],
    ["/a/photo.JPG?x=1", { kind: "ignore" }],
    ["/setup.exe", { kind: "send", preview: undefined }],
    ["/no-extension", { kind: "send", preview: 1024 }],
  ])("Transfer-* for %s", (path, t) => {
    expect(transferOf(o, path)).toEqual(t);
  });

  it("an OPTIONS answer other than 200 is an error", () => {
    expect(() => parseOptions(parseIcapResponse("ICAP/1.0 404 Service not found"), 0)).toThrow("404");
  });
});
