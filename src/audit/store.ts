/**
 * The Auditserver's tables in its own store (one LevelDB, owner "audit"). The records are
 * protobuf messages of proto/kmi/store/v1/audit.proto, whose comments are the authority.
 *
 * | table          | key                                | value                                   |
 * |----------------|------------------------------------|-----------------------------------------|
 * | `meta`         | `audit`                            | kmi.store.v1.AuditMetaRecord            |
 * | `credentials`  | `attestation-key` / `service-tls`  | kmi.store.v1.AuditCredentialRecord      |
 * | `groups`       | `<group>`                          | kmi.store.v1.MachineGroupRecord         |
 * | `join_tokens`  | `<token_id>` (16 hex)              | kmi.store.v1.JoinTokenRecord            |
 * | `machines`     | `<machine_id>` (m-<16 hex>)        | kmi.store.v1.EnrolledMachineRecord      |
 * | `attestations` | `<machine_id>`                     | kmi.store.v1.AttestationResultRecord    |
 * | `nonces`       | `<machine_id>/<nonce, 64 hex>`     | kmi.store.v1.AttestationNonceRecord     |
 * | `audit_log`, `audit_meta` | see src/storage/store.ts | the hash-chained audit log             |
 *
 * Every change of these tables is written in one batch together with its audit log entry.
 */
import { FailedPrecondition } from "../common/errors.js";
import {
  AttestationNonceRecordSchema,
  AttestationResultRecordSchema,
  AuditCredentialRecordSchema,
  AuditMetaRecordSchema,
  EnrolledMachineRecordSchema,
  JoinTokenRecordSchema,
  MachineGroupRecordSchema,
} from "../gen/kmi/store/v1/audit_pb.js";
import { defineTable } from "../storage/store.js";

/** `record_version` written by this version of the Auditserver, for every table. */
export const RECORD_VERSION = 1;
/** Layout version of the Auditserver's store (StoreInfo.schema_version). */
export const AUDIT_SCHEMA_VERSION = 1;
/** StoreInfo.owner of the Auditserver's store. */
export const AUDIT_STORE_OWNER = "audit";

/** Key of the meta record. */
export const META_KEY = "audit";
/** Key of the token-signing key in `credentials`. */
export const ATTESTATION_KEY = "attestation-key";
/** Key of the TLS identity (kmi://service/audit) in `credentials`. */
export const SERVICE_TLS_KEY = "service-tls";

/**
 * Refuses a record written by a newer Auditserver: its fields may mean something this
 * version does not know, and acting on a half-understood record is worse than stopping.
 */
function checkVersion<T extends { recordVersion: number }>(table: string) {
  return (value: T): T => {
    if (value.recordVersion > RECORD_VERSION) {
      throw new FailedPrecondition(
        `store: a ${table} record has record_version ${value.recordVersion}, newer than this kmi knows (${RECORD_VERSION}); upgrade kmi`,
      );
    }
    return value;
  };
}

/** The tables of the Auditserver. */
export const Tables = {
  meta: defineTable("meta", AuditMetaRecordSchema, { upgrade: checkVersion("meta") }),
  credentials: defineTable("credentials", AuditCredentialRecordSchema, { upgrade: checkVersion("credentials") }),
  groups: defineTable("groups", MachineGroupRecordSchema, { upgrade: checkVersion("groups") }),
  joinTokens: defineTable("join_tokens", JoinTokenRecordSchema, { upgrade: checkVersion("join_tokens") }),
  machines: defineTable("machines", EnrolledMachineRecordSchema, { upgrade: checkVersion("machines") }),
  attestations: defineTable("attestations", AttestationResultRecordSchema, { upgrade: checkVersion("attestations") }),
  nonces: defineTable("nonces", AttestationNonceRecordSchema, { upgrade: checkVersion("nonces") }),
} as const;

/** Key of a nonce record. */
export function nonceKey(machineId: string, nonce: Uint8Array): string {
  return `${machineId}/${Buffer.from(nonce).toString("hex")}`;
}
