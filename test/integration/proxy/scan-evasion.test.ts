/**
 * The built-in EICAR scan against a hostile origin: the codings a client decodes are the ones
 * the scan decodes (a Content-Encoding split over two header lines, `gzip, identity`, raw
 * deflate under `deflate`), and an encoded body that decodes to nothing is still held no
 * longer than the hold bound (`maxBodyBytes` of what arrives), whatever `holdMs` says.
 */
import { createServer, type Server } from "node:https";
import type { IncomingMessage, ServerResponse } from "node:http";
import { request as httpRequest } from "node:http";
import type { AddressInfo } from "node:net";
import { deflateRawSync, gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EICAR } from "../../../src/proxy/eicar.js";
import { run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let origin: Server;
let port: number;
let root: string;
const MAX = 64 * 1024;
const hanging: ServerResponse[] = [];

function route(req: IncomingMessage, res: ServerResponse): void {
  const path = req.url ?? "/";
  if (path === "/two-lines") {
    // Two header lines: a client reads them as one list, "identity, gzip", and decodes gzip.
    res.setHeader("content-encoding", ["identity", "gzip"]);
    res.end(gzipSync(EICAR));
  } else if (path === "/gzip-identity") {
    res.setHeader("content-encoding", "gzip, identity");
    res.end(gzipSync(EICAR));
  } else if (path === "/raw-deflate") {
    // "deflate" without the zlib wrapper: what some servers send, and what browsers and curl decode.
    res.setHeader("content-encoding", "deflate");
    res.end(deflateRawSync(EICAR));
  } else if (path === "/sse-attachment" || path === "/sse") {
    // The origin names the type: a "stream" it also offers as a download is a file.
    res.setHeader("content-type", "text/event-stream");
    if (path === "/sse-attachment") res.setHeader("content-disposition", 'attachment; filename="setup.exe"');
    res.end(EICAR);
  } else if (path === "/endless-name") {
    // A gzip header whose FNAME never ends: it decodes to nothing, however much of it comes.
    res.setHeader("content-encoding", "gzip");
    res.setHeader("content-type", "application/octet-stream");
    res.write(Buffer.from([0x1f, 0x8b, 8, 0x08, 0, 0, 0, 0, 0, 3]));
    const piece = Buffer.alloc(16 * 1024, 0x61);
    for (let i = 0; i < (4 * MAX) / piece.length; i++) res.write(piece);
    hanging.push(res);
  } else {
    res.writeHead(404);
    res.end();
  }
}

beforeAll(async () => {
  h = await startHarness({ policy: { scan: { eicar: true, maxBodyBytes: MAX, holdMs: 0 } } });
  origin = createServer({ cert: h.pki.good.cert, key: h.pki.good.key }, route);
  await new Promise<void>((r) => origin.listen(0, "127.0.0.1", r));
  port = (origin.address() as AddressInfo).port;
  root = await h.rootFile();
});

afterAll(async () => {
  for (const r of hanging) r.destroy();
  origin?.closeAllConnections();
  origin?.close();
  await h?.close();
});

function curl(path: string, ...extra: string[]) {
  return run("curl", ["-sS", "--suppress-connect-headers", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, "--compressed", "-i", ...extra, `https://localhost:${port}${path}`]);
}

describe("EICAR in a coding the client decodes", () => {
  it.each([
    ["gzip named on two Content-Encoding lines (identity, then gzip)", "/two-lines"],
    ["gzip, identity", "/gzip-identity"],
    ["raw deflate under Content-Encoding: deflate", "/raw-deflate"],
  ])("%s: blocked, never decoded by the client", async (_n, path) => {
    const r = await curl(path, "--http1.1");
    expect(r.stdout).not.toContain("EICAR-STANDARD");
    expect(r.stdout).toMatch(/^HTTP\/1.1 403/);
    const rec = await h.log.waitFor((x) => x.path === path);
    expect(rec).toMatchObject({ decision: "block", rule: "eicar" });
  });
});

describe("a body typed as a stream", () => {
  it("offered as a download (Content-Disposition: attachment) is held and scanned like a file: a 403 page, no headers of the origin's", async () => {
    const r = await curl("/sse-attachment", "--http1.1");
    expect(r.stdout).toMatch(/^HTTP\/1.1 403/);
    expect(r.stdout).not.toContain("EICAR-STANDARD");
    expect(await h.log.waitFor((x) => x.path === "/sse-attachment")).toMatchObject({ decision: "block", rule: "eicar" });
  });

  it("a live one (no attachment) is not held but scanned as it passes: no page, the transfer is cut at the hit", async () => {
    const r = await curl("/sse", "--http1.1");
    expect(r.stdout).not.toMatch(/^HTTP\/1.1 403/);
    expect(r.stdout).not.toContain("EICAR-STANDARD");
    expect(await h.log.waitFor((x) => x.path === "/sse")).toMatchObject({ decision: "block", rule: "eicar" });
  });
});

describe("the hold bound of an encoded body", () => {
  it("a gzip body that decodes to nothing is released once maxBodyBytes of it arrived (holdMs 0 holds no more)", async () => {
    const socket = await tlsViaProxy(h.port, "localhost", port, { ca: h.agent.rootPem("acme") });
    const status = await new Promise<number>((resolve, reject) => {
      const req = httpRequest({ createConnection: () => socket, path: "/endless-name", headers: { host: "localhost" } });
      req.on("response", (res) => resolve(res.statusCode ?? 0));
      req.on("error", reject);
      setTimeout(() => reject(new Error("no response headers: the proxy holds the whole body")), 5000);
      req.end();
    }).finally(() => socket.destroy());
    expect(status).toBe(200);
  });
});
