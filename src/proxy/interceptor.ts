/**
 * What happens to a CONNECT: tenant, host policy and bypass decisions; a TCP connection to
 * the origin (so an unreachable origin is a plain 502 on the CONNECT); then, after the 200,
 * the client's ClientHello is peeked (SNI, ALPN) and the origin is met first, with the same
 * offers, its certificate verified; a leaf that copies its names is taken from the cache or
 * minted; and the client's TLS is terminated with that leaf and the protocol the origin
 * chose, handing the decrypted connection to the HTTP/1.1 or HTTP/2 handlers.
 *
 * Refusals after the 200 (the origin's certificate does not verify, the SNI names a blocked
 * host, the agent cannot issue) are answered with a page under the untrusted kmi-blocked CA
 * (see ./blocked-ca.ts), never under the tenant's trusted intermediate.
 */
import { createServer as createHttpServer, type Agent, type IncomingMessage, type Server as HttpServer } from "node:http";
import { createServer as createH2Server, type Http2Server, type ServerHttp2Session } from "node:http2";
import { connect as netConnect, isIP, type Socket } from "node:net";
import { TLSSocket } from "node:tls";
import type { Duplex } from "node:stream";
import type { AccessRecord, Decision } from "./access-log.js";
import { AgentCallError } from "./agent-client.js";
import { rawHttpResponse, renderBlockPage, type BlockPage } from "./block-page.js";
import { parseClientHello, type ClientHello } from "./clienthello.js";
import type { ClientInfo, ProxyContext } from "./context.js";
import { isDestinationDenied, type DestinationGuard } from "./destinations.js";
import { answerClientError, handleHttp1Request, handleHttp1Upgrade, type Http1Upstream } from "./http1.js";
import { H2_WINDOW, H2Origin, handleH2Stream, type H2Upstream } from "./http2-handler.js";
import { IssuanceRefused, leafCacheKey, type LeafEntry } from "./leaf-cache.js";
import { LeafRejected } from "./leaf-minter.js";
import { describeOriginCertificate, leafNames } from "./origin-cert.js";
import { describeError, isClientCertRequired, type OriginResult } from "./origin.js";
import { normalizeHost, ruleId } from "./policy.js";
import { splice } from "./splice.js";
import { TunnelAgent } from "./tunnel-agent.js";
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

/** The interceptor: CONNECT handling plus the inner HTTP servers of decrypted connections. */
export class Interceptor {
  private readonly h1: HttpServer;
  private readonly h2: Http2Server;
  private readonly pages: HttpServer;
  private readonly live = new Set<Duplex>();

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
      session.on("connect", () => session.setLocalWindowSize(8 << 20));
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

