/**
 * HTTP/1.1 exchanges through the proxy: plain `http://` requests sent to the proxy, and the
 * requests inside an intercepted HTTPS tunnel. Each request is checked against the policy
 * (host, URL), its body and the response body are scanned (./body-relay.ts), hop-by-hop
 * headers are dropped, and one access log line is written when the exchange ends.
 * WebSocket upgrades are inspected as HTTP requests and then spliced.
 */
import { Agent, request as httpRequest, type IncomingMessage, type RequestOptions, type ServerResponse } from "node:http";
import type { Duplex } from "node:stream";
import type { AccessRecord } from "./access-log.js";
import { renderBlockPage, rawHttpResponse, type BlockPage } from "./block-page.js";
import { isLiveStream, relayBody, type RelayResult } from "./body-relay.js";
import type { ClientInfo, ProxyContext } from "./context.js";
import { isDestinationDenied } from "./destinations.js";
import type { BodyScanner } from "./icap/inspection.js";
import { describeError } from "./origin.js";
import { normalizeHost, ruleId, type Policy } from "./policy.js";
import { judgeRelay } from "./scan-verdict.js";
import { splice } from "./splice.js";
import type { OriginRequest, OriginResponse, TunnelOrigin } from "./tunnel-origin.js";
import { formatListenAddress } from "../common/listen.js";

/** Where a client connection's requests go: plain proxy requests through an agent, or a tunnel's one origin. */
export type Http1Upstream =
  | {
      /** Plain proxy requests (`http://` in absolute form). */
      readonly scheme: "http";
      /** The agent that holds the origin connections. */
      readonly agent: Agent;
      readonly tunnel?: undefined;
    }
  | {
      /** `https` inside an intercepted TLS tunnel, `http` for cleartext HTTP inside a CONNECT. */
      readonly scheme: "http" | "https";
      readonly agent?: undefined;
      /** The origin (fixed), its connection, and the host the client asked for (SNI or CONNECT host). */
      readonly tunnel: { readonly host: string; readonly port: number; readonly requestedHost: string; readonly origin: TunnelOrigin };
    };

/** Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the proxy's own. */
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authorization",
  "proxy-authenticate",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
  "expect",
  "http2-settings",
]);

/**
 * The end-to-end headers of a raw header list, as a flat [name, value, ...] list. `keepUpgrade`
 * keeps `Connection: Upgrade` and `Upgrade` (a WebSocket handshake).
 */
export function endToEndHeaders(raw: readonly string[], keepUpgrade = false, replaceHost?: string): string[] {
  let listed: Set<string> | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.length === 10 && raw[i]!.toLowerCase() === "connection") {
      for (const t of raw[i + 1]!.split(",")) {
        const n = t.trim().toLowerCase();
        if (n !== "" && !(keepUpgrade && n === "upgrade")) (listed ??= new Set()).add(n);
      }
    }
  }
  const out: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower)) {
      if (!(keepUpgrade && (lower === "upgrade" || lower === "connection"))) continue;
      if (lower === "connection") continue; // re-added below as exactly "Upgrade"
    }
    if (listed?.has(lower)) continue;
    if (replaceHost !== undefined && lower === "host") continue;
    out.push(name, raw[i + 1]!);
  }
  if (replaceHost !== undefined) out.unshift("Host", replaceHost);
  if (keepUpgrade) out.push("Connection", "Upgrade");
  return out;
}

/** The first value of header `lower` (a lowercase name) in a raw header list, as `headers[lower]` gives it for single-valued headers. */
function rawHeader(raw: readonly string[], lower: string): string | undefined {
  for (let i = 0; i < raw.length; i += 2) {
    const n = raw[i]!;
    if (n.length === lower.length && n.toLowerCase() === lower) return raw[i + 1];
  }
  return undefined;
}

