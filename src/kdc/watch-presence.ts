/**
 * Which machines have a WatchSecrets stream open on another KDC replica: GetRolloutStatus's
 * `connected` is true when the answering replica holds the machine's stream or any other live
 * replica does, so `kmi ctl ca status` and the portal's Rollout page say the same whichever
 * replica answers.
 *
 * On etcd each replica keeps one lease (renewed by its client) and, for each machine with a
 * stream open on it, a record `watch_presence/<replica>/<machine>` bound to that lease: put when
 * the machine's first stream opens there, deleted when its last one closes. A replica that stops
 * renewing (killed, cut off from etcd) loses its records when the lease expires, so a dead
 * replica's machines stop counting as connected within the TTL (10 s). A lease that is lost
 * while the replica lives is replaced, and its machines are written again.
 *
 * The writes are off the stream's path: a stream opens whether or not its record is written,
 * and a failed write is logged at debug level (the lease's keep-alive retries on its own). On
 * LevelDB there is one KDC, whose own streams are the whole answer.
 */
import { randomBytes } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import type { Logger } from "../common/logger.js";
import { WatchPresenceRecordSchema } from "../gen/kmi/store/v1/kdc_pb.js";
import type { LeasingStore, StoreLease } from "../storage/election.js";
import { defineTable } from "../storage/store.js";
import { KeyedMutex } from "./mutex.js";

/** The table of presence records: key `<replica>/<machine_id>`. */
export const WATCH_PRESENCE = defineTable("watch_presence", WatchPresenceRecordSchema);

/** How long a dead replica's records outlive it, at most (the lease's TTL), seconds. */
export const PRESENCE_TTL_SECONDS = 10;

/** What the watch hub tells, and what GetRolloutStatus asks. */
export interface WatchPresence {
  /** The machine's first stream opened on this replica. */
  opened(machineId: string): void;
  /** The machine's last stream on this replica closed. */
  closed(machineId: string): void;
  /** Machines with a stream open on another replica now. */
  elsewhere(): Promise<ReadonlySet<string>>;
  /** Deletes this replica's records (revokes its lease). */
  close(): Promise<void>;
}

/** One KDC alone (LevelDB): no other replica holds streams. */
export const SOLE_REPLICA: WatchPresence = {
  opened: () => {},
  closed: () => {},
  elsewhere: async () => new Set(),
  close: async () => {},
};

/** The presence records of one replica on a leasing store (etcd). */
export class LeasedWatchPresence implements WatchPresence {
  /** This process's name in the keys: new at each start, so a restart never reuses a dead lease's keys. */
  readonly replica = randomBytes(8).toString("hex");
  readonly #up = new Set<string>();
  readonly #serial = new KeyedMutex();
  #lease: Promise<StoreLease> | undefined;
  #closed = false;

  constructor(
    private readonly store: LeasingStore,
    private readonly logger: Logger,
    private readonly now: () => Date,
    private readonly ttlSeconds = PRESENCE_TTL_SECONDS,
  ) {}

  opened(machineId: string): void {
    this.#up.add(machineId);
    this.#sync(machineId);
  }

  closed(machineId: string): void {
    this.#up.delete(machineId);
    this.#sync(machineId);
  }

  async elsewhere(): Promise<ReadonlySet<string>> {
    const mine = `${this.replica}/`;
    const out = new Set<string>();
    for await (const [key, record] of this.store.iterate(WATCH_PRESENCE)) {
      if (!key.startsWith(mine)) out.add(record.machineId);
    }
    return out;
  }

  async close(): Promise<void> {
    this.#closed = true;
    const lease = await this.#lease?.catch(() => undefined);
    await lease?.revoke();
  }

  /** Brings the machine's record in line with whether it is up here now, after any earlier change of it. */
  #sync(machineId: string): void {
    const key = `${this.replica}/${machineId}`;
    void this.#serial
      .run(machineId, async () => {
        if (this.#closed) return;
        if (this.#up.has(machineId)) {
          const lease = await this.#leaseNow();
          await lease.putIfAbsent(WATCH_PRESENCE, key, create(WatchPresenceRecordSchema, { format: 1, machineId, sinceUnixMs: BigInt(this.now().getTime()) }));
        } else {
          await this.store.batch([{ type: "del", table: WATCH_PRESENCE, key }]);
        }
      })
      .catch((err: unknown) => this.logger.debug("watch presence not recorded", { machine: machineId, error: err instanceof Error ? err.message : String(err) }));
  }

  /** The replica's lease, granted on first use; a lost one is replaced and every machine up here written again. */
  #leaseNow(): Promise<StoreLease> {
    if (this.#lease !== undefined) return this.#lease;
    const granted = this.store.grantLease(this.ttlSeconds);
    this.#lease = granted;
    granted.then(
      (lease) =>
        lease.lost.addEventListener(
          "abort",
          () => {
            if (this.#closed || this.#lease !== granted) return;
            this.#lease = undefined;
            for (const id of this.#up) this.#sync(id);
          },
          { once: true },
        ),
      () => {
        if (this.#lease === granted) this.#lease = undefined;
      },
    );
    return granted;
  }
}
