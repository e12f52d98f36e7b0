/**
 * The intermediate-version state machine of a tenant's CA, as pure functions over the
 * persisted records: each `plan*` checks that a transition is allowed and returns the new
 * records, without touching the store. The caller writes them in one batch with the audit
 * entry, so a refused transition changes nothing.
 *
 *   PENDING --upload--> READY --activate--> ACTIVE --(another activated)--> RETIRED
 *                                  ^                                           |
 *                                  +----------------activate-------------------+
 *   any state but REVOKED/DISCARDED --revoke--> REVOKED  (ACTIVE only with allow_active)
 *   PENDING --discard--> DISCARDED  (key erased); a PENDING version expires (no upload) after the pending TTL
 */
import { clone, create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { FailedPrecondition } from "../common/errors.js";
import { VersionState } from "../gen/kmi/kdc/v1/kdc_pb.js";
import { IntermediateVersionRecordSchema, TenantRecordSchema, type IntermediateVersionRecord, type TenantRecord } from "../gen/kmi/store/v1/kdc_pb.js";

/** Lowercase state name for messages and tables. */
export function stateName(state: VersionState): string {
  switch (state) {
    case VersionState.PENDING:
      return "pending";
    case VersionState.READY:
      return "ready";
    case VersionState.ACTIVE:
      return "active";
    case VersionState.RETIRED:
      return "retired";
    case VersionState.REVOKED:
      return "revoked";
    case VersionState.DISCARDED:
      return "discarded";
    default:
      return "unspecified";
  }
}

/** The validity window of a certificate. */
export interface Validity {
  notBefore: Date;
  notAfter: Date;
}

function ts(d: Date): Timestamp {
  return timestampFromDate(d);
}

/** Checks that a certificate is valid at `now`, naming the version and what to do otherwise. */
export function requireValidNow(version: number, validity: Validity, now: Date): void {
  if (now < validity.notBefore) {
    throw new FailedPrecondition(`version ${version}: certificate is not valid before ${validity.notBefore.toISOString()}; wait, or check the signer's clock`);
  }
  if (now >= validity.notAfter) {
    throw new FailedPrecondition(`version ${version}: certificate expired on ${validity.notAfter.toISOString()}; renew it (\`kmi ctl ca renew\`)`);
  }
}

/** The result of an activation: the tenant, the activated version and the one it retired. */
export interface ActivationPlan {
  tenant: TenantRecord;
  activated: IntermediateVersionRecord;
  retired: IntermediateVersionRecord | undefined;
}

/**
 * Activation of `target`, retiring `current` (the tenant's active version, if any).
 * `validity` is the window of target's certificate.
 */
export function planActivate(
  tenant: TenantRecord,
  target: IntermediateVersionRecord,
  current: IntermediateVersionRecord | undefined,
  validity: Validity | undefined,
  now: Date,
): ActivationPlan {
  const v = target.version;
  switch (target.state) {
    case VersionState.ACTIVE:
      throw new FailedPrecondition(`version ${v} is already active; nothing to do`);
    case VersionState.PENDING:
      throw new FailedPrecondition(`version ${v} is pending; upload its signed certificate first (\`kmi ctl ca upload --version ${v}\`)`);
    case VersionState.REVOKED:
      throw new FailedPrecondition(`version ${v} is revoked and cannot be activated; make a new version (\`kmi ctl ca rotate\`)`);
    case VersionState.DISCARDED:
      throw new FailedPrecondition(`version ${v} is discarded and cannot be activated; make a new version (\`kmi ctl ca csr\` or \`kmi ctl ca rotate\`)`);
    case VersionState.READY:
    case VersionState.RETIRED:
      break;
    default:
      throw new FailedPrecondition(`version ${v} is in an unknown state; it cannot be activated`);
  }
  if (validity === undefined) throw new FailedPrecondition(`version ${v} has no certificate; upload one first`);
  requireValidNow(v, validity, now);
  const t = clone(TenantRecordSchema, tenant);
  t.activeVersion = v;
  const activated = clone(IntermediateVersionRecordSchema, target);
  activated.state = VersionState.ACTIVE;
  activated.activatedAt = ts(now);
  activated.retiredAt = undefined;
  let retired: IntermediateVersionRecord | undefined;
  if (current !== undefined && current.version !== v) {
    retired = clone(IntermediateVersionRecordSchema, current);
    retired.state = VersionState.RETIRED;
    retired.retiredAt = ts(now);
  }
  return { tenant: t, activated, retired };
}

/** The result of a revocation. */
export interface RevocationPlan {
  tenant: TenantRecord;
  revoked: IntermediateVersionRecord;
  /** True when the revoked version was the active one (the tenant now has none). */
  wasActive: boolean;
}

/** Revocation of `target`. */
export function planRevoke(tenant: TenantRecord, target: IntermediateVersionRecord, reason: string, allowActive: boolean, now: Date): RevocationPlan {
  const v = target.version;
  if (target.state === VersionState.REVOKED) throw new FailedPrecondition(`version ${v} is already revoked`);
  if (target.state === VersionState.DISCARDED) throw new FailedPrecondition(`version ${v} is discarded and has no key; nothing to revoke`);
  const wasActive = target.state === VersionState.ACTIVE;
  if (wasActive && !allowActive) {
    throw new FailedPrecondition(
      `version ${v} is the active version; activate another version first, or pass allow_active (--allow-active) to leave the tenant without an active CA`,
    );
  }
  const t = clone(TenantRecordSchema, tenant);
  if (wasActive) t.activeVersion = 0;
  const revoked = clone(IntermediateVersionRecordSchema, target);
  revoked.state = VersionState.REVOKED;
  revoked.revokedAt = ts(now);
  revoked.revokeReason = reason;
  return { tenant: t, revoked, wasActive };
}

/** Checks that `target` can take an uploaded certificate. */
export function requireUploadable(target: IntermediateVersionRecord): void {
  if (target.state !== VersionState.PENDING) {
    throw new FailedPrecondition(
      `version ${target.version} is ${stateName(target.state)}, not pending; upload only to a version made by \`kmi ctl ca csr\` (see \`kmi ctl ca history\`)`,
    );
  }
}

/** A version with its certificate attached (PENDING -> READY). */
export function planUpload(target: IntermediateVersionRecord, certificateDer: Uint8Array, customerRootDer: Uint8Array | undefined): IntermediateVersionRecord {
  requireUploadable(target);
  const r = clone(IntermediateVersionRecordSchema, target);
  r.state = VersionState.READY;
  r.certificateDer = certificateDer;
  r.customerRootDer = customerRootDer ?? new Uint8Array();
  return r;
}

/** When a PENDING version's CSR expires (made + `ttlMs`); undefined for other states or an unknown creation time. */
export function pendingExpiry(v: IntermediateVersionRecord, ttlMs: number): Date | undefined {
  if (v.state !== VersionState.PENDING || v.createdAt === undefined) return undefined;
  return new Date(timestampDate(v.createdAt).getTime() + ttlMs);
}

/** Refuses a PENDING version whose CSR has expired: the signed certificate would come too late. */
export function requireNotExpired(v: IntermediateVersionRecord, ttlMs: number, now: Date): void {
  const end = pendingExpiry(v, ttlMs);
  if (end !== undefined && end.getTime() <= now.getTime()) {
    throw new FailedPrecondition(
      `version ${v.version}: its CSR expired on ${end.toISOString()} (pending versions expire ${durationText(ttlMs)} after \`ca csr\`); ` +
        `discard it (\`kmi ctl ca discard --tenant ${v.tenantId} --version ${v.version}\`) and make a new CSR (\`kmi ctl ca csr\`)`,
    );
  }
}

/** "30 days", "12 hours", "2 seconds": a configured duration in its largest whole unit. */
function durationText(ms: number): string {
  for (const [unit, size] of [["day", 86400_000], ["hour", 3600_000], ["minute", 60_000]] as const) {
    if (ms >= size && ms % size === 0) return `${ms / size} ${unit}${ms === size ? "" : "s"}`;
  }
  const s = Math.round(ms / 1000);
  return `${s} second${s === 1 ? "" : "s"}`;
}

/** A PENDING version given up: DISCARDED, its sealed key erased (the CSR and subject stay for history). */
export function planDiscard(target: IntermediateVersionRecord, reason: string, now: Date): IntermediateVersionRecord {
  if (target.state !== VersionState.PENDING) {
    throw new FailedPrecondition(
      `version ${target.version} is ${stateName(target.state)}, not pending; only a pending version (a CSR waiting for its certificate) can be discarded` +
        (target.state === VersionState.DISCARDED ? "" : "; to stop using a version, revoke it (`kmi ctl ca revoke`)"),
    );
  }
  const r = clone(IntermediateVersionRecordSchema, target);
  r.state = VersionState.DISCARDED;
  r.privateKey = undefined;
  r.discardedAt = ts(now);
  r.discardReason = reason;
  return r;
}

/** Checks that `source` may lend its key to a renewal. */
export function requireRenewable(source: IntermediateVersionRecord): void {
  if (source.state === VersionState.REVOKED) {
    throw new FailedPrecondition(`version ${source.version} is revoked; its key may not be reused; make a new key (\`kmi ctl ca rotate\`)`);
  }
  if (source.state === VersionState.PENDING) {
    throw new FailedPrecondition(`version ${source.version} is pending; upload its certificate, or renew a version that has one`);
  }
  if (source.state === VersionState.DISCARDED) {
    throw new FailedPrecondition(`version ${source.version} is discarded and its key is gone; renew another version, or make a new key (\`kmi ctl ca rotate\`)`);
  }
}

/** A new tenant record whose version counter advanced by one; returns it with the new number. */
export function nextVersion(tenant: TenantRecord): { tenant: TenantRecord; version: number } {
  const t = clone(TenantRecordSchema, tenant);
  t.lastVersion = tenant.lastVersion + 1;
  return { tenant: t, version: t.lastVersion };
}

/** A fresh tenant record. */
export function newTenant(tenantId: string, displayName: string, now: Date): TenantRecord {
  return create(TenantRecordSchema, { recordVersion: 1, tenantId, displayName, activeVersion: 0, lastVersion: 0, createdAt: ts(now) });
}
