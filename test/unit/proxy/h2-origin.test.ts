/**
 * H2Origin (src/proxy/http2-handler.ts) and memory: once its origin session closes (the origin's
 * idle timeout, or the proxy's own), it keeps no reference to it, so an idle client connection
 * that outlives its origin side does not hold the closed session and its TLS socket. A real
 * node:http2 origin over TLS on 127.0.0.1; the collection is V8's (src/proxy/v8-gc.ts).
 */
import { once } from "node:events";
import { createSecureServer, type ClientHttp2Session } from "node:http2";
import type { AddressInfo } from "node:net";
import { setImmediate as tick } from "node:timers/promises";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { H2Origin } from "../../../src/proxy/http2-handler.js";
import { fullGc } from "../../../src/proxy/v8-gc.js";
import { makeOriginPki } from "../../fixtures/proxy/origins.js";

const pki = makeOriginPki();
const server = createSecureServer({ cert: pki.good.cert, key: pki.good.key, allowHTTP1: false });
server.on("stream", (s) => {
  s.respond({ ":status": 200 });
  s.end("ok");
});
let port = 0;

function dial(): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const t = tlsConnect({ host: "127.0.0.1", port, servername: "localhost", ca: pki.caPem, ALPNProtocols: ["h2"] });
    t.once("secureConnect", () => resolve(t));
    t.once("error", reject);
  });
}

/** The origin's session, then closed; only a WeakRef to it is returned. */
async function closedSession(origin: H2Origin): Promise<WeakRef<ClientHttp2Session>> {
  const s = await origin.get();
  const ref = new WeakRef(s);
  const closed = once(s, "close");
  s.close();
  await closed;
  return ref;
}

beforeAll(async () => {
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  port = (server.address() as AddressInfo).port;
});
afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())));

describe("H2Origin", () => {
  it("drops a closed origin session (collectable), and opens a new one on the next get()", async () => {
    const origin = new H2Origin(await dial(), `localhost:${port}`, dial);
    const ref = await closedSession(origin);
    const gc = fullGc()!;
    for (let i = 0; i < 5 && ref.deref() !== undefined; i++) {
      await tick();
      gc();
    }
    expect(ref.deref()).toBeUndefined();
    const next = await origin.get();
    expect(next.closed).toBe(false);
    origin.close();
  });
});
