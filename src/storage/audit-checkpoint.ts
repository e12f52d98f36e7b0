/**
 * Signed checkpoints of an audit log (./audit-log.ts): the checkpoint key, the signed
 * encoding, signing and checking one checkpoint, their tables, and the witness's side (keeping
 * the other server's latest checkpoint). The checkpointer that makes them and the verify that
 * uses them are in ./audit-checkpointer.ts.
 *
 * After Certificate Transparency's signed tree heads (RFC 9162) and the witnesses of Trillian
 * and Rekor, for a linear hash chain: a checkpoint says "log `origin` had `seq` entries, the
 * last hashing to `hash`", signed with a key that is NOT in the store (Ed25519, derived from
 * the master key like the audit HMAC key, never written anywhere). Whoever can write the store
 * but does not hold the master key can recompute the chain, but not a signature.
 *
 * Tables (next to `audit_log` and `audit_meta`, see ./store.ts):
 *
 * | table               | key                           | value                              |
 * |---------------------|-------------------------------|------------------------------------|
 * | `audit_checkpoints` | `numericKey(seq)` (20 digits) | kmi.store.v1.AuditCheckpointRecord |
 * | `audit_witness`     | `<peer>/<key id>`             | kmi.store.v1.AuditWitnessRecord    |
 */
import { createHash, createPrivateKey, createPublicKey, hkdfSync, sign, verify, type KeyObject } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { FailedPrecondition, InvalidArgument } from "../common/errors.js";
import { AuditCheckpointSchema, type AuditCheckpoint } from "../gen/kmi/common/v1/checkpoint_pb.js";
import { AuditCheckpointRecordSchema, AuditWitnessRecordSchema } from "../gen/kmi/store/v1/audit_log_pb.js";
import { Mutex } from "./mutex.js";
import { KEY_BYTES, bytesEqual } from "./seal.js";
import { retryOnConflict } from "./retry.js";
import { defineTable, putOp, type Store } from "./store.js";

export type { AuditCheckpoint } from "../gen/kmi/common/v1/checkpoint_pb.js";

/** Signed checkpoints of this server's own log, keyed by `numericKey(seq)`. */
export const AUDIT_CHECKPOINTS_TABLE = defineTable("audit_checkpoints", AuditCheckpointRecordSchema);
/** The other server's latest checkpoint, keyed by the peer's service name. */
export const AUDIT_WITNESS_TABLE = defineTable("audit_witness", AuditWitnessRecordSchema);
/** `AuditCheckpoint.format` written by this version. */
export const CHECKPOINT_FORMAT = 1;
/** Most entries one checkpoint covers (its record keeps their hashes). */
export const MAX_CHECKPOINT_ENTRIES = 1000;

const SIGN_DOMAIN = Buffer.from("kmi.audit.checkpoint.v1\n", "utf8");
// PKCS#8 wrapping of a raw Ed25519 seed (RFC 8410): SEQUENCE { version 0, AlgorithmIdentifier
// { id-Ed25519 }, OCTET STRING { OCTET STRING seed } }.
const ED25519_PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");

/** The checkpoint key of one server: private part in memory only, public part published. */
export interface CheckpointKey {
  /** Ed25519 private key; never written to disk or the store. */
  readonly privateKey: KeyObject;
  /** DER SubjectPublicKeyInfo; carried in every checkpoint, pinned by the witness. */
  readonly publicKeyDer: Uint8Array;
  /** Lowercase hex SHA-256 of `publicKeyDer`. */
  readonly keyId: string;
}

/**
 * The checkpoint key, derived from the master key with HKDF-SHA256 (info "kmi audit
 * checkpoint v1", no salt) as an Ed25519 seed. Why derived and not stored: a writer of the
 * store must not be able to sign, and the master key is already kept out of the store (a 0600
 * file or the environment); one purpose per derived key. After a master-key rotation the seed
 * is kept sealed in the store instead (./log-keys.ts), so the key the witness pins stays.
 */
export function deriveCheckpointKey(masterKey: Uint8Array): CheckpointKey {
  const seed = deriveCheckpointSeed(masterKey);
  try {
    return checkpointKeyFromSeed(seed);
  } finally {
    seed.fill(0);
  }
}

/** The Ed25519 seed of `deriveCheckpointKey` (32 bytes; the caller zeroes it). */
export function deriveCheckpointSeed(masterKey: Uint8Array): Buffer {
  if (!(masterKey instanceof Uint8Array) || masterKey.length !== KEY_BYTES) {
    throw new InvalidArgument(`master key: must be ${KEY_BYTES} bytes`);
  }
  return Buffer.from(hkdfSync("sha256", masterKey, new Uint8Array(0), "kmi audit checkpoint v1", 32));
}

