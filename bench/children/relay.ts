/**
 * Two bare relays in front of the bench origin, in their own process: what Node's stacks cost
 * without anything kmi adds (row 3's floors). Both terminate the client's TLS with their own
 * certificate (for the bench origin's name) and re-encrypt toward the origin.
 *
 *   pipe   TLS in, bytes piped both ways, TLS out: no HTTP at all (the bound of Node's TLS).
 *   http   node:http server, one undici Client per client connection toward the origin (the
 *          stacks the kmi proxy uses for intercepted HTTP/1.1); the response body is held and
 *          written with its headers, as kmi does with a scanned body. No policy, scan, log or
 *          CONNECT.
 */
import { createServer as createHttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { connect as tlsConnect, createServer as createTlsServer, type TLSSocket } from "node:tls";
import { Client } from "undici";
import { DEFAULT_HOST } from "../lib/hosts.js";
import { childConfig, dieOnError, serveParent } from "../lib/serve.js";
import { OriginCa } from "../lib/tenant-ca.js";

/** What the parent passes. */
export interface RelayChildConfig {
  readonly originPort: number;
  readonly originCaPem: string;
}

/** What the child answers when ready. */
export interface RelayChildInfo {
  readonly pipePort: number;
  readonly httpPort: number;
  /** The CA of the relays' certificate. */
  readonly caPem: string;
}

/** The headers of a raw list without the hop-by-hop ones that matter here (kmi drops them all). */
function endToEnd(raw: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    if (!/^(connection|keep-alive|transfer-encoding)$/i.test(raw[i]!)) out.push(raw[i]!, raw[i + 1]!);
  }
  return out;
}

async function main(): Promise<void> {
  const cfg = childConfig<RelayChildConfig>();
  const ca = new OriginCa();
  const { cert, key } = ca.serverCert([DEFAULT_HOST]);
  const toOrigin = (): TLSSocket => tlsConnect({ host: "127.0.0.1", port: cfg.originPort, servername: DEFAULT_HOST, ca: cfg.originCaPem, ALPNProtocols: ["http/1.1"] });

  const piped = new Set<TLSSocket>();
  const pipe = createTlsServer({ cert, key }, (client) => {
    const origin = toOrigin();
    piped.add(client);
    client.once("close", () => piped.delete(client));
    client.pipe(origin).pipe(client);
    origin.on("error", () => client.destroy());
    client.on("error", () => origin.destroy());
  });

  const http = createHttpsServer({ cert, key, keepAlive: true }, (req, res) => {
    const socket = req.socket as TLSSocket & { relayClient?: Client };
    let client = socket.relayClient;
    if (client === undefined) {
      const c = new Client(`https://${DEFAULT_HOST}`, { connect: (_o, done) => done(null, toOrigin()), pipelining: 1 });
      socket.relayClient = client = c;
      socket.once("close", () => void c.destroy().catch(() => {}));
    }
    const chunks: Buffer[] = [];
    let status = 502;
    let reason = "";
    let headers: string[] = [];
    client.dispatch(
      { path: req.url ?? "/", method: "GET", headers: ["host", DEFAULT_HOST] },
      {
        onConnect: () => {},
        onHeaders: (s, raw, _resume, text) => {
          [status, reason, headers] = [s, text, endToEnd(raw.map((b) => b.toString("latin1")))];
          return true;
        },
        onData: (c) => chunks.push(c) > 0,
        onComplete: () => {
          res.writeHead(status, reason, headers);
          res.end(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks));
        },
        onError: () => res.destroy(),
      },
    );
    req.resume();
  });

  for (const s of [pipe, http]) await new Promise<void>((resolve) => s.listen(0, "127.0.0.1", resolve));
  const info: RelayChildInfo = { pipePort: (pipe.address() as AddressInfo).port, httpPort: (http.address() as AddressInfo).port, caPem: ca.root.pem };
  await serveParent(info, {}, async () => {
    http.closeAllConnections();
    for (const c of piped) c.destroy();
    for (const s of [pipe, http]) await new Promise<void>((resolve) => s.close(() => resolve()));
  });
}

dieOnError(main());
