/**
 * The audit log's two keys (the HMAC key of its keyed hashes, the checkpoint signing key),
 * kept stable across master-key rotations.
 *
 * | table      | key       | value                              |
 * |------------|-----------|------------------------------------|
 * | `log_keys` | `derived` | kmi.store.v1.LogKeysRecord (sealed)|
 *
 * Without the record (a store never rekeyed) both keys are derived from the primary master key
 * with HKDF, as they always were. The first rekey pins them: it writes the record, sealed under
 * that same key, before it makes a new master key; the rewrap then carries it to every later
 * key like any sealed record. Why pin rather than record a key id per audit entry: the witness
 * pins the checkpoint key, and an old token's keyed hash must still match the same token's hash
 * after a rotation (correlation across the rotation); a new derivation would break both.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { FailedPrecondition } from "../common/errors.js";
import type { SealedBlob } from "../gen/kmi/store/v1/envelope_pb.js";
import { LogKeysRecordSchema } from "../gen/kmi/store/v1/keyring_pb.js";
import { checkpointKeyFromSeed, deriveCheckpointSeed, type CheckpointKey } from "./audit-checkpoint.js";
import { deriveAuditKey } from "./audit-log.js";
import type { MasterKeyring } from "./keyring.js";
import { defineTable, type Store } from "./store.js";

/** The table of the pinned log keys. */
export const LOG_KEYS_TABLE = defineTable("log_keys", LogKeysRecordSchema);
const KEY = "derived";
/** AAD of the sealed log keys. */
export const LOG_KEYS_AAD = "log-keys/derived";

/** The audit log's keys, in memory only. */
export interface LogKeys {
  /** Key of `keyedHash` (storage/audit-log.ts). */
  readonly hmacKey: Buffer;
  /** The checkpoint signing key (storage/audit-checkpoint.ts). */
  readonly checkpointKey: CheckpointKey;
}

/** The log keys: the pinned record's when there is one, else derived from the primary master key. */
export async function loadLogKeys(store: Store, keyring: MasterKeyring): Promise<LogKeys> {
  const record = await store.get(LOG_KEYS_TABLE, KEY);
  const both = record === undefined ? keyring.withPrimaryKey(derivedBytes) : openRecord(keyring, record.keys);
  try {
    return { hmacKey: Buffer.from(both.subarray(0, 32)), checkpointKey: checkpointKeyFromSeed(both.subarray(32)) };
  } finally {
    both.fill(0);
  }
}

/**
 * Pins the log keys derived from the primary master key, unless they are pinned already: a
 * conditional put on the record's absence. Call before a new master key seals anything.
 */
export async function pinLogKeys(store: Store, keyring: MasterKeyring, now: Date): Promise<boolean> {
  const current = await store.read(LOG_KEYS_TABLE, KEY);
  if (current.value !== undefined) return false;
  // Sealed under the primary key itself (not a next key): a server started before the rekey holds only that one.
  if (keyring.nextId !== undefined) throw new FailedPrecondition("log keys: a rotation is under way already; pin the log keys before making the next key");
  const both = keyring.withPrimaryKey(derivedBytes);
  try {
    const record = create(LogKeysRecordSchema, {
      recordVersion: 1,
      keys: keyring.seal(both, LOG_KEYS_AAD),
      derivedFromKeyId: keyring.primaryId,
      createdAt: timestampFromDate(now),
    });
    await store.commit({ compares: [{ table: LOG_KEYS_TABLE, key: KEY, modRevision: 0n }], ops: [{ type: "put", table: LOG_KEYS_TABLE, key: KEY, value: record }] });
    return true;
  } finally {
    both.fill(0);
  }
}

function derivedBytes(master: Uint8Array): Buffer {
  const hmac = deriveAuditKey(master);
  const seed = deriveCheckpointSeed(master);
  try {
    return Buffer.concat([hmac, seed]);
  } finally {
    hmac.fill(0);
    seed.fill(0);
  }
}

function openRecord(keyring: MasterKeyring, sealed: SealedBlob | undefined): Buffer {
  if (sealed === undefined) throw new FailedPrecondition("log keys: the pinned record has no keys; restore the store from a backup");
  const both = Buffer.from(keyring.open(sealed, LOG_KEYS_AAD));
  if (both.length !== 64) throw new FailedPrecondition("log keys: the pinned record is not 64 bytes; restore the store from a backup");
  return both;
}
