/**
 * The server of the KDC and the Auditserver, on connect-node.
 *
 * One TCP port with TLS serves gRPC, gRPC-Web and the Connect protocol (HTTP/2, and HTTP/1.1 by
 * ALPN so that `curl` can POST Connect JSON); an optional Unix socket serves the same without
 * TLS (HTTP/2 prior knowledge or HTTP/1.1, told apart by the first bytes). Every server also
 * serves `grpc.health.v1.Health` and server reflection (v1 and v1alpha).
 *
 * See docs/architecture.md, "Server stacks", for why the KDC and Auditserver use connect-node
 * and the key agent uses grpc-js.
 */
import http, { type IncomingMessage, type ServerResponse } from "node:http";
import http2, { type Http2ServerRequest, type Http2ServerResponse, type Http2Session } from "node:http2";
import type { AddressInfo, Server as NetServer, Socket } from "node:net";
import { performance } from "node:perf_hooks";
import { TLSSocket } from "node:tls";
import type { DescService } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createConnectRouter,
  createContextKey,
  createContextValues,
  type Interceptor,
  type ServiceImpl,
  type StreamResponse,
} from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerResponse } from "@connectrpc/connect/protocol";
import { compressionGzip, universalRequestFromNodeRequest, universalResponseToNodeResponse } from "@connectrpc/connect-node";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { responseStatus, tapBodyChunks } from "./connect-refusal.js";
import { toConnectError } from "./error-mapping.js";
import { HealthStatus, ServingStatus } from "./health.js";
import { formatListenAddress, listenUnixSocket, parseListenAddress, removeUnixSocket } from "./listen.js";
import type { Logger } from "./logger.js";
import { createRpcMetrics, type MethodMetrics, type MetricsRegistry, type RpcMetrics } from "./metrics.js";
import { REFLECTION_SERVICES, createReflectionIndex, createReflectionV1, createReflectionV1alpha } from "./reflection.js";
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  DEFAULT_SHUTDOWN_TIMEOUT_MS,
  grpcType,
  kDraining,
  kPeer,
  kPeerAddress,
  logCall,
  type BoundAddresses,
  type CallLogPolicy,
  type ServiceRegistration,
  type TcpListenerOptions,
  type UnixListenerOptions,
} from "./rpc.js";
import { peerIdentityFromSocket, serverTlsOptions, type PeerIdentity } from "./tls.js";

/**
 * Pending TCP connections a server's listen queue holds (Node's default is 511): a fleet that
 * reconnects at once (a replica died) must not overflow it into resets; the kernel caps it at
 * net.core.somaxconn (4096 by default since Linux 5.4).
 */
export const LISTEN_BACKLOG = 4096;

export { kDraining, kPeer, kPeerAddress, requireAuthorizedPeer } from "./rpc.js";
export type { BoundAddresses, ServiceRegistration, TcpListenerOptions, UnixListenerOptions } from "./rpc.js";

/** Options of {@link ConnectServer.create}. */
export interface ConnectServerOptions {
  /** Name used in log lines (`kdc`, `audit`). */
  name: string;
  /** The kmi services to serve. Health and reflection are added. */
  services: readonly ServiceRegistration[];
  /** TCP listener with TLS (gRPC, gRPC-Web, Connect). */
  tcp?: TcpListenerOptions;
  /** Unix-socket listener without TLS. */
  unix?: UnixListenerOptions;
  /** Logger; per-call lines go to it too. */
  logger: Logger;
  /** Max size of one request message, in bytes; default 4 MiB. */
  maxMessageBytes?: number;
  /** How long in-flight calls get on shutdown, in ms; default 10 s. */
  shutdownTimeoutMs?: number;
  /** Registry to record per-RPC metrics in. */
  metrics?: MetricsRegistry;
  /** Levels of the per-call log line; default info when OK, info on error (warn on a server fault). */
  callLog?: Partial<CallLogPolicy>;
  /** More interceptors, run inside the error-mapping one (auth, audit). */
  interceptors?: Interceptor[];
  /** Answers requests to paths that are no RPC (the KDC's portal); default a 404 naming the path. */
  fallback?: (req: NodeRequest, res: NodeResponse) => void;
}