/** The checkpoint key of a 32-byte Ed25519 seed (see `deriveCheckpointSeed`). */
export function checkpointKeyFromSeed(seed: Uint8Array): CheckpointKey {
  if (!(seed instanceof Uint8Array) || seed.length !== 32) throw new InvalidArgument("checkpoint seed: must be 32 bytes");
  const der = Buffer.concat([ED25519_PKCS8_PREFIX, seed]);
  try {
    const privateKey = createPrivateKey({ key: der, format: "der", type: "pkcs8" });
    const publicKeyDer = new Uint8Array(createPublicKey(privateKey).export({ type: "spki", format: "der" }));
    return { privateKey, publicKeyDer, keyId: sha256Hex(publicKeyDer) };
  } finally {
    der.fill(0);
  }
}

/** The bytes a checkpoint's signature covers (see proto/kmi/common/v1/checkpoint.proto). */
export function checkpointSignedBytes(cp: AuditCheckpoint): Buffer {
  const parts: Buffer[] = [SIGN_DOMAIN];
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    parts.push(b);
  };
  const u64 = (n: bigint) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(n);
    parts.push(b);
  };
  const bytes = (b: Uint8Array) => {
    u32(b.length);
    parts.push(Buffer.from(b));
  };
  u32(cp.format);
  bytes(Buffer.from(cp.origin, "utf8"));
  u64(cp.seq);
  bytes(cp.hash);
  u64(cp.fromSeq);
  bytes(cp.entriesDigest);
  const seconds = Buffer.alloc(8);
  seconds.writeBigInt64BE(cp.time?.seconds ?? 0n);
  parts.push(seconds);
  u32(cp.time?.nanos ?? 0);
  bytes(Buffer.from(cp.keyId, "utf8"));
  return Buffer.concat(parts);
}

/** SHA-256 over the concatenated entry hashes: a checkpoint's `entries_digest`. */
export function entriesDigest(hashes: readonly Uint8Array[]): Uint8Array {
  const h = createHash("sha256");
  for (const x of hashes) h.update(x);
  return new Uint8Array(h.digest());
}

/** What one checkpoint states, before it is signed. */
export interface CheckpointFields {
  origin: string;
  seq: bigint;
  hash: Uint8Array;
  fromSeq: bigint;
  entryHashes: readonly Uint8Array[];
  time: Date;
}

/** Signs `fields` with `key`. */
export function signCheckpoint(key: CheckpointKey, fields: CheckpointFields): AuditCheckpoint {
  const cp = create(AuditCheckpointSchema, {
    format: CHECKPOINT_FORMAT,
    origin: fields.origin,
    seq: fields.seq,
    hash: fields.hash,
    fromSeq: fields.fromSeq,
    entriesDigest: entriesDigest(fields.entryHashes),
    time: timestampFromDate(fields.time),
    keyId: key.keyId,
    publicKeyDer: key.publicKeyDer,
  });
  cp.signature = new Uint8Array(sign(null, checkpointSignedBytes(cp), key.privateKey));
  return cp;
}

/**
 * What is wrong with `cp`, or undefined when it is well formed and its signature verifies with
 * its own public key. With `expected`, the key and origin must also be those.
 */
export function checkpointProblem(cp: AuditCheckpoint | undefined, expected?: { keyId: string; origin: string }): string | undefined {
  if (cp === undefined) return "missing";
  if (cp.format !== CHECKPOINT_FORMAT) return `format ${cp.format} is unknown (this kmi reads ${CHECKPOINT_FORMAT})`;
  const originBytes = Buffer.byteLength(cp.origin, "utf8");
  if (originBytes < 1 || originBytes > 128) return "origin: must be 1 to 128 bytes";
  if (cp.seq < 1n) return "seq: must be at least 1";
  if (cp.fromSeq >= cp.seq) return "from_seq: must be less than seq";
  if (cp.hash.length !== 32) return "hash: must be 32 bytes";
  if (cp.entriesDigest.length !== 32) return "entries_digest: must be 32 bytes";
  if (cp.time === undefined) return "time: required";
  if (cp.signature.length !== 64) return "signature: must be 64 bytes (Ed25519)";
  let publicKey: KeyObject;
  try {
    publicKey = createPublicKey({ key: Buffer.from(cp.publicKeyDer), format: "der", type: "spki" });
  } catch {
    return "public_key_der: not a DER SubjectPublicKeyInfo";
  }
  if (publicKey.asymmetricKeyType !== "ed25519") return "public_key_der: not an Ed25519 key";
  if (sha256Hex(cp.publicKeyDer) !== cp.keyId) return "key_id: is not the SHA-256 of public_key_der";
  if (expected !== undefined && cp.keyId !== expected.keyId) {
    return `signed by key ${cp.keyId.slice(0, 16)}…, not by this log's checkpoint key ${expected.keyId.slice(0, 16)}…`;
  }
  if (expected !== undefined && cp.origin !== expected.origin) return `origin "${cp.origin}" is not this log ("${expected.origin}")`;
  if (!verify(null, checkpointSignedBytes(cp), publicKey, cp.signature)) return "signature does not verify (the checkpoint was edited or forged)";
  return undefined;
}

