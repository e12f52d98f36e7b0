/**
 * The hash-chained audit log, kept in the same `Store` as the state it describes.
 *
 * Fail-closed by construction: `append(entry, changeOps)` commits the entry and the caller's
 * state change in ONE atomic batch, so a change can never happen without its entry (and an
 * entry that cannot be written takes its change down with it). A refused request is logged
 * with `append(entry, [])`.
 *
 * Each entry's hash covers all its fields and the previous entry's hash (the canonical
 * encoding is written down in proto/kmi/store/v1/audit_log.proto, so a verifier in any
 * language can recompute it); the head (last seq and hash) is written in the same batch, so
 * that `verify()` also notices a dropped last entry. Tables: `audit_log` (key: seq as 20
 * digits) and `audit_meta` (key "head"); see the layout in ./store.ts.
 *
 * One linear chain across replicas: the batch is conditional on the head's mod revision as
 * read (and on the caller's own compares). When only the head moved (another process, or
 * another append of this one, won), the entry is rebuilt on the new head and committed again
 * (`retryOnConflict`); when a caller's compare failed, its `Conflict` goes back to the caller,
 * whose own retry starts its read-check-write over. Appends of one process also queue up
 * locally, which only saves them from conflicting with each other: correctness comes from
 * the compare.
 */
import { createHash, createHmac, hkdfSync } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { InvalidArgument, isKmiError } from "../common/errors.js";
import {
  AuditEntryRecordSchema,
  AuditHeadRecordSchema,
  type AuditEntryRecord,
} from "../gen/kmi/store/v1/audit_log_pb.js";
import { Mutex } from "./mutex.js";
import { retryOnConflict } from "./retry.js";
import { KEY_BYTES, bytesEqual } from "./seal.js";
import { MAX_TXN_OPS, conflictKey, defineTable, numericKey, parseNumericKey, putOp, type BatchOp, type Compare, type Store } from "./store.js";
import { RefusalBudget, type RefusalBudgetOptions } from "./refusal-budget.js";

/** Table of audit entries, keyed by `numericKey(seq)`. */
export const AUDIT_LOG_TABLE = defineTable("audit_log", AuditEntryRecordSchema);
/** Table of the audit log's head record (key `AUDIT_HEAD_KEY`). */
export const AUDIT_META_TABLE = defineTable("audit_meta", AuditHeadRecordSchema);
/** Key of the head record in `AUDIT_META_TABLE`. */
export const AUDIT_HEAD_KEY = "head";
/** How the head is named in a `Conflict`. */
const HEAD_ID = conflictKey("audit_meta", "head");
/** Most change ops one `append` carries: a commit's `MAX_TXN_OPS` less the entry and the head it also writes. */
export const MAX_APPEND_OPS = MAX_TXN_OPS - 2;
/** Appends tried on a moving head before giving up with the Conflict (gRPC ABORTED). */
const HEAD_ATTEMPTS = 64;

/** `AuditEntryRecord.format` written by this version (and the hash encoding it implies). */
export const AUDIT_FORMAT = 1;

const HASH_DOMAIN = Buffer.from("kmi.audit.v1\n", "utf8");
const ZERO_HASH = new Uint8Array(32);
const MAX_DETAILS = 64;

/** A source of the current time; injected so tests control it. */
export interface Clock {
  /** The current time. */
  now(): Date;
}

/** What a caller logs: who did what to which object, and how it ended. */
export interface AuditEntryInput {
  /** Who: "token:<token_id>", "machine:<id>", "service:<name>" or "system"; 1 to 256 bytes. */
  actor: string;
  /** What, as a dotted verb, e.g. "ca.version.activate"; 1 to 256 bytes. */
  action: string;
  /** The object acted on, e.g. "tenant/acme/version/3"; at most 1024 bytes (may be empty). */
  target: string;
  /** "ok" or "refused: <code>"; 1 to 256 bytes. */
  outcome: string;
  /**
   * Non-secret details; a sensitive value goes in only as `keyedHash(...)`. At most 64 keys
   * (1 to 128 bytes each), values at most 4096 bytes.
   */
  details?: Readonly<Record<string, string>>;
}

