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
import { isStreamingContentType, relayBody, type RelayResult } from "./body-relay.js";
import type { ClientInfo, ProxyContext } from "./context.js";
import { requestBlockRule } from "./http1.js";
import { describeError } from "./origin.js";
import { normalizeHost } from "./policy.js";
import { recordScan } from "./scan-outcome.js";

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

/** The proxy's HTTP/2 session to one origin; reopened on demand when the origin closes it. */
export class H2Origin {
  private session: ClientHttp2Session | undefined;
  private opening: Promise<ClientHttp2Session> | undefined;
  private closed = false;

  constructor(
    first: TLSSocket,
    private readonly authority: string,
    private readonly reconnect: () => Promise<TLSSocket>,
  ) {
    this.session = this.wrap(first);
  }

  private wrap(socket: TLSSocket): ClientHttp2Session {
    const s = h2connect(`https://${this.authority}`, {
      createConnection: () => socket,
      settings: { initialWindowSize: H2_WINDOW, enablePush: false },
    });
    s.on("error", () => {});
    s.on("connect", () => s.setLocalWindowSize(SESSION_WINDOW));
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
}

function respondPage(stream: ServerHttp2Stream, page: BlockPage): void {
  if (stream.destroyed || stream.closed) return;
  if (stream.headersSent) {
    stream.close(constants.NGHTTP2_INTERNAL_ERROR);
    return;
  }
  stream.respond({ ":status": page.status, ...page.headers });
  stream.end(page.body);
}

function hostOf(authority: string): string {
  if (authority.startsWith("[")) return authority.slice(1, authority.indexOf("]")).toLowerCase();
  const c = authority.lastIndexOf(":");
  return normalizeHost(c > 0 ? authority.slice(0, c) : authority);
}

/** Handles one client stream. */
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
  let ostream: ClientHttp2Stream | undefined;
  stream.on("error", () => {});
  stream.on("close", () => {
    if (ostream !== undefined && !ostream.closed) ostream.close(constants.NGHTTP2_CANCEL);
    rec.status = stream.headersSent ? Number(stream.sentHeaders[":status"] ?? 0) : 0;
    rec.duration_ms = Math.round((performance.now() - start) * 10) / 10;
    ctx.counters.decision(rec.decision, rec.tenant);
    ctx.accessLog.write(rec);
  });
  if (method === "CONNECT") {
    rec.decision = "block";
    rec.rule = "bad-request";
    respondPage(stream, renderBlockPage(400, rec.host, "CONNECT inside an intercepted HTTP/2 connection is not supported", undefined));
    return;
  }
  const policy = ctx.policy.forTenant(client.tenant);
  const rule = requestBlockRule(policy, "https", authority, path, up.requestedHost);
  if (rule !== undefined) {
    rec.decision = "block";
    rec.rule = rule;
    respondPage(stream, renderBlockPage(403, rec.host, "the request matches a block rule", rule));
    return;
  }
  const outHeaders = forwardHeaders(headers, true);
  const noRequestBody = stream.endAfterHeaders;

  const onOriginError = (err: NodeJS.ErrnoException): void => {
    if (rec.decision === "allow") {
      rec.decision = "error";
      rec.rule = "origin-error";
      rec.error = describeError(err);
    }
    respondPage(stream, renderBlockPage(502, rec.host, `origin ${describeError(err)}`, "origin-error"));
  };

