/**
 * The access log file has a request's line by the time the client has its response: what a
 * script does with `curl …; tail -n 1 access.log`. Real curl against the proxy, the log read as
 * soon as curl exits, for every kind of exchange (HTTPS over h1 and h2, plain http, a block
 * page, a body that streams past the scan cap, a refused CONNECT).
 */
import { readFileSync } from "node:fs";
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { run, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
let plain: HttpServer;
let plainPort = 0;
let logFile = "";
let root = "";

beforeAll(async () => {
  const { mkdtemp } = await import("node:fs/promises");
  const { tmpdir } = await import("node:os");
  logFile = join(await mkdtemp(join(tmpdir(), "kmi-proxy-log-")), "access.log");
  h = await startHarness({ policy: { blockUrls: ["*/blocked*"] }, proxy: { accessLog: logFile } });
  good = await startOrigin({ cert: h.pki.good });
  plain = createHttpServer((req, res) => res.end(`plain ${req.url}`));
  await new Promise<void>((r) => plain.listen(0, "127.0.0.1", r));
  plainPort = (plain.address() as { port: number }).port;
  root = await h.rootFile();
});

afterAll(async () => {
  plain?.closeAllConnections();
  await new Promise((r) => plain?.close(r));
  await good?.close();
  await h?.close();
});

function lastLine(): Record<string, unknown> {
  const lines = readFileSync(logFile, "utf8").trimEnd().split("\n");
  return JSON.parse(lines.at(-1)!) as Record<string, unknown>;
}

const curl = (...args: string[]) => run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, ...args]);

describe("the access log line is in the file when curl returns", () => {
  it.each([
    ["https over http/1.1", (i: number) => ["--http1.1", `https://localhost:${good.port}/h1-${i}`], (i: number) => `/h1-${i}`],
    ["https over h2", (i: number) => ["--http2", `https://localhost:${good.port}/h2-${i}`], (i: number) => `/h2-${i}`],
    ["plain http", (i: number) => [`http://localhost:${plainPort}/plain-${i}`], (i: number) => `/plain-${i}`],
    ["http inside a CONNECT", (i: number) => ["-p", `http://localhost:${plainPort}/tunnel-${i}`], (i: number) => `/tunnel-${i}`],
    ["a block page", (i: number) => [`https://localhost:${good.port}/blocked-${i}`], (i: number) => `/blocked-${i}`],
    // Past the scan cap (1 MiB) the body streams: its last bytes still wait for the line.
    ["a body over the scan cap, over http/1.1", (i: number) => ["--http1.1", "-o", "/dev/null", `https://localhost:${good.port}/big-h1-${i}?n=1500000`], (i: number) => `/big-h1-${i}?`],
    ["a body over the scan cap, over h2", (i: number) => ["--http2", "-o", "/dev/null", `https://localhost:${good.port}/big-h2-${i}?n=1500000`], (i: number) => `/big-h2-${i}?`],
  ])("%s: tail -n 1 reads this request's line, every time", async (_name, args, path) => {
    for (let i = 0; i < 8; i++) {
      const r = await curl(...args(i));
      expect(r.code, r.stderr).toBe(0);
      expect(lastLine()).toMatchObject({ path: path(i) });
    }
  });

  it("a CONNECT refused before the 200: its line is there too", async () => {
    const r = await curl(`https://127.0.0.2:1/`);
    expect(r.code).not.toBe(0);
    expect(lastLine()).toMatchObject({ method: "CONNECT", path: "127.0.0.2:1" });
  });
});
