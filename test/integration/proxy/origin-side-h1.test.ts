/**
 * The origin side of an intercepted HTTP/1.1 connection (src/proxy/tunnel-origin.ts), driven
 * with curl through the real proxy: the connection made for the handshake serves the first
 * request; an origin connection that idled past --origin-idle-timeout-ms, or that the origin
 * closed, is replaced on the next request while the client's connection stays; HEAD, 103 Early
 * Hints, an origin that never answers and one that answers garbage.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { run, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let origin: Origin;
let root: string;

/** The client's keep-alive outlasts the origin side's idle time, so the two can be told apart. */
const LIMITS = { keepAliveTimeoutMs: 10_000, originIdleTimeoutMs: 300, idleTimeoutMs: 3000 };

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
    // Three requests on one client connection, 500 ms apart (the origin side idles out after 300 ms).
    const r = await run("curl", [...proxyArgs(), "--rate", "2/s", ...WRITE_OUT, url("/hello"), ...WRITE_OUT, url("/hello"), ...WRITE_OUT, url("/hello")]);
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
});
