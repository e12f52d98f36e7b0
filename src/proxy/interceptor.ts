/**
 * What happens to a CONNECT: tenant, host policy and bypass decisions; a TCP connection to
 * the origin (so an unreachable origin is a plain 502 on the CONNECT); then, after the 200,
 * the client's ClientHello is peeked (SNI, ALPN) and the origin is met first, with the same
 * offers, its certificate verified; a leaf that copies its names is taken from the cache or
 * minted; and the client's TLS is terminated with that leaf and the protocol the origin
 * chose, handing the decrypted connection to the HTTP/1.1 or HTTP/2 handlers.
 *
 * What is known before the 200 is answered on the CONNECT itself: a blocked target, no tenant,
 * an unreachable or refused destination, and a tenant the agent cannot issue for (quarantine,
 * revoke, no key, the new-host limit: 503/429 with the reason). Refusals after the 200 (the
 * origin's certificate does not verify, the SNI names a blocked host, the agent fails to issue)
 * are answered with a page under the untrusted kmi-blocked CA (see ./blocked-ca.ts), never
 * under the tenant's trusted intermediate. Cleartext HTTP inside a CONNECT is handed to the
 * HTTP/1.1 handler, inspected like a plain proxy request.
 */
import { createServer as createHttpServer, type IncomingMessage, type Server as HttpServer } from "node:http";
import { createServer as createH2Server, type Http2Server, type ServerHttp2Session } from "node:http2";
import { lookup as dnsLookup } from "node:dns/promises";
import { connect as netConnect, isIP, type Socket } from "node:net";
import { TLSSocket } from "node:tls";
import type { Duplex } from "node:stream";
import type { X509Certificate } from "node:crypto";
import type { Decision } from "./access-log.js";
import { AgentCallError } from "../clients/agent-client.js";
import { rawHttpResponse, renderBlockPage, type BlockPage } from "./block-page.js";
import { parseClientHello, type ClientHello } from "./clienthello.js";
import { ConnectLog } from "./connect-log.js";
import type { ClientInfo, ProxyContext } from "./context.js";
import { isDestinationDenied, type DestinationGuard } from "./destinations.js";
import { answerClientError, handleHttp1Request, handleHttp1Upgrade, type Http1Upstream } from "./http1.js";
import { H2_WINDOW, H2Origin, handleH2Stream, type H2Upstream } from "./http2-handler.js";
import { IssuanceRefused, leafCacheKey, type LeafEntry } from "./leaf-cache.js";
import { LeafHosts } from "./leaf-hosts.js";
import { LeafRejected } from "./leaf-minter.js";
import { describeOriginCertificate, leafNames } from "./origin-cert.js";
import { describeError, isClientCertRequired, type OriginResult } from "./origin.js";
import { normalizeHost, ruleId, type Policy } from "./policy.js";
import { splice } from "./splice.js";
import { markHandshakeDone } from "./tls-server-socket.js";
import { TunnelOrigin } from "./tunnel-origin.js";
import { normalizeClientAddress } from "./tenants.js";

/** Protocols the proxy can inspect, in the order it prefers them. */
const INSPECTABLE_ALPN = new Set(["h2", "http/1.1", "http/1.0"]);

/** Per-connection state carried on the decrypted client socket for the inner servers. */
const kConn = Symbol("kmi.proxy.conn");

/** Requests seen on a decrypted connection (a client that sends none may have refused the leaf). */
interface ConnStats {
  requests: number;
}

interface H1Conn {
  readonly client: ClientInfo;
  readonly upstream: Http1Upstream;
  readonly stats: ConnStats;
}

interface H2Conn {
  readonly client: ClientInfo;
  readonly upstream: H2Upstream;
  readonly stats: ConnStats;
}

/**
 * A client that completes the handshake and closes within this time without a request most
 * likely refused the leaf after the handshake (Node, Java and most pinning libraries verify
 * then, without sending an alert).
 */
const SILENT_REJECT_MS = 1000;

/**
 * The error listener of sockets whose errors show up elsewhere (their 'close'). A module-level
 * function on purpose: an arrow made inside a stage would keep that stage's whole closure scope
 * (origin socket, ClientHello, log) alive for as long as the connection lives.
 */
const ignoreError = (): void => {};

interface PageConn {
  readonly page: BlockPage;
}

type Tagged<T> = { [kConn]?: T };

/** A CONNECT target. */
export interface ConnectTarget {
  readonly host: string;
  readonly port: number;
}

/** Parses a CONNECT request target (`host:port`, `[v6]:port`); undefined when malformed. */
export function parseConnectTarget(target: string | undefined): ConnectTarget | undefined {
  if (target === undefined || target.length > 300) return undefined;
  let host: string;
  let portText: string;
  if (target.startsWith("[")) {
    const end = target.indexOf("]");
    if (end < 0 || target[end + 1] !== ":") return undefined;
    host = target.slice(1, end);
    portText = target.slice(end + 2);
    if (isIP(host) !== 6) return undefined;
  } else {
    const c = target.lastIndexOf(":");
    if (c <= 0) return undefined;
    host = target.slice(0, c);
    portText = target.slice(c + 1);
    if (!/^[A-Za-z0-9._-]+$/.test(host)) return undefined;
  }
  if (!/^\d{1,5}$/.test(portText)) return undefined;
  const port = Number(portText);
  if (port < 1 || port > 65535) return undefined;
  return { host: normalizeHost(host), port };
}

