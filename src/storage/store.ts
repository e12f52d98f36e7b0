/**
 * The storage interface the services use: typed tables of protobuf records, range reads,
 * revisions, conditional atomic batches and a change feed. Two backends implement it and pass
 * one contract suite (test/unit/storage/store-contract.ts): `LevelStore` (./level-store.ts,
 * embedded, one process) and `EtcdStore` (./etcd-store.ts, replicas on an etcd cluster).
 *
 * ## Revisions, conditional batches, the change feed
 *
 * - Every commit gets the next **store revision** (a bigint, from 1, increasing by commit on
 *   LevelDB and by etcd's rules on etcd: increasing, not necessarily by one). Every key
 *   carries its **mod revision**: the revision of the commit that last wrote it; an absent
 *   key reads as mod revision `0n`. A key deleted and written again gets a new, greater one.
 * - `read` returns a value with its mod revision and the store revision of the read.
 * - `commit({ compares, ops })` applies `ops` atomically if every compare holds (a key's
 *   mod revision equals the one given, `0n` for "absent"); otherwise it writes nothing and
 *   rejects with `Conflict` (retryable, gRPC ABORTED), naming the keys that changed.
 *   Every read-check-write is: read with revisions, decide, commit with compares on what was
 *   read, and on `Conflict` start over (`retryOnConflict`, ./retry.ts). No lock is held.
 * - `watch(table, { fromRevision })` yields the changes of a table (or a key prefix of it)
 *   from a revision, in commit order, or `{ type: "resync" }` when that revision has been
 *   compacted away: the watcher then lists the table again and watches from the list's
 *   revision + 1 (Kubernetes' "410 Gone").
 *
 * Limits (etcd's defaults, enforced by both backends so that a program tested on LevelDB
 * fits etcd): at most `MAX_TXN_OPS` ops and `MAX_TXN_OPS` compares per commit, one op per
 * key, and at most `MAX_TXN_BYTES` of keys and values.
 *
 * ## Key layout
 *
 * Every table is one keyspace (LevelDB: a sublevel, on disk `!<table>!<key>`; etcd: the
 * key `<prefix>/<table>/<key>`, see ./etcd-store.ts). Keys are UTF-8 strings compared
 * bytewise; numbers inside keys are fixed-width (`numericKey`) so that key order is numeric
 * order. Values are the binary protobuf encoding of the table's message.
 *
 * | table        | key                           | value                          | written by       |
 * |--------------|-------------------------------|--------------------------------|------------------|
 * | `_meta`      | `store`                       | kmi.store.v1.StoreInfo         | the store itself |
 * | `_state`     | `state` (LevelDB only)        | kmi.store.v1.StoreStateRecord  | ./level-store.ts |
 * | `_rev`       | `<table>!<key>` (LevelDB only)| mod revision, 8 bytes big-endian | ./level-store.ts |
 * | `_log`       | `numericKey(revision)` (LevelDB only) | kmi.store.v1.StoreChangeRecord | ./level-store.ts |
 * | `audit_log`  | `numericKey(seq)` (20 digits) | kmi.store.v1.AuditEntryRecord  | ./audit-log.ts   |
 * | `audit_meta` | `head`                        | kmi.store.v1.AuditHeadRecord   | ./audit-log.ts   |
 * | `audit_checkpoints` | `numericKey(seq)`      | kmi.store.v1.AuditCheckpointRecord | ./audit-checkpointer.ts |
 * | `audit_witness` | `<peer>/<key id>`      | kmi.store.v1.AuditWitnessRecord | ./audit-checkpoint.ts |
 * | `elections`  | `<election name>`             | kmi.store.v1.ElectionRecord    | ./election.ts (on etcd bound to the leader's lease) |
 * | `log_keys`   | `derived`                     | kmi.store.v1.LogKeysRecord (sealed) | ./log-keys.ts (first rekey) |
 * | KDC tables   | see below                     | see below                      | src/kdc          |
 *
 * The KDC's tables (`meta`, `credentials`, `tenants`, `tokens`, `versions`, `signing_keys`,
 * `rollout`) are laid out in proto/kmi/store/v1/kdc.proto, whose message comments name each
 * record's table and key; that file is the authority for them. Names starting with `_` are
 * reserved for the store itself; a service's table name is lowercase letters, digits and
 * `_`, starting with a letter. Secrets are never stored in plaintext: a record that holds one
 * carries a `SealedBlob` (./seal.ts) whose AAD names the record. Records stay small (a few
 * KB; a certificate chain at most tens of KB), far below etcd's 1.5 MiB request limit.
 */
