/**
 * The KDC's tables on the Store interface, and typed reads over them. Writes are batches of
 * ops that the caller commits together with its audit entry (`AuditSink.append`), so every
 * change is all-or-nothing and never without its log entry.
 *
 * ## Key layout (values: proto/kmi/store/v1/kdc.proto)
 *
 * | table          | key                                  | value                        |
 * |----------------|--------------------------------------|------------------------------|
 * | `meta`         | `kdc`                                | KdcMetaRecord                |
 * | `credentials`  | `kmi-root`, `infra-ca`, `kdc-tls`    | CredentialRecord (sealed key)|
 * | `tenants`      | `<tenant_id>`                        | TenantRecord                 |
 * | `tokens`       | `<token_id>` (16 hex)                | TokenRecord (SHA-256 only)   |
 * | `versions`     | `<tenant_id>/<version, 10 digits>`   | IntermediateVersionRecord    |
 * | `signing_keys` | `<tenant_id>/<name>`                 | SigningKeyRecord             |
 * | `rollout`      | `<tenant_id>/<machine_id>`           | MachineRolloutRecord         |
 * | `quarantine`   | `<machine_id>`                       | QuarantinedMachineRecord     |
 * | `rotation_policies` | `<tenant_id>`                   | RotationPolicyRecord         |
 * | `scheduler_runs` | `<job>` ("rotation")               | SchedulerRunRecord           |
 * | `elections`    | `<job>` ("scheduler"; storage/election) | ElectionRecord (store.proto) |
 * | `watch_presence` | `<replica>/<machine_id>` (etcd only, leased; ./watch-presence.ts) | WatchPresenceRecord |
 * | `audit_log`    | seq, 20 digits (storage/audit-log)   | AuditEntryRecord             |
 * | `audit_meta`   | `head` (storage/audit-log)           | AuditHeadRecord              |
 *
 * '/' cannot occur in a tenant id, so the prefix `<tenant_id>/` selects exactly one tenant. A
 * `quarantine` record stays after a release, with `released_at` set (see quarantine.ts).
 *
 * Concurrency: the tenant record is the tenant's version word. Every change of a tenant's
 * versions (create, renew, upload, activate, revoke) writes the tenant record (its
 * `last_version` counter or `active_version` pointer) and is conditional on the tenant record's
 * mod revision as read (`guard.tenant`), so two concurrent changes of one tenant, on one
 * replica or two, cannot both commit: the loser re-reads and decides again. A signing key,
 * a token and a new tenant are guarded by their own record (its revision, or its absence).
 */
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import {
  CredentialRecordSchema,
  IntermediateVersionRecordSchema,
  KdcMetaRecordSchema,
  MachineRolloutRecordSchema,
  QuarantinedMachineRecordSchema,
  RotationPolicyRecordSchema,
  SchedulerRunRecordSchema,
  SigningKeyRecordSchema,
  TenantRecordSchema,
  TokenRecordSchema,
  type CredentialRecord,
  type IntermediateVersionRecord,
  type KdcMetaRecord,
  type MachineRolloutRecord,
  type QuarantinedMachineRecord,
  type RotationPolicyRecord,
  type SchedulerRunRecord,
  type SigningKeyRecord,
  type TenantRecord,
  type TokenRecord,
} from "../gen/kmi/store/v1/kdc_pb.js";
import { defineTable, numericKey, putOp, type BatchOp, type Compare, type ReadResult, type Store, type Table } from "../storage/store.js";

/** Layout version of the KDC's tables. */
export const KDC_SCHEMA_VERSION = 1;

/** Names of the KDC's own credentials in the `credentials` table. */
export const CREDENTIAL = { kmiRoot: "kmi-root", infraCa: "infra-ca", kdcTls: "kdc-tls" } as const;

/** The KDC's tables. */
export const T = {
  meta: defineTable("meta", KdcMetaRecordSchema),
  credentials: defineTable("credentials", CredentialRecordSchema),
  tenants: defineTable("tenants", TenantRecordSchema),
  tokens: defineTable("tokens", TokenRecordSchema),
  versions: defineTable("versions", IntermediateVersionRecordSchema),
  signingKeys: defineTable("signing_keys", SigningKeyRecordSchema),
  rollout: defineTable("rollout", MachineRolloutRecordSchema),
  quarantine: defineTable("quarantine", QuarantinedMachineRecordSchema),
  rotationPolicies: defineTable("rotation_policies", RotationPolicyRecordSchema),
  schedulerRuns: defineTable("scheduler_runs", SchedulerRunRecordSchema),
} as const;