/** Result of peeking the ClientHello. */
type Peek = { kind: "hello"; hello: ClientHello; data: Buffer } | { kind: "not-tls" | "invalid" | "closed" | "timeout"; data: Buffer; reason?: string };

function peekClientHello(socket: Socket, initial: Buffer, timeoutMs: number): Promise<Peek> {
  return new Promise((resolve) => {
    let data = initial;
    let timer: NodeJS.Timeout | undefined;
    const finish = (p: Peek): void => {
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("close", onClose);
      socket.off("end", onClose);
      socket.pause();
      resolve(p);
    };
    const check = (): boolean => {
      const r = parseClientHello(data);
      if (r.kind === "incomplete") return false;
      if (r.kind === "ok") finish({ kind: "hello", hello: r.hello, data });
      else if (r.kind === "not-tls") finish({ kind: "not-tls", data });
      else finish({ kind: "invalid", data, reason: r.reason });
      return true;
    };
    const onData = (chunk: Buffer): void => {
      data = data.length === 0 ? chunk : Buffer.concat([data, chunk]);
      check();
    };
    const onClose = (): void => finish({ kind: "closed", data });
    if (data.length > 0 && check()) return;
    timer = setTimeout(() => finish({ kind: "timeout", data }), timeoutMs);
    socket.on("data", onData);
    socket.on("close", onClose);
    socket.on("end", onClose);
    socket.resume();
  });
}

/** Longest cleartext request line the proxy waits for before it decides a tunnel is not HTTP. */
const MAX_REQUEST_LINE = 8192;

/** An HTTP/1.x request line: method token, target, version (RFC 9112 3). */
const REQUEST_LINE = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP\/1\.[01]\r?\n/;

/**
 * Reads cleartext from a tunnel until its first line is complete (or it closes, times out, or
 * grows past {@link MAX_REQUEST_LINE}) and says whether it is an HTTP/1.x request; the bytes
 * stay unread for whoever handles the connection.
 */
function peekRequestLine(socket: Socket, initial: Buffer, timeoutMs: number): Promise<{ http: boolean; data: Buffer }> {
  return new Promise((resolve) => {
    let data = initial;
    let timer: NodeJS.Timeout | undefined;
    const decided = (): boolean => data.includes(0x0a) || data.length >= MAX_REQUEST_LINE;
    const finish = (): void => {
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("close", finish);
      socket.off("end", finish);
      socket.pause();
      resolve({ http: REQUEST_LINE.test(data.subarray(0, MAX_REQUEST_LINE).toString("latin1")), data });
    };
    const onData = (chunk: Buffer): void => {
      data = Buffer.concat([data, chunk]);
      if (decided()) finish();
    };
    if (decided()) return finish();
    timer = setTimeout(finish, timeoutMs);
    socket.on("data", onData);
    socket.on("close", finish);
    socket.on("end", finish);
    socket.resume();
  });
}

/** A TCP connection to an origin the destination check allows (IP literals here, names in its lookup). */
function tcpConnect(host: string, port: number, timeoutMs: number, destinations: DestinationGuard): Promise<Socket> {
  return new Promise((resolve, reject) => {
    try {
      destinations.checkLiteral(host);
    } catch (err) {
      reject(err);
      return;
    }
    const s = netConnect({ host, port, lookup: destinations.lookup });
    s.setNoDelay(true);
    const timer = setTimeout(() => {
      s.destroy();
      reject(Object.assign(new Error(`connect timed out after ${timeoutMs} ms`), { code: "ETIMEDOUT" }));
    }, timeoutMs);
    s.once("connect", () => {
      clearTimeout(timer);
      s.off("error", onError);
      // The origin may reset while the client is still sending its ClientHello; whoever
      // uses the socket next sees it closed.
      s.on("error", () => {});
      resolve(s);
    });
    const onError = (err: Error): void => {
      clearTimeout(timer);
      reject(err);
    };
    s.once("error", onError);
  });
}

/** A refusal: the page to answer with, and what the access log says. */
interface Refusal {
  readonly page: BlockPage;
  readonly decision: Decision;
  readonly rule: string;
  /** More response headers (a 407's Proxy-Authenticate). */
  readonly extra?: Record<string, string>;
}

function refusal(page: BlockPage, decision: Decision, rule: string, extra?: Record<string, string>): Refusal {
  return extra === undefined ? { page, decision, rule } : { page, decision, rule, extra };
}

/** A CONNECT that passed the checks made before the 200. */
interface Classified {
  readonly kind: "go";
  readonly target: ConnectTarget;
  readonly client: ClientInfo;
  /** The policy in force when the CONNECT arrived (used for the whole connection). */
  readonly policy: Policy;
  /** Set when the connection is tunnelled without looking at it. */
  readonly bypassRule: string | undefined;
  readonly log: ConnectLog;
}

/** A ClientHello the proxy will intercept. */
interface Intercept {
  readonly kind: "intercept";
  readonly log: ConnectLog;
  readonly hello: ClientHello;
  /** The SNI, or the CONNECT host without one. */
  readonly host: string;
  /** The client's ALPN offers the proxy can inspect. */
  readonly offers: string[];
}

