/**
 * The HTTP/1.1 origin side of one intercepted tunnel: an undici `Client` holding the tunnel's
 * ONE origin connection (TLS, or TCP for cleartext HTTP inside a CONNECT), one request at a
 * time. Its first request uses the connection made (and verified) for the handshake; once the
 * origin closed it, or it sat idle for `--origin-idle-timeout-ms`, the next request opens and
 * verifies a new one. A WebSocket upgrade holds a connection for its life ({@link TunnelOrigin.connection}).
 *
 * Why undici and not node:http's `ClientRequest`: a bare relay's client side cost 51–90 µs per
 * HTTP/1.1 keep-alive request (1 KiB) with undici against 87–136 µs with `ClientRequest`, and the
 * proxy's own went from 133 to 118 µs (interleaved runs, docs/proxy.md); and it needs none of
 * node:http's private agent protocol.
 */
import { PassThrough, Readable, type Duplex } from "node:stream";
import { Client, type Dispatcher } from "undici";

/** How long the origin side may take and stay idle. */
export interface TunnelOriginLimits {
  /** The origin's response headers, and each gap in its body, may take this long (the proxy's idle timeout). */
  readonly responseTimeoutMs: number;
  /** An origin connection without a request this long is closed (reopened on the next request). */
  readonly idleMs: number;
}

/** An origin's response, as the relay takes it (node:http's `IncomingMessage` gives the same). */
export interface OriginResponse {
  readonly status: number;
  /** The reason phrase; undefined when it is not printable ASCII (the client gets the standard one). */
  readonly reason: string | undefined;
  readonly rawHeaders: readonly string[];
  readonly body: Readable;
}

/** The request as the origin gets it: its body (when it has one), and a way to abandon it. */
export interface OriginRequest {
  write(chunk: Buffer): boolean;
  /** Ends the body (a request without one was sent whole). */
  end(last?: Buffer): void;
  onDrain(cb: () => void): void;
  /** Abandons the request (the client went away); nothing more is reported. */
  destroy(): void;
}

/** Where a request's outcome goes. Nothing is reported once the request was abandoned. */
export interface OriginCallbacks {
  /** The origin's final answer (informational ones are not reported). */
  response(r: OriginResponse): void;
  /** The request failed before an answer: the connection, the origin's refusal, a timeout, a protocol error. */
  failed(err: Error): void;
  /** The answer broke off mid-body (its body is destroyed right after). */
  broken(err: Error): void;
}

/** The `host[:port]` of a URL for `host` (an IPv6 literal bracketed). */
function urlAuthority(host: string, port: number): string {
  return `${host.includes(":") ? `[${host}]` : host}:${port}`;
}

/** One tunnel's origin connection, lent to one request at a time. */
export class TunnelOrigin {
  private readonly client: Client;
  /** The handshake's connection, until the first request (or a WebSocket) takes it. */
  private first: Duplex | undefined;
  private readonly firstTimer: NodeJS.Timeout;

  constructor(
    first: Duplex,
    private readonly reconnect: () => Promise<Duplex>,
    origin: { readonly host: string; readonly port: number },
    limits: TunnelOriginLimits,
  ) {
    this.first = first;
    // A connection nobody took (a preconnect that never sends a request) is not kept past the idle time.
    this.firstTimer = setTimeout(() => this.takeFirst()?.destroy(), limits.idleMs);
    this.firstTimer.unref();
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
      // The origin's own Keep-Alive timeout, less a second.
      keepAliveTimeoutThreshold: 1_000,
      headersTimeout: limits.responseTimeoutMs,
      bodyTimeout: limits.responseTimeoutMs,
    });
    // Failures reach each request's callbacks; the client's own events need no listener.
    this.client.on("connectionError", () => {});
    // undici reports a callback that threw as the client's 'error' (not in its typings): a bug
    // in one exchange is printed, and does not end the process and every other connection.
    (this.client as unknown as NodeJS.EventEmitter).on("error", (err: Error) => process.emitWarning(err));
  }

  /**
   * Sends a request (`path` in origin form, `headers` a flat name/value list with Host). With
   * `withBody`, the body is what the returned request is written; its outcome goes to `cb`.
   */
  request(path: string, method: string, headers: string[], withBody: boolean, cb: OriginCallbacks): OriginRequest {
    const body = withBody ? new PassThrough() : undefined;
    const exchange = new Exchange(cb, body);
    this.client.dispatch({ path, method: method as Dispatcher.HttpMethod, headers, body: body ?? null }, exchange);
    return body === undefined ? { write: () => true, end: () => {}, onDrain: (done) => done(), destroy: () => exchange.abort() } : uploadTo(body, exchange);
  }

  /** A verified connection to the origin: the handshake's, when unused, or a new one (undici's requests, and a WebSocket upgrade, which holds it for its life). */
  connection(): Promise<Duplex> {
    const s = this.takeFirst();
    return s !== undefined && !s.destroyed ? Promise.resolve(s) : this.reconnect();
  }

  /** Closes the origin connection (the client's went away). */
  destroy(): void {
    this.takeFirst()?.destroy();
    this.client.destroy().catch(() => {});
  }

  private takeFirst(): Duplex | undefined {
    clearTimeout(this.firstTimer);
    const s = this.first;
    this.first = undefined;
    return s;
  }

  private connect(done: (err: Error | null, socket: Duplex | null) => void): void {
    this.connection().then(
      (socket) => done(null, socket),
      (err: Error) => done(err, null),
    );
  }
}

