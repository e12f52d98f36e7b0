/**
 * The Auditserver's client of the KDC: PeerService over mutual TLS with the Auditserver's
 * service certificate (kmi://service/audit), trusting the infrastructure CA for the KDC's
 * certificate. KDC errors become domain errors that say what happened: a bad operator token
 * stays UNAUTHENTICATED, a CSR the KDC refuses stays INVALID_ARGUMENT, and anything that
 * means "the KDC cannot be asked" is UNAVAILABLE.
 */
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated, Unavailable } from "../common/errors.js";
import { transportForUrls } from "../clients/failover-transport.js";
import { createGrpcClientTransport } from "../common/http2-client.js";
import type { Logger } from "../common/logger.js";
import { PeerService } from "../gen/kmi/kdc/v1/peer_pb.js";
import type { IssuedMachineCertificate, KdcPeer } from "./context.js";

/** How to reach the KDC. */
export interface KdcClientOptions {
  /** https URL of the KDC, or every replica's, comma-separated (calls fail over: src/clients/failover-transport.ts). */
  url: string;
  /** The infrastructure CA, PEM. */
  caPem: string;
  /** The Auditserver's service certificate and key, PEM. */
  certPem: string;
  keyPem: string;
  /** Per-call timeout, ms; default 10 s. */
  timeoutMs?: number;
  logger: Logger;
}

/** A mutual-TLS gRPC transport to the KDC. */
export function createKdcTransport(o: Pick<KdcClientOptions, "url" | "caPem" | "certPem" | "keyPem" | "timeoutMs">): Transport {
  return transportForUrls(o.url, (url) =>
    createGrpcClientTransport({
      baseUrl: url,
      defaultTimeoutMs: o.timeoutMs ?? 10_000,
      tls: { ca: o.caPem, cert: o.certPem, key: o.keyPem },
      expectedService: "kdc",
    }),
  ).transport;
}

/**
 * Maps a KDC error. `what` says which call, for the messages. Why UNAVAILABLE for the KDC
 * refusing the Auditserver itself (PERMISSION_DENIED, UNAUTHENTICATED on a peer call): the
 * caller did nothing wrong, the Auditserver is misconfigured; the details go to the log.
 */
function mapError(err: unknown, what: string, url: string, logger: Logger, callerCodes: readonly Code[]): Error {
  const ce = ConnectError.from(err);
  if (callerCodes.includes(ce.code)) {
    switch (ce.code) {
      case Code.Unauthenticated:
        return new Unauthenticated(ce.rawMessage);
      case Code.InvalidArgument:
        return new InvalidArgument(ce.rawMessage);
      case Code.FailedPrecondition:
        return new FailedPrecondition(`kdc: ${ce.rawMessage}`);
      case Code.PermissionDenied:
        return new PermissionDenied(ce.rawMessage);
    }
  }
  logger.warn("kdc call failed", { call: what, kdc: url, code: Code[ce.code], error: ce.rawMessage });
  return new Unavailable(`kdc: ${what} failed at ${url} (${Code[ce.code]?.toLowerCase() ?? ce.code}); try again, and check the KDC and the Auditserver's service certificate`);
}

/** The KdcPeer of the real server. */
export function createKdcPeer(o: KdcClientOptions): KdcPeer & { client: Client<typeof PeerService> } {
  const client = createClient(PeerService, createKdcTransport(o));
  return {
    client,
    async authenticateToken(token) {
      try {
        const res = await client.authenticateToken({ token });
        if (res.token === undefined) throw new Error("kdc: AuthenticateToken returned no token");
        return { token: res.token, actor: res.actor !== "" ? res.actor : `token:${res.token.tokenId}` };
      } catch (err) {
        if (err instanceof Error && !(err instanceof ConnectError) && err.message.startsWith("kdc:")) throw err;
        // An operator's token the KDC refuses is the caller's problem; anything else is ours.
        throw mapError(err, "token check", o.url, o.logger, [Code.Unauthenticated]);
      }
    },
    async issueMachineCertificate(p): Promise<IssuedMachineCertificate> {
      try {
        const res = await client.issueMachineCertificate({ csrPem: p.csrPem, machineId: p.machineId, group: p.group, ttlSeconds: p.ttlSeconds });
        if (res.notAfter === undefined) throw new Error("kdc: IssueMachineCertificate returned no not_after");
        return { certificatePem: res.certificatePem, caPem: res.caPem, notAfter: timestampDate(res.notAfter) };
      } catch (err) {
        if (err instanceof Error && !(err instanceof ConnectError) && err.message.startsWith("kdc:")) throw err;
        throw mapError(err, "machine certificate issuance", o.url, o.logger, [Code.InvalidArgument]);
      }
    },
  };
}
