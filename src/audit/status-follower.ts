/**
 * The status follower of an Auditserver: the one publisher of machine status changes to the
 * WatchMachineStatus streams (./status-hub.ts). It reads the `machines` table's change feed,
 * so a quarantine or release committed by ANY replica on a shared store (etcd) reaches the
 * KDCs that watch THIS replica; on LevelDB the feed carries this process's own commits, the
 * same way. A change is published only after it committed, in commit order.
 *
 * At start it lists the table (publishing nothing: a new stream's snapshot reads the store)
 * and watches from the list's revision + 1. A watch that breaks (the cluster unreachable)
 * resumes from the last revision it delivered; one answered with "resync" (its revision was
 * compacted) lists again and publishes what differs from what it knew, then watches on: the
 * Kubernetes list-then-watch, as the KDC's change follower does.
 */
import type { Logger } from "../common/logger.js";
import { backoffMs, sleep } from "../common/backoff.js";
import { MachineStatus } from "../gen/kmi/audit/v1/audit_pb.js";
import type { EnrolledMachineRecord } from "../gen/kmi/store/v1/audit_pb.js";
import { StoreClosed, type Store } from "../storage/store.js";
import { dateOf } from "./records.js";
import type { MachineStatusHub, StatusChange } from "./status-hub.js";
import { Tables } from "./store.js";

/** Options of the follower. */
export interface StatusFollowerOptions {
  /** First pause before a broken watch is opened again, ms (jittered; default 200). */
  retryMs?: number;
  /** Longest pause, ms (default 5 000). */
  maxRetryMs?: number;
}

type Status = MachineStatus.ACTIVE | MachineStatus.QUARANTINED;

/** Follows the `machines` table and publishes each status change to the hub. */
export class MachineStatusFollower {
  readonly #known = new Map<string, Status>();
  readonly #abort = new AbortController();
  #loop: Promise<void> | undefined;

  constructor(
    private readonly store: Store,
    private readonly hub: MachineStatusHub,
    private readonly logger: Logger,
    private readonly options: StatusFollowerOptions = {},
  ) {}

  /** Lists the machines (nothing is published for what is already there) and starts watching. */
  async start(): Promise<void> {
    if (this.#loop !== undefined) return;
    const from = await this.#list(false);
    this.#loop = this.#follow(from);
  }

  /** Stops watching; resolves once the watch has ended. Idempotent. */
  async stop(): Promise<void> {
    this.#abort.abort();
    await this.#loop;
  }

  /** Lists the table; returns the revision to watch from. */
  async #list(publish: boolean): Promise<bigint> {
    const { records, revision } = await this.store.list(Tables.machines);
    const seen = new Set<string>();
    for (const r of records) {
      seen.add(r.key);
      this.#apply(r.value, publish);
    }
    // A machine gone from the table is no longer anyone's concern; forget it.
    for (const id of [...this.#known.keys()]) if (!seen.has(id)) this.#known.delete(id);
    return revision + 1n;
  }

  async #follow(from: bigint): Promise<void> {
    const signal = this.#abort.signal;
    let next = from;
    let failures = 0;
    while (!signal.aborted) {
      try {
        for await (const ev of this.store.watch(Tables.machines, { fromRevision: next, signal })) {
          failures = 0;
          if (ev.type === "resync") {
            this.logger.warn("machine status feed compacted past this replica's position; listing again", { compact_revision: String(ev.compactRevision) });
            next = await this.#list(true);
            break;
          }
          for (const c of ev.changes) {
            if (c.value !== undefined) this.#apply(c.value, true);
            else this.#known.delete(c.key);
          }
          next = ev.revision + 1n;
        }
      } catch (err) {
        if (signal.aborted || err instanceof StoreClosed) return;
        failures++;
        this.logger.warn("machine status feed broke; watching again", { from_revision: String(next), err });
        await sleep(backoffMs(failures, this.options.retryMs ?? 200, this.options.maxRetryMs ?? 5000), signal);
      }
    }
  }

  /** Records `m`'s status; publishes it when it differs from what was known (and `publish`). */
  #apply(m: EnrolledMachineRecord, publish: boolean): void {
    if (m.status !== MachineStatus.ACTIVE && m.status !== MachineStatus.QUARANTINED) return;
    // A machine enrolled after the list is active: nothing to tell.
    const before = this.#known.get(m.machineId) ?? MachineStatus.ACTIVE;
    this.#known.set(m.machineId, m.status);
    if (!publish || before === m.status) return;
    const change: StatusChange = { machineId: m.machineId, status: m.status, reason: m.statusReason, time: dateOf(m.statusChangedAt ?? m.enrolledAt) };
    this.hub.publish(change);
  }
}