/** Every line of header `lower` (lowercase) joined with ", ", as a client reads a list header sent on several lines; undefined when absent. */
function rawHeaderList(raw: readonly string[], lower: string): string | undefined {
  let out: string | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const n = raw[i]!;
    if (n.length === lower.length && n.toLowerCase() === lower) out = out === undefined ? raw[i + 1]! : `${out}, ${raw[i + 1]!}`;
  }
  return out;
}

function hostOfAuthority(authority: string): string {
  if (authority.startsWith("[")) {
    const end = authority.indexOf("]");
    return authority.slice(1, end < 0 ? undefined : end).toLowerCase();
  }
  const colon = authority.lastIndexOf(":");
  return normalizeHost(colon >= 0 && authority.indexOf(":") === colon ? authority.slice(0, colon) : authority);
}

/**
 * `scheme://authority/path` with the default port dropped and the host lowercased, without
 * trailing dots (`files.example.` is the same host to DNS and to most origins, so a rule for
 * `files.example` must match it).
 */
function policyUrl(scheme: string, authority: string, path: string): string {
  let a = authority.toLowerCase();
  if (!a.startsWith("[")) {
    const colon = a.lastIndexOf(":");
    const oneColon = colon >= 0 && a.indexOf(":") === colon;
    const host = (oneColon ? a.slice(0, colon) : a).replace(/\.+$/, "");
    a = oneColon ? `${host}${a.slice(colon)}` : host;
  }
  if ((scheme === "https" && a.endsWith(":443")) || (scheme === "http" && a.endsWith(":80"))) a = a.slice(0, a.lastIndexOf(":"));
  return `${scheme}://${a}${path}`;
}

/** `host:port` of a tunnel (the name the client asked for, the CONNECT's port), an IPv6 literal bracketed. */
export function tunnelAuthority(host: string, port: number): string {
  return formatListenAddress({ kind: "tcp", host, port });
}

/** Characters RFC 3986 calls unreserved: their percent-encoding means the same path. */
const UNRESERVED = /^[A-Za-z0-9\-._~]$/;

/**
 * `path` as an origin that normalizes it serves it: percent-encoded unreserved characters
 * decoded (RFC 3986 6.2.2.2), runs of slashes merged (as nginx does by default) and dot segments
 * removed (5.2.4); the query is kept as sent. URL rules are matched against it as well as the
 * path as sent, so `/%61dmin`, `/./admin`, `//admin` and `/x/../admin` do not slip past a rule
 * for `/admin`. An encoded slash (`%2F`) and a backslash stay as they are.
 */
export function normalizedPath(path: string): string {
  if (!path.startsWith("/")) return path;
  const q = path.indexOf("?");
  const [p, query] = q < 0 ? [path, ""] : [path.slice(0, q), path.slice(q)];
  const decoded = p.replace(/%([0-9A-Fa-f]{2})/g, (m, hex: string) => {
    const c = String.fromCharCode(parseInt(hex, 16));
    return UNRESERVED.test(c) ? c : m.toUpperCase();
  });
  const segments = decoded.replace(/\/{2,}/g, "/").split("/");
  const out: string[] = [];
  for (let i = 1; i < segments.length; i++) {
    const s = segments[i]!;
    const last = i === segments.length - 1;
    if (s === "." || s === "..") {
      if (s === "..") out.pop();
      if (last) out.push("");
    } else out.push(s);
  }
  return `/${out.join("/")}${query}`;
}

/**
 * The policy rule that blocks this request, if any (host by name, then URL). `tunnel` is the
 * `host[:port]` of the intercepted tunnel the request came in (SNI or CONNECT host): the request
 * goes there whatever its Host header says, so the rules are checked against both. URL rules
 * see the path as sent and as an origin would normalize it ({@link normalizedPath}).
 */
