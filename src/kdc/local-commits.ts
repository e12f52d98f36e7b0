/**
 * `LocalCommits`: the KDC's store, passed through, remembering the revisions of the commits
 * this process made, so that the change follower (./change-follower.ts) skips what the
 * operations already announced. It also tells when no commit of this process is in flight:
 * a commit's event can reach the feed before the commit's own reply.
 */
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import type { BatchOp, CommitResult, FeedEvent, ListedRecord, RangeOptions, ReadResult, Store, Table, Txn, WatchOptions } from "../storage/store.js";

/** Revisions remembered (the follower is never that far behind its own process). */
const REMEMBERED = 100_000;

/** A `Store` that records this process's commit revisions. */
export class LocalCommits implements Store {
  readonly #inner: Store;
  readonly #mine = new Set<bigint>();
  #inflight = 0;
  #idle: Array<() => void> = [];

  constructor(inner: Store) {
    this.#inner = inner;
  }

  /** True when `revision` was committed by this process. */
  isLocal(revision: bigint): boolean {
    return this.#mine.has(revision);
  }

  /** Resolves once no commit of this process is in flight. */
  settled(): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  /** {@inheritDoc Store.commit} */
  async commit(txn: Txn): Promise<CommitResult> {
    this.#inflight++;
    try {
      const r = await this.#inner.commit(txn);
      this.#mine.add(r.revision);
      if (this.#mine.size > REMEMBERED) this.#mine.delete(this.#mine.values().next().value!);
      return r;
    } finally {
      this.#inflight--;
      if (this.#inflight === 0) for (const wake of this.#idle.splice(0)) wake();
    }
  }

  /** {@inheritDoc Store.batch} */
  async batch(ops: readonly BatchOp[]): Promise<void> {
    await this.commit({ ops });
  }

  /** {@inheritDoc Store.get} */
  get<D extends DescMessage>(table: Table<D>, key: string): Promise<MessageShape<D> | undefined> {
    return this.#inner.get(table, key);
  }

  /** {@inheritDoc Store.read} */
  read<D extends DescMessage>(table: Table<D>, key: string): Promise<ReadResult<MessageShape<D>>> {
    return this.#inner.read(table, key);
  }

  /** {@inheritDoc Store.has} */
  has(table: Table, key: string): Promise<boolean> {
    return this.#inner.has(table, key);
  }

  /** {@inheritDoc Store.iterate} */
  iterate<D extends DescMessage>(table: Table<D>, range?: RangeOptions): AsyncIterable<[key: string, value: MessageShape<D>]> {
    return this.#inner.iterate(table, range);
  }

  /** {@inheritDoc Store.list} */
  list<D extends DescMessage>(table: Table<D>, range?: RangeOptions): Promise<{ records: ListedRecord<MessageShape<D>>[]; revision: bigint }> {
    return this.#inner.list(table, range);
  }

  /** {@inheritDoc Store.revision} */
  revision(): Promise<bigint> {
    return this.#inner.revision();
  }

  /** {@inheritDoc Store.keepsHistorySince} */
  keepsHistorySince(revision: bigint): Promise<boolean> {
    return this.#inner.keepsHistorySince(revision);
  }

  /** {@inheritDoc Store.watch} */
  watch<D extends DescMessage>(table: Table<D>, options?: WatchOptions): AsyncIterable<FeedEvent<MessageShape<D>>> {
    return this.#inner.watch(table, options);
  }

  /** {@inheritDoc Store.compact} */
  compact(revision: bigint): Promise<void> {
    return this.#inner.compact(revision);
  }

  /** {@inheritDoc Store.close} */
  close(): Promise<void> {
    return this.#inner.close();
  }
}
