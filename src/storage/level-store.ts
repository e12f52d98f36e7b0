/**
 * `LevelStore`: the `Store` (./store.ts, where the key layout is written down) on LevelDB
 * through `level`, one sublevel per table, plus the store's own sublevels: `_meta` (schema
 * version), `_state` (store revision, compaction point), `_rev` (each key's mod revision) and
 * `_log` (the bounded change log the feed replays from). Consistent snapshot export and
 * restore into an empty store.
 *
 * Revisions, the single-node way: commits are serialized inside this one process (LevelDB
 * locks its directory, so no other process writes it); a commit checks its compares against
 * `_rev`, then writes its values, their mod revisions, its change-log record and the new
 * `_state` in ONE LevelDB batch. Reads with revisions read from one LevelDB snapshot. A key
 * written before revisions existed (a store from an older kmi, or restored from a backup)
 * reads as mod revision 1; the first commit of such a store is revision 2.
 */
import { mkdir, stat } from "node:fs/promises";
import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { Level } from "level";
import { FailedPrecondition, InvalidArgument, Unavailable } from "../common/errors.js";
import {
  StoreChangeRecordSchema,
  StoreChangeSchema,
  StoreInfoSchema,
  StoreRecordSchema,
  StoreStateRecordSchema,
  type StoreChangeRecord,
  type StoreInfo,
  type StoreRecord,
} from "../gen/kmi/store/v1/store_pb.js";
import { Mutex } from "./mutex.js";
import {
  Conflict,
  StoreClosed,
  checkKey,
  checkTable,
  checkTxnBytes,
  conflictKey,
  normalizeRange,
  numericKey,
  prefixUpperBound,
  validateBatch,
  validateTxn,
  type BatchOp,
  type CommitResult,
  type FeedEvent,
  type ListedRecord,
  type RangeOptions,
  type ReadResult,
  type Store,
  type StoreChange,
  type Table,
  type Txn,
  type WatchOptions,
} from "./store.js";

/** Sublevels of revision bookkeeping: not part of a backup (a restored store starts its revisions afresh). */
const INTERNAL_TABLES = new Set(["_state", "_rev", "_log"]);

/** Name of the store's own sublevel (reserved: service table names cannot start with `_`). */
export const META_TABLE = "_meta";
/** Key of the `StoreInfo` record in `_meta`. */
export const STORE_INFO_KEY = "store";
/** The store's own sublevels besides `_meta`: never exported, rebuilt after a restore. */
const STATE_TABLE = "_state";
const REV_TABLE = "_rev";
const LOG_TABLE = "_log";
const STATE_KEY = "state";
/** Keys whose mod revision is kept in memory (the hot ones: the audit head, a tenant being rotated). */
const REV_CACHE_SIZE = 20_000;
/** Default number of commits the change log keeps (older ones answer a watch with "resync"). */
export const DEFAULT_FEED_RETENTION = 10_000;

/** A step of a schema upgrade; see `LevelStoreOptions.upgrade`. */
export type UpgradeStep = (store: Store, fromVersion: number) => Promise<readonly BatchOp[] | void>;

/** Options of `openLevelStore`. */
export interface LevelStoreOptions {
  /**
   * Layout version of the tables the opening program writes; an integer of 1 or more,
   * default 1. A store written with a newer version is refused; an older one is upgraded.
   */
  schemaVersion?: number;
  /**
   * Upgrades an older store one version at a time: called with `fromVersion` = the stored
   * version, then +1, … up to `schemaVersion - 1`. The ops it returns are committed in one
   * batch together with the version bump to `fromVersion + 1`; whatever it writes itself must
   * be safe to write again (a crash before the bump runs the step again). Without it an older
   * store is refused.
   */
  upgrade?: UpgradeStep;
  /**
   * The program that owns the store, e.g. "kdc": recorded when the store is made, checked at
   * every open, and named in error messages.
   */
  owner?: string;
  /** Create the store when the data dir has none (default true); false refuses instead. */
  create?: boolean;
  /**
   * fsync every batch before it resolves (default true). Why: a change or audit entry that
   * was acknowledged must survive a power cut, not only a crash of the process.
   */
  sync?: boolean;
  /** Commits kept in the change log for watches to resume from (default 10 000, at least 1). */
  feedRetention?: number;
}

interface RevState {
  revision: bigint;
  compacted: bigint;
}

