/**
 * Refusals: origins whose certificate does not verify, blocked hosts and URLs, EICAR in
 * responses and uploads, and the policy file reloaded without a restart.
 */
import { connect as tlsConnect } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EICAR } from "../../../src/proxy/eicar.js";
import { BLOCKED_CA_NAME } from "../../../src/proxy/blocked-ca.js";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, requestOver, run, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
let selfSigned: Origin;
let wrongName: Origin;
let root: string;

const POLICY = {
  blockHosts: ["blocked.test", { name: "ads", pattern: "*.ads.test" }],
  blockUrls: [{ name: "no-admin", pattern: "*/admin*" }],
};

beforeAll(async () => {
  h = await startHarness({ policy: POLICY });
  good = await startOrigin({ cert: h.pki.good });
  selfSigned = await startOrigin({ cert: h.pki.selfSigned });
  wrongName = await startOrigin({ cert: h.pki.wrongName });
  root = await h.rootFile();
});

afterAll(async () => {
  await Promise.all([good?.close(), selfSigned?.close(), wrongName?.close()]);
  await h?.close();
});

function curl(url: string, ...extra: string[]) {
  return run("curl", ["-sS", "--suppress-connect-headers", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, ...extra, url]);
}

describe("origins whose certificate does not verify", () => {
  it.each([
    ["self-signed", () => selfSigned.port, /self-signed certificate/, "DEPTH_ZERO_SELF_SIGNED_CERT"],
    ["wrong name", () => wrongName.port, /Hostname\/IP does not match certificate's altnames/, "HOSTNAME_MISMATCH"],
  ])("%s: never behind a trusted leaf; the page names the error and the log records it", async (_name, port, pageText, code) => {
    // A client that trusts only the tenant root refuses the connection: nothing is passed off as trusted.
    const strict = await curl(`https://localhost:${port()}/hello`);
    expect(strict.code).toBe(60);
    expect(strict.stdout).toBe("");
    // A person who clicks through sees why.
    const page = await curl(`https://localhost:${port()}/hello`, "-k", "-i", "--http1.1");
    expect(page.code).toBe(0);
    expect(page.stdout).toMatch(/^HTTP\/1.1 502 /);
    expect(page.stdout).toMatch(pageText);
    expect(page.stdout).toContain("origin-verify");
    const rec = await h.log.waitFor((r) => r.path === `localhost:${port()}` && r.rule === "origin-verify");
    expect(rec).toMatchObject({ decision: "block", status: 502, method: "CONNECT", tenant: "acme" });
    expect(rec.error).toContain(code);
  });

  it("the page is served under the untrusted kmi-blocked CA, not the tenant's intermediate", async () => {
    const { socket } = await connectTunnel(h.port, `localhost:${selfSigned.port}`);
    const t = tlsConnect({ socket, servername: "localhost", rejectUnauthorized: false });
    await new Promise((r) => t.once("secureConnect", r));
    const cert = t.getPeerX509Certificate()!;
    expect(t.authorized).toBe(false);
    expect(cert.issuer).toContain(BLOCKED_CA_NAME.slice(0, 40));
    expect(cert.issuer).not.toContain("acme");
    t.destroy();
  });

  it("an origin that refuses connections gets a 502 on the CONNECT itself", async () => {
    const closed = await startOrigin({ cert: h.pki.good });
    const port = closed.port;
    await closed.close();
    const { status, head, socket } = await connectTunnel(h.port, `localhost:${port}`);
    socket.destroy();
    expect(status).toBe(502);
    expect(head).toContain("ECONNREFUSED");
  });
});

describe("block rules", () => {
  it.each([
    ["exact host", "blocked.test:443", "block-host:blocked.test"],
    ["wildcard host", "x.y.ads.test:443", "block-host:ads"],
  ])("%s: the CONNECT is answered 403 with the rule", async (_n, target, rule) => {
    const { status, head, socket } = await connectTunnel(h.port, target);
    socket.destroy();
    expect(status).toBe(403);
    expect(head).toContain(`rule: <code>${rule}</code>`);
    expect(head.toLowerCase()).toContain(`x-kmi-rule: ${rule}`);
    const rec = await h.log.waitFor((r) => r.path === target);
    expect(rec).toMatchObject({ decision: "block", rule, status: 403 });
  });

  it("a wildcard does not block the bare domain", async () => {
    const { status, socket } = await connectTunnel(h.port, "ads.test:1");
    socket.destroy();
    expect(status).not.toBe(403);
  });

  it("a blocked URL gets a 403 page naming the rule, over h1 and h2", async () => {
    for (const v of ["--http1.1", "--http2"]) {
      const r = await curl(`https://localhost:${good.port}/admin/panel?x=1`, v, "-i");
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/^HTTP\/(1.1|2) 403/);
      expect(r.stdout).toContain("block-url:no-admin");
    }
    const rec = await h.log.waitFor((x) => x.path === "/admin/panel?");
    expect(rec).toMatchObject({ decision: "block", rule: "block-url:no-admin", status: 403 });
    // The request never reached the origin; a neighbour path does.
    const ok = await curl(`https://localhost:${good.port}/hello`);
    expect(ok.stdout).toContain("hello from origin");
  });
});

