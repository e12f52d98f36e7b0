/**
 * The fan-out of machine status changes to WatchMachineStatus streams. A change is published
 * only after its batch committed, so a watcher never hears of a change that did not happen.
 * Each subscriber has a bounded queue: a watcher too slow to keep up is cut off (its stream
 * ends with RESOURCE_EXHAUSTED and it reconnects for a fresh snapshot) rather than letting
 * memory grow without bound.
 */
import { ResourceExhausted } from "../common/errors.js";
import { MachineStatus } from "../gen/kmi/audit/v1/audit_pb.js";

/** One status change. */
export interface StatusChange {
  /** Machine id. */
  machineId: string;
  /** New status. */
  status: MachineStatus.ACTIVE | MachineStatus.QUARANTINED;
  /** Why. */
  reason: string;
  /** When. */
  time: Date;
}

/** A subscription: changes in order; `next` waits for one. */
export interface StatusSubscription {
  /** The next change, or undefined once `signal` aborted or the subscription was closed. */
  next(signal: AbortSignal, idleMs: number): Promise<StatusChange | "idle" | undefined>;
  /** Stops receiving. */
  close(): void;
}

/** Most changes queued for one subscriber before it is cut off. */
export const MAX_QUEUED_CHANGES = 10_000;

/** Publishes status changes to subscribers. */
export class MachineStatusHub {
  readonly #subs = new Set<Subscriber>();

  /** Sends `change` to every subscriber. */
  publish(change: StatusChange): void {
    for (const sub of this.#subs) sub.push(change);
  }

  /** Subscribes; changes published from now on are queued for the subscriber. */
  subscribe(): StatusSubscription {
    const sub = new Subscriber(() => this.#subs.delete(sub));
    this.#subs.add(sub);
    return sub;
  }

  /** Number of subscribers (metrics, tests). */
  get size(): number {
    return this.#subs.size;
  }
}

class Subscriber implements StatusSubscription {
  #queue: StatusChange[] = [];
  #wake: (() => void) | undefined;
  #closed = false;
  #overflow = false;

  constructor(private readonly onClose: () => void) {}

  push(change: StatusChange): void {
    if (this.#closed) return;
    if (this.#queue.length >= MAX_QUEUED_CHANGES) {
      this.#overflow = true;
      this.close();
      return;
    }
    this.#queue.push(change);
    this.#wake?.();
  }

  async next(signal: AbortSignal, idleMs: number): Promise<StatusChange | "idle" | undefined> {
    for (;;) {
      if (this.#overflow) throw new ResourceExhausted("watch: more than 10000 changes queued; reconnect for a fresh snapshot");
      const change = this.#queue.shift();
      if (change !== undefined) return change;
      if (this.#closed || signal.aborted) return undefined;
      const woke = await new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => done(false), idleMs);
        const onAbort = () => done(true);
        const done = (w: boolean) => {
          clearTimeout(timer);
          signal.removeEventListener("abort", onAbort);
          this.#wake = undefined;
          resolve(w);
        };
        this.#wake = () => done(true);
        signal.addEventListener("abort", onAbort, { once: true });
      });
      if (!woke) return "idle";
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#wake?.();
    this.onClose();
  }
}