import type { DescMessage, Message, MessageShape } from "@bufbuild/protobuf";
import { Aborted, InvalidArgument, Unavailable } from "../common/errors.js";

/** A table: a name and the protobuf message every value in it is. Made by `defineTable`. */
export interface Table<Desc extends DescMessage = DescMessage> {
  /** Table name; also the LevelDB sublevel name. */
  readonly name: string;
  /** The message type of every value. */
  readonly schema: Desc;
  /**
   * Optional read-time upgrade: given a decoded value (of any record version), returns it in
   * the current version. Applied by `get` and `iterate`; the stored record is not rewritten.
   */
  upgrade?(value: MessageShape<Desc>): MessageShape<Desc>;
}

/** Options of `defineTable`. */
export interface TableOptions<Desc extends DescMessage> {
  /** Read-time upgrade of older record versions; see `Table.upgrade`. */
  upgrade?(value: MessageShape<Desc>): MessageShape<Desc>;
}

/** Range of an `iterate` call. Bounds are keys; `prefix` combines with them (both apply). */
export interface RangeOptions {
  /** Only keys greater than this. */
  gt?: string;
  /** Only keys greater than or equal to this. */
  gte?: string;
  /** Only keys less than this. */
  lt?: string;
  /** Only keys less than or equal to this. */
  lte?: string;
  /** Only keys that start with this. */
  prefix?: string;
  /** Newest (greatest key) first. */
  reverse?: boolean;
  /** At most this many records; a non-negative integer. */
  limit?: number;
}

/** One write of a `batch`: made by `putOp` or `delOp`. */
export type BatchOp =
  | { readonly type: "put"; readonly table: Table; readonly key: string; readonly value: Message }
  | { readonly type: "del"; readonly table: Table; readonly key: string };

/** A value read with its revisions; see "Revisions" above. */
export interface ReadResult<V> {
  /** The value, or undefined when the key is absent. */
  value: V | undefined;
  /** The revision of the commit that last wrote the key; `0n` when absent. */
  modRevision: bigint;
  /** The store revision at the time of the read. */
  revision: bigint;
}

/** One record of a `list`, with its mod revision. */
export interface ListedRecord<V> {
  /** The key. */
  key: string;
  /** The value. */
  value: V;
  /** The revision of the commit that last wrote it. */
  modRevision: bigint;
}

/** A condition of a `commit`: the key's mod revision is `modRevision` (`0n`: the key is absent). */
export interface Compare {
  /** The table. */
  readonly table: Table;
  /** The key. */
  readonly key: string;
  /** The expected mod revision, as returned by `read` or `list`; `0n` means "absent". */
  readonly modRevision: bigint;
}

/** A conditional batch: `ops` are applied, atomically, only if every one of `compares` holds. */
export interface Txn {
  /** Conditions; none means unconditional. At most `MAX_TXN_OPS`. */
  readonly compares?: readonly Compare[];
  /** Writes; at most `MAX_TXN_OPS`, one per key. */
  readonly ops: readonly BatchOp[];
}

/** What a successful `commit` returns. */
export interface CommitResult {
  /** The store revision of the commit (every key it wrote now has this mod revision). */
  revision: bigint;
}

/** One change of the feed. */
export interface StoreChange<V> {
  /** "put" (written) or "del" (deleted). */
  type: "put" | "del";
  /** The key within the watched table. */
  key: string;
  /** The value written; undefined for a delete. */
  value: V | undefined;
  /** The revision of the commit that made the change. */
  modRevision: bigint;
}

/**
 * What a watch yields: the changes of one commit to the watched keys (in commit order), or
 * `resync` when the requested revision has been compacted (the watch then ends).
 */
export type FeedEvent<V> =
  | { type: "changes"; revision: bigint; changes: StoreChange<V>[] }
  | { type: "resync"; compactRevision: bigint };

/** Options of `watch`. */
export interface WatchOptions {
  /** Only keys starting with this. */
  prefix?: string;
  /**
   * The first revision to deliver (inclusive): typically a `read`/`list` revision + 1. `0n`
   * (default) means "changes after now".
   */
  fromRevision?: bigint;
  /** Ends the watch (the iteration returns). */
  signal?: AbortSignal;
}

/**
 * A conditional batch failed: a compared key changed since it was read. Retryable: read
 * again and decide again (`retryOnConflict`). Maps to gRPC ABORTED when it escapes the retries.
 */
