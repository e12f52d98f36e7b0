/**
 * What both server stacks share: how services are registered, the per-call context values
 * handlers read (who the peer is, whether the server is draining), the listener options, and
 * the per-call log line.
 */
import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, createContextKey, type ContextValues, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { codeName } from "./error-mapping.js";
import { Unauthenticated } from "./errors.js";
import type { LogLevel, Logger } from "./logger.js";
import type { MtlsMode, PeerIdentity, TlsMaterial } from "./tls.js";

export type { PeerIdentity } from "./tls.js";

/** A service and its implementation in Connect's handler style. */
export interface ServiceRegistration<S extends DescService = DescService> {
  /** The generated service descriptor. */
  readonly service: S;
  /**
   * The implementation: the same object works with `createRouterTransport` in tests. Methods
   * left out answer UNIMPLEMENTED; real services are full `ServiceImpl`s (see {@link serviceRegistration}).
   */
  readonly impl: Partial<ServiceImpl<S>>;
}

/** Pairs a service with its implementation, type-checked (a missing method is a compile error). */
export function serviceRegistration<S extends DescService>(service: S, impl: ServiceImpl<S>): ServiceRegistration {
  return { service, impl } as unknown as ServiceRegistration;
}

/** The client certificate of the call, when the client sent one (TCP+TLS only). See {@link PeerIdentity.authorized}. */
export const kPeer = createContextKey<PeerIdentity | undefined>(undefined, { description: "kmi peer identity" });

/** Where the call came from: `ip:port` on TCP, `unix` on a Unix socket, `in-process` in tests. */
export const kPeerAddress = createContextKey<string>("in-process", { description: "kmi peer address" });

/** The address part of a peer address ("10.0.0.1:5000" → "10.0.0.1", "::1:5000" → "::1"; "unix" stays). */
export function peerSource(peerAddress: string): string {
  const colon = peerAddress.lastIndexOf(":");
  return colon > 0 && /^\d+$/.test(peerAddress.slice(colon + 1)) ? peerAddress.slice(0, colon).replace(/^\[|\]$/g, "") : peerAddress;
}

const neverAborted = new AbortController().signal;

/**
 * Aborted when the server starts a graceful shutdown. Long-lived streams (watches) should end
 * on it, so that the shutdown does not wait for its deadline.
 */
export const kDraining = createContextKey<AbortSignal>(neverAborted, { description: "kmi server draining" });

/**
 * The verified client identity of a call, or Unauthenticated with a message that says what to
 * do. Use it in every method that needs mutual TLS (in `optional` mode the handshake lets
 * clients without a valid certificate through, so each such method must check).
 */
export function requireAuthorizedPeer(ctx: HandlerContext | ContextValues): PeerIdentity {
  const values = "values" in ctx ? ctx.values : ctx;
  const peer = values.get(kPeer);
  if (peer === undefined) {
    throw new Unauthenticated("client certificate required: connect over TLS with a certificate issued by the kmi infrastructure CA");
  }
  if (!peer.authorized) {
    throw new Unauthenticated(
      `client certificate not trusted (${peer.authorizationError ?? "unknown reason"}): use a certificate issued by the kmi infrastructure CA`,
    );
  }
  return peer;
}

/** A TCP listener with TLS. */
export interface TcpListenerOptions {
  /** `host:port` (port 0 picks a free port). */
  listen: string;
  /** Server certificate, key and client CA. */
  tls: TlsMaterial;
  /** Client certificate policy; default `none`. */
  mtls?: MtlsMode;
}

/** A Unix-socket listener. */
export interface UnixListenerOptions {
  /** Absolute path of the socket (`unix:` prefix allowed). */
  path: string;
  /** File mode: 0o600 (default) or 0o660. */
  mode?: 0o600 | 0o660;
  /** Group owning the socket (name or gid), with mode 0o660. */
  group?: string | number;
}

/** Addresses a started server listens on. */
export interface BoundAddresses {
  /** `host:port` of the TCP+TLS listener. */
  tcp?: string;
  /** The TCP port actually bound. */
  port?: number;
  /** Path of the Unix socket. */
  unix?: string;
}

/** Default max size of one message, in bytes (gRPC's usual 4 MiB). */
export const DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024;

/** Default time in-flight calls get to finish on shutdown, in ms. */
export const DEFAULT_SHUTDOWN_TIMEOUT_MS = 10_000;

/** The label of a method kind as metrics name it. */
export function grpcType(method: DescMethod): string {
  switch (method.methodKind) {
    case "unary":
      return "unary";
    case "server_streaming":
      return "server_stream";
    case "client_streaming":
      return "client_stream";
    default:
      return "bidi_stream";
  }
}

/** Where a per-call log line goes: its level when OK, and when not. */
export interface CallLogPolicy {
  /** Level of the line of a call that ended OK. */
  ok: LogLevel;
  /** Level of the line of a call that ended with an error. */
  error: LogLevel;
}

const SERVER_FAULT = new Set<number>([Code.Internal, Code.Unknown, Code.DataLoss, Code.Unimplemented]);

/**
 * Writes the one line of a finished call: method, code, duration, peer and, for an error,
 * its message. Server faults log at `warn` at least.
 */
export function logCall(
  logger: Logger,
  policy: CallLogPolicy,
  procedure: string,
  protocol: string,
  code: number,
  durationMs: number,
  peerAddress: string,
  peer: PeerIdentity | undefined,
  message?: string,
): void {
  let level: LogLevel = code === 0 ? policy.ok : policy.error;
  if (SERVER_FAULT.has(code) && (level === "debug" || level === "info")) level = "warn";
  if (!logger.enabled(level)) return;
  const fields: Record<string, unknown> = {
    method: procedure,
    protocol,
    code: codeName(code),
    duration_ms: Math.round(durationMs * 1000) / 1000,
    peer: peerAddress,
  };
  if (peer !== undefined) {
    fields["peer_cert"] = peer.fingerprint256.slice(0, 16);
    fields["peer_authorized"] = peer.authorized;
    if (peer.machineId !== undefined) fields["peer_machine"] = peer.machineId;
    if (peer.serviceName !== undefined) fields["peer_service"] = peer.serviceName;
  }
  if (code !== 0 && message !== undefined) fields["error"] = message;
  logger[level]("rpc", fields);
}