export function requestBlockRule(policy: Policy, scheme: string, authority: string, path: string, tunnel?: string): string | undefined {
  const host = hostOfAuthority(authority);
  const tunnelHost = tunnel === undefined ? undefined : hostOfAuthority(tunnel);
  const hostRule = policy.blockedHost(host) ?? (tunnelHost !== undefined && tunnelHost !== host ? policy.blockedHost(tunnelHost) : undefined);
  if (hostRule !== undefined) return ruleId(hostRule);
  if (!policy.hasUrlRules) return undefined;
  const urls = new Set<string>();
  for (const a of tunnel === undefined ? [authority] : [authority, tunnel]) {
    for (const p of [path, normalizedPath(path)]) urls.add(policyUrl(scheme, a, p));
  }
  for (const url of urls) {
    const rule = policy.blockedUrl(url);
    if (rule !== undefined) return ruleId(rule);
  }
  return undefined;
}

/**
 * A response and its exchange's access log line. The line is written once: before the
 * response's last bytes go out (so a client that reads the log once its response is complete,
 * `curl …; tail -n 1 access.log`, finds it), or when the response closes without them (an abort).
 */
class LoggedResponse {
  private logged = false;

  constructor(
    readonly res: ServerResponse,
    private readonly rec: AccessRecord,
    private readonly ctx: ProxyContext,
    private readonly start: number,
  ) {}

  /** Writes the line (once), with the status sent so far. */
  log(): void {
    if (this.logged) return;
    this.ctx.accessLog.write(this.final());
  }

  /** Ends the response (with its last chunk) once its line is written. */
  end(last?: Buffer): void {
    const res = this.res;
    if (this.logged) {
      res.end(last);
      return;
    }
    this.ctx.accessLog.writeThen(this.final(), () => {
      if (!res.destroyed) res.end(last);
    });
  }

  /** The record with its status and duration, counted; the line is not written again after this. */
  private final(): AccessRecord {
    this.logged = true;
    const rec = this.rec;
    rec.status = this.res.headersSent ? this.res.statusCode : 0;
    rec.duration_ms = Math.round((performance.now() - this.start) * 10) / 10;
    this.ctx.counters.decision(rec.decision, rec.tenant);
    return rec;
  }
}

function sendPage(out: LoggedResponse, page: BlockPage, close = false): void {
  const res = out.res;
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const headers: Record<string, string> = { ...page.headers };
  if (close) headers["connection"] = "close";
  res.writeHead(page.status, headers);
  out.end(page.body);
}

function hasBody(req: IncomingMessage): boolean {
  const cl = req.headers["content-length"];
  return (cl !== undefined && cl !== "0") || req.headers["transfer-encoding"] !== undefined;
}

function noResponseBody(method: string, status: number): boolean {
  return method === "HEAD" || status === 204 || status === 304 || (status >= 100 && status < 200);
}

/** The `host:port` of the tunnel a request came in, if it came in one. */
function tunnelOf(up: Http1Upstream): string | undefined {
  return up.tunnel === undefined ? undefined : tunnelAuthority(up.tunnel.requestedHost, up.tunnel.port);
}

/** Why the destination check refuses `host` when it is an IP literal (names are checked when they resolve). */
function destinationRefusal(ctx: ProxyContext, host: string): string | undefined {
  try {
    ctx.destinations.checkLiteral(host);
    return undefined;
  } catch (err) {
    if (isDestinationDenied(err)) return err.message;
    throw err;
  }
}

/** Where one request goes. */
interface OriginTarget {
  readonly host: string;
  readonly port: number;
  readonly path: string;
  readonly authority: string;
}

/** Where one request goes, or why it cannot. */
type Target = OriginTarget | { error: string };

function targetOf(req: IncomingMessage, up: Http1Upstream): Target {
  const url = req.url ?? "/";
  if (up.tunnel !== undefined) {
    // Origin form only: an origin takes an absolute-form target's host over Host (RFC 9112
    // 3.2.2), so `GET https://other.example/ HTTP/1.1` would ask it for a host the policy never judged.
    if (!url.startsWith("/")) return { error: "inside a tunnel, send origin-form requests (/path)" };
    const authority = req.headers.host ?? up.tunnel.requestedHost;
    return { host: up.tunnel.host, port: up.tunnel.port, path: url, authority };
  }
  if (!url.startsWith("http://")) {
    return { error: url.startsWith("https://") ? "send https requests through CONNECT" : "this is a forward proxy; send absolute-form requests (http://host/path)" };
  }
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return { error: "the request url does not parse" };
  }
  return { host: u.hostname.replace(/^\[|\]$/g, ""), port: u.port === "" ? 80 : Number(u.port), path: u.pathname + u.search, authority: u.host };
}

