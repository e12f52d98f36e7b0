/**
 * HTTP/2 exchanges inside an intercepted tunnel whose origin chose h2: each client stream
 * becomes a stream on the proxy's own HTTP/2 session to the origin, after the same policy
 * checks and body scanning as HTTP/1.1. Trailers pass (gRPC's grpc-status lives there), and
 * streaming content types are scanned as they pass, never held.
 */
import {
  connect as h2connect,
  constants,
  type ClientHttp2Session,
  type ClientHttp2Stream,
  type IncomingHttpHeaders,
  type OutgoingHttpHeaders,
  type ServerHttp2Stream,
} from "node:http2";
import type { TLSSocket } from "node:tls";
import type { AccessRecord } from "./access-log.js";
import { renderBlockPage, type BlockPage } from "./block-page.js";
import { isLiveStream, relayBody, type RelayResult, type RelaySink } from "./body-relay.js";
import type { ClientInfo, ProxyContext } from "./context.js";
import type { BodyScanner } from "./icap/inspection.js";
import { requestBlockRule, tunnelAuthority } from "./http1.js";
import { describeError } from "./origin.js";
import { normalizeHost, type Policy } from "./policy.js";
import { judgeRelay } from "./scan-verdict.js";

/** Stream and session flow-control window: 64 KiB (the default) throttles large bodies badly. */
export const H2_WINDOW = 1 << 20;
const SESSION_WINDOW = 8 << 20;

