/**
 * The key agent's server, on `@grpc/grpc-js`: the agent's Unix socket is the hot path, and
 * grpc-js serves a unary call for about an eighth of connect-node's CPU (docs/architecture.md).
 *
 * Services are written once in Connect's handler style (`ServiceImpl<typeof S>`, the same
 * object `createRouterTransport` takes in tests) and adapted here: path `/pkg.Service/Method`,
 * protobuf-es binary (de)serialization, a `HandlerContext` (./grpc-handler-context.ts: headers from gRPC metadata,
 * deadline, abort on cancel; its costly parts made only when a handler reads them), domain
 * and Connect errors mapped to gRPC statuses. Health and reflection (v1, v1alpha) are served too.
 */
import type { Server as NetServer, Socket } from "node:net";
import { performance } from "node:perf_hooks";
import { create, fromBinary, isMessage, toBinary, type DescMessage, type DescMethod, type DescService } from "@bufbuild/protobuf";
import { Code, type HandlerContext } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { toGrpcStatus } from "./error-mapping.js";
import { HealthStatus, ServingStatus } from "./health.js";
import { formatListenAddress, listenUnixSocket, parseListenAddress, removeUnixSocket } from "./listen.js";
import type { Logger } from "./logger.js";
import { createRpcMetrics, type MethodMetrics, type MetricsRegistry } from "./metrics.js";
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
import { grpcServerCredentials, peerIdentityFromPeerCertificate, type PeerIdentity } from "./tls.js";
import { CANCELED, FINISHED, GrpcCallContext, toMetadata, type AnyCall } from "./grpc-handler-context.js";

export { kDraining, kPeer, kPeerAddress, requireAuthorizedPeer } from "./rpc.js";
export type { BoundAddresses, ServiceRegistration, TcpListenerOptions, UnixListenerOptions } from "./rpc.js";

/** A metadata header every call to the kmi services must carry. */
export interface RequiredMetadata {
  /** Header name, lowercase (`kmi-agent-workload`). */
  key: string;
  /** Its exact value (`true`). */
  value: string;
}

/** Options of {@link GrpcServer.create}. */
export interface GrpcServerOptions {
  /** Name used in log lines (`agent`). */
  name: string;
  /** The kmi services to serve. Health and reflection are added. */
  services: readonly ServiceRegistration[];
  /** Unix-socket listener (the agent's API). */
  unix?: UnixListenerOptions;
  /** TCP listener with TLS. */
  tcp?: TcpListenerOptions;
  /** Logger; per-call lines go to it too. */
  logger: Logger;
  /**
   * A header every call to `services` must carry (not health or reflection): calls without it
   * are INVALID_ARGUMENT with a message naming the header.
   */
  requiredMetadata?: RequiredMetadata;
  /** Max size of one received message, in bytes; default 4 MiB. */
  maxMessageBytes?: number;
  /** How long in-flight calls get on shutdown, in ms; default 10 s. */
  shutdownTimeoutMs?: number;
  /** Registry to record per-RPC metrics in. */
  metrics?: MetricsRegistry;
  /** Levels of the per-call log line; default debug when OK (hot path), info on error. */
  callLog?: Partial<CallLogPolicy>;
}

type AnyImpl = (input: unknown, ctx: HandlerContext) => unknown;

/** What every adapted handler of one method shares; built once at registration. */
interface MethodRuntime {
  readonly service: DescService;
  readonly method: DescMethod;
  readonly path: string;
  readonly url: string;
  readonly impl: AnyImpl | undefined;
  readonly metrics: MethodMetrics | undefined;
  readonly required: RequiredMetadata | undefined;
  readonly requiredMessage: string;
}

function serializer(schema: DescMessage): (value: unknown) => Buffer {
  return (value) => {
    const msg = isMessage(value, schema) ? value : create(schema, value as never);
    const u8 = toBinary(schema, msg);
    return Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
  };
}