/** A new access record of one exchange (status, bytes and decision are filled in as it goes). */
function exchangeRecord(client: ClientInfo, req: IncomingMessage, target: Target, proto: string): AccessRecord {
  return {
    tenant: client.tenant,
    client: client.client,
    host: "error" in target ? "" : hostOfAuthority(target.authority),
    method: req.method ?? "GET",
    path: "error" in target ? (req.url ?? "") : target.path,
    status: 0,
    bytes_up: 0,
    bytes_down: 0,
    decision: "allow",
    duration_ms: 0,
    proto,
  };
}

/** A request refused before it reaches the origin: the page, the rule, and whether the connection closes after it. */
interface RequestRefusal {
  readonly page: BlockPage;
  readonly rule: string;
  readonly error?: string;
  readonly close: boolean;
}

/** Why this request is refused before it is forwarded (a block rule, a private destination), if it is. */
function refuseRequest(ctx: ProxyContext, policy: Policy, up: Http1Upstream, req: IncomingMessage, target: OriginTarget, host: string): RequestRefusal | undefined {
  const rule = requestBlockRule(policy, up.scheme, target.authority, target.path, tunnelOf(up));
  if (rule !== undefined) return { page: renderBlockPage(403, host, "the request matches a block rule", rule), rule, close: hasBody(req) };
  const denied = up.tunnel === undefined ? destinationRefusal(ctx, target.host) : undefined;
  if (denied !== undefined) return { page: renderBlockPage(403, host, denied, "private-destination"), rule: "private-destination", error: denied, close: hasBody(req) };
  return undefined;
}

/** Handles one HTTP/1.1 request from a client (plain proxy request or inside a tunnel). */
export function handleHttp1Request(ctx: ProxyContext, client: ClientInfo, up: Http1Upstream, req: IncomingMessage, res: ServerResponse): void {
  const start = performance.now();
  const target = targetOf(req, up);
  const rec = exchangeRecord(client, req, target, "http/1.1");
  const out = new LoggedResponse(res, rec, ctx, start);
  let ureq: OriginRequest | undefined;
  res.on("close", () => {
    if (!res.writableFinished) ureq?.destroy();
    out.log();
  });
  const refuse = (r: RequestRefusal): void => {
    rec.decision = "block";
    rec.rule = r.rule;
    if (r.error !== undefined) rec.error = r.error;
    sendPage(out, r.page, r.close);
    req.resume();
  };
  if ("error" in target) return refuse({ page: renderBlockPage(400, req.headers.host ?? "", target.error, undefined), rule: "bad-request", error: target.error, close: true });
  const policy = ctx.policy.forTenant(client.tenant);
  const refused = refuseRequest(ctx, policy, up, req, target, rec.host);
  if (refused !== undefined) return refuse(refused);
  const method = req.method ?? "GET";
  const headers = endToEndHeaders(req.rawHeaders, false, up.tunnel === undefined ? target.authority : undefined);
  const scanBody = ctx.inspection.forExchange(policy, { method, path: target.path, authority: target.authority, requestHeaders: headers });
  const exchange: Exchange = { method, out, rec, scanBody };
  const withBody = hasBody(req);
  const open = (): OriginRequest => (ureq = forwardRequest(up, target, headers, withBody, exchange));
  if (!withBody) {
    open().end();
    req.resume();
    return;
  }
  relayRequestBody(req, out, rec, scanBody, open, () => ureq);
}

/** One exchange's response side: where the origin's answer goes and how it is logged and scanned. */
interface Exchange {
  readonly method: string;
  readonly out: LoggedResponse;
  readonly rec: AccessRecord;
  readonly scanBody: BodyScanner;
}

