/**
 * Cleartext inside a CONNECT (`curl -p`, any client that tunnels http://): HTTP is inspected
 * exactly as a plain proxy request is (block rules, EICAR, one access log line per request);
 * other cleartext is refused unless a bypass rule or `nonTls: "tunnel"` lets it through.
 */
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { createServer as createNetServer, type Server as NetServer } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EICAR } from "../../../src/proxy/eicar.js";
import { connectTunnel, run, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let origin: HttpServer;
let originPort = 0;
let echo: NetServer;
let echoPort = 0;
/** Requests the plain HTTP origin served, by path. */
const served: string[] = [];

const POLICY = { blockUrls: [{ name: "no-admin", pattern: "*/admin*" }] };

beforeAll(async () => {
  h = await startHarness({ policy: POLICY });
  origin = createHttpServer((req, res) => {
    served.push(req.url ?? "");
    if (req.url === "/eicar") res.end(EICAR);
    else res.end(`hello ${req.url}`);
  });
  await new Promise<void>((r) => origin.listen(0, "127.0.0.1", r));
  originPort = (origin.address() as { port: number }).port;
  echo = createNetServer((s) => s.pipe(s));
  await new Promise<void>((r) => echo.listen(0, "127.0.0.1", r));
  echoPort = (echo.address() as { port: number }).port;
});

afterAll(async () => {
  origin?.closeAllConnections();
  await new Promise((r) => origin?.close(r));
  await new Promise((r) => echo?.close(r));
  await h?.close();
});

/** curl through a CONNECT tunnel (-p) to a plain http:// URL. */
function curlTunnel(path: string) {
  return run("curl", ["-sS", "-p", "--suppress-connect-headers", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "-i", `http://localhost:${originPort}${path}`]);
}

describe("cleartext HTTP inside a CONNECT is inspected", () => {
  it("a clean request passes and is logged per request, as http/1.1", async () => {
    const r = await curlTunnel("/hello");
    expect(r.stdout).toMatch(/^HTTP\/1.1 200 /);
    expect(r.stdout).toContain("hello /hello");
    const rec = await h.log.waitFor((x) => x.path === "/hello" && x.method === "GET");
    expect(rec).toMatchObject({ decision: "allow", status: 200, proto: "http/1.1", host: "localhost", tenant: "acme" });
  });

  it("the EICAR file is refused with 403 and never reaches the client", async () => {
    const r = await curlTunnel("/eicar");
    expect(r.stdout).toMatch(/^HTTP\/1.1 403 /);
    expect(r.stdout).not.toContain(EICAR.toString("latin1"));
    const rec = await h.log.waitFor((x) => x.path === "/eicar");
    expect(rec).toMatchObject({ decision: "block", rule: "eicar", status: 403 });
  });

  it("a URL a blockUrls rule names is refused with 403 before it reaches the origin", async () => {
    const before = served.length;
    const r = await curlTunnel("/admin/users");
    expect(r.stdout).toMatch(/^HTTP\/1.1 403 /);
    expect(r.stdout).toContain("block-url:no-admin");
    expect(served.slice(before)).not.toContain("/admin/users");
    const rec = await h.log.waitFor((x) => x.path === "/admin/users");
    expect(rec).toMatchObject({ decision: "block", rule: "block-url:no-admin", status: 403 });
  });

  it("several requests on one tunnel are each inspected", async () => {
    const { socket, status } = await connectTunnel(h.port, `localhost:${originPort}`);
    expect(status).toBe(200);
    let text = "";
    socket.on("data", (d: Buffer) => (text += d.toString("latin1")));
    socket.resume();
    socket.write(`GET /one HTTP/1.1\r\nHost: localhost:${originPort}\r\n\r\n`);
    socket.write(`GET /admin HTTP/1.1\r\nHost: localhost:${originPort}\r\nConnection: close\r\n\r\n`);
    await new Promise((r) => socket.once("close", r));
    expect(text).toContain("hello /one");
    expect(text).toMatch(/HTTP\/1.1 403 /);
    await h.log.waitFor((x) => x.path === "/admin" && x.rule === "block-url:no-admin");
  });
});

describe("cleartext that is not HTTP", () => {
  it("is refused by default (closed, logged as a block)", async () => {
    const { socket, status } = await connectTunnel(h.port, `localhost:${echoPort}`);
    expect(status).toBe(200);
    let got = "";
    socket.on("data", (d: Buffer) => (got += d.toString()));
    socket.resume();
    socket.write("SSH-2.0-hello\r\n");
    await new Promise((r) => socket.once("close", r));
    expect(got).toBe("");
    const rec = await h.log.waitFor((x) => x.path === `localhost:${echoPort}` && x.rule === "non-tls");
    expect(rec).toMatchObject({ decision: "block", method: "CONNECT" });
  });
});
