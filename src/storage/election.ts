/**
 * Elections for singleton jobs (the KDC's rotation scheduler), with fencing, behind the
 * `Store` interface.
 *
 * - The election of job `name` is the record `elections/<name>` (kmi.store.v1.ElectionRecord).
 *   Whoever writes it while it is absent leads. On etcd the record is put with the leader's
 *   lease (`LeasingStore.grantLease`): when the leader stops renewing it (crashed, paused,
 *   cut off), etcd deletes it after the TTL and another process's put wins. On LevelDB there is
 *   one process: it always leads, and writes the record at once.
 * - **Fencing**: the record's mod revision when the leader wrote it is its fencing token.
 *   Every write the leader makes carries `leadership.fence` (a compare on that mod revision)
 *   in the same conditional batch, so a leader that lost the election without knowing it (a
 *   process paused past its lease: SIGSTOP, a long GC, a VM freeze) cannot write when it
 *   wakes: the record was deleted or rewritten by the next leader, its revision moved, and the
 *   commit fails with a `Conflict` naming `elections/<name>` (`isFencedConflict`), which is never
 *   retried (`retryIf: notFenced`). Local belief ("I am the leader") is only a hint; the fence
 *   decides. This is etcd's own election recipe (a lease-bound key, the leader's revision
 *   compared in each Txn) on the store's conditional batches.
 */
