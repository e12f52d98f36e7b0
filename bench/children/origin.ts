/**
 * The HTTPS origin of the proxy benchmarks, in its own process: HTTP/1.1 and HTTP/2 (ALPN) on
 * 127.0.0.1, `/1k` and `/1m` bodies (content-length set), and a distinct certificate (new key,
 * new fingerprint) per SNI name `h<N>.bench.kmi.test`, made ahead of time by "prepare" so that
 * no certificate is built during a measured handshake.
 */
import { createSecureServer, type Http2SecureServer, type Http2ServerRequest, type Http2ServerResponse } from "node:http2";
import type { AddressInfo, Socket } from "node:net";
import { createSecureContext, type SecureContext } from "node:tls";
import { childConfig, dieOnError, serveParent } from "../lib/serve.js";
import { DEFAULT_HOST, hostName } from "../lib/hosts.js";
import { OriginCa } from "../lib/tenant-ca.js";


/** What the child answers when ready. */
export interface OriginChildInfo {
  readonly port: number;
  readonly caPem: string;
}

const BODIES: Record<string, Buffer> = {
  "/1k": Buffer.alloc(1024, 0x61),
  "/1m": Buffer.alloc(1024 * 1024, 0x62),
};

async function main(): Promise<void> {
  childConfig<Record<string, never>>();
  const ca = new OriginCa();
  const def = ca.serverCert([DEFAULT_HOST, "localhost"], ["127.0.0.1"]);
  const contexts = new Map<string, SecureContext>();
  let prepared = 0;
  const server: Http2SecureServer = createSecureServer({
    allowHTTP1: true,
    cert: def.cert,
    key: def.key,
    SNICallback: (name, cb) => cb(null, contexts.get(name.toLowerCase())),
    settings: { initialWindowSize: 8 << 20 },
  });
  const sockets = new Set<Socket>();
  server.on("connection", (s: Socket) => {
    s.setNoDelay(true);
    sockets.add(s);
    s.once("close", () => sockets.delete(s));
  });
  server.on("session", (session) => session.on("error", () => {}));
  server.on("request", (req: Http2ServerRequest, res: Http2ServerResponse) => {
    const body = BODIES[req.url] ?? BODIES["/1k"]!;
    res.writeHead(200, { "content-type": "application/octet-stream", "content-length": body.length });
    res.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  const info: OriginChildInfo = { port, caPem: ca.root.pem };
  await serveParent(
    info,
    {
      /** Makes certificates for h0 … h<count-1> (those not made yet). */
      prepare: (args) => {
        const count = (args as { count: number }).count;
        for (; prepared < count; prepared++) {
          const c = ca.serverCert([hostName(prepared)]);
          contexts.set(hostName(prepared), createSecureContext({ cert: c.cert, key: c.key }));
        }
        return { prepared };
      },
    },
    async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  );
}

dieOnError(main());