/** Per-call facts the interceptor fills in and the request wrapper logs. */
interface CallRecord {
  code: Code | 0 | undefined;
  message: string | undefined;
  /** The call got past connect-node's own checks (size limit, framing, decoding) to the interceptors. */
  reached?: boolean;
}

const kCallRecord = createContextKey<CallRecord | undefined>(undefined, { description: "kmi call record" });

const CANCELED = "the client canceled the call";

function isClientGone(err: unknown, signal: AbortSignal): boolean {
  return signal.aborted || (err as { code?: unknown } | null)?.code === "ERR_STREAM_PREMATURE_CLOSE";
}

/** Maps errors to wire errors and notes each call's outcome for the log line. */
function errorMappingInterceptor(logger: Logger): Interceptor {
  return (next) => async (req) => {
    const rec = req.contextValues.get(kCallRecord);
    if (rec !== undefined) rec.reached = true;
    const map = (err: unknown) =>
      !(err instanceof ConnectError) && isClientGone(err, req.signal)
        ? new ConnectError(CANCELED, Code.Canceled)
        : toConnectError(err, logger, { method: `/${req.service.typeName}/${req.method.name}`, peer: req.contextValues.get(kPeerAddress) });
    try {
      const res = await next(req);
      if (!res.stream) {
        if (rec !== undefined) rec.code = 0;
        return res;
      }
      const source = res.message;
      async function* mapped() {
        try {
          yield* source;
          if (rec !== undefined) rec.code = 0;
        } catch (err) {
          const ce = map(err);
          if (rec !== undefined) {
            rec.code = ce.code;
            rec.message = ce.rawMessage;
          }
          throw ce;
        }
      }
      return { ...res, message: mapped() } as StreamResponse;
    } catch (err) {
      const ce = map(err);
      if (rec !== undefined) {
        rec.code = ce.code;
        rec.message = ce.rawMessage;
      }
      throw ce;
    }
  };
}

/**
 * The code of a finished call: what the interceptor saw, else (the call was refused before its
 * handler ran: size limit, bad frame, bad content type) what the response says.
 */
function outcome(rec: CallRecord, uRes: UniversalServerResponse | undefined, finished: boolean, lastChunk: Uint8Array | undefined): { code: number; message: string | undefined } {
  if (rec.code !== undefined) {
    if (rec.code === 0 && !finished) return { code: Code.Canceled, message: "the client went away before the response was sent" };
    return { code: rec.code, message: rec.message };
  }
  if (uRes === undefined) return { code: Code.Canceled, message: "the client went away" };
  return responseStatus(uRes, lastChunk);
}

/**
 * Percent-encodes a grpc-message as the gRPC spec says: only bytes outside 0x20..0x7E, and "%".
 * connect-node encodes like encodeURIComponent (":" becomes %3A), and grpc-js clients decode with
 * decodeURI, which leaves %3A and %3B as they are: the agent (a grpc-js client of the KDC) would
 * show "tenant_id%3A …" to a person.
 */