export class Conflict extends Aborted {
  constructor(
    /** The compared keys whose mod revision differed, as "<table>/<key>". */
    readonly keys: readonly string[],
  ) {
    super(`store: a concurrent change won (${keys.length === 0 ? "unknown key" : keys.slice(0, 3).join(", ")}); retry the call`);
  }
}

/** The store was closed (the server is shutting down): what every call of a closed store rejects with. */
export class StoreClosed extends Unavailable {
  constructor() {
    super("store is closed (the server is shutting down)");
  }
}

/**
 * The store the services use. All methods reject with `Unavailable` once the store is closed
 * (and, on etcd, while the cluster cannot be reached).
 */
export interface Store {
  /** The value under `key`, or undefined. */
  get<Desc extends DescMessage>(table: Table<Desc>, key: string): Promise<MessageShape<Desc> | undefined>;
  /** The value under `key` with its mod revision and the store revision; see `ReadResult`. */
  read<Desc extends DescMessage>(table: Table<Desc>, key: string): Promise<ReadResult<MessageShape<Desc>>>;
  /** True when `key` exists in `table`. */
  has(table: Table, key: string): Promise<boolean>;
  /**
   * The records of `table` in key order (or reverse), within `range`. Each iteration reads
   * from one consistent point in time (later writes are not seen).
   */
  iterate<Desc extends DescMessage>(
    table: Table<Desc>,
    range?: RangeOptions,
  ): AsyncIterable<[key: string, value: MessageShape<Desc>]>;
  /**
   * The records of `table` within `range` with their mod revisions, all read at one store
   * revision (returned): watch from `revision + 1` to follow on without a gap.
   */
  list<Desc extends DescMessage>(
    table: Table<Desc>,
    range?: RangeOptions,
  ): Promise<{ records: ListedRecord<MessageShape<Desc>>[]; revision: bigint }>;
  /**
   * Applies every op, across any tables, atomically: all of them or none. An invalid op
   * (bad key, value of the wrong type, over a limit) rejects the whole batch with
   * `InvalidArgument` before anything is written. Same as `commit({ ops })`.
   */
  batch(ops: readonly BatchOp[]): Promise<void>;
  /**
   * Applies `txn.ops` atomically if every compare holds; otherwise rejects with `Conflict`
   * and writes nothing. Invalid input rejects with `InvalidArgument` as `batch` does.
   */
  commit(txn: Txn): Promise<CommitResult>;
  /** The current store revision. */
  revision(): Promise<bigint>;
  /**
   * True when the history after `revision` is still kept: a watch from `revision + 1` would
   * deliver changes rather than `resync`. False when it was compacted, or `revision` is 0n or
   * newer than the store (nothing can be told from it).
   */
  keepsHistorySince(revision: bigint): Promise<boolean>;
  /** The change feed of `table` (or of the keys with `options.prefix`); see `FeedEvent`. */
  watch<Desc extends DescMessage>(table: Table<Desc>, options?: WatchOptions): AsyncIterable<FeedEvent<MessageShape<Desc>>>;
  /**
   * Drops the change history before `revision` (etcd: compaction): a watch from an older
   * revision then gets `resync`. Values are not affected.
   */
  compact(revision: bigint): Promise<void>;
  /** Closes the store; further calls reject. Idempotent. */
  close(): Promise<void>;
}

/** Most ops (and, separately, most compares) of one commit: etcd's default `--max-txn-ops`. */
export const MAX_TXN_OPS = 128;
/**
 * `items` cut into runs of at most `size` (the last may be shorter; none for no items): how a
 * write whose op count grows with its input (tenants, machines) stays within `MAX_TXN_OPS`.
 */