type Listener = (record: StoreChangeRecord) => void;

type Root = Level<string, Buffer>;
type Sub = ReturnType<typeof openSub>;

function openSub(root: Root, name: string) {
  return root.sublevel<string, Buffer>(name, { keyEncoding: "utf8", valueEncoding: "buffer" });
}

// The internal table of the store's own metadata; made by hand since defineTable refuses `_`.
const META: Table<typeof StoreInfoSchema> = Object.freeze({ name: META_TABLE, schema: StoreInfoSchema });

/**
 * Opens (or creates) the store in `dir`. Refuses, with a message that says what to do, a
 * data dir that is locked by another process, corrupt, not a kmi store, owned by another
 * program, left half-restored, or written by a newer schema.
 */
export async function openLevelStore(dir: string, options: LevelStoreOptions = {}): Promise<LevelStore> {
  const schemaVersion = options.schemaVersion ?? 1;
  if (!Number.isSafeInteger(schemaVersion) || schemaVersion < 1) {
    throw new InvalidArgument(`schemaVersion: ${schemaVersion} is not an integer of 1 or more`);
  }
  const createIfMissing = options.create ?? true;
  const who = options.owner ? `a ${options.owner}` : "another kmi process";
  const init = options.owner ? `kmi ${options.owner} init` : "the program's init command";

  const info = await stat(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") return undefined;
    throw new FailedPrecondition(`data dir ${dir}: cannot read it (${err.code}); check its path and permissions`);
  });
  if (info === undefined) {
    if (!createIfMissing) throw new FailedPrecondition(`data dir ${dir} does not exist; run ${init} first`);
    // Why 0700: the store holds sealed keys and the audit log; nobody else needs to list it.
    await mkdir(dir, { recursive: true, mode: 0o700 });
  } else if (!info.isDirectory()) {
    throw new FailedPrecondition(`data dir ${dir} is not a directory; point the data dir at a directory`);
  }

  const root: Root = new Level<string, Buffer>(dir, { keyEncoding: "utf8", valueEncoding: "buffer" });
  try {
    await root.open({ createIfMissing });
  } catch (err) {
    throw openError(err, dir, who, init);
  }
  const store = new LevelStore(root, dir, schemaVersion, options);
  try {
    await store.checkSchema(createIfMissing, init);
    await store.loadState();
  } catch (err) {
    await root.close().catch(() => {});
    throw err;
  }
  return store;
}

function openError(err: unknown, dir: string, who: string, init: string): Error {
  const e = err as { code?: string; cause?: { code?: string; message?: string } } | undefined;
  const cause = e?.cause;
  const detail = cause?.message ?? (err instanceof Error ? err.message : String(err));
  if (cause?.code === "LEVEL_LOCKED") {
    return new FailedPrecondition(
      `data dir ${dir} is locked by another process (is ${who} already running?); stop it or use another data dir`,
      { cause: err },
    );
  }
  if (cause?.code === "LEVEL_CORRUPTION") {
    return new FailedPrecondition(
      `data dir ${dir} is corrupt (${detail}); restore it from a backup into a new data dir`,
      { cause: err },
    );
  }
  if (/does not exist/.test(detail)) {
    return new FailedPrecondition(`data dir ${dir} has no store; run ${init} first`, { cause: err });
  }
  if (/permission denied|EACCES/i.test(detail)) {
    return new FailedPrecondition(
      `data dir ${dir}: permission denied; run as the user that owns it or fix its owner`,
      { cause: err },
    );
  }
  return new FailedPrecondition(`data dir ${dir} cannot be opened: ${detail}`, { cause: err });
}

/**
 * The LevelDB store. Make it with `openLevelStore`. One process at a time: LevelDB locks the
 * directory.
 */
export class LevelStore implements Store {
  readonly #root: Root;
  readonly #subs = new Map<string, { sub: Sub; schema: DescMessage }>();
  readonly #internalSubs = new Map<string, Sub>();
  readonly #options: LevelStoreOptions;
  readonly #sync: boolean;
  readonly #retention: bigint;
  // Why a process-local queue is enough here: LevelDB's directory lock keeps every other
  // process out, so serializing commits in this process makes compare-then-write atomic.
  readonly #commits = new Mutex();
  readonly #listeners = new Set<Listener>();
  // Mod revisions of keys committed since open ("<table>!<key>" → revision; undefined: deleted).
  readonly #revCache = new Map<string, bigint | undefined>();
  #state: RevState = { revision: 1n, compacted: 0n };
  #closed = false;