/**
 * The request body's side of an exchange. Once the exchange is over (the origin answered
 * before the upload ended, or failed), what the client still sends is dropped: the relay must
 * not wait for a drain that will never come.
 */
function uploadTo(body: PassThrough, exchange: Exchange): OriginRequest {
  const over = (): boolean => body.destroyed || exchange.settled;
  return {
    write: (c) => over() || body.write(c),
    end: (last) => void (over() ? undefined : body.end(last)),
    onDrain: (done) => {
      if (over()) return done();
      const once = (): void => {
        body.off("drain", once);
        body.off("close", once);
        done();
      };
      body.on("drain", once);
      body.on("close", once);
    },
    destroy: () => exchange.abort(),
  };
}

/** A response body from undici, as a Readable: the origin is read as fast as the relay takes it. */
class OriginBody extends Readable {
  constructor(private readonly exchange: Exchange) {
    super();
    // Errors are the relay's to report (it listens while it relays); none may go uncaught after.
    this.on("error", () => {});
  }

  override _read(): void {
    this.exchange.resume();
  }

  override _destroy(err: Error | null, done: (err?: Error | null) => void): void {
    // The relay stopped reading (a block, the client gone): the origin request is abandoned.
    this.exchange.abort();
    done(err);
  }
}

/** The reason phrase as the client may be sent it: printable ASCII, else none (Node then sends the standard one). */
function printableReason(text: string): string | undefined {
  return /^[\t\x20-\x7e]*$/.test(text) ? text : undefined;
}

/** One exchange over the connection: undici's handler, reporting to the callbacks. */
class Exchange implements Dispatcher.DispatchHandlers {
  private abortRequest: ((err?: Error) => void) | undefined;
  private resumeOrigin: (() => void) | undefined;
  private aborted = false;
  /** The request completed or failed. */
  settled = false;
  private body: OriginBody | undefined;

  constructor(
    private readonly cb: OriginCallbacks,
    private readonly upload: PassThrough | undefined,
  ) {}

  /** Abandons the request (the client went away, or its answer is not wanted any more); nothing more is reported. */
  abort(): void {
    if (this.settled) return;
    this.aborted = true;
    this.abortRequest?.();
  }

  /** Reads on (the relay wants more of the body); the parser is shared with later requests, so only while this one runs. */
  resume(): void {
    if (!this.settled) this.resumeOrigin?.();
  }

  onConnect(abort: (err?: Error) => void): void {
    this.abortRequest = abort;
    if (this.aborted) abort();
  }

  onHeaders(status: number, raw: Buffer[], resume: () => void, statusText: string): boolean {
    // Informational answers (103 Early Hints) are not relayed; the final one follows.
    if (status < 200 || this.aborted) return true;
    this.resumeOrigin = resume;
    this.body = new OriginBody(this);
    this.cb.response({ status, reason: printableReason(statusText), rawHeaders: raw.map((b) => b.toString("latin1")), body: this.body });
    return true;
  }

  onData(chunk: Buffer): boolean {
    return this.body === undefined || this.body.push(chunk);
  }

  onComplete(): void {
    this.settle();
    this.body?.push(null);
  }

  onError(err: Error): void {
    this.settle();
    const body = this.body;
    // The client's own abort, or its connection closing (the origin client destroyed): not the origin's failure.
    if (this.aborted || (err as { code?: string }).code === "UND_ERR_DESTROYED") {
      body?.destroy();
      return;
    }
    if (body === undefined) {
      this.cb.failed(err);
      return;
    }
    this.cb.broken(err);
    body.destroy(err);
  }

  private settle(): void {
    this.settled = true;
    // An upload the origin no longer reads (it answered first, or failed) is let go.
    if (this.upload !== undefined && !this.upload.writableFinished) this.upload.destroy();
  }
}
