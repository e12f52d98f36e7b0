/**
 * The KDC's client of the Auditserver (AuditService): gRPC over HTTP/2 with TLS trusting the
 * infrastructure CA, presenting the KDC's own certificate (kmi://service/kdc, clientAuth) for
 * WatchMachineStatus, which needs a kmi service's mutual TLS.
 */
import type { ClientHttp2Session, ClientHttp2Stream, ClientSessionRequestOptions, OutgoingHttpHeaders } from "node:http2";
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { AuditService } from "../gen/kmi/audit/v1/audit_pb.js";

/** How to reach the Auditserver. */
export interface AuditClientOptions {
  /** "https://host:port". */
  url: string;
  /** The infrastructure CA, PEM: the Auditserver's certificate must chain to it. */
  caPem: string;
  /** The KDC's certificate and key, PEM (the key stays in memory). */
  certPem: string;
  keyPem: string;
}

/** An AuditService client with its HTTP/2 session. */
export interface AuditClient {
  readonly client: Client<typeof AuditService>;
  /** Closes the session and every stream on it. */
  close(): void;
}

/**
 * connect-node's session manager, with an 'error' listener of our own on every HTTP/2 session
 * it opens. Why: when the Auditserver's GOAWAY on an idle session and our close() meet (both
 * stopped together), the manager removes its listeners from a session that still has its
 * 'error' to emit, and an unhandled 'error' event would crash the KDC mid-shutdown. The
 * manager's handling is unchanged: calls on that session still fail with the error; only the
 * process no longer dies of it.
 */
class GuardedSessionManager extends Http2SessionManager {
  private readonly guarded = new WeakSet<ClientHttp2Session>();

  override async request(method: string, path: string, headers: OutgoingHttpHeaders, options: Omit<ClientSessionRequestOptions, "signal">): Promise<ClientHttp2Stream> {
    const stream = await super.request(method, path, headers, options);
    const session = stream.session as ClientHttp2Session | undefined;
    if (session !== undefined && !this.guarded.has(session)) {
      this.guarded.add(session);
      session.on("error", () => undefined);
    }
    return stream;
  }
}

/** Creates the client (connects lazily, on the first call). */
export function createAuditClient(o: AuditClientOptions): AuditClient {
  const sessionManager = new GuardedSessionManager(
    o.url,
    // HTTP/2 pings notice a dead connection under a quiet watch stream.
    { pingIntervalMs: 15_000, pingTimeoutMs: 10_000, idleConnectionTimeoutMs: 60_000 },
    { ca: o.caPem, cert: o.certPem, key: o.keyPem },
  );
  const transport = createGrpcTransport({ baseUrl: o.url, sessionManager });
  return { client: createClient(AuditService, transport), close: () => sessionManager.abort() };
}

/** Exponential backoff with full jitter between `initialMs` and `min(maxMs, initialMs·2^(n-1))`. */
export function backoffMs(failures: number, initialMs: number, maxMs: number, random = Math.random): number {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(30, Math.max(0, failures - 1)));
  return Math.round(initialMs + random() * (cap - initialMs));
}

/** An abortable sleep; resolves early (without error) when `signal` aborts. */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = () => {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}