export function encodeGrpcMessage(message: string): string {
  let out = "";
  for (const byte of Buffer.from(message, "utf8")) {
    out += byte >= 0x20 && byte <= 0x7e && byte !== 0x25 ? String.fromCharCode(byte) : "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return out;
}

function respecGrpcMessage(h: Headers | undefined): void {
  const v = h?.get("grpc-message");
  if (h === undefined || v === null || v === undefined) return;
  let decoded: string;
  try {
    decoded = decodeURIComponent(v);
  } catch {
    return;
  }
  h.set("grpc-message", encodeGrpcMessage(decoded));
}

/** The response with its grpc-message header/trailer re-encoded by {@link encodeGrpcMessage}. */
function withSpecGrpcMessage(r: UniversalServerResponse): UniversalServerResponse {
  if (r.body === undefined) {
    respecGrpcMessage(r.header);
    respecGrpcMessage(r.trailer);
    return r;
  }
  const body = r.body;
  async function* wrapped() {
    const it = body[Symbol.asyncIterator]();
    let first = true;
    try {
      for (;;) {
        const n = await it.next();
        if (first) {
          first = false;
          // Headers are written after the first chunk: a trailers-only error has its status here.
          respecGrpcMessage(r.header);
        }
        if (n.done === true) break;
        yield n.value;
      }
    } finally {
      respecGrpcMessage(r.trailer);
    }
  }
  return { ...r, body: wrapped() };
}

/** A request of either HTTP version, as node's servers give it. */
export type NodeRequest = IncomingMessage | Http2ServerRequest;
/** A response of either HTTP version. */
export type NodeResponse = ServerResponse | Http2ServerResponse;

interface Route {
  handler: UniversalHandler;
  metrics: MethodMetrics | undefined;
}

/**
 * The request body as connect-node reads it, but a handler that stops reading early (a refusal
 * of an over-limit message after its length prefix) leaves the request open instead of
 * destroying it, as `for await` over the request would: the server then drains what the client
 * still sends ({@link drainRequest}) and answers on a stream that still works.
 */
async function* requestBody(req: NodeRequest): AsyncGenerator<Uint8Array> {
  let failure: Error | undefined;
  const onError = (err: Error) => (failure = err);
  req.on("error", onError);
  try {
    for (;;) {
      const chunk = req.read() as Buffer | null;
      if (chunk !== null) {
        yield chunk;
        continue;
      }
      if (req.readableEnded) return;
      if (failure !== undefined) throw failure;
      // The same code as the stream's own iterator, so that a client that went away is told apart (isClientGone).
      if (req.destroyed) throw Object.assign(new Error("the client closed the request before its end"), { code: "ERR_STREAM_PREMATURE_CLOSE" });
      await new Promise<void>((resolve) => {
        const wake = () => {
          req.off("readable", wake);
          req.off("end", wake);
          req.off("close", wake);
          req.off("error", wake);
          resolve();
        };
        req.on("readable", wake);
        req.on("end", wake);
        req.on("close", wake);
        req.on("error", wake);
      });
    }
  } finally {
    req.off("error", onError);
  }
}

/** How much of a refused request's unread body is read and dropped before the refusal is sent, at most. */
const DRAIN_MAX_BYTES = 64 * 1024 * 1024;
/** How long the server reads a refused request's unread body before sending the refusal anyway. */
const DRAIN_MAX_MS = 5_000;
/** A client that sends nothing for this long is answered at once (it is not writing a large message). */
const DRAIN_IDLE_MS = 1_000;

/**
 * Reads and drops what is left of a request body, up to `maxBytes` or `maxMs`; resolves true
 * when the body ended. A client that wrote a whole over-limit message at once (connect-node
 * queues it in its HTTP/2 session) refuses every frame of the connection with
 * ENHANCE_YOUR_CALM while that much is queued past its session memory (10 MB by default):
 * the refusal must reach it only after its queue has drained, or it never sees the
 * RESOURCE_EXHAUSTED and its next calls fail too.
 */
function drainRequest(req: NodeRequest, maxBytes = DRAIN_MAX_BYTES, maxMs = DRAIN_MAX_MS): Promise<boolean> {
  if (req.readableEnded) return Promise.resolve(true);
  if (req.destroyed) return Promise.resolve(false);
  return new Promise((resolve) => {
    let read = 0;
    const finish = (ended: boolean) => {
      clearTimeout(timer);
      clearTimeout(idle);
      req.off("readable", onReadable);
      req.off("end", onEnd);
      req.off("close", onClose);
      resolve(ended);
    };
    // read() rather than resume(): connect-node's body iterator may hold a 'readable' listener, which beats flowing mode.
    const onReadable = () => {
      for (let chunk = req.read() as Buffer | null; chunk !== null; chunk = req.read() as Buffer | null) {
        idle.refresh();
        read += chunk.length;
        if (read > maxBytes) return finish(false);
      }
    };
    const onEnd = () => finish(true);
    const onClose = () => finish(req.readableEnded);
    const timer = setTimeout(() => finish(false), maxMs);
    const idle = setTimeout(() => finish(false), DRAIN_IDLE_MS);
    req.on("readable", onReadable);
    req.once("end", onEnd);
    req.once("close", onClose);
    onReadable();
  });
}

/**
 * When a response is complete while the client is still sending its request (a refusal of an
 * over-limit message before its body was read), the rest of the body is discarded and, on
 * HTTP/2, the stream is reset with NO_ERROR: RFC 9113 §8.1 lets a server ask a client to stop
 * sending after a complete response this way. Without it the unread body piles up in the
 * session until nghttp2 refuses every stream on the connection with ENHANCE_YOUR_CALM.
 */
function discardUnreadBodyAfterResponse(req: NodeRequest, res: NodeResponse): void {
  res.once("finish", () => {
    if (req.readableEnded) return;
    req.resume();
    if ("stream" in req && !req.stream.closed) req.stream.close(http2.constants.NGHTTP2_NO_ERROR);
  });
}

/** Reads the first bytes of a cleartext connection: HTTP/2 prior knowledge starts with "PRI". */
function sniffHttp2(socket: Socket, onResult: (h2: boolean) => void): void {
  let buffered = Buffer.alloc(0);
  const onData = (chunk: Buffer) => {
    buffered = Buffer.concat([buffered, chunk]);
    if (buffered.length < 3) return;
    socket.off("data", onData);
    socket.off("end", onEnd);
    socket.pause();
    socket.unshift(buffered);
    onResult(buffered.subarray(0, 3).toString("latin1") === "PRI");
  };
  const onEnd = () => socket.destroy();
  socket.on("data", onData);
  socket.once("end", onEnd);
  socket.on("error", () => socket.destroy());
}

/**
 * A connect-node server with TLS and mutual TLS on TCP, an optional Unix socket, health,
 * reflection, error mapping, per-call logs and metrics, and graceful shutdown.
 */
export class ConnectServer {
  /** Serving statuses; set per service name (`""` is the whole server). */
  readonly health = new HealthStatus();

  private readonly routes = new Map<string, Route>();
  private readonly logger: Logger;
  private readonly callLog: CallLogPolicy;
  private readonly shutdown = new AbortController();
  private readonly draining = new AbortController();
  private readonly sessions = new Set<Http2Session>();
  private readonly sockets = new Set<Socket>();
  private readonly http1Active = new Map<Socket, number>();
  private tlsServer: http2.Http2SecureServer | undefined;
  private unixServer: NetServer | undefined;
  private h2c: http2.Http2Server | undefined;
  private h1: http.Server | undefined;
  private inFlight = 0;
  private idle: (() => void) | undefined;
  private stopping: Promise<void> | undefined;
  private bound: BoundAddresses | undefined;

  private constructor(private readonly opts: ConnectServerOptions) {
    this.logger = opts.logger.child({ server: opts.name });
    this.callLog = { ok: opts.callLog?.ok ?? "info", error: opts.callLog?.error ?? "info" };
    if (opts.tcp === undefined && opts.unix === undefined) {
      throw new Error(`${opts.name}: no listener configured; give a TCP address or a Unix socket path`);
    }
    if (opts.tcp !== undefined) {
      const addr = parseListenAddress(opts.tcp.listen);
      if (addr.kind !== "tcp") throw new Error(`${opts.name}: TCP listen address "${opts.tcp.listen}" is a Unix path; use host:port`);
      serverTlsOptions(opts.tcp.tls, opts.tcp.mtls ?? "none"); // validates: mutual TLS needs a CA
    }
    const all: { service: DescService; impl: ServiceImpl<DescService> }[] = [
      ...(opts.services as { service: DescService; impl: ServiceImpl<DescService> }[]),
    ];
    const index = createReflectionIndex([...opts.services.map((s) => s.service), Health, ...REFLECTION_SERVICES]);
    all.push({ service: Health, impl: this.health.service() as unknown as ServiceImpl<DescService> });
    all.push({ service: REFLECTION_SERVICES[0]!, impl: createReflectionV1(index) as unknown as ServiceImpl<DescService> });
    all.push({ service: REFLECTION_SERVICES[1]!, impl: createReflectionV1alpha(index) as unknown as ServiceImpl<DescService> });

    const router = createConnectRouter({
      grpc: true,
      grpcWeb: true,
      connect: true,
      readMaxBytes: opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES,
      // A misspelled field in Connect JSON is INVALID_ARGUMENT naming it, not silently dropped.
      jsonOptions: { ignoreUnknownFields: false },
      acceptCompression: [compressionGzip],
      shutdownSignal: this.shutdown.signal,
      interceptors: [errorMappingInterceptor(this.logger), ...(opts.interceptors ?? [])],
    });
    for (const { service, impl } of all) {
      this.health.set(service.typeName, ServingStatus.SERVING);
      router.service(service, impl);
    }
    const rpc: RpcMetrics | undefined = opts.metrics ? createRpcMetrics(opts.metrics) : undefined;
    for (const h of router.handlers) {
      this.routes.set(h.requestPath, {
        handler: h,
        metrics: rpc?.method(h.service.typeName, h.method.name, grpcType(h.method)),
      });
    }
  }

  /** Validates the options and builds the server (nothing listens yet). */
  static create(options: ConnectServerOptions): ConnectServer {
    return new ConnectServer(options);
  }

  /** Starts listening; resolves with the addresses actually bound. */
  async start(): Promise<BoundAddresses> {
    if (this.bound !== undefined) return this.bound;
    const bound: BoundAddresses = {};
    const handler = (req: NodeRequest, res: NodeResponse) => this.handle(req, res);
    try {
      if (this.opts.tcp !== undefined) {
        const addr = parseListenAddress(this.opts.tcp.listen);
        if (addr.kind !== "tcp") throw new Error("unreachable");
        const server = http2.createSecureServer(
          { ...serverTlsOptions(this.opts.tcp.tls, this.opts.tcp.mtls ?? "none"), allowHTTP1: true },
          handler,
        );
        this.tlsServer = server;
        this.watch(server);
        server.on("tlsClientError", (err: Error, socket: TLSSocket) => {
          this.logger.info("tls handshake refused", { peer: `${socket.remoteAddress}:${socket.remotePort}`, reason: err.message });
        });
        await new Promise<void>((resolve, reject) => {
          server.once("error", reject);
          server.listen({ port: addr.port, host: addr.host, backlog: LISTEN_BACKLOG }, () => {
            server.off("error", reject);
            resolve();
          });
        });
        const port = (server.address() as AddressInfo).port;
        bound.tcp = formatListenAddress({ kind: "tcp", host: addr.host, port });
        bound.port = port;
      }
      if (this.opts.unix !== undefined) {
        const addr = parseListenAddress(this.opts.unix.path);
        if (addr.kind !== "unix") throw new Error(`${this.opts.name}: Unix socket path "${this.opts.unix.path}" must be absolute`);
        const h2c = http2.createServer({}, handler);
        const h1 = http.createServer(handler);
        h1.keepAliveTimeout = 5_000;
        this.h2c = h2c;
        this.h1 = h1;
        this.watch(h2c);
        h1.on("clientError", (_err, socket: Socket) => socket.destroy());
        const socketOpts: { mode?: 0o600 | 0o660; group?: string | number } = {};
        if (this.opts.unix.mode !== undefined) socketOpts.mode = this.opts.unix.mode;
        if (this.opts.unix.group !== undefined) socketOpts.group = this.opts.unix.group;
        this.unixServer = await listenUnixSocket(addr.path, socketOpts, (socket) => {
          if (this.stopping !== undefined) {
            socket.destroy();
            return;
          }
          this.track(socket);
          sniffHttp2(socket, (isH2) => {
            if (isH2) {
              // The HTTP/2 session takes the bytes put back with unshift() itself.
              h2c.emit("connection", socket);
            } else {
              h1.emit("connection", socket);
              // The HTTP/1.1 parser reads the socket's handle; flowing again delivers the bytes put back.
              socket.resume();
            }
          });
        });
        bound.unix = addr.path;
      }
    } catch (err) {
      await this.closeListeners();
      throw err;
    }
    this.bound = bound;
    this.logger.info("listening", { ...bound, mtls: this.opts.tcp?.mtls ?? undefined });
    return bound;
  }

  /** The addresses bound by {@link start}. */
  get addresses(): BoundAddresses | undefined {
    return this.bound;
  }

  private track(socket: Socket): void {
    this.sockets.add(socket);
    socket.once("close", () => {
      this.sockets.delete(socket);
      this.http1Active.delete(socket);
    });
  }

  private watch(server: http2.Http2SecureServer | http2.Http2Server): void {
    server.on("connection", (socket: Socket) => {
      if (server === this.tlsServer) this.track(socket);
    });
    server.on("session", (session: Http2Session) => {
      if (this.stopping !== undefined) {
        session.close();
        return;
      }
      this.sessions.add(session);
      session.once("close", () => this.sessions.delete(session));
      session.on("error", (err) => this.logger.debug("http2 session error", { err: err.message }));
    });
    server.on("sessionError", (err: Error) => this.logger.debug("http2 session error", { err: err.message }));
  }

  private handle(req: NodeRequest, res: NodeResponse): void {
    const start = performance.now();
    const path = (req.url ?? "").split("?", 1)[0] ?? "";
    const route = this.routes.get(path);
    const socket = req.socket;
    const isHttp1 = req.httpVersionMajor === 1;
    if (isHttp1) this.http1Active.set(socket, (this.http1Active.get(socket) ?? 0) + 1);
    this.inFlight++;

    let peerAddress = "unix";
    let peer: PeerIdentity | undefined;
    if (socket.remoteAddress !== undefined) peerAddress = `${socket.remoteAddress}:${socket.remotePort}`;
    if (socket instanceof TLSSocket || (socket as { encrypted?: boolean }).encrypted === true) {
      // For HTTP/2 the request's socket is the session's proxy: cache the identity per session.
      peer = peerIdentityFromSocket(socket as TLSSocket, "stream" in req ? req.stream.session : undefined);
    }
    const rec: CallRecord = { code: undefined, message: undefined };
    let uRes: UniversalServerResponse | undefined;
    let lastChunk: Uint8Array | undefined;
    let protocol = "connect";
    const ct = String(req.headers["content-type"] ?? "");
    if (ct.startsWith("application/grpc-web")) protocol = "grpc-web";
    else if (ct.startsWith("application/grpc")) protocol = "grpc";

    // The call ends when the response closes (sent, or the client went away).
    res.once("close", () => {
      this.inFlight--;
      if (isHttp1) {
        const n = (this.http1Active.get(socket) ?? 1) - 1;
        this.http1Active.set(socket, n);
        // While draining, an HTTP/1.1 connection closes after its last response.
        if (n === 0 && this.stopping !== undefined) socket.end();
      }
      if (route !== undefined) {
        const { code, message } = outcome(rec, uRes, res.writableFinished, lastChunk);
        const ms = performance.now() - start;
        route.metrics?.handled(code, ms / 1000);
        logCall(this.logger, this.callLog, path, protocol, code, ms, peerAddress, peer, message);
      }
      if (this.inFlight === 0) this.idle?.();
    });

    if (route === undefined && this.opts.fallback !== undefined) {
      this.opts.fallback(req, res);
      return;
    }
    if (route === undefined) {
      res.writeHead(404, { "content-type": "text/plain; charset=utf-8" });
      res.end(`no such method: ${path}; list the methods with server reflection\n`);
      return;
    }
    discardUnreadBodyAfterResponse(req, res);
    const values = createContextValues()
      .set(kPeer, peer)
      .set(kPeerAddress, peerAddress)
      .set(kDraining, this.draining.signal)
      .set(kCallRecord, rec);
    route.metrics?.started();
    const uReq = { ...universalRequestFromNodeRequest(req, res, undefined, values), body: requestBody(req) };
    route.handler(uReq)
      .then(async (r) => {
        // Refused by connect-node itself before the request was read (over the size limit, a bad
        // frame): drop the rest of the body before answering, so the client sees the refusal.
        if (rec.reached !== true && !req.readableEnded) await drainRequest(req);
        uRes = r;
        // gRPC-Web and Connect may carry a refusal's code in the body only: keep its last chunk.
        const out = protocol === "grpc" ? withSpecGrpcMessage(r) : rec.code === undefined ? tapBodyChunks(r, (c) => (lastChunk = c)) : r;
        return universalResponseToNodeResponse(out, res);
      })
      .catch((reason: unknown) => {
        // The response could not be written (the client went away): note it, unless the
        // handler's outcome is known already.
        if (rec.code === undefined) {
          const ce = ConnectError.from(reason);
          rec.code = ce.code === Code.Aborted ? Code.Canceled : ce.code;
          rec.message = ce.rawMessage;
        }
        if (!res.writableEnded) res.destroy();
      });
  }

  private closeListeners(): Promise<void[]> {
    const closing: Promise<void>[] = [];
    const close = (s: { close(cb?: (err?: Error) => void): unknown; listening?: boolean } | undefined) => {
      if (s === undefined || s.listening === false) return;
      closing.push(new Promise<void>((resolve) => void s.close(() => resolve())));
    };
    close(this.tlsServer);
    close(this.unixServer);
    return Promise.all(closing);
  }

  /**
   * Graceful shutdown: health turns NOT_SERVING and watches end, listeners stop accepting,
   * HTTP/2 sessions get GOAWAY, in-flight calls run until done or until `timeoutMs` (then
   * their handlers' signals abort and connections are closed), and the socket file is removed.
   */
  destroy(timeoutMs = this.opts.shutdownTimeoutMs ?? DEFAULT_SHUTDOWN_TIMEOUT_MS): Promise<void> {
    if (this.stopping !== undefined) return this.stopping;
    this.stopping = (async () => {
      const t0 = performance.now();
      this.logger.info("shutting down", { in_flight: this.inFlight, timeout_ms: timeoutMs });
      this.health.shutdown();
      this.draining.abort();
      const listenersClosed = this.closeListeners();
      for (const s of this.sessions) s.close();
      for (const [socket, n] of this.http1Active) if (n === 0) socket.end();
      let timedOut = false;
      if (this.inFlight > 0) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            timedOut = true;
            resolve();
          }, timeoutMs);
          this.idle = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
      if (timedOut) {
        this.logger.warn("shutdown deadline passed; canceling calls", { in_flight: this.inFlight });
        this.shutdown.abort(new ConnectError("the server is shutting down; retry on another instance", Code.Unavailable));
        await new Promise((r) => setTimeout(r, 50));
      }
      for (const s of this.sessions) s.destroy();
      for (const s of this.sockets) s.destroy();
      await listenersClosed;
      this.h2c?.close();
      this.h1?.close();
      if (this.opts.unix !== undefined) {
        const addr = parseListenAddress(this.opts.unix.path);
        if (addr.kind === "unix" && this.bound?.unix !== undefined) await removeUnixSocket(addr.path);
      }
      this.logger.info("stopped", { duration_ms: Math.round(performance.now() - t0), forced: timedOut });
    })();
    return this.stopping;
  }
}