  /** @internal Use `openLevelStore`. */
  constructor(
    root: Root,
    /** The data dir. */
    readonly dir: string,
    /** The schema version this store is kept at (the opener's). */
    readonly schemaVersion: number,
    options: LevelStoreOptions,
  ) {
    this.#root = root;
    this.#options = options;
    this.#sync = options.sync ?? true;
    const retention = options.feedRetention ?? DEFAULT_FEED_RETENTION;
    if (!Number.isSafeInteger(retention) || retention < 1) throw new InvalidArgument(`feedRetention: ${retention} is not an integer of 1 or more`);
    this.#retention = BigInt(retention);
  }

  /** @internal Loads the revision state; part of opening. */
  async loadState(): Promise<void> {
    const raw = await this.#rawSub(STATE_TABLE).get(STATE_KEY);
    if (raw === undefined) return;
    const st = fromBinary(StoreStateRecordSchema, raw);
    this.#state = { revision: st.revision, compacted: st.compacted };
  }

  /** @internal Checks (or writes) the `_meta` record and runs upgrades; part of opening. */
  async checkSchema(created: boolean, init: string): Promise<void> {
    const info = await this.#readInfo();
    if (info === undefined) {
      if (await this.#hasAnyRecord(false)) {
        throw new FailedPrecondition(
          `data dir ${this.dir} holds a LevelDB that is not a kmi store (no schema version); use an empty data dir`,
        );
      }
      if (!created) throw new FailedPrecondition(`data dir ${this.dir} has no store; run ${init} first`);
      await this.#writeInfo({ schemaVersion: this.schemaVersion, owner: this.#options.owner ?? "", restoreInProgress: false });
      return;
    }
    if (info.restoreInProgress) {
      throw new FailedPrecondition(
        `data dir ${this.dir} holds an unfinished restore; delete the data dir and run the restore again`,
      );
    }
    this.#checkOwner(info.owner, `data dir ${this.dir}`);
    await this.#upgradeFrom(info.schemaVersion, "data dir");
  }