/** Sends the request to the origin (the tunnel's connection, or the agent's); its response is relayed (and scanned) to the client. */
function forwardRequest(up: Http1Upstream, target: OriginTarget, headers: string[], withBody: boolean, x: Exchange): OriginRequest {
  if (up.tunnel !== undefined) {
    // HTTP/1.1 needs a Host: a client that sent none (HTTP/1.0) gets the name it asked for in its tunnel.
    const withHost = rawHeader(headers, "host") === undefined ? ["Host", target.authority, ...headers] : headers;
    return up.tunnel.origin.request(target.path, x.method, withHost, withBody, {
      response: (r) => relayResponse(r, x),
      failed: (err) => onUpstreamError(err as NodeJS.ErrnoException, x.out, x.rec),
      broken: (err) => noteBrokenResponse(err as NodeJS.ErrnoException, x.rec),
    });
  }
  const u = httpRequest({ agent: up.agent, host: target.host, port: target.port, method: x.method, path: target.path, headers: headers, setHost: false });
  u.on("response", (ures: IncomingMessage) => relayResponse({ status: ures.statusCode ?? 502, reason: ures.statusMessage, rawHeaders: ures.rawHeaders, body: ures }, x));
  u.on("error", (err: NodeJS.ErrnoException) => onUpstreamError(err, x.out, x.rec));
  return { write: (c) => u.write(c), end: (last) => void u.end(last), onDrain: (cb) => void u.once("drain", cb), destroy: () => void u.destroy() };
}

/** An answer that broke off mid-body: the log says why (the transfer is cut by the relay). */
function noteBrokenResponse(err: NodeJS.ErrnoException, rec: AccessRecord): void {
  if (rec.decision !== "allow") return;
  rec.decision = "error";
  rec.rule = "origin-error";
  rec.error = describeError(err);
}

/** The origin connection failed: a 403 (a refused destination) or 502 page, or an abort once headers went out. */
function onUpstreamError(err: NodeJS.ErrnoException, out: LoggedResponse, rec: AccessRecord): void {
  const res = out.res;
  if (isDestinationDenied(err)) {
    // A name that resolved only to refused addresses (the agent's lookup said so).
    rec.decision = "block";
    rec.rule = "private-destination";
    rec.error = err.message;
    if (!res.headersSent) sendPage(out, renderBlockPage(403, rec.host, err.message, "private-destination"));
    else res.destroy();
    return;
  }
  if (rec.decision === "allow") {
    rec.decision = "error";
    rec.rule = "origin-error";
    rec.error = describeError(err);
  }
  if (!res.headersSent) sendPage(out, renderBlockPage(502, rec.host, `origin ${describeError(err)}`, "origin-error"));
  else res.destroy();
}

/** Relays the origin's response to the client, its body scanned (and held, unless a stream by nature). */
function relayResponse(ures: OriginResponse, x: Exchange): void {
  const { out, rec } = x;
  const res = out.res;
  const status = ures.status;
  const rheaders = endToEndHeaders(ures.rawHeaders);
  if (noResponseBody(x.method, status)) {
    res.writeHead(status, ures.reason, rheaders);
    out.end();
    ures.body.resume();
    return;
  }
  // From the raw list: a header object would be built for one lookup.
  const contentType = rawHeader(ures.rawHeaders, "content-type");
  const hold = !isLiveStream(contentType, rawHeader(ures.rawHeaders, "content-disposition"));
  const scan = x.scanBody("response", contentType, { status, reason: ures.reason ?? "", headers: rheaders });
  relayBody(
    ures.body,
    scan.settings,
    hold,
    {
      open: () => res.writeHead(status, ures.reason, rheaders),
      write: (c) => res.write(c),
      end: (last) => out.end(last),
      onDrain: (cb) => res.once("drain", cb),
      knownLength: rawHeader(ures.rawHeaders, "content-length") !== undefined,
    },
    (r: RelayResult) => {
      const v = judgeRelay(rec, r, "response");
      if (v.kind === "block") {
        ures.body.destroy();
        if (v.released) res.destroy();
        else sendPage(out, v.page);
      } else if (v.kind === "abort") {
        // An answer that broke off while it was held: the client has nothing yet, and gets a page saying why.
        if (!res.headersSent && rec.decision === "error") sendPage(out, renderBlockPage(502, rec.host, `origin ${rec.error ?? "failed"}`, "origin-error"));
        else res.destroy();
      }
    },
    // Every line: a client decodes "identity" then "gzip" on two lines as "identity, gzip".
    rawHeaderList(ures.rawHeaders, "content-encoding"),
    scan.inspector,
  );
}

