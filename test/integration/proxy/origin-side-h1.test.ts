/**
 * The origin side of an intercepted HTTP/1.1 connection (src/proxy/tunnel-origin.ts), driven
 * with curl through the real proxy: the connection made for the handshake serves the first
 * request; an origin connection that idled past --origin-idle-timeout-ms, or that the origin
 * closed, is replaced on the next request while the client's connection stays; HEAD, 103 Early
 * Hints, an origin that never answers, answers garbage, answers with a reason phrase a client may
 * not be sent, breaks off mid-body or answers before the upload ends; a client that leaves; a
 * WebSocket through the tunnel.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { decodeWsFrame, encodeWsFrame, startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let origin: Origin;
let root: string;

/** The client's keep-alive outlasts the origin side's idle time, so the two can be told apart. */
const LIMITS = { keepAliveTimeoutMs: 10_000, originIdleTimeoutMs: 500, idleTimeoutMs: 3000 };

beforeAll(async () => {
  h = await startHarness({ proxy: { limits: LIMITS } });
  // HTTP/1.1 only, so every connection through the proxy is an HTTP/1.1 one.
  origin = await startOrigin({ cert: h.pki.good, h2: false });
  root = await h.rootFile();
});

afterAll(async () => {
  await h?.close();
  await origin?.close();
});

const url = (path: string): string => `https://localhost:${origin.port}${path}`;
const proxyArgs = (): string[] => ["-sS", "--max-time", "15", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, "--http1.1"];
/** Each transfer's status and whether curl opened a connection for it (1) or reused one (0). */
const WRITE_OUT = ["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n"];

function lines(stdout: string): string[] {
  return stdout.trim().split("\n");
}

