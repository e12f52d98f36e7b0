/**
 * The agent's clients of the Auditserver and the KDC: gRPC over HTTP/2 with TLS, trusting
 * the infrastructure CA, and presenting the machine certificate (mutual TLS) once the
 * machine has one. Each client owns its HTTP/2 session, so a renewed certificate gets a new
 * client and the old session is closed.
 */
import type { ClientHttp2Session, ClientHttp2Stream, ClientSessionRequestOptions, OutgoingHttpHeaders } from "node:http2";
import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

/** TLS material of a client. */
export interface ClientTls {
  /** CA certificates to trust for the server, PEM. */
  caPem: string;
  /** Client certificate, PEM (mutual TLS); absent before enrollment. */
  certPem?: string;
  /** Client private key, PEM; with certPem. */
  keyPem?: string;
}

/** A typed client with its session. */
export interface PeerClient<S extends DescService> {
  /** The client. */
  readonly client: Client<S>;
  /** Closes the HTTP/2 session and every stream on it. */
  close(): void;
}

/**
 * connect-node's session manager, with an 'error' listener of our own on every HTTP/2 session
 * it opens. Why: when a server's GOAWAY on an idle session and our close() meet (the agent and
 * the server stopped together, as on a host shutdown), the manager removes its listeners from a
 * session that still has its 'error' to emit, and an unhandled 'error' event would crash the
 * agent. The manager's handling is unchanged: calls on that session still fail with the error;
 * only the process no longer dies of it.
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

/** Creates a gRPC client of `service` at `baseUrl` ("https://host:port"). */
export function createPeerClient<S extends DescService>(service: S, baseUrl: string, tls: ClientTls, options: { pingIntervalMs?: number } = {}): PeerClient<S> {
  const nodeOptions: { ca: string; cert?: string; key?: string } = { ca: tls.caPem };
  if (tls.certPem !== undefined && tls.keyPem !== undefined) {
    nodeOptions.cert = tls.certPem;
    nodeOptions.key = tls.keyPem;
  }
  const sessionManager = new GuardedSessionManager(
    baseUrl,
    { pingIntervalMs: options.pingIntervalMs ?? 15_000, pingTimeoutMs: 10_000, idleConnectionTimeoutMs: 60_000 },
    nodeOptions,
  );
  const transport = createGrpcTransport({ baseUrl, sessionManager });
  return {
    client: createClient(service, transport),
    close: () => sessionManager.abort(),
  };
}