function deserializer(schema: DescMessage): (buf: Buffer) => unknown {
  return (buf) => fromBinary(schema, buf);
}


/**
 * A grpc-js server for services written in Connect's handler style, on a Unix socket whose mode
 * is set before any client can connect, and optionally on TCP with TLS and mutual TLS.
 */
export class GrpcServer {
  /** Serving statuses; set per service name (`""` is the whole server). */
  readonly health = new HealthStatus();

  private readonly server: grpc.Server;
  private readonly logger: Logger;
  private readonly callLog: CallLogPolicy;
  private readonly draining = new AbortController();
  private unixServer: NetServer | undefined;
  private readonly unixSockets = new Set<Socket>();
  private injector: grpc.ConnectionInjector | undefined;
  private bound: BoundAddresses | undefined;
  private stopping: Promise<void> | undefined;
  private inFlight = 0;

  private constructor(private readonly opts: GrpcServerOptions) {
    this.logger = opts.logger.child({ server: opts.name });
    this.callLog = { ok: opts.callLog?.ok ?? "debug", error: opts.callLog?.error ?? "info" };
    if (opts.tcp === undefined && opts.unix === undefined) {
      throw new Error(`${opts.name}: no listener configured; give a Unix socket path or a TCP address`);
    }
    if (opts.tcp !== undefined) {
      const addr = parseListenAddress(opts.tcp.listen);
      if (addr.kind !== "tcp") throw new Error(`${opts.name}: TCP listen address "${opts.tcp.listen}" is a Unix path; use host:port`);
      grpcServerCredentials(opts.tcp.tls, opts.tcp.mtls ?? "none"); // validates: mutual TLS needs a CA
    }
    if (opts.requiredMetadata !== undefined && !/^[a-z0-9][a-z0-9_.-]*$/.test(opts.requiredMetadata.key)) {
      throw new Error(`required metadata key "${opts.requiredMetadata.key}" must be a lowercase header name`);
    }
    const max = opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.server = new grpc.Server({
      "grpc.max_receive_message_length": max,
      // Channelz bookkeeping costs on every call and nothing here reads it.
      "grpc.enable_channelz": 0,
    });
    const rpcMetrics = opts.metrics ? createRpcMetrics(opts.metrics) : undefined;
    const index = createReflectionIndex([...opts.services.map((s) => s.service), Health, ...REFLECTION_SERVICES]);
    const builtin: { service: DescService; impl: object }[] = [
      { service: Health, impl: this.health.service() },
      { service: REFLECTION_SERVICES[0]!, impl: createReflectionV1(index) },
      { service: REFLECTION_SERVICES[1]!, impl: createReflectionV1alpha(index) },
    ];
    const add = (service: DescService, impl: object, required: RequiredMetadata | undefined) => {
      this.health.set(service.typeName, ServingStatus.SERVING);
      for (const method of service.methods) {
        const fn = (impl as Record<string, unknown>)[method.localName];
        const path = `/${service.typeName}/${method.name}`;
        const rt: MethodRuntime = {
          service,
          method,
          path,
          url: `http://localhost${path}`,
          impl: typeof fn === "function" ? (fn.bind(impl) as AnyImpl) : undefined,
          metrics: rpcMetrics?.method(service.typeName, method.name, grpcType(method)),
          required,
          requiredMessage:
            required === undefined
              ? ""
              : `missing metadata "${required.key}: ${required.value}"; add this header to every call to ${service.typeName}`,
        };
        const ok = this.server.register(path, this.handlerFor(rt), serializer(method.output), deserializer(method.input), kindOf(method));
        if (!ok) throw new Error(`${opts.name}: method ${path} registered twice`);
      }
    };
    for (const s of opts.services) add(s.service, s.impl, opts.requiredMetadata);
    for (const s of builtin) add(s.service, s.impl, undefined);
  }

  /** Validates the options and builds the server (nothing listens yet). */
  static create(options: GrpcServerOptions): GrpcServer {
    return new GrpcServer(options);
  }