/** One entry of the log as read back. Hashes are lowercase hex. */
export interface AuditEntry {
  /** Sequence number, from 1, without gaps. */
  seq: bigint;
  /** When it was written (millisecond precision). */
  time: Date;
  /** Who. */
  actor: string;
  /** What. */
  action: string;
  /** On which object. */
  target: string;
  /** How it ended. */
  outcome: string;
  /** Non-secret details. */
  details: Record<string, string>;
  /** The previous entry's hash; 64 zeros for the first. */
  prevHash: string;
  /** This entry's hash. */
  hash: string;
}

/** What `verify()` found. */
export interface AuditVerifyResult {
  /** True when every entry's hash, seq and link, and the head, are intact. */
  ok: boolean;
  /** How many entries were checked before stopping (all of them when ok). */
  entries: number;
  /** The first seq where the chain breaks; 0n when ok. */
  firstBadSeq: bigint;
  /** What is wrong there; "" when ok. */
  problem: string;
  /** Hex hash of the head record (the last entry), to compare with a copy kept elsewhere; "" for an empty log. */
  headHash: string;
}

/** Options of `tail`. */
export interface AuditTailOptions {
  /** Only entries with a seq greater than this (default 0: from the start). */
  afterSeq?: bigint | number;
  /** At most this many entries, 1 to 1000 (default 100). */
  limit?: number;
  /** The last `limit` entries (after `afterSeq`) instead of the first. */
  last?: boolean;
}

/** Options of `AuditLog`. */
export interface AuditLogOptions {
  /** Clock for entry times (default: the system clock). */
  clock?: Clock;
  /** Limits of {@link AuditLog.appendUnauthenticated}. */
  refusals?: RefusalBudgetOptions;
  /** Monotonic milliseconds for the refusal budget (default performance.now: a wall-clock step must not freeze it). */
  monotonicMs?: () => number;
}

/**
 * The audit log over a `Store`. Any number of instances (processes, replicas) may append to
 * one store: each append is conditional on the head it read.
 */
export class AuditLog {
  readonly #store: Store;
  readonly #clock: Clock;
  // Throughput only (see the module comment): this process's appends take turns.
  readonly #local = new Mutex();
  readonly #refusals: RefusalBudget;
  readonly #monotonicMs: () => number;

  constructor(store: Store, options: AuditLogOptions = {}) {
    this.#store = store;
    this.#clock = options.clock ?? { now: () => new Date() };
    this.#refusals = new RefusalBudget(options.refusals);
    this.#monotonicMs = options.monotonicMs ?? (() => performance.now());
  }

  /** Refusals of unauthenticated callers counted but not written (see {@link appendUnauthenticated}). */
  get suppressedRefusals(): number {
    return this.#refusals.suppressed;
  }

  /**
   * Appends the refusal of a caller that proved nothing (see ./refusal-budget.ts), within the
   * budget of its `source` (the peer address, without port); past it, counts the refusal and
   * writes nothing. The next entry written for the source carries `suppressed_refusals` when
   * some were counted. At most once a minute while refusals are counted, a summary entry
   * (`audit.refusals_suppressed`, actor `system`) records how many and from how many sources.
   * Resolves with the entry, or undefined when it was only counted.
   */
  async appendUnauthenticated(entry: AuditEntryInput, source: string): Promise<AuditEntry | undefined> {
    const d = this.#refusals.take(source, this.#monotonicMs());
    if (!d.write) {
      if (d.summary !== undefined) {
        await this.append({
          actor: "system",
          action: "audit.refusals_suppressed",
          target: "",
          outcome: "ok",
          details: { suppressed_refusals: String(d.summary.suppressed), sources: String(d.summary.sources), budget: "refusals of unauthenticated callers past their address's budget are counted, not written" },
        });
      }
      return undefined;
    }
    return this.append(d.suppressedBefore === 0 ? entry : { ...entry, details: { ...(entry.details ?? {}), suppressed_refusals: String(d.suppressedBefore) } });
  }

