/**
 * Records and domain values to the API's messages (the last step of every handler).
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { CertificateInfoSchema, type CertificateInfo } from "../gen/kmi/common/v1/common_pb.js";
import { AuditEntrySchema, TenantSchema, TokenInfoSchema, type AuditEntry as AuditEntryMsg, type Tenant, type TokenInfo } from "../gen/kmi/kdc/v1/admin_pb.js";
import { IntermediateVersionSchema, SigningKeySchema, type IntermediateVersion, type SigningKey } from "../gen/kmi/kdc/v1/kdc_pb.js";
import { custodyOf } from "./version-keys.js";
import type { IntermediateVersionRecord, SigningKeyRecord, TenantRecord, TokenRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import type { AuditEntry } from "../storage/audit-log.js";
import type { CertificateFactory, CertSummary } from "./context.js";
import { pendingExpiry } from "./model.js";

/** CertificateInfo of a certificate summary. */
export function certificateInfo(s: CertSummary): CertificateInfo {
  return create(CertificateInfoSchema, {
    subject: s.subject,
    issuer: s.issuer,
    serialHex: s.serialHex,
    notBefore: timestampFromDate(s.notBefore),
    notAfter: timestampFromDate(s.notAfter),
    sha256Fingerprint: s.sha256Fingerprint,
    isCa: s.isCa,
    dnsNames: s.dnsNames,
    ipAddresses: s.ipAddresses,
    uris: s.uris,
    keyAlgorithm: s.algorithm,
    subjectKeyIdHex: s.subjectKeyIdHex,
    authorityKeyIdHex: s.authorityKeyIdHex,
    pathLenConstraint: s.pathLenConstraint,
  });
}

/**
 * IntermediateVersion of a version record (never its key). With `pending`, a PENDING version
 * carries when its CSR expires and whether it has.
 */
export function intermediateVersion(r: IntermediateVersionRecord, pki: CertificateFactory, pending?: { pendingTtlMs: number; now: Date }): IntermediateVersion {
  const hasCert = r.certificateDer.length > 0;
  const expires = pending === undefined ? undefined : pendingExpiry(r, pending.pendingTtlMs);
  return create(IntermediateVersionSchema, {
    tenantId: r.tenantId,
    version: r.version,
    state: r.state,
    signer: r.signer,
    keyAlgorithm: r.keyAlgorithm,
    keyId: r.keyId,
    certificatePem: hasCert ? pki.certificatePem(r.certificateDer) : "",
    ...(hasCert ? { certificate: certificateInfo(pki.summarize(r.certificateDer)) } : {}),
    csrPem: r.csrDer.length > 0 ? pki.csrPem(r.csrDer) : "",
    ...(r.createdAt ? { createdAt: r.createdAt } : {}),
    ...(r.activatedAt ? { activatedAt: r.activatedAt } : {}),
    ...(r.retiredAt ? { retiredAt: r.retiredAt } : {}),
    ...(r.revokedAt ? { revokedAt: r.revokedAt } : {}),
    revokeReason: r.revokeReason,
    renewedFrom: r.renewedFrom,
    keyCustody: custodyOf(r),
    customerRootSha256: r.customerRootDer.length > 0 ? pki.summarize(r.customerRootDer).sha256Fingerprint : "",
    ...(expires !== undefined ? { pendingExpiresAt: timestampFromDate(expires), pendingExpired: expires.getTime() <= pending!.now.getTime() } : {}),
    ...(r.discardedAt ? { discardedAt: r.discardedAt } : {}),
    discardReason: r.discardReason,
  });
}

/** Tenant of a tenant record. */
export function tenant(r: TenantRecord): Tenant {
  return create(TenantSchema, { tenantId: r.tenantId, displayName: r.displayName, activeVersion: r.activeVersion, ...(r.createdAt ? { createdAt: r.createdAt } : {}) });
}

/** TokenInfo of a token record (never the hash). */
export function tokenInfo(r: TokenRecord): TokenInfo {
  return create(TokenInfoSchema, {
    tokenId: r.tokenId,
    role: r.role,
    tenantId: r.tenantId,
    description: r.description,
    ...(r.createdAt ? { createdAt: r.createdAt } : {}),
    ...(r.expiresAt ? { expiresAt: r.expiresAt } : {}),
    revoked: r.revokedAt !== undefined,
  });
}

/** SigningKey of a signing-key record (public part only). */
export function signingKey(r: SigningKeyRecord, pem: (spki: Uint8Array) => string): SigningKey {
  return create(SigningKeySchema, {
    tenantId: r.tenantId,
    name: r.name,
    keyId: r.keyId,
    keyAlgorithm: r.keyAlgorithm,
    publicKeyPem: pem(r.publicKeyDer),
    ...(r.createdAt ? { createdAt: r.createdAt } : {}),
    revoked: r.revokedAt !== undefined,
  });
}

/** AuditEntry message of a log entry. */
export function auditEntry(e: AuditEntry): AuditEntryMsg {
  return create(AuditEntrySchema, {
    seq: e.seq,
    time: timestampFromDate(e.time),
    actor: e.actor,
    action: e.action,
    target: e.target,
    outcome: e.outcome,
    details: e.details,
    prevHash: e.prevHash,
    hash: e.hash,
  });
}