/** Key of a version record. */
export function versionKey(tenantId: string, version: number): string {
  return `${tenantId}/${numericKey(version, 10)}`;
}

/** AAD of an intermediate key's SealedBlob (shared by renewals of the key). */
export function intermediateKeyAad(tenantId: string, keyId: string): string {
  return `kdc/tenant/${tenantId}/key/${keyId}`;
}

/** AAD of a signing key's SealedBlob. */
export function signingKeyAad(tenantId: string, name: string): string {
  return `kdc/tenant/${tenantId}/signing-key/${name}`;
}

/** AAD of a KDC credential's SealedBlob. */
export function credentialAad(name: string): string {
  return `kdc/credential/${name}`;
}

/** Typed reads of the KDC's records, and put ops for batches. */
export class KdcStore {
  constructor(readonly store: Store) {}

  private async all<D extends DescMessage>(table: Table<D>, prefix?: string, reverse = false): Promise<MessageShape<D>[]> {
    const out: MessageShape<D>[] = [];
    for await (const [, v] of this.store.iterate(table, prefix === undefined ? { reverse } : { prefix, reverse })) out.push(v);
    return out;
  }

  /** The metadata record, or undefined before init. */
  getMeta(): Promise<KdcMetaRecord | undefined> {
    return this.store.get(T.meta, "kdc");
  }

  /** A credential by name. */
  getCredential(name: string): Promise<CredentialRecord | undefined> {
    return this.store.get(T.credentials, name);
  }

  /** A tenant by id. */
  getTenant(tenantId: string): Promise<TenantRecord | undefined> {
    return this.store.get(T.tenants, tenantId);
  }

  /** A tenant with its mod revision (`0n` when absent), for a conditional change. */
  readTenant(tenantId: string): Promise<ReadResult<TenantRecord>> {
    return this.store.read(T.tenants, tenantId);
  }

  /** A token with its mod revision. */
  readToken(tokenId: string): Promise<ReadResult<TokenRecord>> {
    return this.store.read(T.tokens, tokenId);
  }

  /** A signing key with its mod revision. */
  readSigningKey(tenantId: string, name: string): Promise<ReadResult<SigningKeyRecord>> {
    return this.store.read(T.signingKeys, `${tenantId}/${name}`);
  }

  /** Every tenant, by id. */
  listTenants(): Promise<TenantRecord[]> {
    return this.all(T.tenants);
  }

  /** A token by id. */
  getToken(tokenId: string): Promise<TokenRecord | undefined> {
    return this.store.get(T.tokens, tokenId);
  }

  /** Every token. */
  listTokens(): Promise<TokenRecord[]> {
    return this.all(T.tokens);
  }

  /** A version of a tenant. */
  getVersion(tenantId: string, version: number): Promise<IntermediateVersionRecord | undefined> {
    return this.store.get(T.versions, versionKey(tenantId, version));
  }

  /** Every version of a tenant, newest first. */
  listVersions(tenantId: string): Promise<IntermediateVersionRecord[]> {
    return this.all(T.versions, `${tenantId}/`, true);
  }

  /** Every version of every tenant (for consistency checks and status). */
  listAllVersions(): Promise<IntermediateVersionRecord[]> {
    return this.all(T.versions);
  }

  /** A signing key by name. */
  getSigningKey(tenantId: string, name: string): Promise<SigningKeyRecord | undefined> {
    return this.store.get(T.signingKeys, `${tenantId}/${name}`);
  }

  /** A tenant's signing keys, by name. */
  listSigningKeys(tenantId: string): Promise<SigningKeyRecord[]> {
    return this.all(T.signingKeys, `${tenantId}/`);
  }

  /** A tenant's machine rollout reports, by machine id. */
  listRollout(tenantId: string): Promise<MachineRolloutRecord[]> {
    return this.all(T.rollout, `${tenantId}/`);
  }

  /** One machine's rollout report for a tenant. */
  getRollout(tenantId: string, machineId: string): Promise<MachineRolloutRecord | undefined> {
    return this.store.get(T.rollout, `${tenantId}/${machineId}`);
  }