describe("the origin side of an intercepted HTTP/1.1 connection", () => {
  it("reuses the handshake's origin connection, and replaces one that idled past --origin-idle-timeout-ms while the client's stays", async () => {
    const before = origin.connections;
    // Three requests on one client connection, a second apart (the origin side idles out after 500 ms).
    const r = await run("curl", [...proxyArgs(), "--rate", "1/s", ...WRITE_OUT, url("/hello"), ...WRITE_OUT, url("/hello"), ...WRITE_OUT, url("/hello")]);
    expect(r.stderr).toBe("");
    expect(lines(r.stdout)).toEqual(["200 1", "200 0", "200 0"]);
    // One origin connection per request: the first made for the handshake, two replacing idle ones.
    expect(origin.connections - before).toBe(3);

    // Back to back, the one origin connection serves them all.
    const before2 = origin.connections;
    const quick = await run("curl", [...proxyArgs(), ...WRITE_OUT, url("/hello"), ...WRITE_OUT, url("/hello"), ...WRITE_OUT, url("/hello")]);
    expect(lines(quick.stdout)).toEqual(["200 1", "200 0", "200 0"]);
    expect(origin.connections - before2).toBe(1);
  });

  it("an origin that closes after its answer: the next request on the same client connection gets a new, verified origin connection", async () => {
    const before = origin.connections;
    const r = await run("curl", [...proxyArgs(), ...WRITE_OUT, url("/close"), ...WRITE_OUT, url("/hello"), ...WRITE_OUT, url("/close"), ...WRITE_OUT, url("/hello")]);
    expect(lines(r.stdout)).toEqual(["200 1", "200 0", "200 0", "200 0"]);
    expect(origin.connections - before).toBe(3);
    const logged = await h.log.waitFor((x) => x.path === "/close" && x.status === 200);
    expect(logged.decision).toBe("allow");
  });

  it("HEAD is answered without a body, and a GET after it on the same client connection works", async () => {
    const r = await run("curl", [...proxyArgs(), "-I", ...WRITE_OUT, url("/hello"), "--next", ...proxyArgs(), ...WRITE_OUT, url("/hello")]);
    expect(r.stderr).toBe("");
    expect(lines(r.stdout)).toEqual(["200 1", "200 0"]);
    const head = await h.log.waitFor((x) => x.method === "HEAD" && x.path === "/hello");
    expect(head).toMatchObject({ status: 200, bytes_down: 0, decision: "allow" });
  });

  it("relays the final answer after a 103 Early Hints, not the 103 itself", async () => {
    const r = await run("curl", [...proxyArgs(), "-v", url("/early-hints")]);
    expect(r.stdout).toBe("after early hints\n");
    // curl -v prints every status line it receives ("< HTTP/1.1 103 Early Hints" when one arrives).
    expect(r.stderr).toMatch(/< HTTP\/1\.1 200/);
    expect(r.stderr).not.toMatch(/< HTTP\/1\.1 103/);
  });

  it("an origin that never answers: a 502 page before --idle-timeout-ms closes the client's connection, logged as origin-error", async () => {
    const r = await run("curl", [...proxyArgs(), "-w", "\\n%{http_code}", url("/stall")]);
    expect(r.stdout.trim().split("\n").pop()).toBe("502");
    expect(r.stdout).toContain("did not answer in time");
    const rec = await h.log.waitFor((x) => x.path === "/stall");
    expect(rec).toMatchObject({ status: 502, decision: "error", rule: "origin-error" });
    expect(rec.error).toMatch(/did not answer in time \(UND_ERR_HEADERS_TIMEOUT\)/);
  });

  it("an origin that answers with a status line that does not parse: a 502 page naming the parser's complaint", async () => {
    const r = await run("curl", [...proxyArgs(), "-w", "\\n%{http_code}", url("/garbage")]);
    expect(r.stdout.trim().split("\n").pop()).toBe("502");
    const rec = await h.log.waitFor((x) => x.path === "/garbage");
    expect(rec).toMatchObject({ status: 502, decision: "error", rule: "origin-error" });
    expect(rec.error).toMatch(/HPE_INVALID_STATUS/);
    // The proxy still serves the next request.
    const ok = await run("curl", [...proxyArgs(), url("/hello")]);
    expect(ok.stdout).toContain("hello from origin over http/1.1");
  });

  it("an origin's reason phrase that is not printable ASCII: the client gets the standard one, and the proxy lives on", async () => {
    for (const path of ["/reason-latin1", "/reason-utf8"]) {
      const r = await run("curl", [...proxyArgs(), "-v", url(path)]);
      expect(r.stdout).toBe("ok\n");
      expect(r.stderr).toMatch(/< HTTP\/1\.1 200 OK\r?\n/);
      const head = await run("curl", [...proxyArgs(), "-I", "-w", "%{http_code}", "-o", "/dev/null", url(path)]);
      expect(head.stdout).toBe("200");
    }
    const ok = await run("curl", [...proxyArgs(), url("/hello")]);
    expect(ok.stdout).toContain("hello from origin over http/1.1");
  });

  it("a client that leaves before the answer is logged as such, not as the origin's failure", async () => {
    const path = `/stall?client-leaves-${Date.now()}`;
    const r = await run("curl", [...proxyArgs(), "--max-time", "0.5", url(path)]);
    expect(r.code).toBe(28);
    const rec = await h.log.waitFor((x) => x.path.startsWith("/stall?"));
    expect(rec).toMatchObject({ decision: "allow", status: 0 });
    expect(rec.rule).toBeUndefined();
    expect(rec.error).toBeUndefined();
  });

  it("an answer that breaks off mid-body: a 502 page while it was held, a cut transfer once it streamed; the log says why", async () => {
    const held = await run("curl", [...proxyArgs(), "-w", "\n%{http_code}", url("/cut")]);
    expect(held.stdout.trim().split("\n").pop()).toBe("502");
    expect(held.stdout).toContain("closed the connection");
    const rec = await h.log.waitFor((x) => x.path === "/cut");
    expect(rec).toMatchObject({ decision: "error", rule: "origin-error", status: 502 });
    expect(rec.error).toMatch(/closed the connection \(UND_ERR_SOCKET\)/);

    // Past the scan cap (1 MiB) the body was streaming: the client has the headers, and its transfer is cut.
    const streamed = await run("curl", [...proxyArgs(), "-o", "/dev/null", url("/cut-big")]);
    // 18: partial file (curl got fewer bytes than the Content-Length).
    expect(streamed.code).toBe(18);
    const rec2 = await h.log.waitFor((x) => x.path === "/cut-big");
    expect(rec2).toMatchObject({ decision: "error", rule: "origin-error", status: 200 });
    expect(rec2.error).toMatch(/closed the connection \(UND_ERR_SOCKET\)/);
  });

  it("an origin that answers before the upload ends: the client gets the answer, and its connection serves the next request", async () => {
    const dir = await mkdtemp(join(tmpdir(), "kmi-upload-"));
    try {
      const file = join(dir, "upload.bin");
      await writeFile(file, Buffer.alloc(4 << 20, 0x55));
      const r = await run("curl", [...proxyArgs(), "--data-binary", `@${file}`, ...WRITE_OUT, url("/answer-early"), "--next", ...proxyArgs(), ...WRITE_OUT, url("/hello")]);
      const [first, second] = lines(r.stdout);
      expect(first).toMatch(/^413 1$/);
      expect(second).toMatch(/^200 [01]$/);
      const rec = await h.log.waitFor((x) => x.path === "/answer-early");
      expect(rec).toMatchObject({ status: 413, decision: "allow" });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("a WebSocket as a tunnel's first request takes the connection made for the handshake", async () => {
    const before = origin.connections;
    const t = await tlsViaProxy(h.port, "localhost", origin.port, { ca: h.agent.rootPem("acme") });
    try {
      const key = Buffer.from("kmi-origin-side-h1").toString("base64");
      t.write(`GET /ws HTTP/1.1\r\nHost: localhost:${origin.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
      let buf = Buffer.alloc(0);
      const reply = await new Promise<string>((resolve, reject) => {
        t.on("data", (d: Buffer) => {
          buf = Buffer.concat([buf, d]);
          const end = buf.indexOf("\r\n\r\n");
          if (end < 0) return;
          const rest = buf.subarray(end + 4);
          if (rest.length > 0) {
            const f = decodeWsFrame(rest);
            if (f !== undefined) resolve(f.payload.toString());
          } else if (buf.subarray(0, end).toString().startsWith("HTTP/1.1 101")) {
            t.write(encodeWsFrame(Buffer.from("ping"), true));
          } else reject(new Error(buf.toString()));
        });
      });
      expect(reply).toBe("echo: ping");
      expect(origin.connections - before).toBe(1);
    } finally {
      t.destroy();
    }
  });
});
