/**
 * Bypass: plain tunnels for host patterns, non-TLS traffic, origins that demand client
 * certificates, and (opt-in) hosts whose clients keep rejecting the minted certificate.
 * In each case the client sees the origin's own certificate, and the log says why.
 */
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createServer, type Server } from "node:net";
import { connect as tlsConnect, createServer as createTlsServer, type TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeTestPki, type TestPki } from "../../helpers/pki.js";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, requestOver, run, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
let pki: TestPki;

const POLICY = { bypassHosts: ["127.0.0.1", "*.bypass.localhost"], autoBypass: { enabled: true, threshold: 2, windowSeconds: 60, ttlSeconds: 60 } };

beforeAll(async () => {
  pki = await makeTestPki(await mkdtemp(join(tmpdir(), "kmi-proxy-mtls-")));
  h = await startHarness({
    policy: POLICY,
    // The client-certificate origins below have a certificate the proxy trusts, as real ones do.
    extraCaPem: [await readFile(pki.ca.cert, "utf8")],
  });
  good = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await good?.close();
  await h?.close();
  await rm(pki.dir, { recursive: true, force: true });
});

/** TLS through the proxy; resolves with the socket or the handshake error. */
async function tlsThrough(target: string, o: { servername?: string; ca: string | Buffer; cert?: Buffer; key?: Buffer; alpn?: string[] }): Promise<TLSSocket> {
  const { socket, status } = await connectTunnel(h.port, target);
  expect(status).toBe(200);
  return new Promise((resolve, reject) => {
    const t = tlsConnect({ socket, servername: o.servername, ca: o.ca, cert: o.cert, key: o.key, ALPNProtocols: o.alpn ?? ["http/1.1"] });
    t.once("secureConnect", () => resolve(t));
    t.once("error", (err) => {
      // A client that refuses the certificate closes its connection.
      socket.destroy();
      reject(err);
    });
  });
}