import { create, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { hostname } from "node:os";
import { randomBytes } from "node:crypto";
import { backoffMs, sleep } from "../common/backoff.js";
import { InvalidArgument, errorText } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { ElectionRecordSchema } from "../gen/kmi/store/v1/store_pb.js";
import { Conflict, conflictKey, defineTable, putOp, type Compare, type Store, type Table } from "./store.js";
import { retryOnConflict } from "./retry.js";

/** The table of election records: key the election's name. */
export const ELECTIONS = defineTable("elections", ElectionRecordSchema);

/** A lease on a store's keys (etcd), kept alive by the client until revoked or lost. */
export interface StoreLease {
  /** Aborted when the lease is lost: expired on the server, or its keep-alive failed for good. */
  readonly lost: AbortSignal;
  /**
   * Writes `value` under `key`, bound to this lease, only if the key is absent: resolves with
   * the write's mod revision, or undefined when the key exists.
   */
  putIfAbsent<Desc extends DescMessage>(table: Table<Desc>, key: string, value: MessageShape<Desc>): Promise<bigint | undefined>;
  /** Ends the lease (its keys are deleted) and stops renewing it. Idempotent, never rejects. */
  revoke(): Promise<void>;
}

/** A store that can bind keys to leases (EtcdStore). */
export interface LeasingStore extends Store {
  /** A new lease of `ttlSeconds`, renewed until revoked or lost. */
  grantLease(ttlSeconds: number): Promise<StoreLease>;
}

/** True when `store` can bind keys to leases (etcd). */
export function isLeasing(store: Store): store is LeasingStore {
  return typeof (store as Partial<LeasingStore>).grantLease === "function";
}

/** What this process holds while it leads one election. */
export interface Leadership {
  /** The election's name. */
  readonly name: string;
  /** This process's holder id. */
  readonly holder: string;
  /** The fencing compare: put it in every commit the leader makes. */
  readonly fence: Compare;
  /** Aborted when leadership ends: lease lost, resigned, or a fenced write was refused. */
  readonly lost: AbortSignal;
  /** Marks leadership lost (after a refused, fenced write) and gives up the lease. */
  step(reason: string): Promise<void>;
}

/** Options of `createElection`. */
export interface ElectionOptions {
  /** Election name: lowercase letters, digits and '-', e.g. "scheduler". */
  name: string;
  /** Lease TTL in seconds on etcd (2 or more): how long a paused or dead leader blocks the job. */
  ttlSeconds: number;
  /** Holder id; default "<host>/<pid>/<random>". */
  holder?: string;
  logger?: Logger;
  /** Clock for the record's `won_at`. */
  now?: () => Date;
}

/** True when `err` is a Conflict on an election record: the write was fenced (its writer no longer leads). */
export function isFencedConflict(err: unknown): boolean {
  return err instanceof Conflict && err.keys.some((k) => k.startsWith(`${ELECTIONS.name}/`));
}

/** For `retryOnConflict`'s `retryIf`: retry every conflict but a fenced one (rereading cannot help a fenced writer). */
export function notFenced(err: Conflict): boolean {
  return !isFencedConflict(err);
}

/** A default holder id: host, pid and a random part (a restarted process is a new holder). */
export function defaultHolder(): string {
  return `${hostname().slice(0, 200)}/${process.pid}/${randomBytes(4).toString("hex")}`;
}

/** One election on a store; `campaign` until it is won. */
export class Election {
  readonly #store: Store;
  readonly #o: Required<Pick<ElectionOptions, "name" | "ttlSeconds" | "holder">> & ElectionOptions;

  constructor(store: Store, options: ElectionOptions) {
    if (!/^[a-z][a-z0-9-]{0,62}$/.test(options.name)) throw new InvalidArgument(`election name "${options.name}": use lowercase letters, digits and '-'`);
    if (!Number.isInteger(options.ttlSeconds) || options.ttlSeconds < 2) throw new InvalidArgument("election ttl: a whole number of seconds, 2 or more");
    this.#store = store;
    this.#o = { ...options, holder: options.holder ?? defaultHolder() };
  }

  /** This process's holder id. */
  get holder(): string {
    return this.#o.holder;
  }

  /** The current holder's record as stored (undefined while nobody holds it). */
  async current(): Promise<{ holder: string; wonAt: Date } | undefined> {
    const r = await this.#store.get(ELECTIONS, this.#o.name);
    return r === undefined ? undefined : { holder: r.holder, wonAt: new Date(Number(r.wonAtUnixMs)) };
  }

  /** Resolves once this process leads; rejects with `signal`'s reason when it aborts first. */
  async campaign(signal: AbortSignal): Promise<Leadership> {
    return isLeasing(this.#store) ? this.#campaignLeased(this.#store, signal) : this.#campaignAlone();
  }

  #record() {
    return create(ElectionRecordSchema, { format: 1, holder: this.#o.holder, wonAtUnixMs: BigInt((this.#o.now?.() ?? new Date()).getTime()) });
  }

  /** LevelDB: the one process leads; its write of the record sets the fence. */
  async #campaignAlone(): Promise<Leadership> {
    const { revision } = await retryOnConflict(async () => {
      const read = await this.#store.read(ELECTIONS, this.#o.name);
      return this.#store.commit({ compares: [{ table: ELECTIONS, key: this.#o.name, modRevision: read.modRevision }], ops: [putOp(ELECTIONS, this.#o.name, this.#record())] });
    });
    const lost = new AbortController();
    return this.#leadership(revision, lost, async () => {});
  }

  /** etcd: a lease, a put-if-absent bound to it, and a wait for the record to go while another holds it. */
  async #campaignLeased(store: LeasingStore, signal: AbortSignal): Promise<Leadership> {
    for (let attempt = 1; ; attempt++) {
      signal.throwIfAborted();
      let lease: StoreLease | undefined;
      try {
        lease = await store.grantLease(this.#o.ttlSeconds);
        while (!lease.lost.aborted) {
          signal.throwIfAborted();
          const revision = await lease.putIfAbsent(ELECTIONS, this.#o.name, this.#record());
          if (revision !== undefined) {
            const lost = new AbortController();
            const held = lease;
            lease.lost.addEventListener("abort", () => lost.abort(new Error("lease lost")), { once: true });
            return this.#leadership(revision, lost, () => held.revoke());
          }
          await this.#waitForVacancy(AbortSignal.any([signal, lease.lost]));
        }
        await lease.revoke();
      } catch (err) {
        await lease?.revoke();
        if (signal.aborted) throw signal.reason;
        this.#o.logger?.warn("election: campaign failed; retrying", { election: this.#o.name, error: errorText(err) });
        await sleep(backoffMs(attempt, 250, 5000), signal);
      }
    }
  }

  /** Returns when the record is gone (or after one TTL, to look again), or when `signal` aborts. */
  async #waitForVacancy(signal: AbortSignal): Promise<void> {
    const read = await this.#store.read(ELECTIONS, this.#o.name);
    if (read.value === undefined) return;
    const until = AbortSignal.any([signal, AbortSignal.timeout(this.#o.ttlSeconds * 1000)]);
    try {
      for await (const ev of this.#store.watch(ELECTIONS, { prefix: this.#o.name, fromRevision: read.revision + 1n, signal: until })) {
        if (ev.type === "resync") return;
        if (ev.changes.some((c) => c.key === this.#o.name && c.type === "del")) return;
      }
    } catch (err) {
      if (!until.aborted) throw err;
    }
  }

  #leadership(revision: bigint, lost: AbortController, release: () => Promise<void>): Leadership {
    const name = this.#o.name;
    const logger = this.#o.logger;
    lost.signal.addEventListener("abort", () => void release(), { once: true });
    return {
      name,
      holder: this.#o.holder,
      fence: { table: ELECTIONS, key: name, modRevision: revision },
      lost: lost.signal,
      async step(reason: string) {
        if (!lost.signal.aborted) logger?.warn("election: leadership ended", { election: name, reason });
        lost.abort(new Error(reason));
        await release();
      },
    };
  }
}

/** How a fenced key is named in a Conflict, for tests and logs: "elections/<name>". */
export function electionKey(name: string): string {
  return conflictKey(ELECTIONS, name);
}