  /** Starts listening; resolves with the addresses actually bound. */
  async start(): Promise<BoundAddresses> {
    if (this.bound !== undefined) return this.bound;
    const bound: BoundAddresses = {};
    try {
      if (this.opts.tcp !== undefined) {
        const addr = parseListenAddress(this.opts.tcp.listen);
        if (addr.kind !== "tcp") throw new Error("unreachable");
        const creds = grpcServerCredentials(this.opts.tcp.tls, this.opts.tcp.mtls ?? "none");
        const port = await new Promise<number>((resolve, reject) => {
          this.server.bindAsync(formatListenAddress(addr), creds, (err, p) => (err ? reject(err) : resolve(p)));
        });
        bound.tcp = formatListenAddress({ kind: "tcp", host: addr.host, port });
        bound.port = port;
      }
      if (this.opts.unix !== undefined) {
        const addr = parseListenAddress(this.opts.unix.path);
        if (addr.kind !== "unix") throw new Error(`${this.opts.name}: Unix socket path "${this.opts.unix.path}" must be absolute`);
        const injector = this.server.createConnectionInjector(grpc.ServerCredentials.createInsecure());
        this.injector = injector;
        const socketOpts: { mode?: 0o600 | 0o660; group?: string | number } = {};
        if (this.opts.unix.mode !== undefined) socketOpts.mode = this.opts.unix.mode;
        if (this.opts.unix.group !== undefined) socketOpts.group = this.opts.unix.group;
        this.unixServer = await listenUnixSocket(addr.path, socketOpts, (socket) => {
          if (this.stopping !== undefined) {
            socket.destroy();
            return;
          }
          socket.on("error", () => socket.destroy());
          this.unixSockets.add(socket);
          socket.once("close", () => this.unixSockets.delete(socket));
          injector.injectConnection(socket);
        });
        bound.unix = addr.path;
      }
    } catch (err) {
      this.server.forceShutdown();
      this.unixServer?.close();
      throw err;
    }
    this.bound = bound;
    this.logger.info("listening", { ...bound, mtls: this.opts.tcp?.mtls ?? undefined, required_metadata: this.opts.requiredMetadata?.key });
    return bound;
  }

  /** The addresses bound by {@link start}. */
  get addresses(): BoundAddresses | undefined {
    return this.bound;
  }

  private context(rt: MethodRuntime, call: AnyCall): GrpcCallContext {
    let peerAddress = call.getPeer();
    let peer: PeerIdentity | undefined;
    if (peerAddress === "unknown") {
      peerAddress = "unix";
    } else {
      const auth = call.getAuthContext();
      if (auth.sslPeerCertificate !== undefined) peer = peerIdentityFromPeerCertificate(auth.sslPeerCertificate, true);
    }
    return new GrpcCallContext(rt, call, peerAddress, peer, this.draining.signal);
  }

  private unaryFailed(rt: MethodRuntime, ctx: GrpcCallContext, callback: grpc.sendUnaryData<unknown>, t0: number, err: unknown): void {
    const st = toGrpcStatus(err, this.logger, { method: rt.path, peer: ctx.peerAddress });
    ctx.abort(FINISHED);
    this.done(rt, t0, st.code, ctx.peerAddress, ctx.peer, st.details);
    const e: Partial<grpc.StatusObject> = { code: st.code, details: st.details };
    const trailer = ctx.setResponseTrailer();
    if (trailer !== undefined) e.metadata = toMetadata(trailer);
    callback(e);
  }

  private unarySucceeded(
    rt: MethodRuntime,
    call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerReadableStream<unknown, unknown>,
    ctx: GrpcCallContext,
    callback: grpc.sendUnaryData<unknown>,
    t0: number,
    out: unknown,
  ): void {
    const header = ctx.setResponseHeader();
    if (header !== undefined) call.sendMetadata(toMetadata(header));
    const t = ctx.setResponseTrailer();
    const trailer = t === undefined ? undefined : toMetadata(t);
    ctx.abort(FINISHED);
    this.done(rt, t0, 0, ctx.peerAddress, ctx.peer);
    callback(null, out, trailer);
  }