  /** The store's current revision. */
  revision(): Promise<bigint> {
    return this.store.revision();
  }

  /** True when the store still keeps the history after `revision` (see Store.keepsHistorySince). */
  keepsHistorySince(revision: bigint): Promise<boolean> {
    return this.store.keepsHistorySince(revision);
  }

  /**
   * For each tenant, the newest mod revision among its tenant record and its signing keys: a
   * tenant's released set changed after revision R exactly when this is greater than R (every
   * change of a tenant's versions writes its tenant record; no record of either table is ever
   * deleted).
   */
  async tenantChangeRevisions(): Promise<Map<string, bigint>> {
    const out = new Map<string, bigint>();
    const bump = (tenantId: string, rev: bigint) => {
      if (rev > (out.get(tenantId) ?? 0n)) out.set(tenantId, rev);
    };
    for (const r of (await this.store.list(T.tenants)).records) bump(r.key, r.modRevision);
    for (const r of (await this.store.list(T.signingKeys)).records) bump(r.value.tenantId, r.modRevision);
    return out;
  }

  /** A machine's quarantine record with its mod revision. */
  readQuarantined(machineId: string): Promise<ReadResult<QuarantinedMachineRecord>> {
    return this.store.read(T.quarantine, machineId);
  }

  /** A tenant's rotation policy with its mod revision (`0n`: none). */
  readRotationPolicy(tenantId: string): Promise<ReadResult<RotationPolicyRecord>> {
    return this.store.read(T.rotationPolicies, tenantId);
  }

  /** Every tenant's rotation policy, by tenant id. */
  listRotationPolicies(): Promise<RotationPolicyRecord[]> {
    return this.all(T.rotationPolicies);
  }

  /** A singleton job's last run with its mod revision. */
  readSchedulerRun(job: string): Promise<ReadResult<SchedulerRunRecord>> {
    return this.store.read(T.schedulerRuns, job);
  }

  /** Every machine the KDC knows as quarantined or as released after a quarantine, by machine id. */
  listQuarantined(): Promise<QuarantinedMachineRecord[]> {
    return this.all(T.quarantine);
  }
}

/** Compares for conditional changes: the record is still at the mod revision read (`0n`: still absent). */
export const guard = {
  tenant: (tenantId: string, modRevision: bigint): Compare => ({ table: T.tenants, key: tenantId, modRevision }),
  token: (tokenId: string, modRevision: bigint): Compare => ({ table: T.tokens, key: tokenId, modRevision }),
  signingKey: (tenantId: string, name: string, modRevision: bigint): Compare => ({ table: T.signingKeys, key: `${tenantId}/${name}`, modRevision }),
  quarantine: (machineId: string, modRevision: bigint): Compare => ({ table: T.quarantine, key: machineId, modRevision }),
  rotationPolicy: (tenantId: string, modRevision: bigint): Compare => ({ table: T.rotationPolicies, key: tenantId, modRevision }),
  schedulerRun: (job: string, modRevision: bigint): Compare => ({ table: T.schedulerRuns, key: job, modRevision }),
};

/** Put ops for the KDC's records, keyed by the layout above. */
export const put = {
  meta: (r: KdcMetaRecord): BatchOp => putOp(T.meta, "kdc", r),
  credential: (r: CredentialRecord): BatchOp => putOp(T.credentials, r.name, r),
  tenant: (r: TenantRecord): BatchOp => putOp(T.tenants, r.tenantId, r),
  token: (r: TokenRecord): BatchOp => putOp(T.tokens, r.tokenId, r),
  version: (r: IntermediateVersionRecord): BatchOp => putOp(T.versions, versionKey(r.tenantId, r.version), r),
  signingKey: (r: SigningKeyRecord): BatchOp => putOp(T.signingKeys, `${r.tenantId}/${r.name}`, r),
  rollout: (r: MachineRolloutRecord): BatchOp => putOp(T.rollout, `${r.tenantId}/${r.machineId}`, r),
  quarantined: (r: QuarantinedMachineRecord): BatchOp => putOp(T.quarantine, r.machineId, r),
  rotationPolicy: (r: RotationPolicyRecord): BatchOp => putOp(T.rotationPolicies, r.tenantId, r),
  schedulerRun: (r: SchedulerRunRecord): BatchOp => putOp(T.schedulerRuns, r.job, r),
};