  /** Connections (client sockets of tunnels and intercepted sessions) open now. */
  get openConnections(): number {
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

  private async connect(req: IncomingMessage, socket: Socket, head: Buffer): Promise<void> {
    const ctx = this.ctx;
    const start = performance.now();
    this.track(socket);
    socket.on("error", () => {});
    socket.setNoDelay(true);
    const address = normalizeClientAddress(socket.remoteAddress);
    const clientId = `${address}:${socket.remotePort ?? 0}`;
    const rec: AccessRecord = {
      tenant: "",
      client: clientId,
      host: "",
      method: "CONNECT",
      path: "",
      status: 0,
      bytes_up: 0,
      bytes_down: 0,
      decision: "allow",
      duration_ms: 0,
      proto: "tunnel",
    };
    const log = (decision: Decision, rule: string | undefined, error?: string): void => {
      rec.decision = decision;
      if (rule !== undefined) rec.rule = rule;
      if (error !== undefined) rec.error = error;
      rec.duration_ms = Math.round((performance.now() - start) * 10) / 10;
      ctx.counters.decision(decision);
      ctx.accessLog.write(rec);
    };
    const answer = (page: BlockPage, decision: Decision, rule: string | undefined, extra: Record<string, string> = {}): void => {
      rec.status = page.status;
      log(decision, rule, page.headers["x-kmi-reason"]);
      ctx.counters.connect(decision);
      socket.end(rawHttpResponse(page, extra));
      socket.destroySoon?.();
    };

    const target = parseConnectTarget(req.url);
    if (target === undefined) {
      rec.path = String(req.url ?? "").slice(0, 300);
      return answer(renderBlockPage(400, "", "the CONNECT target is not host:port", undefined), "block", "bad-request");
    }
    rec.host = target.host;
    rec.path = `${target.host}:${target.port}`;
    const resolving = ctx.tenants.resolve(socket.remoteAddress, req.headers["proxy-authorization"]);
    // A promise only while a scrypt password is checked; everything else stays synchronous.
    const match = resolving instanceof Promise ? await resolving : resolving;
    if (match.kind === "auth-required") {
      return answer(renderBlockPage(407, target.host, match.reason, undefined), "block", "proxy-auth", {
        "proxy-authenticate": 'Basic realm="kmi proxy"',
      });
    }
    if (match.kind === "no-tenant") {
      return answer(renderBlockPage(403, target.host, "no tenant matches this client; configure its address range or use proxy credentials", undefined), "block", "no-tenant");
    }
    rec.tenant = match.tenant;
    const client: ClientInfo = { tenant: match.tenant, client: clientId, address };
    const policy = ctx.policy.current;
    const blocked = policy.blockedHost(target.host);
    if (blocked !== undefined) {
      return answer(renderBlockPage(403, target.host, "the host matches a block rule", ruleId(blocked)), "block", ruleId(blocked));
    }
    const originKey = `${target.host}:${target.port}`;
    let bypassRule: string | undefined;
    const bypass = policy.bypassedHost(target.host);
    if (bypass !== undefined) bypassRule = ruleId(bypass);
    else if (ctx.learned.demandsClientCert(originKey) && policy.clientCertOrigins === "bypass") bypassRule = "client-cert";
    else if (ctx.learned.pinnedBypass(match.tenant, target.host)) bypassRule = "auto-bypass";

    let tcp: Socket;
    try {
      tcp = await tcpConnect(target.host, target.port, ctx.limits.originTimeoutMs, ctx.destinations);
    } catch (err) {
      if (isDestinationDenied(err)) {
        return answer(renderBlockPage(403, target.host, err.message, "private-destination"), "block", "private-destination");
      }
      const why = `origin ${describeError(err as NodeJS.ErrnoException)}`;
      return answer(renderBlockPage(502, target.host, why, "origin-unreachable"), "error", "origin-unreachable");
    }
    if (socket.destroyed) {
      tcp.destroy();
      return log("error", "client-gone");
    }
    socket.write("HTTP/1.1 200 Connection Established\r\n\r\n");

    if (bypassRule !== undefined) return this.tunnel(socket, tcp, head, rec, bypassRule, log);

    const peek = await peekClientHello(socket, head, ctx.limits.clientHelloTimeoutMs);
    if (peek.kind !== "hello") {
      if (peek.kind === "not-tls" && policy.nonTls === "tunnel") return this.tunnel(socket, tcp, peek.data, rec, "non-tls", log);
      tcp.destroy();
      socket.destroy();
      const why = peek.kind === "not-tls" ? "non-tls traffic refused by policy" : peek.kind === "invalid" ? `bad clienthello: ${peek.reason}` : `client ${peek.kind} before its clienthello`;
      return log(peek.kind === "not-tls" ? "block" : "error", peek.kind === "not-tls" ? "non-tls" : "client-hello", why);
    }
    const hello = peek.hello;
    const host = hello.serverName ?? target.host;
    rec.host = host;
    if (host !== target.host) {
      const b = policy.blockedHost(host);
      if (b !== undefined) {
        tcp.destroy();
        return this.servePage(socket, peek.data, hello, host, renderBlockPage(403, host, "the host matches a block rule", ruleId(b)), rec, log, "block", ruleId(b));
      }
      const bp = policy.bypassedHost(host);
      if (bp !== undefined) return this.tunnel(socket, tcp, peek.data, rec, ruleId(bp), log);
      if (ctx.learned.pinnedBypass(match.tenant, host)) return this.tunnel(socket, tcp, peek.data, rec, "auto-bypass", log);
    }
    const offers = hello.alpn.filter((p) => INSPECTABLE_ALPN.has(p));
    if (hello.alpn.length > 0 && offers.length === 0) {
      if (policy.uninspectableAlpn === "tunnel") return this.tunnel(socket, tcp, peek.data, rec, "alpn-uninspectable", log);
      tcp.destroy();
      socket.destroy();
      const offered = hello.alpn.map((p) => JSON.stringify(p).slice(0, 40)).slice(0, 8).join(", ");
      return log("block", "alpn-uninspectable", `the client offers only protocols the proxy cannot inspect (${offered}); policy uninspectableAlpn is "block"`);
    }

    const origin: OriginResult = await ctx.origins.connect({ host: target.host, port: target.port, servername: hello.serverName, alpn: offers, socket: tcp });
    if (origin.kind === "client-cert") {
      ctx.learned.markClientCert(originKey);
      if (policy.clientCertOrigins === "bypass") return this.retunnel(socket, target, peek.data, rec, log);
      return this.servePage(socket, peek.data, hello, host, renderBlockPage(502, host, origin.reason, "client-cert", "block"), rec, log, "block", "client-cert");
    }
    if (origin.kind === "unverified") {
      return this.servePage(socket, peek.data, hello, host, renderBlockPage(502, host, origin.reason, "origin-verify", "block"), rec, log, "block", "origin-verify");
    }
    if (origin.kind === "failed") {
      return this.servePage(socket, peek.data, hello, host, renderBlockPage(502, host, origin.reason, "origin-tls"), rec, log, "error", "origin-tls");
    }
    const osock = origin.socket;
    // A TLS 1.3 origin that wants a client certificate says so only after its handshake.
    let lateError: Error | undefined;
    const onLate = (err: Error): void => {
      lateError = err;
    };
    osock.on("error", onLate);
    const closeOrigin = (): void => void osock.destroy();
    socket.once("close", closeOrigin);

    let leaf: LeafEntry;
    try {
      leaf = await this.leafFor(client, host, origin.cert);
    } catch (err) {
      osock.destroy();
      const [status, rule, why] =
        err instanceof IssuanceRefused
          ? [429, "issue-rate-limit", err.message]
          : err instanceof AgentCallError
            ? [503, "agent-error", `the key agent could not issue a certificate: ${err.code}: ${err.message}`]
            : err instanceof LeafRejected
              ? [503, "leaf-rejected", err.message]
              : [503, "leaf-error", (err as Error).message];
      if (!(err instanceof IssuanceRefused)) ctx.logger.warn("leaf issuance failed", { tenant: client.tenant, host, error: err as Error });
      return this.servePage(socket, peek.data, hello, host, renderBlockPage(status, host, why, rule), rec, log, "error", rule);
    }
    if (socket.destroyed) {
      osock.destroy();
      return log("error", "client-gone", "client left during the origin handshake");
    }
    if (lateError !== undefined) {
      osock.destroy();
      if (isClientCertRequired(lateError)) {
        ctx.learned.markClientCert(originKey);
        if (policy.clientCertOrigins === "bypass") return this.retunnel(socket, target, peek.data, rec, log);
        return this.servePage(socket, peek.data, hello, host, renderBlockPage(502, host, "origin demands a client certificate", "client-cert", "block"), rec, log, "block", "client-cert");
      }
      return this.servePage(socket, peek.data, hello, host, renderBlockPage(502, host, `origin ${describeError(lateError)}`, "origin-tls"), rec, log, "error", "origin-tls");
    }

    // Terminate the client's TLS with the leaf and the origin's protocol choice.
    socket.unshift(peek.data);
    const alpn = origin.alpn;
    const tls = new TLSSocket(socket, {
      isServer: true,
      secureContext: leaf.context,
      ALPNProtocols: alpn === false ? undefined : [alpn],
    });
    // The outer HTTP server's sockets allow half-open connections, and a TLSSocket inherits
    // that; a decrypted connection must not, or a client's FIN would leave it (an HTTP/2
    // session, a stalled upload) open until its idle timeout.
    tls.allowHalfOpen = false;
    this.track(tls);
    let secured = false;
    let failed = false;
    const hsTimer = setTimeout(() => {
      failed = true;
      tls.destroy();
      log("error", "client-tls", `client did not finish its tls handshake within ${ctx.limits.handshakeTimeoutMs} ms`);
    }, ctx.limits.handshakeTimeoutMs);
    tls.on("error", (err: NodeJS.ErrnoException) => {
      if (secured || failed) return;
      failed = true;
      clearTimeout(hsTimer);
      osock.destroy();
      // The client refused the minted certificate (a pinned app, or the CA is not installed).
      const code = err.code ?? "";
      const rejected = /ALERT_(BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN|UNSUPPORTED_CERTIFICATE|CERTIFICATE_REVOKED|ACCESS_DENIED|DECRYPT_ERROR)/.test(code);
      if (rejected) this.rejected(client, host);
      log("error", rejected ? "client-rejected-leaf" : "client-tls", `client tls: ${describeError(err)}`);
    });
    tls.once("close", () => {
      if (secured || failed) return;
      // Closed after our certificate went out, before finishing the handshake: clients that
      // verify as the handshake ends (Node, many pinning libraries) leave this way, without an alert.
      failed = true;
      clearTimeout(hsTimer);
      osock.destroy();
      this.rejected(client, host);
      log("error", "client-closed-in-handshake", "client closed during the tls handshake (refused the leaf?)");
    });
    const stats: ConnStats = { requests: 0 };
    tls.once("secure", () => {
      secured = true;
      // What tls.Server does before 'secureConnection'; http2 waits for it.
      (tls as TLSSocket & { secureConnecting: boolean }).secureConnecting = false;
      clearTimeout(hsTimer);
      osock.off("error", onLate);
      ctx.counters.connect("intercept");
      const securedAt = performance.now();
      tls.once("close", () => {
        if (stats.requests === 0 && performance.now() - securedAt < SILENT_REJECT_MS) {
          this.rejected(client, host);
          log("error", "client-closed-after-handshake", "client closed right after the handshake without a request (refused the leaf?)");
        }
      });
      const reconnect = async (): Promise<TLSSocket> => {
        const r = await ctx.origins.connect({ host: target.host, port: target.port, servername: hello.serverName, alpn: alpn === false ? [] : [alpn] });
        if (r.kind !== "ok") throw Object.assign(new Error(r.reason), { code: r.kind === "failed" ? r.code : r.kind.toUpperCase() });
        return r.socket;
      };
      if (alpn === "h2") {
        const o = new H2Origin(osock, target.port === 443 ? host : `${host}:${target.port}`, reconnect);
        (tls as Tagged<H2Conn>)[kConn] = { client, upstream: { origin: o, requestedHost: host }, stats };
        tls.once("close", () => o.close());
        this.h2.emit("connection", tls);
      } else {
        const agent = new TunnelAgent(osock, reconnect);
        (tls as Tagged<H1Conn>)[kConn] = { client, upstream: { scheme: "https", agent: agent as unknown as Agent, tunnel: { host: target.host, port: target.port, requestedHost: host } }, stats };
        tls.once("close", () => agent.destroy());
        this.h1.emit("connection", tls);
      }
    });
  }

  /** Counts a client's refusal of the minted leaf (pinned-app detection, when the policy turns it on). */
  private rejected(client: ClientInfo, host: string): void {
    if (this.ctx.learned.recordRejection(client.tenant, host, this.ctx.policy.current.autoBypass)) {
      this.ctx.logger.info("auto-bypass on: clients keep rejecting the minted certificate", { tenant: client.tenant, host });
    }
  }

  /** The leaf for this origin certificate: cached, joined, or minted (rate-limited per client). */
  private async leafFor(client: ClientInfo, host: string, cert: import("node:crypto").X509Certificate): Promise<LeafEntry> {
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
    const { entry, source } = await ctx.leaves.obtain(
      client.tenant,
      k,
      () => ctx.minter.mint(client.tenant, origin, host),
      () => ctx.rateLimiter.take(client.address),
    );
    ctx.counters.leaf(source);
    return entry;
  }

  /** A plain tunnel (bypass): `first` is what the client already sent. */
  private tunnel(
    socket: Socket,
    tcp: Socket,
    first: Buffer,
    rec: AccessRecord,
    rule: string,
    log: (d: Decision, rule: string | undefined, error?: string) => void,
  ): void {
    this.ctx.counters.connect("bypass");
    this.track(tcp);
    tcp.on("error", () => {});
    if (first.length > 0) tcp.write(first);
    rec.status = 200;
    splice(socket, tcp, this.ctx.limits.idleTimeoutMs, (r) => {
      rec.bytes_up = r.up + first.length;
      rec.bytes_down = r.down;
      log("bypass", rule, r.error?.message);
    });
  }

  /** Tunnels on a fresh TCP connection (the first one was used for a TLS attempt). */
  private retunnel(
    socket: Socket,
    target: ConnectTarget,
    first: Buffer,
    rec: AccessRecord,
    log: (d: Decision, rule: string | undefined, error?: string) => void,
  ): void {
    tcpConnect(target.host, target.port, this.ctx.limits.originTimeoutMs, this.ctx.destinations).then(
      (tcp) => {
        if (socket.destroyed) {
          tcp.destroy();
          return log("error", "client-gone");
        }
        this.tunnel(socket, tcp, first, rec, "client-cert", log);
      },
      (err: NodeJS.ErrnoException) => {
        socket.destroy();
        log("error", "origin-unreachable", describeError(err));
      },
    );
  }

  /** Answers with `page` under a leaf of the untrusted kmi-blocked CA. */
  private servePage(
    socket: Socket,
    data: Buffer,
    hello: ClientHello,
    host: string,
    page: BlockPage,
    rec: AccessRecord,
    log: (d: Decision, rule: string | undefined, error?: string) => void,
    decision: Decision,
    rule: string,
  ): void {
    rec.status = page.status;
    log(decision, rule, page.headers["x-kmi-reason"]);
    this.ctx.counters.connect(decision);
    if (socket.destroyed) return;
    socket.unshift(data);
    const alpn = hello.alpn.length === 0 || hello.alpn.includes("http/1.1") ? "http/1.1" : undefined;
    const tls = new TLSSocket(socket, {
      isServer: true,
      secureContext: this.ctx.blockedCa.contextFor(host),
      ALPNProtocols: alpn === undefined ? undefined : [alpn],
    });
    tls.allowHalfOpen = false;
    this.track(tls);
    tls.on("error", () => tls.destroy());
    const timer = setTimeout(() => tls.destroy(), this.ctx.limits.handshakeTimeoutMs);
    tls.once("close", () => clearTimeout(timer));
    tls.once("secure", () => {
      (tls as TLSSocket & { secureConnecting: boolean }).secureConnecting = false;
      if (tls.alpnProtocol !== false && tls.alpnProtocol !== "http/1.1") {
        tls.destroy();
        return;
      }
      (tls as Tagged<PageConn>)[kConn] = { page };
      this.pages.emit("connection", tls);
    });
  }
}