describe("EICAR", () => {
  it.each([
    ["in one chunk", "/eicar"],
    ["straddling two chunks", "/eicar-split"],
    ["gzip-compressed (Content-Encoding: gzip)", "/eicar.gz"],
    ["brotli-compressed (Content-Encoding: br)", "/eicar.br"],
  ])("a response carrying it %s is replaced by a 403 page (h1 and h2)", async (_n, path) => {
    for (const v of ["--http1.1", "--http2"]) {
      const r = await curl(`https://localhost:${good.port}${path}`, v, "-i");
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/^HTTP\/(1.1|2) 403/);
      expect(r.stdout).toContain("rule: <code>eicar</code>");
      expect(r.stdout).not.toContain("EICAR-STANDARD");
    }
    const rec = await h.log.waitFor((x) => x.path === path && x.rule === "eicar");
    expect(rec).toMatchObject({ decision: "block", status: 403 });
  });

  it("a clean compressed response passes as sent (the client decodes it), not marked scan-limit", async () => {
    for (const v of ["--http1.1", "--http2"]) {
      const r = await curl(`https://localhost:${good.port}/hello.gz`, v, "--compressed");
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/^hello from origin over (http\/1\.1|h2), compressed\n$/);
    }
    const rec = await h.log.waitFor((x) => x.path === "/hello.gz" && x.status === 200);
    expect(rec.decision).toBe("allow");
    expect(rec.rule).toBeUndefined();
  });

  it("an upload carrying it never reaches the origin (one chunk, and straddling delayed chunks)", async () => {
    const ca = h.agent.rootPem("acme");
    const before = good.requests;
    const whole = await requestOver(await tlsViaProxy(h.port, "localhost", good.port, { ca }), "/upload", {
      host: "localhost",
      method: "POST",
      body: Buffer.concat([Buffer.from("data "), EICAR]),
    });
    expect(whole.status).toBe(403);
    expect(whole.body.toString()).toContain("eicar");
    const split = await requestOver(await tlsViaProxy(h.port, "localhost", good.port, { ca }), "/upload", {
      host: "localhost",
      method: "POST",
      body: [Buffer.alloc(3000, 0x20), EICAR.subarray(0, 10), EICAR.subarray(10, 50), EICAR.subarray(50), Buffer.alloc(10, 0x20)],
      chunkDelayMs: 20,
    });
    expect(split.status).toBe(403);
    expect(good.requests).toBe(before);
    const recs = h.log.records.filter((r) => r.path === "/upload" && r.rule === "eicar");
    expect(recs.length).toBe(2);
    expect(recs[1]!.bytes_up).toBeGreaterThan(3000);
    // A clean upload passes.
    const clean = await requestOver(await tlsViaProxy(h.port, "localhost", good.port, { ca }), "/upload", { host: "localhost", method: "POST", body: Buffer.alloc(4096, 0x41) });
    expect(clean.body.toString()).toBe("received 4096 bytes\n");
  });

  it("an upload over h2 carrying it is refused with 403", async () => {
    const r = await run("curl", ["-sS", "--suppress-connect-headers", "--http2", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--cacert", root, "--data-binary", "@-", "-i", `https://localhost:${good.port}/upload`], `x${EICAR.toString("latin1")}y`);
    expect(r.stdout).toMatch(/^HTTP\/2 403/);
    expect(r.stdout).toContain("eicar");
  });
});

describe("policy reload", () => {
  it("a changed policy file takes effect without a restart; a broken one keeps the last good policy", async () => {
    const url = `https://localhost:${good.port}/hello`;
    expect((await curl(url)).stdout).toContain("hello from origin");
    const reloads = h.proxy.context.policy.reloads;
    await h.writePolicy({ ...POLICY, blockUrls: [...POLICY.blockUrls, "*/hello"] });
    for (let i = 0; i < 50 && h.proxy.context.policy.reloads === reloads; i++) await new Promise((r) => setTimeout(r, 50));
    expect(h.proxy.context.policy.reloads).toBeGreaterThan(reloads);
    const blocked = await curl(url, "-i");
    expect(blocked.stdout).toMatch(/ 403/);
    expect(blocked.stdout).toContain("block-url:*/hello");
    // A broken file is refused; the policy in force stays.
    const { writeFile } = await import("node:fs/promises");
    await writeFile(h.policyFile, JSON.stringify({ blockHosts: ["not a host!"] }));
    await h.proxy.reload();
    expect((await curl(url, "-i")).stdout).toMatch(/ 403/);
    await h.writePolicy(POLICY);
    await h.proxy.reload();
    expect((await curl(url)).stdout).toContain("hello from origin");
  });
});
