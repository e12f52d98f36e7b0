/**
 * The storage interface the services use: typed tables of protobuf records, range reads and
 * atomic multi-table batches. `LevelStore` (./level-store.ts) implements it on LevelDB; a
 * replicated backend (etcd) can implement the same interface later without touching a service.
 *
 * ## Key layout
 *
 * Every table is one keyspace (a LevelDB sublevel: on disk `!<table>!<key>`). Keys are UTF-8
 * strings compared bytewise; numbers inside keys are fixed-width (`numericKey`) so that key
 * order is numeric order. Values are the binary protobuf encoding of the table's message.
 *
 * | table        | key                           | value                          | written by       |
 * |--------------|-------------------------------|--------------------------------|------------------|
 * | `_meta`      | `store`                       | kmi.store.v1.StoreInfo         | the store itself |
 * | `audit_log`  | `numericKey(seq)` (20 digits) | kmi.store.v1.AuditEntryRecord  | ./audit-log.ts   |
 * | `audit_meta` | `head`                        | kmi.store.v1.AuditHeadRecord   | ./audit-log.ts   |
 * | `audit_checkpoints` | `numericKey(seq)`      | kmi.store.v1.AuditCheckpointRecord | ./audit-checkpointer.ts |
 * | `audit_witness` | `<peer>/<key id>`      | kmi.store.v1.AuditWitnessRecord | ./audit-checkpoint.ts |
 * | KDC tables   | see below                     | see below                      | src/kdc          |
 *
 * The KDC's tables (`meta`, `credentials`, `tenants`, `tokens`, `versions`, `signing_keys`,
 * `rollout`) are laid out in proto/kmi/store/v1/kdc.proto, whose message comments name each
 * record's table and key; that file is the authority for them. Names starting with `_` are
 * reserved for the store itself; a service's table name is lowercase letters, digits and
 * `_`, starting with a letter. Secrets are never stored in plaintext: a record that holds one
 * carries a `SealedBlob` (./seal.ts) whose AAD names the record.
 */
import type { DescMessage, Message, MessageShape } from "@bufbuild/protobuf";
import { InvalidArgument } from "../common/errors.js";

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

/**
 * The store the services use. All methods reject with `Unavailable` once the store is closed.
 */
export interface Store {
  /** The value under `key`, or undefined. */
  get<Desc extends DescMessage>(table: Table<Desc>, key: string): Promise<MessageShape<Desc> | undefined>;
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
   * Applies every op, across any tables, atomically: all of them or none. An invalid op
   * (bad key, value of the wrong type) rejects the whole batch with `InvalidArgument`
   * before anything is written.
   */
  batch(ops: readonly BatchOp[]): Promise<void>;
  /** Closes the store; further calls reject. Idempotent. */
  close(): Promise<void>;
}

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
  });
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