describe("bypass", () => {
  it("a bypassed host (by CONNECT target) is tunnelled: the client sees the origin's own certificate", async () => {
    const t = await tlsThrough(`127.0.0.1:${good.port}`, { ca: h.pki.caPem });
    expect(t.getPeerX509Certificate()!.issuer).toContain("origin test CA");
    const r = await requestOver(t, "/hello", { host: "127.0.0.1" });
    expect(r.body.toString()).toContain("hello from origin");
    const rec = await h.log.waitFor((x) => x.path === `127.0.0.1:${good.port}` && x.decision === "bypass");
    expect(rec).toMatchObject({ rule: "bypass-host:127.0.0.1", method: "CONNECT", tenant: "acme" });
    expect(rec.bytes_down).toBeGreaterThan(300);
    expect(rec.bytes_up).toBeGreaterThan(100);
  });

  it("a bypassed host by SNI (wildcard) is not tunnelled when the CONNECT names another host (sni-bypass.test.ts has the rest)", async () => {
    // x.bypass.localhost has no address here: the CONNECT to localhost is not its traffic, so
    // the proxy meets the origin as the client asked and judges its certificate, which does not
    // name x.bypass.localhost.
    const t = tlsThrough(`localhost:${good.port}`, { servername: "x.bypass.localhost", ca: h.pki.caPem });
    await expect(t).rejects.toThrow();
    const rec = await h.log.waitFor((x) => x.host === "x.bypass.localhost");
    expect(rec).toMatchObject({ decision: "block", rule: "origin-verify" });
  });

  it("openssl through the proxy to a bypassed host shows the origin's chain", async () => {
    const caFile = `${h.dir}/origin-ca.pem`;
    const { writeFile } = await import("node:fs/promises");
    await writeFile(caFile, h.pki.caPem);
    const r = await run("openssl", ["s_client", "-proxy", `127.0.0.1:${h.port}`, "-connect", `127.0.0.1:${good.port}`, "-CAfile", caFile, "-verify_return_error"]);
    expect(r.stdout).toContain("Verify return code: 0 (ok)");
    expect(r.stdout).toMatch(/issuer=CN\s?=\s?origin test CA/);
  });

  it('cleartext that is not HTTP inside a CONNECT is tunnelled as is when the policy says nonTls: "tunnel"', async () => {
    const echo: Server = createServer((s) => s.pipe(s));
    await new Promise<void>((r) => echo.listen(0, "127.0.0.1", r));
    const port = (echo.address() as { port: number }).port;
    await h.switchPolicy({ ...POLICY, nonTls: "tunnel" });
    try {
      const { socket } = await connectTunnel(h.port, `localhost:${port}`);
      socket.resume();
      const got = new Promise<string>((resolve) => socket.once("data", (d: Buffer) => resolve(d.toString())));
      socket.write("SSH-2.0-hello\r\n");
      expect(await got).toBe("SSH-2.0-hello\r\n");
      socket.end();
      const rec = await h.log.waitFor((x) => x.path === `localhost:${port}`);
      expect(rec).toMatchObject({ decision: "bypass", rule: "non-tls" });
    } finally {
      await h.switchPolicy(POLICY);
      echo.close();
    }
  });

  it("a ClientHello offering only protocols the proxy cannot inspect is closed by default, tunnelled when the policy says so", async () => {
    // Why not a tunnel by default: an origin may ignore ALPN and speak HTTP, so a made-up
    // protocol would let any client skip inspection.
    const before = good.requests;
    const { socket, status } = await connectTunnel(h.port, `localhost:${good.port}`);
    expect(status).toBe(200);
    const refused = await new Promise<Error | undefined>((resolve) => {
      const t = tlsConnect({ socket, servername: "localhost", ca: h.pki.caPem, ALPNProtocols: ["x-made-up"] });
      t.once("secureConnect", () => resolve(undefined));
      t.once("error", (err) => resolve(err));
      t.once("close", () => resolve(new Error("closed")));
    });
    expect(refused).toBeDefined();
    const rec = await h.log.waitFor((x) => x.path === `localhost:${good.port}` && x.rule === "alpn-uninspectable");
    expect(rec).toMatchObject({ decision: "block", method: "CONNECT" });
    expect(rec.error).toContain('offers only protocols the proxy cannot inspect ("x-made-up")');
    expect(good.requests).toBe(before);

    await h.switchPolicy({ ...POLICY, uninspectableAlpn: "tunnel" });
    expect(h.proxy.context.policy.current.uninspectableAlpn).toBe("tunnel");
    // An origin that ignores ALPN (as many do) and speaks HTTP/1.1.
    let served = 0;
    const plainTls = createTlsServer({ cert: h.pki.good.cert, key: h.pki.good.key }, (s) => {
      s.once("data", () => {
        served++;
        s.end("HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nhello\n");
      });
    });
    await new Promise<void>((r) => plainTls.listen(0, "127.0.0.1", r));
    const port = (plainTls.address() as { port: number }).port;
    try {
      // Tunnelled: the client sees the origin's own certificate, and the bytes are not inspected.
      const t = await tlsThrough(`localhost:${port}`, { servername: "localhost", ca: h.pki.caPem, alpn: ["x-made-up"] });
      expect(t.getPeerX509Certificate()!.issuer).toContain("origin test CA");
      const r = await requestOver(t, "/hello", { host: "localhost" });
      expect(r.body.toString()).toBe("hello\n");
      expect(served).toBe(1);
      const tun = await h.log.waitFor((x) => x.path === `localhost:${port}` && x.rule === "alpn-uninspectable");
      expect(tun).toMatchObject({ decision: "bypass", method: "CONNECT" });
    } finally {
      plainTls.close();
      await h.switchPolicy(POLICY);
      expect(h.proxy.context.policy.current.uninspectableAlpn).toBe("block");
    }
  });

  it.each([
    ["TLS 1.2", "TLSv1.2" as const],
    ["TLS 1.3", "TLSv1.3" as const],
  ])("an origin that demands a client certificate (%s) is tunnelled, so the client's own certificate works", async (_n, maxVersion) => {
    const [cert, key, ca] = await Promise.all([readFile(pki.server.cert), readFile(pki.server.key), readFile(pki.ca.cert, "utf8")]);
    const mtls = await startOrigin({ cert: { cert: cert.toString(), key: key.toString() }, h2: false, requireClientCert: true, clientCa: ca, maxVersion });
    try {
      const clientCert = await readFile(pki.client.cert);
      const clientKey = await readFile(pki.client.key);
      // TLS 1.2 shows the demand during the origin handshake; TLS 1.3 only after it, so a
      // first connection may fail there while the proxy learns. The next one is tunnelled.
      let t: TLSSocket | undefined;
      for (let i = 0; i < 2 && t === undefined; i++) {
        t = await tlsThrough(`localhost:${mtls.port}`, { servername: "localhost", ca, cert: clientCert, key: clientKey }).catch(() => undefined);
        if (maxVersion === "TLSv1.2") expect(t).toBeDefined();
      }
      expect(t).toBeDefined();
      expect(t!.getPeerX509Certificate()!.issuer).toContain("kmi test infrastructure CA");
      const r = await requestOver(t!, "/hello", { host: "localhost" });
      expect(r.body.toString()).toContain("hello from origin");
      const rec = await h.log.waitFor((x) => x.path === `localhost:${mtls.port}` && x.decision === "bypass");
      expect(rec.rule).toBe("client-cert");
    } finally {
      await mtls.close();
    }
  });

  it("opt-in auto-bypass: after clients reject the minted certificate twice, the host is tunnelled", async () => {
    const other = await startOrigin({ cert: h.pki.other });
    try {
      // A pinned app trusts only the origin's real CA.
      for (let i = 0; i < 2; i++) {
        await expect(tlsThrough(`localhost:${other.port}`, { servername: "localhost", ca: h.pki.caPem })).rejects.toThrow();
        await h.log.waitFor(() => h.log.records.filter((y) => y.path === `localhost:${other.port}` && /^client-(rejected-leaf|closed)/.test(y.rule ?? "")).length > i);
      }
      const t = await tlsThrough(`localhost:${other.port}`, { servername: "localhost", ca: h.pki.caPem });
      expect(t.getPeerX509Certificate()!.issuer).toContain("origin test CA");
      t.destroy();
      const rec = await h.log.waitFor((x) => x.path === `localhost:${other.port}` && x.decision === "bypass");
      expect(rec.rule).toBe("auto-bypass");
      // Another tenant's clients are not affected: the decision is per tenant and host.
      expect(h.proxy.context.learned.pinnedBypass("globex", "localhost")).toBe(false);
    } finally {
      await other.close();
    }
  });
});
