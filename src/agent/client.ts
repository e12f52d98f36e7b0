/**
 * The agent's clients of the Auditserver and the KDC: gRPC over HTTP/2 with TLS, trusting
 * the infrastructure CA, and presenting the machine certificate (mutual TLS) once the
 * machine has one. Each client owns its HTTP/2 session, so a renewed certificate gets a new
 * client and the old session is closed.
 */
import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcClientTransport } from "../common/http2-client.js";

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

/** Creates a gRPC client of `service` at `baseUrl` ("https://host:port"). */
export function createPeerClient<S extends DescService>(service: S, baseUrl: string, tls: ClientTls, options: { pingIntervalMs?: number } = {}): PeerClient<S> {
  const nodeOptions: { ca: string; cert?: string; key?: string } = { ca: tls.caPem };
  if (tls.certPem !== undefined && tls.keyPem !== undefined) {
    nodeOptions.cert = tls.certPem;
    nodeOptions.key = tls.keyPem;
  }
  // The peer is the service the contract belongs to: kmi.kdc.v1.* → the KDC, kmi.audit.v1.* → the Auditserver.
  const expectedService = /^kmi\.(kdc|audit)\.v1\./.exec(service.typeName)?.[1];
  const { transport, close } = createGrpcClientTransport({
    baseUrl,
    tls: nodeOptions,
    ...(expectedService !== undefined ? { expectedService } : {}),
    session: { pingIntervalMs: options.pingIntervalMs ?? 15_000, pingTimeoutMs: 10_000, idleConnectionTimeoutMs: 60_000 },
  });
  return { client: createClient(service, transport), close };
}