  /**
   * Appends `entry` and applies `changeOps` in one atomic batch, if every one of `compares`
   * holds (see `Store.commit`), and returns the entry as written. If it rejects, neither the
   * entry nor any of the changes happened; a failed compare of the caller rejects with
   * `Conflict`. `changeOps` and `compares` may not touch the audit tables.
   */
  async append(entry: AuditEntryInput, changeOps: readonly BatchOp[] = [], compares: readonly Compare[] = []): Promise<AuditEntry> {
    checkEntry(entry);
    for (const op of changeOps) {
      // Why: a change that could rewrite or drop entries would defeat the chain.
      if (op?.table?.name === AUDIT_LOG_TABLE.name || op?.table?.name === AUDIT_META_TABLE.name) {
        throw new InvalidArgument(`audit append: change ops may not write the audit tables (${op.table.name})`);
      }
    }
    for (const c of compares) {
      if (c?.table?.name === AUDIT_LOG_TABLE.name || c?.table?.name === AUDIT_META_TABLE.name) {
        throw new InvalidArgument(`audit append: compares may not name the audit tables (${c.table.name})`);
      }
    }
    return this.#local.runExclusive(() =>
      retryOnConflict(() => this.#appendOnHead(entry, changeOps, compares), {
        attempts: HEAD_ATTEMPTS,
        retryIf: (err) => err.keys.length > 0 && err.keys.every((k) => k === HEAD_ID),
      }),
    );
  }

  /** One attempt: the entry built on the head as read now, committed if that head is still the head. */
  async #appendOnHead(entry: AuditEntryInput, changeOps: readonly BatchOp[], compares: readonly Compare[]): Promise<AuditEntry> {
    // Read the head every time (no cache), so a failed batch leaves nothing stale behind.
    const read = await this.#store.read(AUDIT_META_TABLE, AUDIT_HEAD_KEY);
    const head = read.value;
    const seq = (head?.seq ?? 0n) + 1n;
    const prevHash = head && head.seq > 0n ? head.hash : ZERO_HASH;
    const record = create(AuditEntryRecordSchema, {
      format: AUDIT_FORMAT,
      seq,
      time: timestampFromDate(this.#clock.now()),
      actor: entry.actor,
      action: entry.action,
      target: entry.target,
      outcome: entry.outcome,
      details: { ...(entry.details ?? {}) },
      prevHash,
    });
    record.hash = auditEntryHash(record);
    const newHead = create(AuditHeadRecordSchema, { format: AUDIT_FORMAT, seq, hash: record.hash });
    await this.#store.commit({
      compares: [...compares, { table: AUDIT_META_TABLE, key: AUDIT_HEAD_KEY, modRevision: read.modRevision }],
      ops: [...changeOps, putOp(AUDIT_LOG_TABLE, numericKey(seq), record), putOp(AUDIT_META_TABLE, AUDIT_HEAD_KEY, newHead)],
    });
    return toAuditEntry(record);
  }

  /** The head: the last entry's seq and hex hash; `{ seq: 0n, hash: "" }` for an empty log. */
  async head(): Promise<{ seq: bigint; hash: string }> {
    const head = await this.#store.get(AUDIT_META_TABLE, AUDIT_HEAD_KEY);
    return head ? { seq: head.seq, hash: hex(head.hash) } : { seq: 0n, hash: "" };
  }

  /** Entries in seq order (oldest first), selected by `options`. */
  async tail(options: AuditTailOptions = {}): Promise<AuditEntry[]> {
    const limit = options.limit ?? 100;
    if (!Number.isSafeInteger(limit) || limit < 1 || limit > 1000) {
      throw new InvalidArgument("limit: must be 1 to 1000");
    }
    const after = BigInt(options.afterSeq ?? 0);
    if (after < 0n) throw new InvalidArgument("after_seq: must not be negative");
    const range = after > 0n ? { gt: numericKey(after) } : {};
    const out: AuditEntry[] = [];
    for await (const [, record] of this.#store.iterate(AUDIT_LOG_TABLE, { ...range, limit, reverse: options.last ?? false })) {
      out.push(toAuditEntry(record));
    }
    return options.last ? out.reverse() : out;
  }

  /**
   * Walks the whole log and checks each entry's seq (no gaps, stored under its own seq), its
   * hash and its link to the previous entry, and that the last entry is the head. Entries
   * appended while it runs (after the head it read first) are not checked.
   */
  async verify(): Promise<AuditVerifyResult> {
    const head = await this.#store.get(AUDIT_META_TABLE, AUDIT_HEAD_KEY);
    const headHash = head && head.seq > 0n ? hex(head.hash) : "";
    let entries = 0;
    let expected = 1n;
    let prev: Uint8Array = ZERO_HASH;
    const fail = (seq: bigint, problem: string): AuditVerifyResult => ({ ok: false, entries, firstBadSeq: seq, problem, headHash });
    const range = head ? { lte: numericKey(head.seq) } : {};
    try {
      for await (const [key, record] of this.#store.iterate(AUDIT_LOG_TABLE, range)) {
        if (!/^[0-9]{20}$/.test(key)) return fail(expected, `key "${key}" is not a seq (foreign record in the log)`);
        const at = parseNumericKey(key);
        if (at !== expected) {
          return fail(expected, at > expected ? `gap: seq ${expected} missing (entry dropped)` : `seq ${at} out of order`);
        }
        if (record.seq !== at) {
          return fail(at, `entry stored as seq ${at} says it is seq ${record.seq} (entries reordered or moved)`);
        }
        if (record.format !== AUDIT_FORMAT) return fail(at, `entry format ${record.format} is unknown`);
        if (!bytesEqual(auditEntryHash(record), record.hash)) return fail(at, "hash mismatch (entry edited)");
        if (!bytesEqual(record.prevHash, prev)) {
          return fail(at, "prev-hash break (the entry before it was replaced, or entries were reordered)");
        }
        prev = record.hash;
        expected++;
        entries++;
      }
    } catch (err) {
      if (isKmiError(err)) throw err;
      // A record that no longer decodes was edited at the byte level (or the disk is corrupt).
      return fail(expected, `entry ${expected} does not decode (edited or corrupt)`);
    }
    const last = expected - 1n;
    if (!head) {
      return entries === 0 ? { ok: true, entries, firstBadSeq: 0n, problem: "", headHash } : fail(expected, "head record missing: the end of the log cannot be checked");
    }
    if (last < head.seq) {
      return fail(expected, `log ends at seq ${last} but the head says ${head.seq}: the last entries were dropped`);
    }
    if (head.seq > 0n && !bytesEqual(head.hash, prev)) {
      return fail(head.seq, `head hash does not match entry ${head.seq} (last entry edited or replaced)`);
    }
    return { ok: true, entries, firstBadSeq: 0n, problem: "", headHash };
  }
}

