/**
 * Who a machine is: the verified client certificate of the mutual-TLS connection (URI SAN
 * kmi://machine/<id>), and that certificate must be one this Auditserver recorded for that
 * machine (the current one, or the one before the last renewal). Why the second check: the
 * infrastructure CA alone would accept any certificate it ever signed for that id, including
 * one issued for an enrollment whose batch then failed.
 */
import { X509Certificate } from "node:crypto";
import { MACHINE_ID_PATTERN } from "../attest/index.js";
import { PermissionDenied, Unauthenticated } from "../common/errors.js";
import type { PeerIdentity } from "../common/tls.js";
import type { EnrolledMachineRecord } from "../gen/kmi/store/v1/audit_pb.js";
import type { AuditContext } from "./context.js";
import { Tables } from "./store.js";

/** A machine caller: its id and its verified certificate. */
export interface MachineCaller {
  /** Machine id from the certificate's URI SAN. */
  machineId: string;
  /** The client certificate, DER. */
  certificateDer: Uint8Array;
  /** Lowercase hex SHA-256 of the certificate. */
  certificateSha256: string;
}

/** The machine behind a mutual-TLS call, or Unauthenticated/PermissionDenied saying what to present. */
export function requireMachinePeer(peer: PeerIdentity | undefined): MachineCaller {
  if (peer === undefined) {
    throw new Unauthenticated("client certificate required: call over mutual TLS with your machine certificate; a new machine enrolls first with a join token");
  }
  if (!peer.authorized) {
    throw new Unauthenticated(`client certificate not trusted (${peer.authorizationError ?? "unknown reason"}): use the machine certificate issued at enrollment`);
  }
  if (peer.machineId === undefined) {
    throw new PermissionDenied("client certificate: not a machine certificate (no kmi://machine/<id> URI SAN)");
  }
  if (!MACHINE_ID_PATTERN.test(peer.machineId)) {
    throw new PermissionDenied("client certificate: its kmi://machine/ URI does not hold a machine id of this Auditserver");
  }
  return { machineId: peer.machineId, certificateDer: peer.der, certificateSha256: peer.fingerprint256 };
}

/** The peer service name behind a mutual-TLS call (kmi://service/<name>). */
export function requireServicePeer(peer: PeerIdentity | undefined): string {
  if (peer === undefined) throw new Unauthenticated("client certificate required: call over mutual TLS with a kmi://service/<name> certificate");
  if (!peer.authorized) throw new Unauthenticated(`client certificate not trusted (${peer.authorizationError ?? "unknown reason"})`);
  if (peer.serviceName === undefined) throw new PermissionDenied("client certificate: not a service certificate (no kmi://service/<name> URI SAN); only kmi services may watch machine status");
  return peer.serviceName;
}

/**
 * The enrolled machine of `caller`, when the certificate it presents is one recorded for it.
 * Unauthenticated otherwise (the certificate does not prove an enrolled machine).
 */
export async function loadCallerMachine(ctx: AuditContext, caller: MachineCaller): Promise<EnrolledMachineRecord> {
  return (await readCallerMachine(ctx, caller)).machine;
}

/** `loadCallerMachine` with the record's mod revision, for a change conditional on it (`machineGuard`). */
export async function readCallerMachine(ctx: AuditContext, caller: MachineCaller): Promise<{ machine: EnrolledMachineRecord; modRevision: bigint }> {
  const read = await ctx.store.read(Tables.machines, caller.machineId);
  const machine = read.value;
  if (machine === undefined) {
    throw new Unauthenticated(`machine ${caller.machineId}: not enrolled at this Auditserver; enroll with a new join token`);
  }
  if (caller.certificateSha256 !== machine.certificateSha256 && caller.certificateSha256 !== machine.previousCertificateSha256) {
    throw new Unauthenticated(`client certificate: not the current certificate of machine ${caller.machineId}; use the certificate from its last enrollment or renewal`);
  }
  return { machine, modRevision: read.modRevision };
}

/** Facts about a machine certificate that the KDC returned, checked before it is recorded. */
export interface CheckedMachineCertificate {
  /** DER. */
  der: Uint8Array;
  /** Lowercase hex SHA-256. */
  sha256: string;
  /** End of validity. */
  notAfter: Date;
}

/**
 * Checks the certificate the KDC issued: signed by the infrastructure CA, for the key in the
 * CSR, naming the machine. Why check what our own KDC returns: the Auditserver records it as
 * the machine's identity, so a mix-up (another machine's certificate, another key) must stop
 * here. A mismatch is a server fault (plain Error: INTERNAL on the wire, details in the log).
 */
export function checkIssuedCertificate(p: { certificatePem: string; caPem: string; machineId: string; spki: Uint8Array }): CheckedMachineCertificate {
  const cert = new X509Certificate(p.certificatePem);
  const ca = new X509Certificate(p.caPem);
  if (!cert.verify(ca.publicKey)) throw new Error("kdc: the machine certificate is not signed by the infrastructure CA");
  const spki = cert.publicKey.export({ type: "spki", format: "der" });
  if (!spki.equals(Buffer.from(p.spki))) throw new Error("kdc: the machine certificate is for another key than the CSR's");
  const uri = `URI:kmi://machine/${p.machineId}`;
  if (!(cert.subjectAltName ?? "").split(", ").includes(uri)) throw new Error(`kdc: the machine certificate does not name kmi://machine/${p.machineId}`);
  return { der: new Uint8Array(cert.raw), sha256: cert.fingerprint256.replaceAll(":", "").toLowerCase(), notAfter: new Date(cert.validTo) };
}