/** Connection-specific headers HTTP/2 forbids (RFC 9113 8.2.2). */
const H2_DROP = new Set(["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "http2-settings", "proxy-authorization", "host"]);

function forwardHeaders(h: IncomingHttpHeaders, request: boolean): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  for (const name in h) {
    if (H2_DROP.has(name)) continue;
    if (name === "te" && request) {
      if (String(h[name]).toLowerCase() === "trailers") out[name] = "trailers";
      continue;
    }
    if (name === ":status" && request) continue;
    out[name] = h[name];
  }
  return out;
}

/**
 * The proxy's HTTP/2 session to one origin; reopened on demand when the origin closes it, and
 * closed by the proxy once idle for `idleMs` (0: never), so that an idle client connection
 * holds no origin connection.
 */
export class H2Origin {
  private session: ClientHttp2Session | undefined;
  private opening: Promise<ClientHttp2Session> | undefined;
  private closed = false;
  /** Origin streams open now (a session with open streams is not idle, even when silent). */
  private active = 0;

  constructor(
    first: TLSSocket,
    private readonly authority: string,
    private readonly reconnect: () => Promise<TLSSocket>,
    private readonly idleMs = 0,
  ) {
    this.session = this.wrap(first);
  }

  /** Counts `stream` as open until it closes. */
  track(stream: ClientHttp2Stream): void {
    this.active++;
    stream.once("close", () => this.active--);
  }

  private wrap(socket: TLSSocket): ClientHttp2Session {
    const s = h2connect(`https://${this.authority}`, {
      createConnection: () => socket,
      settings: { initialWindowSize: H2_WINDOW, enablePush: false },
    });
    s.on("error", () => {});
    // A session closed before its 'connect' (the client left at once) throws on the window change.
    s.on("connect", () => void (s.destroyed || s.setLocalWindowSize(SESSION_WINDOW)));
    // Graceful: a stream that opens meanwhile finishes; the next get() opens a new connection.
    if (this.idleMs > 0) s.setTimeout(this.idleMs, () => void (this.active === 0 && s.close()));
    // Memory: a closed session (and its TLS socket) is not kept for the life of an idle client.
    s.once("close", () => {
      if (this.session === s) this.session = undefined;
    });
    return s;
  }

  /** A usable session (the current one, or a new connection). */
  get(): Promise<ClientHttp2Session> {
    const s = this.session;
    if (s !== undefined && !s.closed && !s.destroyed) return Promise.resolve(s);
    if (this.closed) return Promise.reject(new Error("tunnel closed"));
    this.opening ??= this.reconnect().then(
      (sock) => {
        this.opening = undefined;
        if (this.closed) {
          sock.destroy();
          throw new Error("tunnel closed");
        }
        this.session = this.wrap(sock);
        return this.session;
      },
      (err: unknown) => {
        this.opening = undefined;
        throw err;
      },
    );
    return this.opening;
  }

  /** Closes the origin session (the client's session ended). */
  close(): void {
    this.closed = true;
    this.session?.destroy();
  }
}

/** What an intercepted h2 connection carries. */
export interface H2Upstream {
  /** The origin session. */
  readonly origin: H2Origin;
  /** The host the client asked for (SNI or CONNECT host). */
  readonly requestedHost: string;
  /** The CONNECT's port. */
  readonly port: number;
}

/**
 * Writes a stream's access log line once; `status` when it is known before the headers go out.
 * With `then` (which sends the response's last bytes), the line is in the file first.
 */
type StreamLog = (status?: number, then?: () => void) => void;

function respondPage(stream: ServerHttp2Stream, page: BlockPage, log: StreamLog): void {
  if (stream.destroyed || stream.closed) return;
  if (stream.headersSent) {
    stream.close(constants.NGHTTP2_INTERNAL_ERROR);
    return;
  }
  stream.respond({ ":status": page.status, ...page.headers });
  log(undefined, () => {
    if (!stream.destroyed) stream.end(page.body);
  });
}

function hostOf(authority: string): string {
  if (authority.startsWith("[")) return authority.slice(1, authority.indexOf("]")).toLowerCase();
  const c = authority.lastIndexOf(":");
  return normalizeHost(c > 0 ? authority.slice(0, c) : authority);
}

/**
 * The origin side of one client stream: the origin stream once opened, and the request body
 * chunks that arrive before it exists (a relay sink that buffers until then).
 */
class OriginStream implements RelaySink {
  stream: ClientHttp2Stream | undefined;
  private pending: Buffer[] = [];
  private pendingEnd = false;
  private drainCb: (() => void) | undefined;

  constructor(private readonly opener: () => void) {}

  open(): void {
    this.opener();
  }

  /** The origin stream exists: what waited goes to it. */
  attach(o: ClientHttp2Stream): void {
    this.stream = o;
    for (const c of this.pending) o.write(c);
    this.pending = [];
    if (this.pendingEnd) o.end();
    const cb = this.drainCb;
    this.drainCb = undefined;
    cb?.();
  }

  write(c: Buffer): boolean {
    if (this.stream === undefined) {
      this.pending.push(c);
      return false;
    }
    return this.stream.write(c);
  }

  end(last?: Buffer): void {
    if (this.stream !== undefined) {
      this.stream.end(last);
      return;
    }
    if (last !== undefined) this.pending.push(last);
    this.pendingEnd = true;
  }

  onDrain(cb: () => void): void {
    if (this.stream === undefined) this.drainCb = cb;
    else this.stream.once("drain", cb);
  }

  /** Cancels the origin stream (the client's stream ended first, or its body was refused). */
  cancel(): void {
    if (this.stream !== undefined && !this.stream.closed) this.stream.close(constants.NGHTTP2_CANCEL);
  }
}

/** Handles one client stream: log record, policy checks, then the origin stream with both bodies relayed. */
export function handleH2Stream(ctx: ProxyContext, client: ClientInfo, up: H2Upstream, stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
  const start = performance.now();
  const method = String(headers[":method"] ?? "GET");
  const path = String(headers[":path"] ?? "/");
  const authority = String(headers[":authority"] ?? headers.host ?? up.requestedHost);
  const rec: AccessRecord = {
    tenant: client.tenant,
    client: client.client,
    host: hostOf(authority),
    method,
    path,
    status: 0,
    bytes_up: 0,
    bytes_down: 0,
    decision: "allow",
    duration_ms: 0,
    proto: "h2",
  };
  const policy = ctx.policy.forTenant(client.tenant);
  const requestHeaders = forwardHeaders(headers, true);
  const scanBody = ctx.inspection.forExchange(policy, { method, path, authority, requestHeaders });
  // The line is written once: just before the response's last bytes go out, or when the stream closes without them.
  let logged = false;
  const log: StreamLog = (status, then) => {
    if (logged) return then?.();
    logged = true;
    rec.status = status ?? (stream.headersSent ? Number(stream.sentHeaders[":status"] ?? 0) : 0);
    rec.duration_ms = Math.round((performance.now() - start) * 10) / 10;
    ctx.counters.decision(rec.decision, rec.tenant);
    if (then === undefined) ctx.accessLog.write(rec);
    else ctx.accessLog.writeThen(rec, then);
  };
  const origin = new OriginStream(() => void openOriginStream(up, stream, requestHeaders, false, rec, scanBody, origin, log));
  stream.on("error", () => {});
  stream.on("close", () => {
    origin.cancel();
    log();
  });
  const refused = refuseStream(policy, method, authority, path, up, rec.host);
  if (refused !== undefined) {
    rec.decision = "block";
    rec.rule = refused.rule;
    respondPage(stream, refused.page, log);
    return;
  }
  if (stream.endAfterHeaders) {
    void openOriginStream(up, stream, requestHeaders, true, rec, scanBody, origin, log);
    return;
  }
  // The request body is relayed once the origin stream exists; until then chunks are held.
  const requestType = headers["content-type"] === undefined ? undefined : String(headers["content-type"]);
  const upload = scanBody("request", requestType);
  relayBody(
    stream,
    upload.settings,
    !isLiveStream(requestType, headers["content-disposition"]),
    origin,
    (r: RelayResult) => {
      const v = judgeRelay(rec, r, "request");
      if (v.kind !== "pass") origin.cancel();
      if (v.kind === "block") respondPage(stream, v.page, log);
    },
    headers["content-encoding"] === undefined ? undefined : String(headers["content-encoding"]),
    upload.inspector,
  );
}

/** Why a stream is refused before it reaches the origin (CONNECT inside h2, a block rule), if it is. */
function refuseStream(policy: Policy, method: string, authority: string, path: string, up: H2Upstream, host: string): { page: BlockPage; rule: string } | undefined {
  if (method === "CONNECT") return { page: renderBlockPage(400, host, "CONNECT inside an intercepted HTTP/2 connection is not supported", undefined), rule: "bad-request" };
  const rule = requestBlockRule(policy, "https", authority, path, tunnelAuthority(up.requestedHost, up.port));
  if (rule !== undefined) return { page: renderBlockPage(403, host, "the request matches a block rule", rule), rule };
  return undefined;
}

/** The origin failed the stream: a 502 page (or a reset, once the response began). */
function onOriginError(stream: ServerHttp2Stream, rec: AccessRecord, err: NodeJS.ErrnoException, log: StreamLog): void {
  if (rec.decision === "allow") {
    rec.decision = "error";
    rec.rule = "origin-error";
    rec.error = describeError(err);
  }
  respondPage(stream, renderBlockPage(502, rec.host, `origin ${describeError(err)}`, "origin-error"), log);
}

/** Opens the origin stream for a client stream and relays its response; undefined when it could not. */
function openOriginStream(
  up: H2Upstream,
  stream: ServerHttp2Stream,
  requestHeaders: OutgoingHttpHeaders,
  endStream: boolean,
  rec: AccessRecord,
  scanBody: BodyScanner,
  origin: OriginStream,
  log: StreamLog,
): Promise<ClientHttp2Stream | undefined> {
  const method = rec.method;
  return up.origin.get().then(
    (session) => {
      if (stream.closed || stream.destroyed) return undefined;
      const o = session.request(requestHeaders, { endStream });
      up.origin.track(o);
      let answered = false;
      o.on("response", (rh, flags) => {
        answered = true;
        relayH2Response(o, rh, flags, method, stream, rec, scanBody, log);
      });
      o.on("error", (err: NodeJS.ErrnoException) => onOriginError(stream, rec, err, log));
      o.on("close", () => {
        // The origin reset the stream before answering. (An answered stream may close before
        // its headers are passed on: a held body is still being scanned, e.g. as it decodes.)
        if (!answered && !stream.headersSent && !stream.closed && rec.decision === "allow") {
          onOriginError(stream, rec, Object.assign(new Error(`stream reset (code ${o.rstCode})`), { code: "RST_STREAM" }), log);
        }
      });
      origin.attach(o);
      return o;
    },
    (err: NodeJS.ErrnoException) => {
      onOriginError(stream, rec, err, log);
      return undefined;
    },
  );
}

/** Relays the origin's response (headers, body scanned, trailers) to the client stream. */
function relayH2Response(
  o: ClientHttp2Stream,
  rh: IncomingHttpHeaders,
  flags: number,
  method: string,
  stream: ServerHttp2Stream,
  rec: AccessRecord,
  scanBody: BodyScanner,
  log: StreamLog,
): void {
  const status = Number(rh[":status"] ?? 502);
  const out = forwardHeaders(rh, false);
  const ended = (flags & constants.NGHTTP2_FLAG_END_STREAM) !== 0 || method === "HEAD" || status === 204 || status === 304;
  if (stream.destroyed || stream.closed) return;
  if (ended) {
    log(status);
    stream.respond(out, { endStream: true });
    o.resume();
    return;
  }
  const contentType = rh["content-type"];
  const mayHaveTrailers = (contentType !== undefined && String(contentType).startsWith("application/grpc")) || rh["trailer"] !== undefined;
  let trailers: OutgoingHttpHeaders | undefined;
  if (mayHaveTrailers) {
    o.on("trailers", (t: IncomingHttpHeaders) => (trailers = forwardHeaders(t, false)));
    stream.on("wantTrailers", () => stream.sendTrailers(trailers ?? {}));
  }
  const ct = contentType === undefined ? undefined : String(contentType);
  const scan = scanBody("response", ct, { status, headers: out });
  relayBody(
    o,
    scan.settings,
    !isLiveStream(ct, rh["content-disposition"]),
    {
      open: () => stream.respond(out, { waitForTrailers: mayHaveTrailers }),
      write: (c) => stream.write(c),
      end: (last) =>
        log(undefined, () => {
          if (!stream.destroyed) stream.end(last);
        }),
      onDrain: (cb) => stream.once("drain", cb),
      knownLength: rh["content-length"] !== undefined,
    },
    (r: RelayResult) => {
      const v = judgeRelay(rec, r, "response");
      if (v.kind === "block") {
        o.close(constants.NGHTTP2_CANCEL);
        respondPage(stream, v.page, log);
      } else if (v.kind === "abort") {
        if (!stream.closed) stream.close(o.rstCode || constants.NGHTTP2_INTERNAL_ERROR);
      }
    },
    rh["content-encoding"] === undefined ? undefined : String(rh["content-encoding"]),
    scan.inspector,
  );
}