/** Makes an `AuditLog` over `store`. */
export function createAuditLog(store: Store, options: AuditLogOptions = {}): AuditLog {
  return new AuditLog(store, options);
}

function checkText(value: unknown, field: string, min: number, max: number): void {
  if (typeof value !== "string") throw new InvalidArgument(`audit entry ${field}: must be a string`);
  const bytes = Buffer.byteLength(value, "utf8");
  if (bytes < min || bytes > max) throw new InvalidArgument(`audit entry ${field}: must be ${min} to ${max} bytes`);
}

function checkEntry(entry: AuditEntryInput): void {
  checkText(entry.actor, "actor", 1, 256);
  checkText(entry.action, "action", 1, 256);
  checkText(entry.target, "target", 0, 1024);
  checkText(entry.outcome, "outcome", 1, 256);
  const details = entry.details ?? {};
  const keys = Object.keys(details);
  if (keys.length > MAX_DETAILS) throw new InvalidArgument(`audit entry details: at most ${MAX_DETAILS} keys`);
  for (const k of keys) {
    checkText(k, "details key", 1, 128);
    if (k === "__proto__") throw new InvalidArgument("audit entry details key: __proto__ is not allowed");
    checkText(details[k], `details[${k}]`, 0, 4096);
  }
}

/**
 * SHA-256 over the canonical encoding of `record` (all fields but `hash`, with `prev_hash`),
 * as written down in proto/kmi/store/v1/audit_log.proto.
 */