/** What the client's first bytes lead to. */
type HelloOutcome =
  | Intercept
  /** `sniOnly`: the bypass names the SNI, not the CONNECT host: it holds only if the CONNECT names an address of that name. */
  | { readonly kind: "tunnel"; readonly log: ConnectLog; readonly rule: string; readonly sniOnly?: string }
  | { readonly kind: "page"; readonly log: ConnectLog; readonly hello: ClientHello; readonly refusal: Refusal }
  | { readonly kind: "drop"; readonly log: ConnectLog; readonly decision: Decision; readonly rule: string; readonly error: string };

/** A verified TLS connection to the origin. */
interface OriginTls {
  readonly kind: "ok";
  readonly socket: TLSSocket;
  readonly cert: X509Certificate;
  /** The protocol the origin chose. */
  readonly alpn: string | false;
  /** An error the origin sent after its handshake, so far. */
  lateError(): Error | undefined;
  /** Stops recording late errors (the client's handshake finished). */
  stopWatching(): void;
}

/**
 * Whether the CONNECT's `target` is an address that `name` resolves to (the system resolver,
 * within `timeoutMs`): what lets a bypass rule that names the SNI tunnel a CONNECT made to an IP
 * address. A CONNECT to another name, or to an address the name does not have, is not that
 * host's traffic, and a bypass for it would let any client skip inspection of any host by
 * writing a bypassed name in its SNI.
 */
async function sniNamesAddress(name: string, target: string, timeoutMs: number): Promise<boolean> {
  const address = normalizeAddress(target);
  if (isIP(address) === 0) return false;
  let timer: NodeJS.Timeout | undefined;
  try {
    const found = await Promise.race([
      dnsLookup(name, { all: true, verbatim: true }),
      new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error("lookup timed out")), timeoutMs))),
    ]);
    return found.some((a) => normalizeAddress(a.address) === address);
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
}

/** An IP address in one spelling (IPv4-mapped IPv6 as IPv4, IPv6 as the URL parser writes it); a name as is. */
function normalizeAddress(host: string): string {
  const bare = normalizeClientAddress(host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host);
  return isIP(bare) === 6 ? new URL(`http://[${bare}]/`).hostname.slice(1, -1) : bare;
}

/** The interceptor: CONNECT handling plus the inner HTTP servers of decrypted connections. */
export class Interceptor {
  private readonly h1: HttpServer;
  private readonly h2: Http2Server;
  private readonly pages: HttpServer;
  private readonly live = new Set<Duplex>();
  /** Tenant + origin `host:port` pairs that got a leaf lately. */
  private readonly leafHosts = new LeafHosts();