  private done(rt: MethodRuntime, t0: number, code: number, peerAddress: string, peer: PeerIdentity | undefined, message?: string): void {
    this.inFlight--;
    const ms = performance.now() - t0;
    rt.metrics?.handled(code, ms / 1000);
    logCall(this.logger, this.callLog, rt.path, "grpc", code, ms, peerAddress, peer, message);
  }

  private refuseMissingMetadata(rt: MethodRuntime, call: { metadata: grpc.Metadata }): boolean {
    const r = rt.required;
    if (r === undefined) return false;
    const v = call.metadata.get(r.key);
    return !(v.length > 0 && v[0] === r.value);
  }

  private handlerFor(rt: MethodRuntime): grpc.UntypedHandleCall {
    const unimplemented = `${rt.service.typeName}.${rt.method.name} is not implemented`;
    const logFields = { method: rt.path };
    switch (rt.method.methodKind) {
      case "unary":
      case "client_streaming":
        return (call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerReadableStream<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
          const t0 = performance.now();
          this.inFlight++;
          rt.metrics?.started();
          if (this.refuseMissingMetadata(rt, call)) {
            this.done(rt, t0, Code.InvalidArgument, call.getPeer(), undefined, rt.requiredMessage);
            callback({ code: grpc.status.INVALID_ARGUMENT, details: rt.requiredMessage });
            return;
          }
          if (rt.impl === undefined) {
            this.done(rt, t0, Code.Unimplemented, call.getPeer(), undefined, unimplemented);
            callback({ code: grpc.status.UNIMPLEMENTED, details: unimplemented });
            return;
          }
          const ctx = this.context(rt, call);
          let result: unknown;
          try {
            const input = "request" in call ? call.request : readableIterable(call as grpc.ServerReadableStream<unknown, unknown>);
            result = rt.impl(input, ctx);
          } catch (err) {
            this.unaryFailed(rt, ctx, callback, t0, err);
            return;
          }
          if (result instanceof Promise) {
            result.then(
              (out: unknown) => this.unarySucceeded(rt, call, ctx, callback, t0, out),
              (err: unknown) => this.unaryFailed(rt, ctx, callback, t0, err),
            );
          } else {
            this.unarySucceeded(rt, call, ctx, callback, t0, result);
          }
        };
      case "server_streaming":
      case "bidi_streaming":
        return (call: grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>) => {
          const t0 = performance.now();
          this.inFlight++;
          rt.metrics?.started();
          if (this.refuseMissingMetadata(rt, call)) {
            this.done(rt, t0, Code.InvalidArgument, call.getPeer(), undefined, rt.requiredMessage);
            call.emit("error", { code: Code.InvalidArgument, details: rt.requiredMessage });
            return;
          }
          if (rt.impl === undefined) {
            this.done(rt, t0, Code.Unimplemented, call.getPeer(), undefined, unimplemented);
            call.emit("error", { code: Code.Unimplemented, details: unimplemented });
            return;
          }
          const ctx = this.context(rt, call);
          // A stream reads its signal throughout: make it now, with its cancel listener and deadline timer.
          void ctx.signal;
          void this.pump(rt, call, ctx, t0, ctx.peerAddress, ctx.peer, logFields);
        };
    }
  }