export function auditEntryHash(record: AuditEntryRecord): Uint8Array {
  const h = createHash("sha256");
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    h.update(b);
  };
  const bytes = (b: Uint8Array) => {
    u32(b.length);
    h.update(b);
  };
  const str = (s: string) => bytes(Buffer.from(s, "utf8"));
  h.update(HASH_DOMAIN);
  u32(record.format);
  const seq = Buffer.alloc(8);
  seq.writeBigUInt64BE(record.seq);
  h.update(seq);
  const seconds = Buffer.alloc(8);
  seconds.writeBigInt64BE(record.time?.seconds ?? 0n);
  h.update(seconds);
  u32(record.time?.nanos ?? 0);
  str(record.actor);
  str(record.action);
  str(record.target);
  str(record.outcome);
  // Sorted by the UTF-8 bytes of the key (not JS's UTF-16 order) so that any language gets the same order.
  const details = Object.entries(record.details)
    .map(([k, v]) => [Buffer.from(k, "utf8"), Buffer.from(v, "utf8")] as const)
    .sort((a, b) => Buffer.compare(a[0], b[0]));
  u32(details.length);
  for (const [k, v] of details) {
    bytes(k);
    bytes(v);
  }
  bytes(record.prevHash);
  return new Uint8Array(h.digest());
}

function hex(b: Uint8Array): string {
  return Buffer.from(b).toString("hex");
}

/** Converts a stored record to an `AuditEntry`. */
export function toAuditEntry(record: AuditEntryRecord): AuditEntry {
  return {
    seq: record.seq,
    time: record.time ? timestampDate(record.time) : new Date(0),
    actor: record.actor,
    action: record.action,
    target: record.target,
    outcome: record.outcome,
    details: { ...record.details },
    prevHash: hex(record.prevHash),
    hash: hex(record.hash),
  };
}

/**
 * The key for `keyedHash`, derived from the master key with HKDF-SHA256 (info
 * "kmi audit hmac v1", no salt: the master key is already uniformly random). Why a derived
 * key: the master key itself is never used for two purposes.
 */
export function deriveAuditKey(masterKey: Uint8Array): Buffer {
  if (!(masterKey instanceof Uint8Array) || masterKey.length !== KEY_BYTES) {
    throw new InvalidArgument(`master key: must be ${KEY_BYTES} bytes`);
  }
  return Buffer.from(hkdfSync("sha256", masterKey, new Uint8Array(0), "kmi audit hmac v1", 32));
}

/**
 * "hmac:" + the first 32 hex characters of HMAC-SHA256(auditKey, value): how a token or other
 * sensitive value appears in the log. Why keyed: a plain hash of a guessable value could be
 * reversed by trying candidates; only the holder of the master key can compute this one, yet
 * equal values still show up as equal, so entries can be correlated.
 */
export function keyedHash(auditKey: Uint8Array, value: string | Uint8Array): string {
  return "hmac:" + createHmac("sha256", auditKey).update(value).digest("hex").slice(0, 32);
}