  constructor(private readonly ctx: ProxyContext) {
    const l = ctx.limits;
    // The inner servers never listen: decrypted sockets are handed to them with emit("connection").
    this.h1 = createHttpServer({
      maxHeaderSize: l.maxHeaderBytes,
      headersTimeout: l.headersTimeoutMs,
      requestTimeout: l.requestTimeoutMs,
      keepAliveTimeout: l.keepAliveTimeoutMs,
      connectionsCheckingInterval: 1000,
    });
    this.h1.timeout = l.idleTimeoutMs;
    this.h1.on("request", (req, res) => {
      const c = (req.socket as Tagged<H1Conn>)[kConn];
      if (c === undefined) return res.destroy();
      c.stats.requests++;
      handleHttp1Request(this.ctx, c.client, c.upstream, req, res);
    });
    this.h1.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      const c = (socket as Tagged<H1Conn>)[kConn];
      if (c === undefined) return socket.destroy();
      c.stats.requests++;
      handleHttp1Upgrade(this.ctx, c.client, c.upstream, req, socket, head);
    });
    this.h1.on("clientError", answerClientError);

    this.h2 = createH2Server({
      maxHeaderListPairs: 256,
      maxSessionMemory: 32,
      settings: { initialWindowSize: H2_WINDOW, maxHeaderListSize: l.maxHeaderBytes },
    });
    // No 'timeout' listener: an idle session is then destroyed by the server.
    this.h2.setTimeout(l.idleTimeoutMs);
    this.h2.on("session", (session: ServerHttp2Session) => {
      session.on("error", () => {});
      session.on("connect", () => void (session.destroyed || session.setLocalWindowSize(8 << 20)));
    });
    this.h2.on("stream", (stream, headers) => {
      const c = (stream.session?.socket as Tagged<H2Conn> | undefined)?.[kConn];
      if (c === undefined) return stream.close();
      c.stats.requests++;
      handleH2Stream(this.ctx, c.client, c.upstream, stream, headers);
    });

    this.pages = createHttpServer({ maxHeaderSize: l.maxHeaderBytes, headersTimeout: l.headersTimeoutMs, requestTimeout: l.headersTimeoutMs });
    this.pages.on("request", (req, res) => {
      const c = (req.socket as Tagged<PageConn>)[kConn];
      const page = c?.page ?? renderBlockPage(403, "", "refused", undefined);
      res.writeHead(page.status, { ...page.headers, connection: "close" });
      res.end(page.body);
      req.resume();
    });
    this.pages.on("clientError", (_err, socket: Duplex) => socket.destroy());
  }

  /** Closes every connection the interceptor holds. */
  destroyAll(): void {
    for (const s of this.live) s.destroy();
    this.live.clear();
    this.h1.closeAllConnections();
  }

  /** Sockets the interceptor holds now (client, decrypted and origin sides of tunnels and intercepted sessions). */
  get socketsHeld(): number {
    return this.live.size;
  }

  private track(s: Duplex): void {
    this.live.add(s);
    s.once("close", () => this.live.delete(s));
  }

  /** Handles a CONNECT from the outer HTTP server. */
  handleConnect(req: IncomingMessage, socket: Socket, head: Buffer): void {
    void this.connect(req, socket, head).catch((err: unknown) => {
      this.ctx.logger.error("connect handling failed", { error: err as Error });
      socket.destroy();
    });
  }

  /** The stages of a CONNECT: classify → dial → (200) → peekHello → originTls → mint → terminate. */
  private async connect(req: IncomingMessage, socket: Socket, head: Buffer): Promise<void> {
    const start = performance.now();
    this.track(socket);
    socket.on("error", ignoreError);
    socket.setNoDelay(true);
    const address = normalizeClientAddress(socket.remoteAddress);
    const c = await this.classify(req, address, ConnectLog.begin(this.ctx, `${address}:${socket.remotePort ?? 0}`, start));
    if (c.kind === "answer") return this.answer(socket, c.log, c.refusal);
    const dialed = await this.dial(c.target);
    if (dialed.kind === "answer") return this.answer(socket, c.log, dialed.refusal);
    const tcp = dialed.tcp;
    if (socket.destroyed) {
      tcp.destroy();
      return c.log.write("no-request", "client-gone");
    }
    socket.write("HTTP/1.1 200 Connection Established\r\n\r\n");
    if (c.bypassRule !== undefined) return this.tunnel(socket, tcp, head, c.log, c.bypassRule);

    const peek = await peekClientHello(socket, head, this.ctx.limits.clientHelloTimeoutMs);
    if (peek.kind === "not-tls") return this.cleartext(socket, tcp, peek.data, c);
    let h = this.classifyHello(peek, c);
    if (h.kind === "tunnel" && h.sniOnly !== undefined && !(await sniNamesAddress(h.sniOnly, c.target.host, this.ctx.limits.originTimeoutMs))) {
      // A bypassed name in the SNI of a CONNECT to somewhere else: inspected like any other.
      h = this.classifyHello(peek, c, false);
    }
    if (h.kind !== "intercept") {
      if (h.kind === "tunnel") return this.tunnel(socket, tcp, peek.data, h.log, h.rule);
      tcp.destroy();
      if (h.kind === "page") return this.servePage(socket, peek.data, h.hello, h.log, h.refusal);
      socket.destroy();
      return h.log.write(h.decision, h.rule, h.error);
    }
    const o = await this.originTls(c, h, tcp);
    if (o.kind === "retunnel") return this.retunnel(socket, c.target, peek.data, h.log);
    if (o.kind === "page") return this.servePage(socket, peek.data, h.hello, h.log, o.refusal);
    const closeOrigin = (): void => void o.socket.destroy();
    socket.once("close", closeOrigin);
    const leaf = await this.mint(c.client, h.host, o.cert, `${c.target.host}:${c.target.port}`);
    if (!("context" in leaf)) {
      o.socket.destroy();
      return this.servePage(socket, peek.data, h.hello, h.log, leaf);
    }
    this.leafHosts.remember(c.client.tenant, `${c.target.host}:${c.target.port}`);
    if (socket.destroyed) {
      o.socket.destroy();
      return h.log.write("no-request", "client-gone", "client left during the origin handshake");
    }
    const late = this.lateOriginRefusal(c, h, o);
    if (late !== undefined) {
      o.socket.destroy();
      if (late === "retunnel") return this.retunnel(socket, c.target, peek.data, h.log);
      return this.servePage(socket, peek.data, h.hello, h.log, late);
    }
    // From here the handshake watch (then the session) closes the origin side.
    socket.off("close", closeOrigin);
    this.terminate(socket, peek.data, leaf, c, h, o);
  }

  /** Answers the CONNECT itself (before any 200) with `refusal`'s page. */
  private answer(socket: Socket, log: ConnectLog, r: Refusal): void {
    log.write(r.decision, r.rule, r.page.headers["x-kmi-reason"], { status: r.page.status });
    this.ctx.counters.connect(r.decision);
    socket.end(rawHttpResponse(r.page, r.extra));
    socket.destroySoon?.();
  }

  /** Target, tenant, host rules: refused on the CONNECT, or what to do once the origin answers TCP. */
  private async classify(req: IncomingMessage, address: string, log0: ConnectLog): Promise<Classified | { kind: "answer"; log: ConnectLog; refusal: Refusal }> {
    const ctx = this.ctx;
    const target = parseConnectTarget(req.url);
    if (target === undefined) {
      // A target that carries a user and password (`alice:pw@host:443`) is logged without them.
      const log = log0.with({ path: String(req.url ?? "").replace(/^[^/@]*@/, "…@").slice(0, 300) });
      return { kind: "answer", log, refusal: refusal(renderBlockPage(400, "", "the CONNECT target is not host:port", undefined), "block", "bad-request") };
    }
    const log1 = log0.with({ host: target.host, path: `${target.host}:${target.port}` });
    const resolving = ctx.tenants.resolve(req.socket.remoteAddress, req.headers["proxy-authorization"]);
    // A promise only while a scrypt password is checked; everything else stays synchronous.
    const match = resolving instanceof Promise ? await resolving : resolving;
    if (match.kind === "auth-required") {
      return {
        kind: "answer",
        log: log1,
        refusal: refusal(renderBlockPage(407, target.host, match.reason, undefined), "block", "proxy-auth", { "proxy-authenticate": 'Basic realm="kmi proxy"' }),
      };
    }
    if (match.kind === "no-tenant") {
      const page = renderBlockPage(403, target.host, "no tenant matches this client; configure its address range or use proxy credentials", undefined);
      return { kind: "answer", log: log1, refusal: refusal(page, "block", "no-tenant") };
    }
    const log = log1.with({ tenant: match.tenant });
    const client: ClientInfo = { tenant: match.tenant, client: `${address}:${req.socket.remotePort ?? 0}`, address };
    const policy = ctx.policy.forTenant(match.tenant);
    const blocked = policy.blockedHost(target.host);
    if (blocked !== undefined) {
      return { kind: "answer", log, refusal: refusal(renderBlockPage(403, target.host, "the host matches a block rule", ruleId(blocked)), "block", ruleId(blocked)) };
    }
    const originKey = `${target.host}:${target.port}`;
    let bypassRule: string | undefined;
    const bypass = policy.bypassedHost(target.host);
    if (bypass !== undefined) bypassRule = ruleId(bypass);
    else if (ctx.learned.demandsClientCert(originKey) && policy.clientCertOrigins === "bypass") bypassRule = "client-cert";
    else if (ctx.learned.pinnedBypass(match.tenant, target.host)) bypassRule = "auto-bypass";
    if (bypassRule === undefined) {
      const cannot = await this.cannotIntercept(client, originKey);
      if (cannot !== undefined) return { kind: "answer", log, refusal: cannot };
    }
    return { kind: "go", target, client, policy, bypassRule, log };
  }

  /**
   * Why this CONNECT cannot be intercepted, when the proxy knows before the 200: the agent has
   * no key for the tenant (quarantine, revoke, none held), or the client is past its new-host
   * limit for a host it got no leaf for. Answered on the CONNECT itself, so the client reads the
   * reason instead of a certificate error from the kmi-blocked CA.
   */
  private async cannotIntercept(client: ClientInfo, originKey: string): Promise<Refusal | undefined> {
    const host = originKey.slice(0, originKey.lastIndexOf(":"));
    const keys = this.ctx.keys.refusal(client.tenant);
    if (keys !== undefined) return refusal(renderBlockPage(503, host, keys.reason, keys.rule, "error"), "error", keys.rule, { "retry-after": "30" });
    if (await this.pastNewHostLimit(client, originKey)) {
      const why = "too many new hosts from this address (the proxy's per-address limit on leaf issuance, kmi proxy --issue-rate/--issue-burst); try again shortly";
      return refusal(renderBlockPage(429, host, why, "issue-rate-limit", "error"), "error", "issue-rate-limit", { "retry-after": "1" });
    }
    return undefined;
  }

  /**
   * True when the client is past its new-host limit and its tenant got no leaf for `originKey`
   * lately. With workers, the limit is the primary's: a worker whose view says the bucket is
   * empty asks the primary, which also knows the hosts the other workers served.
   */
  private async pastNewHostLimit(client: ClientInfo, originKey: string): Promise<boolean> {
    if (!this.ctx.rateLimiter.exhausted(client.address) || this.leafHosts.has(client.tenant, originKey)) return false;
    const shared = this.ctx.minter.sharedLimit;
    return shared === undefined || (await shared.refusesNewHost(client.tenant, originKey, client.address));
  }

  /** A TCP connection to the origin, or the refusal to answer on the CONNECT. */
  private async dial(target: ConnectTarget): Promise<{ kind: "tcp"; tcp: Socket } | { kind: "answer"; refusal: Refusal }> {
    try {
      return { kind: "tcp", tcp: await tcpConnect(target.host, target.port, this.ctx.limits.originTimeoutMs, this.ctx.destinations) };
    } catch (err) {
      if (isDestinationDenied(err)) {
        return { kind: "answer", refusal: refusal(renderBlockPage(403, target.host, err.message, "private-destination"), "block", "private-destination") };
      }
      const why = `origin ${describeError(err as NodeJS.ErrnoException)}`;
      return { kind: "answer", refusal: refusal(renderBlockPage(502, target.host, why, "origin-unreachable"), "error", "origin-unreachable") };
    }
  }

  /**
   * Cleartext inside a CONNECT: HTTP/1.x is inspected exactly as a plain proxy request (the
   * same block rules, scanning and access log, one line per request); anything else is closed,
   * or tunnelled when the policy's `nonTls` is "tunnel" (a `bypassHosts` rule tunnels it earlier).
   */
  private async cleartext(socket: Socket, tcp: Socket, first: Buffer, c: Classified): Promise<void> {
    const { http, data } = await peekRequestLine(socket, first, this.ctx.limits.clientHelloTimeoutMs);
    if (!http) {
      if (c.policy.nonTls === "tunnel") return this.tunnel(socket, tcp, data, c.log, "non-tls");
      tcp.destroy();
      socket.destroy();
      return c.log.write("block", "non-tls", 'cleartext that is not HTTP is refused (policy nonTls is "block"; a bypassHosts rule tunnels it)');
    }
    if (socket.destroyed) {
      tcp.destroy();
      return c.log.write("no-request", "client-gone");
    }
    this.ctx.counters.connect("intercept");
    tcp.on("error", () => {});
    const { target, client } = c;
    const reconnect = (): Promise<Socket> => tcpConnect(target.host, target.port, this.ctx.limits.originTimeoutMs, this.ctx.destinations);
    const origin = this.tunnelOrigin(tcp, reconnect, target);
    const stats: ConnStats = { requests: 0 };
    const upstream: Http1Upstream = { scheme: "http", tunnel: { host: target.host, port: target.port, requestedHost: target.host, origin } };
    (socket as Tagged<H1Conn>)[kConn] = { client, upstream, stats };
    socket.once("close", () => origin.destroy());
    socket.unshift(data);
    this.h1.emit("connection", socket);
    // The peek paused it; the server reads through 'data' events (the outer server unconsumed the socket at the CONNECT).
    socket.resume();
  }

  /** What the client's ClientHello asks for: interception, a tunnel, a page, or a close. */
  private classifyHello(peek: Peek, c: Classified, sniBypass = true): HelloOutcome {
    const { policy, target, log: log0 } = c;
    if (peek.kind !== "hello") {
      if (peek.kind === "invalid") return { kind: "drop", log: log0, decision: "error", rule: "client-hello", error: `bad clienthello: ${peek.reason}` };
      // Closed or silent before its ClientHello: it never asked for anything.
      return { kind: "drop", log: log0, decision: "no-request", rule: "client-hello", error: `client ${peek.kind} before its clienthello` };
    }
    const hello = peek.hello;
    const host = hello.serverName ?? target.host;
    const log = log0.with({ host });
    if (host !== target.host) {
      const b = policy.blockedHost(host);
      if (b !== undefined) return { kind: "page", log, hello, refusal: refusal(renderBlockPage(403, host, "the host matches a block rule", ruleId(b)), "block", ruleId(b)) };
      const bp = sniBypass ? policy.bypassedHost(host) : undefined;
      if (bp !== undefined) return { kind: "tunnel", log, rule: ruleId(bp), sniOnly: host };
      if (sniBypass && this.ctx.learned.pinnedBypass(c.client.tenant, host)) return { kind: "tunnel", log, rule: "auto-bypass", sniOnly: host };
    }
    const offers = hello.alpn.filter((p) => INSPECTABLE_ALPN.has(p));
    if (hello.alpn.length > 0 && offers.length === 0) {
      if (policy.uninspectableAlpn === "tunnel") return { kind: "tunnel", log, rule: "alpn-uninspectable" };
      const offered = hello.alpn.map((p) => JSON.stringify(p).slice(0, 40)).slice(0, 8).join(", ");
      return { kind: "drop", log, decision: "block", rule: "alpn-uninspectable", error: `the client offers only protocols the proxy cannot inspect (${offered}); policy uninspectableAlpn is "block"` };
    }
    return { kind: "intercept", log, hello, host, offers };
  }

  /** Meets the origin over TLS with the client's SNI and inspectable ALPN offers, and verifies it. */
  private async originTls(c: Classified, h: Intercept, tcp: Socket): Promise<OriginTls | { kind: "retunnel" } | { kind: "page"; refusal: Refusal }> {
    const { target, policy } = c;
    const origin: OriginResult = await this.ctx.origins.connect({ host: target.host, port: target.port, servername: h.hello.serverName, alpn: h.offers, socket: tcp });
    if (origin.kind === "client-cert") {
      this.ctx.learned.markClientCert(`${target.host}:${target.port}`);
      if (policy.clientCertOrigins === "bypass") return { kind: "retunnel" };
      return { kind: "page", refusal: refusal(renderBlockPage(502, h.host, origin.reason, "client-cert", "block"), "block", "client-cert") };
    }
    if (origin.kind === "unverified") return { kind: "page", refusal: refusal(renderBlockPage(502, h.host, origin.reason, "origin-verify", "block"), "block", "origin-verify") };
    if (origin.kind === "failed") return { kind: "page", refusal: refusal(renderBlockPage(502, h.host, origin.reason, "origin-tls"), "error", "origin-tls") };
    // A TLS 1.3 origin that wants a client certificate says so only after its handshake.
    const late: { error?: Error } = {};
    const onLate = (err: Error): void => void (late.error = err);
    origin.socket.on("error", onLate);
    return { kind: "ok", socket: origin.socket, cert: origin.cert, alpn: origin.alpn, lateError: () => late.error, stopWatching: () => void origin.socket.off("error", onLate) };
  }

  /** The leaf for this origin certificate, or the page that says why there is none; `target` is the CONNECT's `host:port`. */
  private async mint(client: ClientInfo, host: string, cert: X509Certificate, target: string): Promise<LeafEntry | Refusal> {
    try {
      return await this.leafFor(client, host, cert, target);
    } catch (err) {
      const [status, rule, why] =
        err instanceof IssuanceRefused
          ? [429, "issue-rate-limit", err.message]
          : err instanceof AgentCallError
            ? [503, "agent-error", `the key agent could not issue a certificate: ${err.code}: ${err.message}`]
            : err instanceof LeafRejected
              ? [503, "leaf-rejected", err.message]
              : [503, "leaf-error", (err as Error).message];
      if (!(err instanceof IssuanceRefused)) this.ctx.logger.warn("leaf issuance failed", { tenant: client.tenant, host, error: err as Error });
      return refusal(renderBlockPage(status, host, why, rule), "error", rule);
    }
  }

  /** What an origin error that came after its handshake (while the leaf was minted) means. */
  private lateOriginRefusal(c: Classified, h: Intercept, o: OriginTls): Refusal | "retunnel" | undefined {
    const err = o.lateError();
    if (err === undefined) return undefined;
    if (isClientCertRequired(err)) {
      this.ctx.learned.markClientCert(`${c.target.host}:${c.target.port}`);
      if (c.policy.clientCertOrigins === "bypass") return "retunnel";
      return refusal(renderBlockPage(502, h.host, "origin demands a client certificate", "client-cert", "block"), "block", "client-cert");
    }
    return refusal(renderBlockPage(502, h.host, `origin ${describeError(err)}`, "origin-tls"), "error", "origin-tls");
  }

  /** Terminates the client's TLS with the leaf and the origin's protocol choice; once secured, serves HTTP/1.1 or h2. */
  private terminate(socket: Socket, data: Buffer, leaf: LeafEntry, c: Classified, h: Intercept, o: OriginTls): void {
    socket.unshift(data);
    const tls = new TLSSocket(socket, {
      isServer: true,
      secureContext: leaf.context,
      ALPNProtocols: o.alpn === false ? undefined : [o.alpn],
    });
    // The outer HTTP server's sockets allow half-open connections, and a TLSSocket inherits
    // that; a decrypted connection must not, or a client's FIN would leave it (an HTTP/2
    // session, a stalled upload) open until its idle timeout.
    tls.allowHalfOpen = false;
    this.track(tls);
    this.watchHandshake(tls, c.client, h, o, () => {
      markHandshakeDone(tls);
      o.stopWatching();
      this.ctx.counters.connect("intercept");
      const stats: ConnStats = { requests: 0 };
      this.logIfNoRequest(tls, c.client, h, stats);
      this.serveDecrypted(tls, c, h, o, stats);
    });
  }

  /**
   * Calls `secured` when the client's handshake completes; logs (and counts toward auto-bypass)
   * a handshake that times out, fails, or is abandoned, and then closes the origin side.
   */
  private watchHandshake(tls: TLSSocket, client: ClientInfo, h: Intercept, o: OriginTls, secured: () => void): void {
    const { host, log } = h;
    let settled = false;
    const fail = (decision: Decision, rule: string, why: string, rejected: boolean): void => {
      settled = true;
      clearTimeout(timer);
      o.socket.destroy();
      if (rejected) this.rejected(client, host);
      log.write(decision, rule, why);
    };
    const timer = setTimeout(() => {
      fail("error", "client-tls", `client did not finish its tls handshake within ${this.ctx.limits.handshakeTimeoutMs} ms`, false);
      tls.destroy();
    }, this.ctx.limits.handshakeTimeoutMs);
    const onError = (err: NodeJS.ErrnoException): void => {
      if (settled) return;
      // The client refused the minted certificate (a pinned app, or the CA is not installed).
      const rejected = /ALERT_(BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN|UNSUPPORTED_CERTIFICATE|CERTIFICATE_REVOKED|ACCESS_DENIED|DECRYPT_ERROR)/.test(err.code ?? "");
      fail("error", rejected ? "client-rejected-leaf" : "client-tls", `client tls: ${describeError(err)}`, rejected);
    };
    const onClose = (): void => {
      if (settled) return;
      // Closed after our certificate went out, before finishing the handshake: clients that
      // verify as the handshake ends (Node, many pinning libraries) leave this way, without an alert.
      fail("no-request", "client-closed-in-handshake", "client closed during the tls handshake without an alert", true);
    };
    tls.on("error", onError);
    tls.once("close", onClose);
    tls.once("secure", () => {
      settled = true;
      clearTimeout(timer);
      // Memory: these listeners hold the handshake's scope (origin socket, ClientHello, timer);
      // a session that stays open for hours must not keep it.
      tls.off("error", onError);
      tls.off("close", onClose);
      tls.on("error", ignoreError);
      secured();
    });
  }

  /** Logs a decrypted connection that closes without a request (`no-request`). */
  private logIfNoRequest(tls: TLSSocket, client: ClientInfo, h: Intercept, stats: ConnStats): void {
    const securedAt = performance.now();
    // Only what the line needs stays alive with the connection, not the whole Intercept.
    const { host, log } = h;
    tls.once("close", () => {
      if (stats.requests > 0) return;
      const seconds = Math.round(performance.now() - securedAt) / 1000;
      if (seconds * 1000 < SILENT_REJECT_MS) {
        // Most likely a client that verifies after the handshake and refused the leaf without an alert.
        this.rejected(client, host);
        log.write("no-request", "client-closed-after-handshake", `client closed ${seconds} s after the handshake without a request`);
      } else {
        log.write("no-request", "no-request", `client closed ${seconds} s after the handshake without a request`);
      }
    });
  }

  /** Hands the decrypted connection to the inner HTTP/1.1 or HTTP/2 server, with its origin side. */
  private serveDecrypted(tls: TLSSocket, c: Classified, h: Intercept, o: OriginTls, stats: ConnStats): void {
    const { client, target } = c;
    const { host } = h;
    const servername = h.hello.serverName;
    const alpn = o.alpn;
    const reconnect = async (): Promise<TLSSocket> => {
      const r = await this.ctx.origins.connect({ host: target.host, port: target.port, servername, alpn: alpn === false ? [] : [alpn] });
      if (r.kind !== "ok") throw Object.assign(new Error(r.reason), { code: r.kind === "failed" ? r.code : r.kind.toUpperCase() });
      return r.socket;
    };
    if (alpn === "h2") {
      const origin = new H2Origin(o.socket, target.port === 443 ? host : `${host}:${target.port}`, reconnect, this.ctx.limits.originIdleTimeoutMs);
      (tls as Tagged<H2Conn>)[kConn] = { client, upstream: { origin, requestedHost: host, port: target.port }, stats };
      tls.once("close", () => origin.close());
      this.h2.emit("connection", tls);
      return;
    }
    const origin = this.tunnelOrigin(o.socket, reconnect, target);
    (tls as Tagged<H1Conn>)[kConn] = { client, upstream: { scheme: "https", tunnel: { host: target.host, port: target.port, requestedHost: host, origin } }, stats };
    tls.once("close", () => origin.destroy());
    this.h1.emit("connection", tls);
  }

  /** The HTTP/1.1 origin side of a tunnel: `first` its connection, `reconnect` how to open (and verify) another. */
  private tunnelOrigin(first: Duplex, reconnect: () => Promise<Duplex>, target: { host: string; port: number }): TunnelOrigin {
    const l = this.ctx.limits;
    // The origin's answer may take the idle timeout less a tenth (at most 5 s): the client then
    // hears why (a 502 page) before its own connection, idle as long, is closed.
    const responseTimeoutMs = Math.max(1, l.idleTimeoutMs - Math.min(5_000, Math.floor(l.idleTimeoutMs / 10)));
    return new TunnelOrigin(first, reconnect, target, { responseTimeoutMs, idleMs: l.originIdleTimeoutMs });
  }

  /** Counts a client's refusal of the minted leaf (pinned-app detection, when the policy turns it on). */
  private rejected(client: ClientInfo, host: string): void {
    if (this.ctx.learned.recordRejection(client.tenant, host, this.ctx.policy.forTenant(client.tenant).autoBypass)) {
      this.ctx.logger.info("auto-bypass on: clients keep rejecting the minted certificate", { tenant: client.tenant, host });
    }
  }

  /** The leaf for this origin certificate: cached, joined, or minted (rate-limited per client). */
  private async leafFor(client: ClientInfo, host: string, cert: X509Certificate, target: string): Promise<LeafEntry> {
    const ctx = this.ctx;
    const key = leafCacheKey(client.tenant, cert.fingerprint256);
    const hit = ctx.leaves.get(key);
    if (hit !== undefined) {
      ctx.counters.leaf("cache");
      return hit;
    }
    const origin = describeOriginCertificate(cert);
    const names = leafNames(origin, host);
    const k = names.truncated ? leafCacheKey(client.tenant, cert.fingerprint256, host) : key;
    // With workers the primary holds the limit (one per machine) and charges it when it mints.
    const { entry, source } = await ctx.leaves.obtain(
      client.tenant,
      k,
      () => ctx.minter.mint(client.tenant, origin, host, { client: client.address, target }),
      ctx.minter.sharedLimit !== undefined ? undefined : () => ctx.rateLimiter.take(client.address),
    );
    ctx.counters.leaf(source);
    return entry;
  }

  /** A plain tunnel (bypass): `first` is what the client already sent. */
  private tunnel(socket: Socket, tcp: Socket, first: Buffer, log: ConnectLog, rule: string): void {
    this.ctx.counters.connect("bypass");
    this.track(tcp);
    tcp.on("error", () => {});
    if (first.length > 0) tcp.write(first);
    splice(socket, tcp, this.ctx.limits.idleTimeoutMs, (r) => {
      log.write("bypass", rule, r.error?.message, { status: 200, bytes_up: r.up + first.length, bytes_down: r.down });
    });
  }

  /** Tunnels on a fresh TCP connection (the first one was used for a TLS attempt). */
  private retunnel(socket: Socket, target: ConnectTarget, first: Buffer, log: ConnectLog): void {
    tcpConnect(target.host, target.port, this.ctx.limits.originTimeoutMs, this.ctx.destinations).then(
      (tcp) => {
        if (socket.destroyed) {
          tcp.destroy();
          return log.write("no-request", "client-gone");
        }
        this.tunnel(socket, tcp, first, log, "client-cert");
      },
      (err: NodeJS.ErrnoException) => {
        socket.destroy();
        log.write("error", "origin-unreachable", describeError(err));
      },
    );
  }

  /** Answers with the refusal's page under a leaf of the untrusted kmi-blocked CA; `data` is the client's ClientHello. */
  private servePage(socket: Socket, data: Buffer, hello: ClientHello, log: ConnectLog, r: Refusal): void {
    const page = r.page;
    log.write(r.decision, r.rule, page.headers["x-kmi-reason"], { status: page.status });
    this.ctx.counters.connect(r.decision);
    if (socket.destroyed) return;
    socket.unshift(data);
    const alpn = hello.alpn.length === 0 || hello.alpn.includes("http/1.1") ? "http/1.1" : undefined;
    const tls = new TLSSocket(socket, {
      isServer: true,
      secureContext: this.ctx.blockedCa.contextFor(log.host),
      ALPNProtocols: alpn === undefined ? undefined : [alpn],
    });
    tls.allowHalfOpen = false;
    this.track(tls);
    tls.on("error", () => tls.destroy());
    const timer = setTimeout(() => tls.destroy(), this.ctx.limits.handshakeTimeoutMs);
    tls.once("close", () => clearTimeout(timer));
    tls.once("secure", () => {
      markHandshakeDone(tls);
      if (tls.alpnProtocol !== false && tls.alpnProtocol !== "http/1.1") {
        tls.destroy();
        return;
      }
      (tls as Tagged<PageConn>)[kConn] = { page };
      this.pages.emit("connection", tls);
    });
  }
}