export function chunk<T>(items: readonly T[], size: number): T[][] {
  if (!Number.isSafeInteger(size) || size < 1) throw new InvalidArgument(`chunk: size must be a positive integer, not ${size}`);
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/** Most bytes of keys and values in one commit: below etcd's default 1.5 MiB request limit, with room for framing. */
export const MAX_TXN_BYTES = 1_400_000;

/** Longest key, in UTF-8 bytes. */
export const MAX_KEY_BYTES = 1024;

const TABLE_NAME = /^[a-z][a-z0-9_]{0,62}$/;
// In a `u` regexp a lone surrogate is its own code point; it would be written to disk as U+FFFD
// and two different keys could then collide.
const LONE_SURROGATE = /\p{Cs}/u;

/**
 * Defines a table: `name` (lowercase letters, digits and `_`, starting with a letter, at most
 * 63 characters) holding values of the protobuf message `schema`.
 */
export function defineTable<Desc extends DescMessage>(
  name: string,
  schema: Desc,
  options: TableOptions<Desc> = {},
): Table<Desc> {
  if (!TABLE_NAME.test(name)) {
    throw new InvalidArgument(
      `table name: "${name}" is not valid; use lowercase letters, digits and '_', starting with a letter`,
    );
  }
  const table: Table<Desc> = { name, schema };
  if (options.upgrade) table.upgrade = options.upgrade;
  return Object.freeze(table);
}

/** A `put` of `value` under `key` in `table`, for `Store.batch`. */
export function putOp<Desc extends DescMessage>(table: Table<Desc>, key: string, value: MessageShape<Desc>): BatchOp {
  return { type: "put", table: table as unknown as Table, key, value };
}

/** A delete of `key` from `table`, for `Store.batch`. Deleting a missing key is not an error. */
export function delOp(table: Table, key: string): BatchOp {
  return { type: "del", table, key };
}

/**
 * A fixed-width decimal key for a non-negative integer: `numericKey(42)` is
 * "00000000000000000042" (20 digits, enough for any uint64), so LevelDB's bytewise order is
 * numeric order. Use `width` 10 for values that fit in a uint32.
 */
export function numericKey(n: number | bigint, width = 20): string {
  if (typeof n === "number" && !Number.isSafeInteger(n)) {
    throw new InvalidArgument(`numeric key: ${n} is not a safe integer`);
  }
  const big = BigInt(n);
  const text = big.toString(10);
  if (big < 0n || text.length > width) {
    throw new InvalidArgument(`numeric key: ${text} does not fit in ${width} non-negative digits`);
  }
  return text.padStart(width, "0");
}

/** Reads a key made by `numericKey` back; InvalidArgument when it is not all digits. */
export function parseNumericKey(key: string): bigint {
  if (!/^[0-9]{1,20}$/.test(key)) throw new InvalidArgument(`numeric key: "${key}" is not fixed-width digits`);
  return BigInt(key);
}

/** Throws InvalidArgument unless `key` is a non-empty, well-formed string of at most `MAX_KEY_BYTES` UTF-8 bytes. */
export function checkKey(key: unknown, where: string): asserts key is string {
  if (typeof key !== "string" || key.length === 0) {
    throw new InvalidArgument(`${where}: key must be a non-empty string`);
  }
  if (LONE_SURROGATE.test(key)) throw new InvalidArgument(`${where}: key has a lone UTF-16 surrogate`);
  if (Buffer.byteLength(key, "utf8") > MAX_KEY_BYTES) {
    throw new InvalidArgument(`${where}: key is longer than ${MAX_KEY_BYTES} bytes`);
  }
}

/** Throws InvalidArgument unless `table` is a table a service may use (see `defineTable`). */
export function checkTable(table: Table | undefined, where: string): void {
  if (table === undefined || typeof table.name !== "string" || table.schema?.kind !== "message") {
    throw new InvalidArgument(`${where}: not a table; make one with defineTable()`);
  }
  if (!TABLE_NAME.test(table.name)) {
    throw new InvalidArgument(`${where}: table name "${table.name}" is reserved or not valid`);
  }
}

/**
 * Checks every op of a batch before anything is written, so that one bad op rejects the
 * whole batch. Backends call it first thing in `batch`.
 */
export function validateBatch(ops: readonly BatchOp[]): void {
  if (!Array.isArray(ops)) throw new InvalidArgument("batch: ops must be an array");
  if (ops.length > MAX_TXN_OPS) {
    throw new InvalidArgument(`batch: ${ops.length} ops, more than ${MAX_TXN_OPS} in one commit (etcd's limit); split the change`);
  }
  const seen = new Set<string>();
  ops.forEach((op, i) => {
    const where = `batch op ${i}`;
    if (op === null || typeof op !== "object" || (op.type !== "put" && op.type !== "del")) {
      throw new InvalidArgument(`${where}: type must be "put" or "del"`);
    }
    checkTable(op.table, where);
    checkKey(op.key, `${where} (${op.table.name})`);
    if (op.type === "put") {
      const typeName = (op.value as Partial<Message> | undefined)?.$typeName;
      if (typeName !== op.table.schema.typeName) {
        throw new InvalidArgument(
          `${where} (${op.table.name}/${op.key}): value is ${typeName ?? "not a message"}, ` +
            `table ${op.table.name} holds ${op.table.schema.typeName}`,
        );
      }
    }
    // Why: etcd refuses a txn that writes one key twice; LevelDB would keep the last. One rule for both.
    const id = `${op.table.name}/${op.key}`;
    if (seen.has(id)) throw new InvalidArgument(`${where}: ${id} is written twice in one batch`);
    seen.add(id);
  });
}

/** Checks a whole `Txn` (its ops as `validateBatch` does, and its compares) before anything is written. */
export function validateTxn(txn: Txn): void {
  if (txn === null || typeof txn !== "object") throw new InvalidArgument("commit: txn must be an object");
  validateBatch(txn.ops);
  const compares = txn.compares ?? [];
  if (!Array.isArray(compares)) throw new InvalidArgument("commit: compares must be an array");
  if (compares.length > MAX_TXN_OPS) {
    throw new InvalidArgument(`commit: ${compares.length} compares, more than ${MAX_TXN_OPS} in one commit (etcd's limit)`);
  }
  compares.forEach((c, i) => {
    const where = `compare ${i}`;
    checkTable(c?.table, where);
    checkKey(c.key, `${where} (${c.table.name})`);
    if (typeof c.modRevision !== "bigint" || c.modRevision < 0n) {
      throw new InvalidArgument(`${where} (${c.table.name}/${c.key}): modRevision must be a non-negative bigint`);
    }
  });
  if (txn.ops.length === 0 && compares.length > 0) throw new InvalidArgument("commit: compares without ops; a read needs no commit");
}

/** Throws InvalidArgument when a commit's keys and values add up to more than `MAX_TXN_BYTES`. */
export function checkTxnBytes(bytes: number): void {
  if (bytes > MAX_TXN_BYTES) {
    throw new InvalidArgument(`batch: ${bytes} bytes of keys and values, more than ${MAX_TXN_BYTES} in one commit (etcd's request limit); split the change`);
  }
}

/** "<table>/<key>": how a key is named in a `Conflict`. */
export function conflictKey(table: Table | string, key: string): string {
  return `${typeof table === "string" ? table : table.name}/${key}`;
}

/** A range with `prefix` folded into plain bounds; what a backend passes to its iterator. */
export interface KeyBounds {
  /** Lower bound. */
  gt?: string;
  /** Lower bound, inclusive. */
  gte?: string;
  /** Upper bound. */
  lt?: string;
  /** Upper bound, inclusive. */
  lte?: string;
}

/**
 * Folds `range.prefix` into `gte`/`lt` bounds, keeping the tighter of each pair, and checks
 * the keys and the limit. Returns undefined bounds members when not set.
 */
export function normalizeRange(range: RangeOptions): KeyBounds {
  const bounds: KeyBounds = {};
  for (const name of ["gt", "gte", "lt", "lte", "prefix"] as const) {
    const v = range[name];
    if (v !== undefined && (name !== "prefix" || v !== "")) checkKey(v, `range ${name}`);
  }
  if (range.limit !== undefined && !(Number.isSafeInteger(range.limit) && range.limit >= 0)) {
    throw new InvalidArgument("range limit: must be a non-negative integer");
  }
  if (range.gt !== undefined) bounds.gt = range.gt;
  if (range.gte !== undefined) bounds.gte = range.gte;
  if (range.lt !== undefined) bounds.lt = range.lt;
  if (range.lte !== undefined) bounds.lte = range.lte;
  const prefix = range.prefix;
  if (prefix !== undefined && prefix !== "") {
    // Lower bound: keep whichever of the caller's bound and the prefix is tighter.
    const lower = bounds.gt ?? bounds.gte;
    if (lower === undefined || compareKeys(prefix, lower) > 0) {
      delete bounds.gt;
      bounds.gte = prefix;
    }
    const upper = prefixUpperBound(prefix);
    if (upper !== undefined) {
      const callerUpper = bounds.lt ?? bounds.lte;
      if (callerUpper === undefined || compareKeys(upper, callerUpper) <= 0) {
        delete bounds.lte;
        bounds.lt = upper;
      }
    }
  }
  return bounds;
}

/** Compares two keys the way the store orders them: by their UTF-8 bytes. */
export function compareKeys(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, "utf8"), Buffer.from(b, "utf8"));
}

/**
 * The smallest key greater than every key that starts with `prefix`, or undefined when there
 * is none (the prefix is all U+10FFFF). Works on code points, since UTF-8 byte order is code
 * point order, and skips the surrogate range, which UTF-8 cannot hold.
 */
export function prefixUpperBound(prefix: string): string | undefined {
  const points = Array.from(prefix, (c) => c.codePointAt(0)!);
  while (points.length > 0) {
    const last = points.pop()!;
    if (last < 0x10ffff) {
      points.push(last === 0xd7ff ? 0xe000 : last + 1);
      return String.fromCodePoint(...points);
    }
  }
  return undefined;
}
