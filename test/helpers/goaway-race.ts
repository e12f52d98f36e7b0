/**
 * A server that shuts down (GOAWAY on an idle HTTP/2 session) at the moment a kmi program
 * closes its connect-node client, as when both are stopped together on a host shutdown. The
 * client is closed right after its session took the GOAWAY and before the session's socket
 * has closed: the window in which connect-node's session manager has removed its listeners
 * from a session that still has an 'error' to emit.
 */
import * as http2 from "node:http2";
import { createRequire, syncBuiltinESMExports } from "node:module";
import type { AddressInfo } from "node:net";
import { makeInfra, serviceTls } from "../fixtures/agent/infra.js";

/** The module object behind `node:http2`, where connect-node looks up `http2.connect`. */
const http2Module = createRequire(import.meta.url)("node:http2") as { connect: typeof http2.connect };

/** A client under test: one call that establishes the session, and close(). */
export interface RaceClient {
  /** One call; it fails (the server answers UNIMPLEMENTED) but leaves the session open and idle. */
  call(): Promise<unknown>;
  /** What the program calls on shutdown. */
  close(): void;
}

/**
 * Runs the race against the client `make` builds for a TLS server at `url` trusting `caPem`;
 * the server is the kmi service `service` (its certificate's `kmi://service/<name>`). Resolves
 * with the uncaught exceptions it caused (none when the client survives).
 */
export async function goawayWhileClosing(service: string, make: (url: string, caPem: string) => RaceClient): Promise<string[]> {
  const infra = makeInfra();
  const tls = serviceTls(infra, service);
  const server = http2.createSecureServer({ cert: tls.cert, key: tls.key });
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (s) => sessions.add(s));
  // Every call is answered at once (trailers-only UNIMPLEMENTED): the session stays open and idle.
  server.on("stream", (stream) => stream.respond({ ":status": 200, "content-type": "application/grpc", "grpc-status": "12" }, { endStream: true }));
  await new Promise<void>((res) => server.listen(0, "127.0.0.1", res));
  const url = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;

  let client: RaceClient | undefined;
  let session: http2.ClientHttp2Session | undefined;
  const originalConnect = http2Module.connect;
  http2Module.connect = ((...args: Parameters<typeof http2.connect>) => {
    const s = originalConnect(...args);
    session = s;
    s.on("goaway", () => queueMicrotask(() => client?.close()));
    return s;
  }) as typeof http2.connect;
  syncBuiltinESMExports();

  // vitest turns an uncaught exception into a failed run; catch them here to report them.
  const uncaught: string[] = [];
  let crashed = () => {};
  const saved = process.listeners("uncaughtException");
  process.removeAllListeners("uncaughtException");
  process.on("uncaughtException", (err) => {
    uncaught.push(String(err));
    crashed();
  });
  try {
    client = make(url, infra.pem);
    await client.call().catch(() => undefined);
    if (session === undefined) throw new Error("the client opened no HTTP/2 session");
    // The session ends either way: closed, or with the unhandled 'error' thrown out of its close.
    const ended = new Promise<void>((res) => {
      session!.once("close", () => res());
      crashed = res;
    });
    for (const s of sessions) s.close(); // the server shuts down: GOAWAY on the idle session
    await ended;
  } finally {
    http2Module.connect = originalConnect;
    syncBuiltinESMExports();
    process.removeAllListeners("uncaughtException");
    for (const l of saved) process.on("uncaughtException", l);
    for (const s of sessions) s.destroy();
    await new Promise<void>((res) => server.close(() => res()));
  }
  return uncaught;
}