/** Relays the client's request body to the origin request `open` makes, scanned (and held, unless a stream by nature). */
function relayRequestBody(req: IncomingMessage, out: LoggedResponse, rec: AccessRecord, scanBody: BodyScanner, open: () => OriginRequest, upstream: () => OriginRequest | undefined): void {
  const upload = scanBody("request", req.headers["content-type"]);
  relayBody(
    req,
    upload.settings,
    !isLiveStream(req.headers["content-type"], req.headers["content-disposition"]),
    {
      open: () => void open(),
      write: (c) => upstream()!.write(c),
      end: (last) => upstream()!.end(last),
      onDrain: (cb) => upstream()!.onDrain(cb),
    },
    (r: RelayResult) => {
      const v = judgeRelay(rec, r, "request");
      if (v.kind === "block" && !v.released) {
        // The rest of the upload is read and dropped (nothing more reaches the origin): a client
        // still sending when the verdict comes (an ICAP service that is down answers at once)
        // would otherwise get a reset instead of the page.
        sendPage(out, v.page);
        req.resume();
      } else if (v.kind !== "pass") {
        upstream()?.destroy();
        out.res.destroy();
      }
    },
    req.headers["content-encoding"],
    upload.inspector,
  );
}

/**
 * The HTTP server's `clientError` handler: a request head that is too large gets 431, a
 * malformed one 400 (when the socket can still take them), then the connection closes.
 */
export function answerClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
  // A second error on a socket already answered (the parser reports one per chunk) changes nothing.
  if (socket.writableEnded) return;
  if (socket.writable && err.code?.startsWith("HPE_") === true) {
    const status = err.code === "HPE_HEADER_OVERFLOW" ? "431 Request Header Fields Too Large" : "400 Bad Request";
    socket.end(`HTTP/1.1 ${status}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n`);
    // Read and drop what the client still sends: closing with unread input would reset the
    // connection and destroy the answer before the client reads it.
    socket.on("data", () => {});
    socket.resume();
    // end() lets the answer out (a TLS socket writes asynchronously); a client that does not
    // read it is cut off shortly after.
    setTimeout(() => socket.destroy(), 1000).unref();
    return;
  }
  socket.destroy();
}

/** Where an upgrade's origin connection comes from: the agent, or a new connection of the tunnel's origin (held for the WebSocket's life). */
function upgradeConnection(up: Http1Upstream): Pick<RequestOptions, "agent" | "createConnection"> {
  if (up.tunnel === undefined) return { agent: up.agent };
  const origin = up.tunnel.origin;
  return {
    createConnection: (_options, done) => {
      origin.connection().then(
        (socket) => done(null, socket),
        (err: Error) => done(err, undefined as unknown as Duplex),
      );
      return undefined;
    },
  };
}

function writeRawPage(socket: Duplex, page: BlockPage): void {
  socket.end(rawHttpResponse(page));
}

