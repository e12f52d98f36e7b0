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
 *   parser llhttp (the parser node:http itself uses, reached through Node's `_http_common`) on the
 *          client's TLS socket, the same undici client toward the origin, the response written
 *          as one head string and the held body: node:http's server side without its request
 *          and response objects, streams and timers. What a leaner server side could reach: a
 *          measurement, not a design (it answers only the bench's bodiless GETs; a request it
 *          cannot parse closes the connection).
 */
import { createRequire } from "node:module";
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
  readonly parserPort: number;
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

/** The part of Node's internal HTTPParser (llhttp) the parser relay uses. */
interface LlhttpParser {
  initialize(type: number, resource: object, maxHeaderSize: number, lenient: number): void;
  execute(data: Buffer): number | Error;
  close(): void;
  [callback: number]: (...args: never[]) => void;
}
interface LlhttpParserClass {
  new (): LlhttpParser;
  readonly REQUEST: number;
  readonly kOnHeadersComplete: number;
  readonly kOnBody: number;
  readonly kOnMessageComplete: number;
}
const { HTTPParser } = createRequire(import.meta.url)("_http_common") as { HTTPParser: LlhttpParserClass };

/** A response's head and held body, as one write (a TLS record or two). */
function writeResponse(socket: TLSSocket, status: number, reason: string, headers: string[], body: Buffer): void {
  let head = `HTTP/1.1 ${status} ${reason}\r\n`;
  for (let i = 0; i < headers.length; i += 2) {
    if (headers[i]!.toLowerCase() !== "content-length") head += `${headers[i]}: ${headers[i + 1]}\r\n`;
  }
  head += `content-length: ${body.length}\r\n\r\n`;
  socket.cork();
  socket.write(head, "latin1");
  socket.write(body);
  socket.uncork();
}

/** Forwards one GET of `path` through `client`; the answer (body held) goes to `done`. */
function forward(client: Client, path: string, done: (status: number, reason: string, headers: string[], body: Buffer) => void, failed: () => void): void {
  const chunks: Buffer[] = [];
  let status = 502;
  let reason = "";
  let headers: string[] = [];
  client.dispatch(
    { path, method: "GET", headers: ["host", DEFAULT_HOST] },
    {
      onConnect: () => {},
      onHeaders: (s, raw, _resume, text) => {
        [status, reason, headers] = [s, text, endToEnd(raw.map((b) => b.toString("latin1")))];
        return true;
      },
      onData: (c) => chunks.push(c) > 0,
      onComplete: () => done(status, reason, headers, chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks)),
      onError: failed,
    },
  );
}

/** The origin client of one client connection, closed with it. */
function originClient(socket: TLSSocket, toOrigin: () => TLSSocket): Client {
  const c = new Client(`https://${DEFAULT_HOST}`, { connect: (_o, done) => done(null, toOrigin()), pipelining: 1 });
  socket.once("close", () => void c.destroy().catch(() => {}));
  return c;
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
    socket.relayClient ??= originClient(socket, toOrigin);
    forward(
      socket.relayClient,
      req.url ?? "/",
      (status, reason, headers, body) => {
        res.writeHead(status, reason, headers);
        res.end(body);
      },
      () => res.destroy(),
    );
    req.resume();
  });

  const parsed = new Set<TLSSocket>();
  const parser = createTlsServer({ cert, key }, (socket) => {
    parsed.add(socket);
    socket.once("close", () => parsed.delete(socket));
    socket.on("error", () => socket.destroy());
    const client = originClient(socket, toOrigin);
    const p = new HTTPParser();
    p.initialize(HTTPParser.REQUEST, {}, 0, 0);
    socket.once("close", () => p.close());
    let url = "/";
    p[HTTPParser.kOnHeadersComplete] = (_major: never, _minor: never, _headers: never, _method: never, u: never) => void (url = u);
    p[HTTPParser.kOnBody] = () => {};
    p[HTTPParser.kOnMessageComplete] = () =>
      forward(client, url, (status, reason, headers, body) => writeResponse(socket, status, reason, headers, body), () => socket.destroy());
    socket.on("data", (d: Buffer) => {
      if (p.execute(d) instanceof Error) socket.destroy();
    });
  });

  const servers = [pipe, http, parser];
  for (const s of servers) await new Promise<void>((resolve) => s.listen(0, "127.0.0.1", resolve));
  const port = (s: { address(): unknown }) => (s.address() as AddressInfo).port;
  const info: RelayChildInfo = { pipePort: port(pipe), httpPort: port(http), parserPort: port(parser), caPem: ca.root.pem };
  await serveParent(info, {}, async () => {
    http.closeAllConnections();
    for (const c of [...piped, ...parsed]) c.destroy();
    for (const s of servers) await new Promise<void>((resolve) => s.close(() => resolve()));
  });
}

dieOnError(main());
