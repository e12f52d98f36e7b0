/**
 * A bypass rule names hosts whose traffic is not inspected. The tunnel goes to the CONNECT's
 * host, so a ClientHello whose SNI names a bypassed host while the CONNECT names another one
 * must not turn the connection into an uninspected tunnel to that other host: otherwise any
 * client skips inspection of any host by writing a bank's name in its SNI (the same reasoning
 * that makes uninspectable ALPN offers blocked by default). The SNI's bypass holds only for a
 * CONNECT to an address the name resolves to.
 */
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EICAR } from "../../../src/proxy/eicar.js";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, requestOver, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;

const POLICY = { bypassHosts: ["*.bank.test"] };

beforeAll(async () => {
  // `*.bank.test` resolves to nothing; `localhost` (the last test's rule) to 127.0.0.1.
  h = await startHarness({ policy: POLICY });
  // Stands for a host the client controls: it answers whatever SNI it is sent.
  good = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await good?.close();
  await h?.close();
});

/** TLS with `servername` through a CONNECT to `target`, not checking the certificate, then GET `path`: the body, or the error. */
async function fetchThrough(target: string, servername: string, path: string): Promise<{ body: string; issuer: string }> {
  const { socket, status } = await connectTunnel(h.port, target);
  expect(status).toBe(200);
  try {
    return await new Promise((resolve) => {
      const t: TLSSocket = tlsConnect({ socket, servername, rejectUnauthorized: false, ALPNProtocols: ["http/1.1"] });
      t.once("secureConnect", () => {
        const issuer = t.getPeerX509Certificate()?.issuer ?? "";
        requestOver(t, path, { host: servername }).then(
          (r) => resolve({ body: r.body.toString("latin1"), issuer }),
          (err: Error) => resolve({ body: `error: ${err.message}`, issuer }),
        );
      });
      t.once("error", (err) => resolve({ body: `error: ${err.message}`, issuer: "" }));
    });
  } finally {
    socket.destroy();
  }
}

describe("a bypassed name in the SNI", () => {
  it("of a CONNECT to another name is inspected: the EICAR file does not reach the client", async () => {
    const r = await fetchThrough(`localhost:${good.port}`, "www.bank.test", "/eicar");
    expect(r.body).not.toContain(EICAR.toString("latin1"));
    const rec = await h.log.waitFor((x) => x.path === `localhost:${good.port}` && x.method === "CONNECT" && x.host === "www.bank.test");
    expect(rec.decision).not.toBe("bypass");
  });

  it("of a CONNECT to an address the name does not resolve to is inspected", async () => {
    const r = await fetchThrough(`127.0.0.1:${good.port}`, "www.bank.test", "/eicar");
    expect(r.body).not.toContain(EICAR.toString("latin1"));
    const rec = await h.log.waitFor((x) => x.path === `127.0.0.1:${good.port}` && x.method === "CONNECT" && x.host === "www.bank.test");
    expect(rec.decision).not.toBe("bypass");
  });

  it("of a CONNECT to an address of that name is tunnelled: the client meets the origin's own certificate", async () => {
    await h.switchPolicy({ bypassHosts: ["*.bank.test", "localhost"] });
    const r = await fetchThrough(`127.0.0.1:${good.port}`, "localhost", "/hello").finally(() => h.switchPolicy(POLICY));
    expect(r.issuer).toContain("origin test CA");
    expect(r.body).toContain("hello from origin");
    const rec = await h.log.waitFor((x) => x.path === `127.0.0.1:${good.port}` && x.method === "CONNECT" && x.host === "localhost");
    expect(rec).toMatchObject({ decision: "bypass", rule: "bypass-host:localhost" });
  });
});