  private async pump(
    rt: MethodRuntime,
    call: grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>,
    ctx: GrpcCallContext,
    t0: number,
    peerAddress: string,
    peer: PeerIdentity | undefined,
    logFields: Record<string, unknown>,
  ): Promise<void> {
    let it: AsyncIterator<unknown> | undefined;
    try {
      const input = "request" in call ? call.request : readableIterable(call as grpc.ServerDuplexStream<unknown, unknown>);
      it = (rt.impl!(input, ctx) as AsyncIterable<unknown>)[Symbol.asyncIterator]();
      let headerSent = false;
      for (;;) {
        const r = await it.next();
        if (r.done === true) break;
        if (ctx.signal.aborted) break;
        if (!headerSent) {
          headerSent = true;
          const header = ctx.setResponseHeader();
          if (header !== undefined) call.sendMetadata(toMetadata(header));
        }
        if (!call.write(r.value)) await drainOrAbort(call, ctx.signal);
      }
      if (ctx.signal.aborted && call.cancelled) {
        await it.return?.();
        this.done(rt, t0, Code.Canceled, peerAddress, peer, CANCELED.rawMessage);
        ctx.abort(FINISHED);
        return;
      }
      const header = headerSent ? undefined : ctx.setResponseHeader();
      if (header !== undefined) call.sendMetadata(toMetadata(header));
      const t = ctx.setResponseTrailer();
      const trailer = t === undefined ? undefined : toMetadata(t);
      ctx.abort(FINISHED);
      this.done(rt, t0, 0, peerAddress, peer);
      call.end(trailer);
    } catch (err) {
      const st = toGrpcStatus(call.cancelled ? CANCELED : err, this.logger, { ...logFields, peer: peerAddress });
      ctx.abort(FINISHED);
      this.done(rt, t0, st.code, peerAddress, peer, st.details);
      const e: Partial<grpc.StatusObject> = { code: st.code, details: st.details };
      const t = ctx.setResponseTrailer();
      if (t !== undefined) e.metadata = toMetadata(t);
      if (!call.cancelled) call.emit("error", e);
    }
  }

  /**
   * Graceful shutdown: health turns NOT_SERVING and watches end, the socket stops accepting,
   * sessions get GOAWAY and in-flight calls run until done or until `timeoutMs`; then the
   * remaining calls are canceled and connections closed, and the socket file is removed.
   */
  destroy(timeoutMs = this.opts.shutdownTimeoutMs ?? DEFAULT_SHUTDOWN_TIMEOUT_MS): Promise<void> {
    if (this.stopping !== undefined) return this.stopping;
    this.stopping = (async () => {
      const t0 = performance.now();
      this.logger.info("shutting down", { in_flight: this.inFlight, timeout_ms: timeoutMs });
      this.health.shutdown();
      this.draining.abort();
      const unixClosed =
        this.unixServer === undefined ? Promise.resolve() : new Promise<void>((resolve) => void this.unixServer!.close(() => resolve()));
      let forced = false;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          forced = true;
          this.logger.warn("shutdown deadline passed; canceling calls", { in_flight: this.inFlight });
          this.server.forceShutdown();
          resolve();
        }, timeoutMs);
        this.server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      this.injector?.destroy();
      // Sessions are closed by now; a socket left open never finished the HTTP/2 preface.
      for (const socket of this.unixSockets) socket.destroy();
      await unixClosed;
      if (this.bound?.unix !== undefined) await removeUnixSocket(this.bound.unix);
      this.logger.info("stopped", { duration_ms: Math.round(performance.now() - t0), forced });
    })();
    return this.stopping;
  }
}

function kindOf(method: DescMethod): string {
  switch (method.methodKind) {
    case "unary":
      return "unary";
    case "server_streaming":
      return "serverStream";
    case "client_streaming":
      return "clientStream";
    default:
      return "bidi";
  }
}

/**
 * The request messages of a client or bidi stream. `destroyOnReturn: false` matters: the default
 * iterator destroys the whole duplex when the requests end, and the status would never be sent.
 */
function readableIterable(call: grpc.ServerReadableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>): AsyncIterable<unknown> {
  return { [Symbol.asyncIterator]: () => call.iterator({ destroyOnReturn: false }) };
}

function drainOrAbort(call: NodeJS.EventEmitter, signal: AbortSignal): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = () => {
      call.off("drain", done);
      signal.removeEventListener("abort", done);
      resolve();
    };
    call.once("drain", done);
    signal.addEventListener("abort", done, { once: true });
  });
}