  const onResponse = (o: ClientHttp2Stream, rh: IncomingHttpHeaders, flags: number): void => {
    const status = Number(rh[":status"] ?? 502);
    const out = forwardHeaders(rh, false);
    const ended = (flags & constants.NGHTTP2_FLAG_END_STREAM) !== 0 || method === "HEAD" || status === 204 || status === 304;
    if (stream.destroyed || stream.closed) return;
    if (ended) {
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
    const scan = ctx.inspection.scan(policy, "response", { method, path, authority, requestHeaders: outHeaders, response: { status, headers: out } }, ct);
    relayBody(
      o,
      scan.settings,
      !isStreamingContentType(ct),
      {
        open: () => stream.respond(out, { waitForTrailers: mayHaveTrailers }),
        write: (c) => stream.write(c),
        end: (last) => stream.end(last),
        onDrain: (cb) => stream.once("drain", cb),
      },
      (r: RelayResult) => {
        rec.bytes_down = r.bytes;
        const page = recordScan(rec, r, "response");
        if (r.kind === "blocked") {
          o.close(constants.NGHTTP2_CANCEL);
          respondPage(stream, renderBlockPage(403, rec.host, page ?? "blocked", r.rule));
        } else if (r.kind === "error") {
          if (!stream.closed) stream.close(o.rstCode || constants.NGHTTP2_INTERNAL_ERROR);
        }
      },
      rh["content-encoding"] === undefined ? undefined : String(rh["content-encoding"]),
      scan.inspector,
    );
  };

  const openOrigin = (endStream: boolean): Promise<ClientHttp2Stream | undefined> =>
    up.origin.get().then(
      (session) => {
        if (stream.closed || stream.destroyed) return undefined;
        const o = session.request(outHeaders, { endStream });
        ostream = o;
        let answered = false;
        o.on("response", (rh, flags) => {
          answered = true;
          onResponse(o, rh, flags);
        });
        o.on("error", onOriginError);
        o.on("close", () => {
          // The origin reset the stream before answering. (An answered stream may close before
          // its headers are passed on: a held body is still being scanned, e.g. as it decodes.)
          if (!answered && !stream.headersSent && !stream.closed && rec.decision === "allow") {
            onOriginError(Object.assign(new Error(`stream reset (code ${o.rstCode})`), { code: "RST_STREAM" }));
          }
        });
        return o;
      },
      (err: NodeJS.ErrnoException) => {
        onOriginError(err);
        return undefined;
      },
    );

  if (noRequestBody) {
    void openOrigin(true);
    return;
  }
  // The request body is relayed once the origin stream exists; until then chunks are held.
  const pending: Buffer[] = [];
  let pendingEnd = false;
  let drainCb: (() => void) | undefined;
  const requestType = headers["content-type"] === undefined ? undefined : String(headers["content-type"]);
  const upload = ctx.inspection.scan(policy, "request", { method, path, authority, requestHeaders: outHeaders }, requestType);
  relayBody(
    stream,
    upload.settings,
    !isStreamingContentType(requestType),
    {
      open: () => {
        void openOrigin(false).then((o) => {
          if (o === undefined) return;
          for (const c of pending) o.write(c);
          pending.length = 0;
          if (pendingEnd) o.end();
          if (drainCb !== undefined) {
            const cb = drainCb;
            drainCb = undefined;
            cb();
          }
        });
      },
      write: (c) => {
        if (ostream === undefined) {
          pending.push(c);
          return false;
        }
        return ostream.write(c);
      },
      end: (last) => {
        if (ostream === undefined) {
          if (last !== undefined) pending.push(last);
          pendingEnd = true;
        } else {
          ostream.end(last);
        }
      },
      onDrain: (cb) => {
        if (ostream === undefined) drainCb = cb;
        else ostream.once("drain", cb);
      },
    },
    (r: RelayResult) => {
      rec.bytes_up = r.bytes;
      const page = recordScan(rec, r, "request");
      if (r.kind === "blocked") {
        ostream?.close(constants.NGHTTP2_CANCEL);
        respondPage(stream, renderBlockPage(403, rec.host, page ?? "blocked", r.rule));
      } else if (r.kind === "error") {
        ostream?.close(constants.NGHTTP2_CANCEL);
      }
    },
    headers["content-encoding"] === undefined ? undefined : String(headers["content-encoding"]),
    upload.inspector,
  );
}
