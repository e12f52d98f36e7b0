/**
 * `EtcdStore`: the `Store` (./store.ts) on an etcd v3 cluster through the npm client `etcd3`
 * (pinned; it runs on our grpc-js), for KDC and Auditserver replicas. Revisions are etcd's own:
 * `read` and `list` return a key's `mod_revision` and the response header's revision; `commit`
 * is one etcd Txn whose compares are `mod_revision == n` (`0` for "absent", which etcd
 * evaluates against a missing key as zero) and whose failure branch reads the compared keys
 * so that the `Conflict` names the ones that changed; `watch` is an etcd watch with
 * `start_revision`, answered with "resync" when etcd reports the revision compacted.
 *
 * ## Key layout in etcd
 *
 * | etcd key                         | value                                  |
 * |----------------------------------|----------------------------------------|
 * | `<prefix>/_meta/store`           | kmi.store.v1.StoreInfo (owner, schema) |
 * | `<prefix>/<table>/<key>`         | the table's protobuf message, binary   |
 *
 * `<prefix>` is per program (`kmi/kdc`, `kmi/audit`: see `--etcd-prefix`), so several
 * programs share one cluster without seeing each other's keys. Table names hold no `/`, so
 * `<prefix>/<table>/` selects exactly one table. Nothing else is kept: per-key and store
 * revisions and the change history are etcd's (`_state`, `_rev`, `_log` exist only in
 * LevelDB). Secrets are sealed before they get here (./seal.ts), exactly as in LevelDB; etcd
 * itself is reached over TLS with a client certificate.
 *
 * Limits: etcd refuses a Txn with more than 128 ops (`--max-txn-ops`) or a request over
 * 1.5 MiB (`--max-request-bytes`); `validateTxn` and `checkTxnBytes` refuse such a commit
 * before it is sent, on both backends.
 */
import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { AsyncLocalStorage } from "node:async_hooks";
import { handleWhen, retry } from "cockatiel";
import { Etcd3, isRecoverableError, type IOptions, type Lease } from "etcd3";
import { FailedPrecondition, InvalidArgument, Unavailable, isKmiError } from "../common/errors.js";
import { StoreInfoSchema, type StoreInfo } from "../gen/kmi/store/v1/store_pb.js";
import {
  Conflict,
  StoreClosed,
  checkKey,
  checkTable,
  checkTxnBytes,
  conflictKey,
  normalizeRange,
  prefixUpperBound,
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
import type { LeasingStore, StoreLease } from "./election.js";

/** Records per range request of `iterate` and `list` (all pages are read at one revision). */
const PAGE = 512;
/** Deadline of one unary etcd call, ms. */
const CALL_TIMEOUT_MS = 10_000;

/** How to reach the cluster and where this program's keys live. */
export interface EtcdStoreOptions {
  /** Client URLs, e.g. ["https://10.0.0.1:2379", …]; at least one. */
  endpoints: readonly string[];
  /** PEM of the CA that signed the members' certificates. */
  ca: Buffer;
  /** PEM of this client's certificate (chain), for etcd's `--client-cert-auth`. */
  cert: Buffer;
  /** PEM of this client's private key. */
  key: Buffer;
  /** Key prefix of this program's tables, without a trailing `/`, e.g. "kmi/kdc". */
  prefix: string;
  /** The program that owns the keys (checked like a LevelDB data dir's owner). */
  owner?: string;
  /** Layout version of the owner's tables (default 1); a newer stored one is refused. */
  schemaVersion?: number;
  /** Create the store's meta record when absent (default true); false refuses instead. */
  create?: boolean;
}

const PREFIX_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*(\/[A-Za-z0-9][A-Za-z0-9._-]*)*$/;

/**
 * Connects to etcd and checks (or writes, once, with an "absent" compare) the store's meta
 * record. Refuses, saying what to do, an unreachable cluster, another owner's prefix, a newer
 * schema.
 */
export async function openEtcdStore(options: EtcdStoreOptions): Promise<EtcdStore> {
  if (options.endpoints.length === 0) throw new InvalidArgument("etcd endpoints: give at least one (--etcd-endpoints https://host:2379,…)");
  for (const e of options.endpoints) {
    if (!/^https:\/\/[^/\s]+:\d+\/?$/.test(e)) throw new InvalidArgument(`etcd endpoint "${e}": use https://host:port (kmi talks to etcd over TLS only)`);
  }
  if (!PREFIX_RE.test(options.prefix)) throw new InvalidArgument(`etcd prefix "${options.prefix}": use path segments of letters, digits, '.', '_' and '-', e.g. kmi/kdc`);
  const client = new Etcd3({
    hosts: [...options.endpoints],
    credentials: { rootCertificate: options.ca, certChain: options.cert, privateKey: options.key },
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + CALL_TIMEOUT_MS }),
    faultHandling: { global: etcdRetryPolicy() },
  } satisfies IOptions);
  const store = new EtcdStore(client, options);
  try {
    await store.checkMeta();
  } catch (err) {
    client.close();
    throw err;
  }
  return store;
}