  #checkOwner(owner: string, subject: string): void {
    const mine = this.#options.owner ?? "";
    if (owner !== "" && mine !== "" && owner !== mine) {
      throw new FailedPrecondition(`${subject} belongs to kmi ${owner}, not kmi ${mine}; use the ${mine}'s own data`);
    }
  }

  async #upgradeFrom(stored: number, what: string): Promise<void> {
    if (stored > this.schemaVersion) {
      throw new FailedPrecondition(
        `${what} ${this.dir} was written by schema v${stored}, newer than v${this.schemaVersion} that this kmi knows; ` +
          `run the newer kmi, or restore a backup made by this version`,
      );
    }
    if (stored < this.schemaVersion && !this.#options.upgrade) {
      throw new FailedPrecondition(
        `${what} ${this.dir} is at schema v${stored}, older than v${this.schemaVersion}, and no upgrade is registered`,
      );
    }
    const info = (await this.#readInfo())!;
    for (let v = stored; v < this.schemaVersion; v++) {
      const ops = (await this.#options.upgrade!(this, v)) ?? [];
      validateBatch(ops);
      const next = create(StoreInfoSchema, { ...info, format: 1, schemaVersion: v + 1 });
      await this.#write([...ops, { type: "put", table: META, key: STORE_INFO_KEY, value: next }]);
    }
  }

  async #readInfo(): Promise<StoreInfo | undefined> {
    const raw = await this.#sub(META).get(STORE_INFO_KEY);
    if (raw === undefined) return undefined;
    let info: StoreInfo;
    try {
      info = fromBinary(StoreInfoSchema, raw);
    } catch (err) {
      throw new FailedPrecondition(`data dir ${this.dir}: the store's meta record is corrupt; restore from a backup`, {
        cause: err,
      });
    }
    if (info.format > 1) {
      throw new FailedPrecondition(`data dir ${this.dir}: meta record format ${info.format} is newer than this kmi; run the newer kmi`);
    }
    return info;
  }

  async #writeInfo(fields: { schemaVersion: number; owner: string; restoreInProgress: boolean }): Promise<void> {
    const value = create(StoreInfoSchema, { format: 1, ...fields });
    await this.#write([{ type: "put", table: META, key: STORE_INFO_KEY, value }]);
  }

  /** True when any key exists outside `_meta` (or at all, when `excludeMeta` is false). */
  async #hasAnyRecord(excludeMeta = true): Promise<boolean> {
    const metaPrefix = `!${META_TABLE}!`;
    for await (const key of this.#root.keys()) {
      if (excludeMeta && key.startsWith(metaPrefix)) continue;
      return true;
    }
    return false;
  }

  #sub(table: Table): Sub {
    const known = this.#subs.get(table.name);
    if (known) {
      // Two definitions of one table with different messages would decode each other's
      // records as garbage; refuse the second.
      if (known.schema.typeName !== table.schema.typeName) {
        throw new InvalidArgument(
          `table ${table.name}: defined with ${table.schema.typeName} but this store holds ${known.schema.typeName} there`,
        );
      }
      return known.sub;
    }
    const sub = openSub(this.#root, table.name);
    this.#subs.set(table.name, { sub, schema: table.schema });
    return sub;
  }

  #rawSub(name: string): Sub {
    const known = this.#subs.get(name)?.sub ?? this.#internalSubs.get(name);
    if (known !== undefined) return known;
    // Made once: a sublevel object is costly to make, and the internal ones are used by every commit.
    const sub = openSub(this.#root, name);
    if (name.startsWith("_")) this.#internalSubs.set(name, sub);
    return sub;
  }

  #checkOpen(): void {
    if (this.#closed) throw new StoreClosed();
  }

  #decode<Desc extends DescMessage>(table: Table<Desc>, key: string, raw: Uint8Array): MessageShape<Desc> {
    let value: MessageShape<Desc>;
    try {
      value = fromBinary(table.schema, raw);
    } catch (err) {
      // A plain Error on purpose: a record that does not decode is the server's problem
      // (corruption, a foreign writer), not the caller's; it stays an opaque INTERNAL.
      throw new Error(`store: record ${table.name}/${key} does not decode as ${table.schema.typeName}`, { cause: err });
    }
    return table.upgrade ? table.upgrade(value) : value;
  }

  /** {@inheritDoc Store.get} */
  async get<Desc extends DescMessage>(table: Table<Desc>, key: string): Promise<MessageShape<Desc> | undefined> {
    this.#checkOpen();
    checkTable(table, "get");
    checkKey(key, `get ${table.name}`);
    const raw = await this.#sub(table).get(key);
    return raw === undefined ? undefined : this.#decode(table, key, raw);
  }

  /** {@inheritDoc Store.has} */
  async has(table: Table, key: string): Promise<boolean> {
    this.#checkOpen();
    checkTable(table, "has");
    checkKey(key, `has ${table.name}`);
    return this.#sub(table).has(key);
  }

  /** {@inheritDoc Store.iterate} */
  async *iterate<Desc extends DescMessage>(
    table: Table<Desc>,
    range: RangeOptions = {},
  ): AsyncGenerator<[key: string, value: MessageShape<Desc>]> {
    this.#checkOpen();
    checkTable(table, "iterate");
    const bounds = normalizeRange(range);
    if (range.limit === 0) return;
    const iterator = this.#sub(table).iterator({
      ...bounds,
      reverse: range.reverse ?? false,
      limit: range.limit ?? -1,
    });
    for await (const [key, raw] of iterator) yield [key, this.#decode(table, key, raw)];
  }

  /** {@inheritDoc Store.batch} */
  async batch(ops: readonly BatchOp[]): Promise<void> {
    await this.commit({ ops });
  }

  /**
   * {@inheritDoc Store.read}
   *
   * No snapshot needed: the revision is read before the value, and a commit writes both in one
   * batch, so the value read is never older than the revision returned. When a commit lands in
   * between, the value is newer and a commit conditional on the (older) revision fails: the
   * safe side.
   */
  async read<Desc extends DescMessage>(table: Table<Desc>, key: string): Promise<ReadResult<MessageShape<Desc>>> {
    this.#checkOpen();
    checkTable(table, "read");
    checkKey(key, `read ${table.name}`);
    const revision = this.#state.revision;
    const rev = await this.#storedRevision(table, key);
    const raw = await this.#sub(table).get(key);
    const modRevision = raw === undefined ? 0n : rev ?? 1n;
    return {
      value: raw === undefined ? undefined : this.#decode(table, key, raw),
      modRevision,
      // A commit that landed between the two reads: the store is at least at its revision.
      revision: modRevision > revision ? modRevision : revision,
    };
  }

  /** A key's revision from `_rev` (through the cache); undefined when it has none (absent, or written before revisions). */
  async #storedRevision(table: Table, key: string): Promise<bigint | undefined> {
    const k = revKey(table.name, key);
    if (this.#revCache.has(k)) return this.#revCache.get(k);
    const raw = await this.#rawSub(REV_TABLE).get(k);
    return raw?.readBigUInt64BE(0);
  }

  /** Remembers the revision a commit gave a key (undefined: deleted); bounded, oldest first out. */
  #cacheRevision(k: string, rev: bigint | undefined): void {
    this.#revCache.delete(k);
    this.#revCache.set(k, rev);
    if (this.#revCache.size > REV_CACHE_SIZE) this.#revCache.delete(this.#revCache.keys().next().value!);
  }

  /** {@inheritDoc Store.list} */
  async list<Desc extends DescMessage>(
    table: Table<Desc>,
    range: RangeOptions = {},
  ): Promise<{ records: ListedRecord<MessageShape<Desc>>[]; revision: bigint }> {
    this.#checkOpen();
    checkTable(table, "list");
    const bounds = normalizeRange(range);
    const snapshot = this.#root.snapshot();
    try {
      const state = await this.#rawSub(STATE_TABLE).get(STATE_KEY, { snapshot });
      const revision = state === undefined ? 1n : fromBinary(StoreStateRecordSchema, state).revision;
      if (range.limit === 0) return { records: [], revision };
      const raws: Array<[string, Buffer]> = [];
      const iterator = this.#sub(table).iterator({ ...bounds, snapshot, reverse: range.reverse ?? false, limit: range.limit ?? -1 });
      for await (const entry of iterator) raws.push(entry);
      const revs = raws.length === 0 ? [] : await this.#rawSub(REV_TABLE).getMany(raws.map(([k]) => revKey(table.name, k)), { snapshot });
      const records = raws.map(([key, raw], i) => ({ key, value: this.#decode(table, key, raw), modRevision: modRevisionOf(true, revs[i]) }));
      return { records, revision };
    } finally {
      await snapshot.close();
    }
  }

  /** {@inheritDoc Store.revision} */
  async revision(): Promise<bigint> {
    this.#checkOpen();
    return this.#state.revision;
  }

  /** {@inheritDoc Store.commit} */
  async commit(txn: Txn): Promise<CommitResult> {
    this.#checkOpen();
    validateTxn(txn);
    // Encode everything first, so that an op that fails to encode writes nothing.
    let bytes = 0;
    const encoded = txn.ops.map((op) => {
      const value = op.type === "put" ? Buffer.from(toBinary(op.table.schema, op.value)) : undefined;
      bytes += Buffer.byteLength(op.key) + op.table.name.length + (value?.length ?? 0);
      return { op, value };
    });
    checkTxnBytes(bytes);
    return this.#commits.runExclusive(async () => {
      this.#checkOpen();
      const failed: string[] = [];
      for (const c of txn.compares ?? []) {
        if ((await this.#modRevision(c.table, c.key)) !== c.modRevision) failed.push(conflictKey(c.table, c.key));
      }
      if (failed.length > 0) throw new Conflict(failed);
      if (encoded.length === 0) return { revision: this.#state.revision };
      return this.#apply(encoded);
    });
  }

  /** Writes one commit (values, mod revisions, change log, state) in one LevelDB batch; under the commit queue. */
  async #apply(encoded: ReadonlyArray<{ op: BatchOp; value: Buffer | undefined }>): Promise<CommitResult> {
    const revision = this.#state.revision + 1n;
    const revBytes = Buffer.alloc(8);
    revBytes.writeBigUInt64BE(revision);
    const revSub = this.#rawSub(REV_TABLE);
    const logSub = this.#rawSub(LOG_TABLE);
    const levelOps: Array<{ type: "put"; sublevel: Sub; key: string; value: Buffer } | { type: "del"; sublevel: Sub; key: string }> = [];
    const record = create(StoreChangeRecordSchema, { format: 1, revision });
    for (const { op, value } of encoded) {
      const sublevel = this.#sub(op.table);
      if (value !== undefined) {
        levelOps.push({ type: "put", sublevel, key: op.key, value }, { type: "put", sublevel: revSub, key: revKey(op.table.name, op.key), value: revBytes });
      } else {
        levelOps.push({ type: "del", sublevel, key: op.key }, { type: "del", sublevel: revSub, key: revKey(op.table.name, op.key) });
      }
      record.changes.push(create(StoreChangeSchema, { table: op.table.name, key: op.key, deleted: value === undefined, ...(value ? { value } : {}) }));
    }
    levelOps.push({ type: "put", sublevel: logSub, key: numericKey(revision), value: Buffer.from(toBinary(StoreChangeRecordSchema, record)) });
    const next: RevState = { revision, compacted: this.#state.compacted };
    // The log keeps the last `retention` commits: each commit drops the one that falls out.
    const dropped = revision - this.#retention;
    if (dropped >= 1n) {
      levelOps.push({ type: "del", sublevel: logSub, key: numericKey(dropped) });
      if (next.compacted <= dropped) next.compacted = dropped + 1n;
    }
    levelOps.push(this.#stateOp(next));
    await this.#root.batch(levelOps, { sync: this.#sync });
    // State, cache and listeners change in one synchronous step, so a watch registering in
    // between sees either both or neither (see `watch`).
    this.#state = next;
    for (const { op, value } of encoded) this.#cacheRevision(revKey(op.table.name, op.key), value === undefined ? undefined : revision);
    for (const listener of this.#listeners) listener(record);
    return { revision };
  }

  #stateOp(st: RevState): { type: "put"; sublevel: Sub; key: string; value: Buffer } {
    const value = Buffer.from(toBinary(StoreStateRecordSchema, create(StoreStateRecordSchema, { format: 1, revision: st.revision, compacted: st.compacted })));
    return { type: "put", sublevel: this.#rawSub(STATE_TABLE), key: STATE_KEY, value };
  }

  /** The current mod revision of a key; only consistent under the commit queue. */
  async #modRevision(table: Table, key: string): Promise<bigint> {
    const k = revKey(table.name, key);
    if (this.#revCache.has(k)) return this.#revCache.get(k) ?? 0n;
    const rev = await this.#storedRevision(table, key);
    if (rev !== undefined) return rev;
    return (await this.#sub(table).has(key)) ? 1n : 0n;
  }

  /** {@inheritDoc Store.keepsHistorySince} */
  async keepsHistorySince(revision: bigint): Promise<boolean> {
    this.#checkOpen();
    // As etcd: the revision itself must not be compacted away (a watch from the next one then replays).
    return revision > 0n && revision <= this.#state.revision && revision >= this.#state.compacted;
  }

  /** {@inheritDoc Store.compact} */
  async compact(revision: bigint): Promise<void> {
    this.#checkOpen();
    await this.#commits.runExclusive(async () => {
      if (revision > this.#state.revision) {
        throw new InvalidArgument(`compact: revision ${revision} is in the future (the store is at ${this.#state.revision})`);
      }
      if (revision <= this.#state.compacted) return;
      const logSub = this.#rawSub(LOG_TABLE);
      const ops: Array<{ type: "put"; sublevel: Sub; key: string; value: Buffer } | { type: "del"; sublevel: Sub; key: string }> = [];
      for await (const key of logSub.keys({ lt: numericKey(revision) })) ops.push({ type: "del", sublevel: logSub, key });
      const next = { revision: this.#state.revision, compacted: revision };
      ops.push(this.#stateOp(next));
      await this.#root.batch(ops, { sync: this.#sync });
      this.#state = next;
    });
  }

  /** {@inheritDoc Store.watch} */
  async *watch<Desc extends DescMessage>(table: Table<Desc>, options: WatchOptions = {}): AsyncGenerator<FeedEvent<MessageShape<Desc>>> {
    this.#checkOpen();
    checkTable(table, "watch");
    const prefix = options.prefix ?? "";
    if (prefix !== "") checkKey(prefix, "watch prefix");
    const from = options.fromRevision ?? 0n;
    if (typeof from !== "bigint" || from < 0n) throw new InvalidArgument("watch: fromRevision must be a non-negative bigint");
    const queue: StoreChangeRecord[] = [];
    let wake: (() => void) | undefined;
    const listener: Listener = (record) => {
      queue.push(record);
      wake?.();
    };
    const onAbort = () => wake?.();
    // Registered and the revision read in one synchronous step: every commit after `upto`
    // reaches `queue`, every commit up to it is in the log.
    this.#listeners.add(listener);
    const upto = this.#state.revision;
    const snapshot = this.#root.snapshot();
    options.signal?.addEventListener("abort", onAbort);
    try {
      const pick = (record: StoreChangeRecord) => this.#feedEvent(table, prefix, record);
      if (from !== 0n && from <= upto) {
        const raw = await this.#rawSub(STATE_TABLE).get(STATE_KEY, { snapshot });
        const compacted = raw === undefined ? 0n : fromBinary(StoreStateRecordSchema, raw).compacted;
        if (from < compacted) {
          yield { type: "resync", compactRevision: compacted };
          return;
        }
        const logSub = this.#rawSub(LOG_TABLE);
        for await (const [, raw] of logSub.iterator({ snapshot, gte: numericKey(from), lte: numericKey(upto) })) {
          const ev = pick(fromBinary(StoreChangeRecordSchema, raw));
          if (ev !== undefined) yield ev;
        }
      }
      await snapshot.close().catch(() => {});
      const after = from === 0n ? upto : from - 1n > upto ? from - 1n : upto;
      for (;;) {
        if (options.signal?.aborted) return;
        this.#checkOpen();
        const record = queue.shift();
        if (record === undefined) {
          await new Promise<void>((resolve) => (wake = resolve));
          wake = undefined;
          continue;
        }
        if (record.revision <= after) continue;
        const ev = pick(record);
        if (ev !== undefined) yield ev;
      }
    } finally {
      this.#listeners.delete(listener);
      options.signal?.removeEventListener("abort", onAbort);
      await snapshot.close().catch(() => {});
    }
  }

  /** The changes of `record` to `table` under `prefix`, as a feed event; undefined when none. */
  #feedEvent<Desc extends DescMessage>(table: Table<Desc>, prefix: string, record: StoreChangeRecord): FeedEvent<MessageShape<Desc>> | undefined {
    const changes: StoreChange<MessageShape<Desc>>[] = [];
    for (const c of record.changes) {
      if (c.table !== table.name || !c.key.startsWith(prefix)) continue;
      changes.push({
        type: c.deleted ? "del" : "put",
        key: c.key,
        value: c.deleted ? undefined : this.#decode(table, c.key, c.value),
        modRevision: record.revision,
      });
    }
    return changes.length === 0 ? undefined : { type: "changes", revision: record.revision, changes };
  }

  async #write(ops: readonly BatchOp[]): Promise<void> {
    if (ops.length === 0) return;
    // Encode everything first, so that an op that fails to encode writes nothing.
    const levelOps = ops.map((op) =>
      op.type === "put"
        ? { type: "put" as const, sublevel: this.#sub(op.table), key: op.key, value: Buffer.from(toBinary(op.table.schema, op.value)) }
        : { type: "del" as const, sublevel: this.#sub(op.table), key: op.key },
    );
    await this.#root.batch(levelOps, { sync: this.#sync });
  }

  /**
   * Every record of every table, `_meta` first, all read from ONE LevelDB snapshot: writes
   * made while the export runs are not in it, so the backup is consistent across tables.
   * Values stay in their stored form (sealed secrets stay sealed).
   */
  async *exportSnapshot(): AsyncGenerator<StoreRecord> {
    this.#checkOpen();
    const snapshot = this.#root.snapshot();
    try {
      const metaPrefix = `!${META_TABLE}!`;
      const metaEnd = prefixUpperBound(metaPrefix)!;
      for await (const [key, value] of this.#root.iterator({ snapshot, gte: metaPrefix, lt: metaEnd })) {
        yield create(StoreRecordSchema, { table: META_TABLE, key: key.slice(metaPrefix.length), value });
      }
      for await (const [fullKey, value] of this.#root.iterator({ snapshot })) {
        const end = fullKey.startsWith("!") ? fullKey.indexOf("!", 1) : -1;
        if (end < 0) throw new Error(`store: key outside any table in ${this.dir}; the data dir was written by something else`);
        const table = fullKey.slice(1, end);
        if (table === META_TABLE || INTERNAL_TABLES.has(table)) continue;
        yield create(StoreRecordSchema, { table, key: fullKey.slice(end + 1), value });
      }
    } finally {
      await snapshot.close();
    }
  }

  /**
   * Restores an `exportSnapshot` stream into this store, which must hold no records yet.
   * The first record must be the backup's `_meta` record; a backup of a newer schema or of
   * another owner is refused before anything is written, an older one is upgraded after.
   * While it runs the store is marked "restore in progress", so that a restore cut short by a
   * crash is refused at the next open instead of serving half a backup.
   */
  async importSnapshot(records: AsyncIterable<StoreRecord> | Iterable<StoreRecord>): Promise<{ records: number }> {
    this.#checkOpen();
    if (await this.#hasAnyRecord()) {
      throw new FailedPrecondition(`restore: data dir ${this.dir} already holds records; restore into an empty data dir`);
    }
    let backupInfo: StoreInfo | undefined;
    let count = 0;
    let chunk: Array<{ type: "put"; sublevel: Sub; key: string; value: Buffer }> = [];
    const flush = async () => {
      if (chunk.length > 0) await this.#root.batch(chunk, { sync: this.#sync });
      chunk = [];
    };
    for await (const record of records) {
      if (backupInfo === undefined) {
        if (record.table !== META_TABLE || record.key !== STORE_INFO_KEY) {
          throw new InvalidArgument("restore: the backup does not start with the store's meta record; it is not a kmi store export");
        }
        try {
          backupInfo = fromBinary(StoreInfoSchema, record.value);
        } catch (err) {
          throw new InvalidArgument("restore: the backup's meta record does not decode; the backup is corrupt", { cause: err });
        }
        if (backupInfo.format > 1 || backupInfo.restoreInProgress) {
          throw new InvalidArgument("restore: the backup's meta record is not one this kmi can restore");
        }
        this.#checkOwner(backupInfo.owner, "restore: the backup");
        if (backupInfo.schemaVersion > this.schemaVersion) {
          throw new FailedPrecondition(
            `restore: the backup is schema v${backupInfo.schemaVersion}, newer than v${this.schemaVersion} that this kmi knows; restore it with the newer kmi`,
          );
        }
        if (backupInfo.schemaVersion < this.schemaVersion && !this.#options.upgrade) {
          throw new FailedPrecondition(
            `restore: the backup is schema v${backupInfo.schemaVersion}, older than v${this.schemaVersion}, and no upgrade is registered`,
          );
        }
        await this.#writeInfo({ schemaVersion: this.schemaVersion, owner: this.#options.owner ?? "", restoreInProgress: true });
        continue;
      }
      if (record.table === META_TABLE) throw new InvalidArgument(`restore: unexpected meta record "${record.key}"`);
      checkTable({ name: record.table, schema: StoreRecordSchema }, `restore record ${count}`);
      checkKey(record.key, `restore record ${count} (${record.table})`);
      chunk.push({ type: "put", sublevel: this.#rawSub(record.table), key: record.key, value: Buffer.from(record.value) });
      count++;
      if (chunk.length >= 512) await flush();
    }
    if (backupInfo === undefined) throw new InvalidArgument("restore: the backup is empty");
    await flush();
    await this.#writeInfo({
      schemaVersion: backupInfo.schemaVersion,
      owner: backupInfo.owner || (this.#options.owner ?? ""),
      restoreInProgress: false,
    });
    await this.#upgradeFrom(backupInfo.schemaVersion, "restored data dir");
    return { records: count };
  }

  /** {@inheritDoc Store.close} */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    // Wake every watch: it sees the store closed and ends with Unavailable.
    for (const listener of this.#listeners) listener(create(StoreChangeRecordSchema, { format: 1, revision: 0n }));
    await this.#commits.runExclusive(() => undefined);
    await this.#root.close();
  }
}

/** Key of a mod revision in `_rev`: table names hold no '!', so `<table>!` selects exactly one table. */
function revKey(table: string, key: string): string {
  return `${table}!${key}`;
}

/** A key's mod revision from its `_rev` entry; a key written before revisions existed reads as 1. */
function modRevisionOf(present: boolean, rev: Buffer | undefined): bigint {
  if (!present) return 0n;
  return rev === undefined ? 1n : rev.readBigUInt64BE(0);
}
