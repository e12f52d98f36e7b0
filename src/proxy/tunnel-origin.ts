/**
 * The HTTP/1.1 origin side of one intercepted tunnel: an undici `Client` holding the tunnel's
 * ONE origin connection (TLS, or TCP for cleartext HTTP inside a CONNECT), one request at a
 * time. Its first request uses the connection made (and verified) for the handshake; once the
 * origin closed it, or it sat idle for `--origin-idle-timeout-ms`, the next request opens and
 * verifies a new one. A WebSocket upgrade takes a connection of its own ({@link TunnelOrigin.connection}).
 *
 * Why undici and not node:http's `ClientRequest`: the proxy's CPU per HTTP/1.1 keep-alive request
 * (1 KiB) fell from 101–114 µs to about half that with the same server side (docs/benchmarks.md,
 * row 3), and it needs none of node:http's private agent protocol.
 */
import type { Duplex } from "node:stream";
import { Client, type Dispatcher } from "undici";

/** How long the origin side may take and stay idle. */
export interface TunnelOriginLimits {
  /** The origin's response headers, and each gap in its body, may take this long (the proxy's idle timeout). */
  readonly responseTimeoutMs: number;
  /** An origin connection without a request this long is closed (reopened on the next request). */
  readonly idleMs: number;
}

/** The `host[:port]` of a URL for `host` (an IPv6 literal bracketed). */
function urlAuthority(host: string, port: number): string {
  return `${host.includes(":") ? `[${host}]` : host}:${port}`;
}

/** One tunnel's origin connection, lent to one request at a time. */
export class TunnelOrigin {
  private readonly client: Client;
  /** The handshake's connection, until the first request takes it. */
  private first: Duplex | undefined;

  constructor(
    first: Duplex,
    private readonly reconnect: () => Promise<Duplex>,
    origin: { readonly host: string; readonly port: number },
    limits: TunnelOriginLimits,
  ) {
    this.first = first;
    // The URL only names the origin for a request without a Host header; the connection is ours.
    let url: URL;
    try {
      url = new URL(`http://${urlAuthority(origin.host, origin.port)}`);
    } catch {
      url = new URL(`http://localhost:${origin.port}`);
    }
    this.client = new Client(url, {
      connect: (_options, done) => this.connect(done as (err: Error | null, socket: Duplex | null) => void),
      pipelining: 1,
      keepAliveTimeout: limits.idleMs,
      keepAliveMaxTimeout: limits.idleMs,
      headersTimeout: limits.responseTimeoutMs,
      bodyTimeout: limits.responseTimeoutMs,
    });
    // Failures reach each request's handler; the client's own events need no listener.
    this.client.on("connectionError", () => {});
  }

  /** Sends a request; its response (or failure) goes to `handler`. */
  dispatch(options: Dispatcher.DispatchOptions, handler: Dispatcher.DispatchHandlers): void {
    this.client.dispatch(options, handler);
  }

  /** A new, verified connection to the origin (a WebSocket upgrade holds one for its lifetime). */
  connection(): Promise<Duplex> {
    return this.reconnect();
  }

  /** Closes the origin connection (the client's went away). */
  destroy(): void {
    this.first?.destroy();
    this.first = undefined;
    this.client.destroy().catch(() => {});
  }

  private connect(done: (err: Error | null, socket: Duplex | null) => void): void {
    const s = this.first;
    this.first = undefined;
    if (s !== undefined && !s.destroyed) {
      done(null, s);
      return;
    }
    this.reconnect().then(
      (socket) => done(null, socket),
      (err: Error) => done(err, null),
    );
  }
}
