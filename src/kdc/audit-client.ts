/**
 * The KDC's client of the Auditserver (AuditService): gRPC over HTTP/2 with TLS trusting the
 * infrastructure CA, presenting the KDC's own certificate (kmi://service/kdc, clientAuth) for
 * WatchMachineStatus, which needs a kmi service's mutual TLS. Over several Auditserver replicas
 * a call that failed before the replica acted goes to the next (the attestation key fetch, the
 * machine status feed, the witness and the portal's relay alike).
 */
import { createClient, type Client } from "@connectrpc/connect";
import { transportForUrls } from "../clients/failover-transport.js";
import { createGrpcClientTransport } from "../common/http2-client.js";
import { AuditAdminService } from "../gen/kmi/audit/v1/admin_pb.js";
import { AuditService } from "../gen/kmi/audit/v1/audit_pb.js";

/** How to reach the Auditserver. */
export interface AuditClientOptions {
  /** "https://host:port", or every replica's, comma-separated (calls fail over: src/clients/failover-transport.ts). */
  url: string;
  /** The infrastructure CA, PEM: the Auditserver's certificate must chain to it. */
  caPem: string;
  /** The KDC's certificate and key, PEM (the key stays in memory). */
  certPem: string;
  keyPem: string;
}

/** AuditService and AuditAdminService clients with their HTTP/2 session. */
export interface AuditClient {
  readonly client: Client<typeof AuditService>;
  /** AuditAdminService on the same connection (the portal's relay, ./audit-relay.ts). */
  readonly admin: Client<typeof AuditAdminService>;
  /** Closes the session and every stream on it. */
  close(): void;
}

/** Creates the client (connects lazily, on the first call). */
export function createAuditClient(o: AuditClientOptions): AuditClient {
  const { transport, close } = transportForUrls(o.url, (url) =>
    createGrpcClientTransport({
      baseUrl: url,
      tls: { ca: o.caPem, cert: o.certPem, key: o.keyPem },
      // The attestation key and the quarantine feed come from here: only the Auditserver will do.
      expectedService: "audit",
      // HTTP/2 pings notice a dead connection under a quiet watch stream.
      session: { pingIntervalMs: 15_000, pingTimeoutMs: 10_000, idleConnectionTimeoutMs: 60_000 },
    }),
  );
  return { client: createClient(AuditService, transport), admin: createClient(AuditAdminService, transport), close };
}