/** Throws InvalidArgument naming `field` when `cp` is not a well-formed, correctly signed checkpoint. */
export function requireCheckpoint(cp: AuditCheckpoint | undefined, field: string, expected?: { keyId: string; origin: string }): AuditCheckpoint {
  const problem = checkpointProblem(cp, expected);
  if (problem !== undefined) throw new InvalidArgument(`${field}: ${problem}`);
  return cp!;
}

/**
 * The witness's side: keeps the latest checkpoint of each peer's log in this server's store,
 * one per peer and checkpoint key (key "<peer>/<key_id>"). A checkpoint is accepted only when
 * its signature verifies and it does not go back on the one held for its key: a lower seq, or
 * the same seq with another hash, means the peer's log was truncated or rewritten, and is
 * refused with FailedPrecondition, keeping the copy that proves it. Why per key: a writer of the
 * peer's store cannot change the peer's key (it is derived from the peer's master key), while a
 * peer installed afresh has a new one and must not be taken for a rewritten log. Only the peer
 * itself can hand one over (mutual TLS with its service certificate, whose key the store seals).
 */
export class CheckpointWitness {
  readonly #store: Store;
  readonly #clock: { now(): Date };
  readonly #mutex = new Mutex();

  constructor(store: Store, clock: { now(): Date }) {
    this.#store = store;
    this.#clock = clock;
  }

  /** Checks and keeps `cp` for `peer`; resolves with the copy held after the call. */
  async accept(peer: string, cp: AuditCheckpoint | undefined): Promise<AuditCheckpoint> {
    const given = requireCheckpoint(cp, "checkpoint");
    // Conditional on the copy as read: replicas sharing a store cannot put an older copy over a newer one.
    return this.#mutex.runExclusive(() => retryOnConflict(() => this.#acceptOnce(peer, given)));
  }

  async #acceptOnce(peer: string, given: AuditCheckpoint): Promise<AuditCheckpoint> {
    const key = witnessKey(peer, given.keyId);
    const read = await this.#store.read(AUDIT_WITNESS_TABLE, key);
    const held = read.value?.checkpoint;
    if (held !== undefined) {
      if (given.origin !== held.origin) throw new FailedPrecondition(`checkpoint: origin "${given.origin}" is not the ${peer}'s log "${held.origin}"`);
      if (given.seq < held.seq) {
        throw new FailedPrecondition(`checkpoint: seq ${given.seq} is older than the witnessed seq ${held.seq}: the ${peer}'s audit log was truncated or rolled back`);
      }
      if (given.seq === held.seq) {
        if (!bytesEqual(given.hash, held.hash)) throw new FailedPrecondition(`checkpoint: seq ${given.seq} has another hash than the witnessed one: the ${peer}'s audit log was rewritten`);
        return held;
      }
    }
    const record = create(AuditWitnessRecordSchema, { format: 1, peer, checkpoint: given, witnessedAt: timestampFromDate(this.#clock.now()) });
    await this.#store.commit({ compares: [{ table: AUDIT_WITNESS_TABLE, key, modRevision: read.modRevision }], ops: [putOp(AUDIT_WITNESS_TABLE, key, record)] });
    return given;
  }

  /** The latest checkpoint held for `peer`'s checkpoint key `keyId`, or undefined; InvalidArgument for a malformed key id. */
  async get(peer: string, keyId: string): Promise<AuditCheckpoint | undefined> {
    if (!/^[0-9a-f]{64}$/.test(keyId)) throw new InvalidArgument("key_id: must be 64 lowercase hex characters (the SHA-256 of your checkpoint public key)");
    return (await this.#store.get(AUDIT_WITNESS_TABLE, witnessKey(peer, keyId)))?.checkpoint;
  }
}

function witnessKey(peer: string, keyId: string): string {
  return `${peer}/${keyId}`;
}

function sha256Hex(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}