type Kv = { key: Buffer; value: Buffer; mod_revision: string; create_revision: string };

/** The etcd store. Make it with `openEtcdStore`. Any number of processes may share one prefix. */
export class EtcdStore implements LeasingStore {
  readonly #client: Etcd3;
  readonly #prefix: string;
  readonly #options: EtcdStoreOptions;
  readonly #schemas = new Map<string, string>();
  readonly #watches = new Set<() => void>();
  readonly #leases = new Set<Lease>();
  #closed = false;

  /** @internal Use `openEtcdStore`. */
  constructor(client: Etcd3, options: EtcdStoreOptions) {
    this.#client = client;
    this.#options = options;
    this.#prefix = `${options.prefix}/`;
  }

  /** Where this store lives, for messages: "etcd <endpoints> prefix <prefix>". */
  get where(): string {
    return `etcd ${this.#options.endpoints.join(",")} prefix ${this.#options.prefix}`;
  }

  /** @internal Checks (or writes) the meta record; part of opening. */
  async checkMeta(): Promise<void> {
    const key = Buffer.from(`${this.#prefix}_meta/store`);
    const schemaVersion = this.#options.schemaVersion ?? 1;
    const owner = this.#options.owner ?? "";
    const res = await this.#call(() => this.#client.kv.range({ key }));
    const kv = res.kvs[0] as Kv | undefined;
    if (kv === undefined) {
      if (this.#options.create === false) throw new FailedPrecondition(`${this.where} has no store; run kmi ${owner || "<program>"} init first`);
      const info = create(StoreInfoSchema, { format: 1, schemaVersion, owner, restoreInProgress: false });
      // Two replicas starting at once: the first writes it, the second finds it (absent compare).
      await this.#txn({
        compare: [{ key, target: "Mod", result: "Equal", mod_revision: 0 }],
        success: [{ request_put: { key, value: Buffer.from(toBinary(StoreInfoSchema, info)) } }],
        failure: [],
      });
      return this.checkMeta();
    }
    let info: StoreInfo;
    try {
      info = fromBinary(StoreInfoSchema, kv.value);
    } catch (err) {
      throw new FailedPrecondition(`${this.where}: the store's meta record is corrupt; restore the cluster from a snapshot`, { cause: err });
    }
    if (info.owner !== "" && owner !== "" && info.owner !== owner) {
      throw new FailedPrecondition(`${this.where} belongs to kmi ${info.owner}, not kmi ${owner}; give each program its own --etcd-prefix`);
    }
    if (info.schemaVersion > schemaVersion) {
      throw new FailedPrecondition(`${this.where} was written by schema v${info.schemaVersion}, newer than v${schemaVersion} that this kmi knows; run the newer kmi`);
    }
    if (info.schemaVersion < schemaVersion) {
      throw new FailedPrecondition(`${this.where} is at schema v${info.schemaVersion}, older than v${schemaVersion}, and no upgrade is registered`);
    }
  }

  #checkOpen(): void {
    if (this.#closed) throw new StoreClosed();
  }

  /** Runs one Txn, sent once: the client never sends it again after a failure (see {@link etcdRetryPolicy}). */
  #txn(request: Parameters<Etcd3["kv"]["txn"]>[0]) {
    return this.#call(() => unretried(() => this.#client.kv.txn(request)));
  }

  /** Runs one etcd call; a failure of the cluster or the connection becomes Unavailable. */
  async #call<T>(fn: () => Promise<T>): Promise<T> {
    this.#checkOpen();
    try {
      return await fn();
    } catch (err) {
      if (isKmiError(err)) throw err;
      const message = err instanceof Error ? err.message : String(err);
      throw new Unavailable(`etcd: ${message.slice(0, 200)}; check --etcd-endpoints and the cluster's health`, { cause: err });
    }
  }

  #tablePrefix(table: Table): string {
    const known = this.#schemas.get(table.name);
    if (known === undefined) this.#schemas.set(table.name, table.schema.typeName);
    else if (known !== table.schema.typeName) {
      throw new InvalidArgument(`table ${table.name}: defined with ${table.schema.typeName} but this store holds ${known} there`);
    }
    return `${this.#prefix}${table.name}/`;
  }

  #key(table: Table, key: string): Buffer {
    return Buffer.from(this.#tablePrefix(table) + key, "utf8");
  }

  #decode<Desc extends DescMessage>(table: Table<Desc>, key: string, raw: Uint8Array): MessageShape<Desc> {
    let value: MessageShape<Desc>;
    try {
      value = fromBinary(table.schema, raw);
    } catch (err) {
      // A plain Error on purpose, as in LevelStore: corruption is the server's problem.
      throw new Error(`store: record ${table.name}/${key} does not decode as ${table.schema.typeName}`, { cause: err });
    }
    return table.upgrade ? table.upgrade(value) : value;
  }

  /** {@inheritDoc Store.get} */
  async get<Desc extends DescMessage>(table: Table<Desc>, key: string): Promise<MessageShape<Desc> | undefined> {
    return (await this.read(table, key)).value;
  }

  /** {@inheritDoc Store.read} */
  async read<Desc extends DescMessage>(table: Table<Desc>, key: string): Promise<ReadResult<MessageShape<Desc>>> {
    checkTable(table, "read");
    checkKey(key, `read ${table.name}`);
    const k = this.#key(table, key);
    const res = await this.#call(() => this.#client.kv.range({ key: k }));
    const kv = res.kvs[0] as Kv | undefined;
    return {
      value: kv === undefined ? undefined : this.#decode(table, key, kv.value),
      modRevision: kv === undefined ? 0n : BigInt(kv.mod_revision),
      revision: BigInt(res.header.revision),
    };
  }

  /** {@inheritDoc Store.has} */
  async has(table: Table, key: string): Promise<boolean> {
    checkTable(table, "has");
    checkKey(key, `has ${table.name}`);
    const k = this.#key(table, key);
    const res = await this.#call(() => this.#client.kv.range({ key: k, count_only: true }));
    return BigInt(res.count) > 0n;
  }

  /** {@inheritDoc Store.iterate} */
  async *iterate<Desc extends DescMessage>(table: Table<Desc>, range: RangeOptions = {}): AsyncGenerator<[key: string, value: MessageShape<Desc>]> {
    for await (const page of this.#pages(table, range)) {
      for (const r of page.records) yield [r.key, r.value];
    }
  }

  /** {@inheritDoc Store.list} */
  async list<Desc extends DescMessage>(table: Table<Desc>, range: RangeOptions = {}): Promise<{ records: ListedRecord<MessageShape<Desc>>[]; revision: bigint }> {
    const records: ListedRecord<MessageShape<Desc>>[] = [];
    let revision = 0n;
    for await (const page of this.#pages(table, range)) {
      records.push(...page.records);
      revision = page.revision;
    }
    if (revision === 0n) revision = await this.revision();
    return { records, revision };
  }

  /** Pages of a range, every page read at the revision of the first (one consistent view). */
  async *#pages<Desc extends DescMessage>(table: Table<Desc>, range: RangeOptions): AsyncGenerator<{ records: ListedRecord<MessageShape<Desc>>[]; revision: bigint }> {
    this.#checkOpen();
    checkTable(table, "iterate");
    const bounds = normalizeRange(range);
    if (range.limit === 0) return;
    const tp = this.#tablePrefix(table);
    const reverse = range.reverse ?? false;
    let start = Buffer.from(tp + (bounds.gte ?? (bounds.gt !== undefined ? bounds.gt + "\0" : "")), "utf8");
    let end = Buffer.from(bounds.lt !== undefined ? tp + bounds.lt : bounds.lte !== undefined ? tp + bounds.lte + "\0" : prefixUpperBound(tp)!, "utf8");
    let left = range.limit ?? Number.POSITIVE_INFINITY;
    let atRevision: string | undefined;
    while (left > 0 && Buffer.compare(start, end) < 0) {
      const limit = Math.min(PAGE, left);
      const res = await this.#call(() =>
        this.#client.kv.range({
          key: start,
          range_end: end,
          limit,
          sort_order: reverse ? "Descend" : "Ascend",
          sort_target: "Key",
          ...(atRevision !== undefined ? { revision: atRevision } : {}),
        }),
      );
      atRevision ??= res.header.revision;
      const kvs = res.kvs as Kv[];
      const records = kvs.map((kv) => {
        const key = kv.key.toString("utf8").slice(tp.length);
        return { key, value: this.#decode(table, key, kv.value), modRevision: BigInt(kv.mod_revision) };
      });
      yield { records, revision: BigInt(atRevision) };
      left -= kvs.length;
      if (!res.more || kvs.length === 0) return;
      const last = kvs[kvs.length - 1]!.key;
      if (reverse) end = Buffer.from(last);
      else start = Buffer.concat([Buffer.from(last), Buffer.from([0])]);
    }
  }

  /** {@inheritDoc Store.revision} */
  async revision(): Promise<bigint> {
    const key = Buffer.from(`${this.#prefix}_meta/store`);
    const res = await this.#call(() => this.#client.kv.range({ key, count_only: true }));
    return BigInt(res.header.revision);
  }

  /** {@inheritDoc Store.batch} */
  async batch(ops: readonly BatchOp[]): Promise<void> {
    await this.commit({ ops });
  }

  /** {@inheritDoc Store.commit} */
  async commit(txn: Txn): Promise<CommitResult> {
    this.#checkOpen();
    validateTxn(txn);
    // Compares without ops still answer Conflict when one fails, as LevelStore does.
    if (txn.ops.length === 0 && (txn.compares ?? []).length === 0) return { revision: await this.revision() };
    let bytes = 0;
    const success = txn.ops.map((op) => {
      const key = this.#key(op.table, op.key);
      if (op.type === "del") {
        bytes += key.length;
        return { request_delete_range: { key } };
      }
      const value = Buffer.from(toBinary(op.table.schema, op.value));
      bytes += key.length + value.length;
      return { request_put: { key, value } };
    });
    checkTxnBytes(bytes);
    const compares = txn.compares ?? [];
    const keys = compares.map((c) => this.#key(c.table, c.key));
    const res = await this.#txn({
      compare: compares.map((c, i) => ({ key: keys[i], target: "Mod", result: "Equal", mod_revision: c.modRevision.toString() })),
      success,
      // Read the compared keys when a compare fails, to name the ones that changed.
      failure: keys.map((key) => ({ request_range: { key, keys_only: true } })),
    });
    if (!res.succeeded) {
      const failed = compares.filter((c, i) => {
        const kv = res.responses[i]?.response_range?.kvs[0] as Kv | undefined;
        return (kv === undefined ? 0n : BigInt(kv.mod_revision)) !== c.modRevision;
      });
      throw new Conflict(failed.map((c) => conflictKey(c.table, c.key)));
    }
    return { revision: BigInt(res.header.revision) };
  }

  /** {@inheritDoc Store.keepsHistorySince} */
  async keepsHistorySince(revision: bigint): Promise<boolean> {
    if (revision <= 0n) return false;
    // A range read at `revision` succeeds exactly when etcd still holds that revision (not
    // compacted, not in the future); a watch from the next one then replays without a gap.
    const key = Buffer.from(`${this.#prefix}_meta/store`);
    try {
      await this.#call(() => this.#client.kv.range({ key, count_only: true, revision: revision.toString() }));
      return true;
    } catch (err) {
      const message = String((err as { cause?: Error }).cause?.message ?? "");
      if (/compacted|future revision/.test(message)) return false;
      throw err;
    }
  }

  /** {@inheritDoc Store.compact} */
  async compact(revision: bigint): Promise<void> {
    try {
      await this.#call(() => this.#client.kv.compact({ revision: revision.toString(), physical: true }));
    } catch (err) {
      const message = String((err as { cause?: Error }).cause?.message ?? "");
      if (/compacted/.test(message)) return;
      if (/future revision/.test(message)) throw new InvalidArgument(`compact: revision ${revision} is in the future`);
      throw err;
    }
  }

  /** {@inheritDoc Store.watch} */
  async *watch<Desc extends DescMessage>(table: Table<Desc>, options: WatchOptions = {}): AsyncGenerator<FeedEvent<MessageShape<Desc>>> {
    this.#checkOpen();
    checkTable(table, "watch");
    const prefix = options.prefix ?? "";
    if (prefix !== "") checkKey(prefix, "watch prefix");
    const from = options.fromRevision ?? 0n;
    if (typeof from !== "bigint" || from < 0n) throw new InvalidArgument("watch: fromRevision must be a non-negative bigint");
    const tp = this.#tablePrefix(table);
    const start = Buffer.from(tp + prefix, "utf8");
    const end = Buffer.from(prefixUpperBound(tp + prefix)!, "utf8");
    const stream = await this.#call(() => this.#client.watchClient.watch());
    const queue: unknown[] = [];
    let failure: Error | undefined;
    let wake: (() => void) | undefined;
    const poke = () => wake?.();
    stream.on("data", (res: unknown) => {
      queue.push(res);
      poke();
    });
    stream.on("error", (err: Error) => {
      failure ??= err;
      poke();
    });
    stream.on("end", () => {
      failure ??= new Error("watch stream ended");
      poke();
    });
    this.#watches.add(poke);
    options.signal?.addEventListener("abort", poke);
    try {
      stream.write({ create_request: { key: start, range_end: end, ...(from > 0n ? { start_revision: from.toString() } : {}) } });
      for (;;) {
        if (options.signal?.aborted) return;
        this.#checkOpen();
        const res = queue.shift() as WatchResponse | undefined;
        if (res === undefined) {
          if (failure !== undefined) throw new Unavailable(`etcd: the watch stream broke (${failure.message.slice(0, 200)}); watch again from the last revision`, { cause: failure });
          await new Promise<void>((resolve) => (wake = resolve));
          wake = undefined;
          continue;
        }
        if (res.compact_revision !== undefined && BigInt(res.compact_revision) > 0n) {
          yield { type: "resync", compactRevision: BigInt(res.compact_revision) };
          return;
        }
        if (res.canceled) throw new Unavailable(`etcd: the watch was canceled (${res.cancel_reason ?? ""}); watch again from the last revision`);
        for (const ev of this.#group(table, tp, res.events ?? [])) yield ev;
      }
    } finally {
      this.#watches.delete(poke);
      options.signal?.removeEventListener("abort", poke);
      // The underlying object is a grpc-js ClientDuplexStream (an EventEmitter); the typing of etcd3 is narrower.
      const raw = stream as unknown as { removeAllListeners(e: string): void; on(e: string, f: () => void): void; end(): void; cancel(): void };
      raw.removeAllListeners("data");
      raw.on("error", () => {});
      raw.end();
      raw.cancel();
    }
  }

  /** A watch response's events as feed events, one per revision (one etcd Txn is one revision). */
  #group<Desc extends DescMessage>(table: Table<Desc>, tp: string, events: readonly WatchEvent[]): FeedEvent<MessageShape<Desc>>[] {
    const out: Array<{ type: "changes"; revision: bigint; changes: StoreChange<MessageShape<Desc>>[] }> = [];
    for (const ev of events) {
      const key = ev.kv.key.toString("utf8").slice(tp.length);
      const modRevision = BigInt(ev.kv.mod_revision);
      const change: StoreChange<MessageShape<Desc>> =
        ev.type === "Delete" || ev.type === 1
          ? { type: "del", key, value: undefined, modRevision }
          : { type: "put", key, value: this.#decode(table, key, ev.kv.value), modRevision };
      const last = out[out.length - 1];
      if (last !== undefined && last.revision === modRevision) last.changes.push(change);
      else out.push({ type: "changes", revision: modRevision, changes: [change] });
    }
    return out;
  }

  /**
   * A lease of `ttlSeconds` (etcd's own, renewed by the client every third of the TTL) for
   * `putIfAbsent` writes bound to it: the election records of ./election.ts.
   */
  async grantLease(ttlSeconds: number): Promise<StoreLease> {
    this.#checkOpen();
    if (!Number.isInteger(ttlSeconds) || ttlSeconds < 2) throw new InvalidArgument("lease ttl: a whole number of seconds, 2 or more");
    const lease = this.#client.lease(ttlSeconds, { autoKeepAlive: true });
    const lost = new AbortController();
    lease.on("lost", (err) => lost.abort(err));
    this.#leases.add(lease);
    const revoke = async () => {
      if (!this.#leases.delete(lease)) return;
      if (!lost.signal.aborted) lost.abort(new Error("lease revoked"));
      // Why revoke, not just close: etcd3's close() leaves the keep-alive running, and the key
      // would outlive this process's leadership by a whole TTL.
      await lease.revoke({ deadline: Date.now() + 2000 }).catch(() => {});
    };
    let id: string;
    try {
      id = await this.#call(() => lease.grant());
    } catch (err) {
      await revoke();
      throw err;
    }
    return {
      lost: lost.signal,
      revoke,
      putIfAbsent: async (table, key, value) => {
        checkTable(table, "putIfAbsent");
        checkKey(key, `putIfAbsent ${table.name}`);
        const k = this.#key(table, key);
        const res = await this.#txn({
          compare: [{ key: k, target: "Mod", result: "Equal", mod_revision: "0" }],
          success: [{ request_put: { key: k, value: Buffer.from(toBinary(table.schema, value)), lease: id } }],
          failure: [],
        });
        return res.succeeded ? BigInt(res.header.revision) : undefined;
      },
    };
  }

  /** {@inheritDoc Store.close} */
  async close(): Promise<void> {
    if (this.#closed) return;
    for (const lease of [...this.#leases]) {
      this.#leases.delete(lease);
      await lease.revoke({ deadline: Date.now() + 2000 }).catch(() => {});
    }
    this.#closed = true;
    for (const poke of this.#watches) poke();
    this.#client.close();
  }
}

interface WatchEvent {
  type: "Put" | "Delete" | 0 | 1;
  kv: Kv;
}

interface WatchResponse {
  created?: boolean;
  canceled?: boolean;
  cancel_reason?: string;
  compact_revision?: string;
  events?: WatchEvent[];
}

/** Marks the etcd calls made inside it as not to be sent again by the client (see {@link etcdRetryPolicy}). */
const noRetry = new AsyncLocalStorage<true>();

/** Runs `call` (a Txn) so that the etcd client does not send it again after a failure. */
export function unretried<T>(call: () => Promise<T>): Promise<T> {
  return noRetry.run(true, call);
}

/**
 * The etcd client's retry: a read is sent up to 3 more times on a recoverable error (UNAVAILABLE), as etcd3
 * does by default, but a Txn never. Why: a Txn whose answer was lost may have been applied; sent
 * again, its compares fail and it looks like a Conflict, and the caller would run its change a
 * second time on fresh reads (a second version, a second audit entry). Failing it instead leaves
 * the caller an UNAVAILABLE it reports, and the client decides.
 */
export function etcdRetryPolicy() {
  return retry(handleWhen((err) => isRecoverableError(err) && noRetry.getStore() !== true), { maxAttempts: 3 });
}