/** Handles an HTTP/1.1 Upgrade (WebSocket): inspects the handshake, then splices the streams. */
export function handleHttp1Upgrade(
  ctx: ProxyContext,
  client: ClientInfo,
  up: Http1Upstream,
  req: IncomingMessage,
  socket: Duplex,
  head: Buffer,
): void {
  const start = performance.now();
  const target = targetOf(req, up);
  const rec: AccessRecord = {
    tenant: client.tenant,
    client: client.client,
    host: "error" in target ? "" : hostOfAuthority(target.authority),
    method: req.method ?? "GET",
    path: "error" in target ? (req.url ?? "") : target.path,
    status: 0,
    bytes_up: 0,
    bytes_down: 0,
    decision: "allow",
    duration_ms: 0,
    proto: "websocket",
  };
  const log = (): void => {
    rec.duration_ms = Math.round((performance.now() - start) * 10) / 10;
    ctx.counters.decision(rec.decision, rec.tenant);
    ctx.accessLog.write(rec);
  };
  socket.on("error", () => {});
  const refuse = (page: BlockPage, decision: AccessRecord["decision"], rule: string, error?: string): void => {
    rec.decision = decision;
    rec.rule = rule;
    rec.status = page.status;
    if (error !== undefined) rec.error = error;
    writeRawPage(socket, page);
    log();
  };
  if ("error" in target) return refuse(renderBlockPage(400, "", target.error, undefined), "block", "bad-request", target.error);
  if ((req.headers.upgrade ?? "").toLowerCase() !== "websocket") {
    return refuse(renderBlockPage(400, rec.host, "only websocket upgrades pass the proxy", "upgrade"), "block", "upgrade");
  }
  const rule = requestBlockRule(ctx.policy.forTenant(client.tenant), up.scheme, target.authority, target.path, tunnelOf(up));
  if (rule !== undefined) return refuse(renderBlockPage(403, rec.host, "the request matches a block rule", rule), "block", rule);
  const denied = up.tunnel === undefined ? destinationRefusal(ctx, target.host) : undefined;
  if (denied !== undefined) return refuse(renderBlockPage(403, rec.host, denied, "private-destination"), "block", "private-destination", denied);

  const headers = endToEndHeaders(req.rawHeaders, true, up.tunnel === undefined ? target.authority : undefined);
  const ureq = httpRequest({ ...upgradeConnection(up), host: target.host, port: target.port, method: "GET", path: target.path, headers, setHost: false });
  socket.once("close", () => ureq.destroy());
  ureq.on("error", (err: NodeJS.ErrnoException) => {
    if (rec.status === 0 && isDestinationDenied(err)) return refuse(renderBlockPage(403, rec.host, err.message, "private-destination"), "block", "private-destination", err.message);
    if (rec.status === 0) refuse(renderBlockPage(502, rec.host, `origin ${describeError(err)}`, "origin-error"), "error", "origin-error", describeError(err));
  });
  ureq.on("response", (ures) => {
    // The origin refused the upgrade: relay its answer and close.
    rec.status = ures.statusCode ?? 0;
    const lines = [`HTTP/1.1 ${rec.status} ${ures.statusMessage ?? ""}`];
    const h = endToEndHeaders(ures.rawHeaders);
    for (let i = 0; i < h.length; i += 2) lines.push(`${h[i]}: ${h[i + 1]}`);
    lines.push("Connection: close", "", "");
    socket.write(lines.join("\r\n"));
    ures.on("data", (c: Buffer) => {
      rec.bytes_down += c.length;
      socket.write(c);
    });
    ures.on("end", () => {
      socket.end();
      log();
    });
    ures.on("error", () => socket.destroy());
  });
  ureq.on("upgrade", (ures, usocket, uhead) => {
    rec.status = 101;
    const lines = [`HTTP/1.1 101 ${ures.statusMessage ?? "Switching Protocols"}`];
    for (let i = 0; i < ures.rawHeaders.length; i += 2) lines.push(`${ures.rawHeaders[i]}: ${ures.rawHeaders[i + 1]}`);
    lines.push("", "");
    socket.write(lines.join("\r\n"));
    if (uhead.length > 0) socket.write(uhead);
    if (head.length > 0) usocket.write(head);
    splice(socket, usocket, ctx.limits.idleTimeoutMs, (r) => {
      rec.bytes_up = r.up + head.length;
      rec.bytes_down = r.down + uhead.length;
      log();
    });
  });
  ureq.end();
}
