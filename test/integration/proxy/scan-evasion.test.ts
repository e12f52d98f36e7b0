/**
 * The built-in EICAR scan against a hostile origin: the codings a client decodes are the ones
 * the scan decodes (a Content-Encoding split over two header lines, `gzip, identity`, raw
 * deflate under `deflate`).
 */
import { createServer, type Server } from "node:https";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { deflateRawSync, gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EICAR } from "../../../src/proxy/eicar.js";
import { run, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let origin: Server;
let port: number;
let root: string;
const MAX = 64 * 1024;

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
