/**
 * The HTTP/2 client side of every kmi program that calls a kmi server over gRPC (the agent,
 * the KDC's Auditserver client, the Auditserver's KDC client, `kmi ctl`): a connect-node gRPC
 * transport over its own HTTP/2 session manager, guarded so that a server's GOAWAY cannot
 * crash the calling process. Every such transport in src/ is made here.
 */
import type { ClientHttp2Session, ClientHttp2Stream, ClientSessionRequestOptions, OutgoingHttpHeaders, SecureClientSessionOptions } from "node:http2";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager, type Http2SessionOptions } from "@connectrpc/connect-node";
import { parseSubjectAltNames } from "./tls.js";

/**
 * connect-node's session manager, with an 'error' listener of our own on every HTTP/2 session
 * it opens. Why: when a server's GOAWAY on an idle session and our close() meet (the client and
 * the server stopped together, as on a host shutdown), the manager removes its listeners from a
 * session that still has its 'error' to emit, and an unhandled 'error' event would crash the
 * process. The manager's handling is unchanged: calls on that session still fail with the
 * error; only the process no longer dies of it.
 */
export class GuardedSessionManager extends Http2SessionManager {
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

/** Options of {@link createGrpcClientTransport}. */
export interface GrpcClientTransportOptions {
  /** "https://host:port" of the server. */
  baseUrl: string;
  /** TLS of the connection: `ca` to trust, and `cert`/`key` for mutual TLS. */
  tls: Pick<SecureClientSessionOptions, "ca" | "cert" | "key">;
  /** Pings and idle timeout of the session; connect-node's defaults when absent. */
  session?: Http2SessionOptions;
  /** Interceptors, e.g. one that adds the bearer token. */
  interceptors?: Interceptor[];
  /** Deadline of each call, ms; none when absent. */
  defaultTimeoutMs?: number;
  /**
   * The kmi service the server must be: its certificate must carry the URI SAN
   * `kmi://service/<name>` besides chaining to `ca` and naming the host. Why: the
   * infrastructure CA issues every kmi service's certificate, so a chain and a host name alone
   * would let any service (a monitoring client with a `kmi://service/watcher` certificate) pose
   * as the KDC or the Auditserver to a peer, e.g. to hand the KDC a forged attestation key.
   */
  expectedService?: string;
}

/**
 * A `checkServerIdentity` that also requires the `kmi://service/<name>` URI SAN. Node's own
 * check (host name against the DNS/IP SANs) runs first.
 */
export function serviceIdentityCheck(name: string): (host: string, cert: PeerCertificate) => Error | undefined {
  const want = `kmi://service/${name}`;
  return (host, cert) => {
    const err = checkServerIdentity(host, cert);
    if (err !== undefined) return err;
    const uris = parseSubjectAltNames(cert.subjectaltname).filter((n) => n.type === "URI").map((n) => n.value);
    if (uris.includes(want)) return undefined;
    return Object.assign(
      new Error(
        `the server at ${host} is not the ${name}: its certificate has ${uris.length === 0 ? "no kmi service identity" : uris.join(", ")}, not ${want}; check the URL`,
      ),
      { code: "ERR_KMI_SERVICE_IDENTITY" },
    );
  };
}

/** A gRPC transport with the HTTP/2 session it owns. */
export interface GrpcClientTransport {
  /** The transport, for `createClient`. */
  readonly transport: Transport;
  /** Closes the HTTP/2 session and every stream on it (calls after this open a new session). */
  close(): void;
}

/** Creates a gRPC transport to a kmi server over a {@link GuardedSessionManager}; connects lazily. */
export function createGrpcClientTransport(o: GrpcClientTransportOptions): GrpcClientTransport {
  const tls: SecureClientSessionOptions = o.expectedService === undefined ? o.tls : { ...o.tls, checkServerIdentity: serviceIdentityCheck(o.expectedService) };
  const sessionManager = new GuardedSessionManager(o.baseUrl, o.session ?? {}, tls);
  const transport = createGrpcTransport({
    baseUrl: o.baseUrl,
    sessionManager,
    ...(o.interceptors !== undefined ? { interceptors: o.interceptors } : {}),
    ...(o.defaultTimeoutMs !== undefined ? { defaultTimeoutMs: o.defaultTimeoutMs } : {}),
  });
  return { transport, close: () => sessionManager.abort() };
}
