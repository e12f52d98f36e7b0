/**
 * The one home for endpoint rotation: a client of a replicated kmi service (the agent, `kmi ctl`,
 * the KDC's Auditserver client, the Auditserver's KDC client) holds every replica's URL, starts
 * at one chosen by a stable hash of who it is (so a fleet spreads over the replicas instead of
 * all landing on the first), and moves to the next replica in an order of its own, also from
 * that hash (so the clients of a replica that dies spread over the others instead of all
 * landing on the one after it), when a call or a session fails in a way another replica could
 * answer: the connection failed, or the server answered UNAVAILABLE
 * (shedding load, draining, or its store unreachable). A replica that sheds load says when to
 * come back: `retry-after-ms` in the response header or trailer, and in the message.
 */
import { createHash } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { RETRY_AFTER_HEADER } from "../common/errors.js";

export { RETRY_AFTER_HEADER };

/** The index in [0, n) a stable hash of `key` picks: the same key always starts at the same replica. */
export function stableIndex(key: string, n: number): number {
  if (n <= 1) return 0;
  const h = createHash("sha256").update(key).digest();
  return h.readUInt32BE(0) % n;
}

/**
 * The order in which a client keyed `key` walks `n` replicas: it starts at `stableIndex(key, n)`;
 * the others follow in a shuffle seeded by the key (Fisher–Yates over SHA-256 of key and step).
 */
export function replicaOrder(key: string, n: number): number[] {
  const first = stableIndex(key, n);
  const rest = [...Array(n).keys()].filter((i) => i !== first);
  for (let i = rest.length - 1; i > 0; i--) {
    const j = createHash("sha256").update(`${key}\n${i}`).digest().readUInt32BE(0) % (i + 1);
    [rest[i], rest[j]] = [rest[j]!, rest[i]!];
  }
  return [first, ...rest];
}

/** The replicas of one service and the one a client uses now. */
export class Endpoints {
  readonly urls: readonly string[];
  /** Indexes into `urls` in the order this client walks them. */
  readonly #order: readonly number[];
  /** Position in `#order` of the replica in use. */
  #pos = 0;
  /** Per URL: not before this time (epoch ms), as a shedding replica asked. */
  readonly #notBefore = new Map<string, number>();

  /**
   * `urls`: every replica, in the order given (at least one). `spreadKey`: who the client is
   * (a machine id, a replica's own URL); the replica used first, and the order of the others, are
   * picked by its hash (`replicaOrder`). Without it the URLs are walked in the order given.
   */
  constructor(urls: readonly string[], spreadKey?: string) {
    if (urls.length === 0) throw new RangeError("endpoints: at least one URL is needed");
    this.urls = [...urls];
    this.#order = spreadKey === undefined ? [...this.urls.keys()] : replicaOrder(spreadKey, this.urls.length);
  }

  /** The URL in use. */
  get current(): string {
    return this.#at(this.#pos);
  }

  /**
   * Moves to the next replica (round the list) that did not ask to be left alone, or, when
   * every one did, to the one free soonest; returns its URL.
   */
  advance(now: number = Date.now()): string {
    const n = this.urls.length;
    let best = (this.#pos + 1) % n;
    for (let i = 1; i <= n; i++) {
      const j = (this.#pos + i) % n;
      if (this.waitMs(this.#at(j), now) === 0) {
        best = j;
        break;
      }
      if (this.waitMs(this.#at(j), now) < this.waitMs(this.#at(best), now)) best = j;
    }
    this.#pos = best;
    return this.current;
  }

  /** Leaves `url` alone for `ms` (a replica shedding load asked for it). */
  avoid(url: string, ms: number, now: number = Date.now()): void {
    this.#notBefore.set(url, now + ms);
  }

  /** How long until `url` (default: the one in use) may be tried again, ms; 0 when it may now. */
  waitMs(url: string = this.current, now: number = Date.now()): number {
    const t = this.#notBefore.get(url);
    if (t === undefined) return 0;
    if (t <= now) {
      this.#notBefore.delete(url);
      return 0;
    }
    return t - now;
  }

  /** Makes `url` the one in use (when a call succeeded there); ignored when it is not in the list. */
  use(url: string): void {
    const pos = this.#order.indexOf(this.urls.indexOf(url));
    if (pos >= 0) this.#pos = pos;
  }

  /** The URLs from the one in use on, in this client's order: the order a call tries them. */
  rotation(): string[] {
    return this.#order.map((_, i) => this.#at(this.#pos + i));
  }

  /** The URL at position `pos` (round the order). */
  #at(pos: number): string {
    return this.urls[this.#order[pos % this.#order.length]!]!;
  }
}

/**
 * True when another replica could answer where this one did not: the connection failed or the
 * server said UNAVAILABLE. connect-es reports a refused, reset or timed-out connection as
 * UNAVAILABLE too (and a few transport failures as UNKNOWN/INTERNAL without a server's status;
 * those are not moved on, the server may have acted).
 */
export function isFailover(err: unknown): boolean {
  return err instanceof ConnectError && err.code === Code.Unavailable;
}

/** The wait a replica asked for (`retry-after-ms` header or trailer), ms; undefined when it gave none. */
export function retryAfterMs(err: unknown): number | undefined {
  if (!(err instanceof ConnectError)) return undefined;
  const raw = err.metadata.get(RETRY_AFTER_HEADER);
  if (raw === null) return undefined;
  const ms = Number(raw.split(",")[0]);
  return Number.isFinite(ms) && ms >= 0 ? Math.min(ms, 300_000) : undefined;
}

/** Options of {@link callWithFailover}. */
export interface FailoverOptions {
  /** Called when a replica failed and the next one is tried. */
  onFailover?: (url: string, err: unknown, next: string) => void;
  /** Decides whether a failure moves on (default {@link isFailover}). */
  retryIf?: (err: unknown) => boolean;
}

/**
 * Runs `call` on the replica in use; when it fails in a way another replica could answer, on the
 * next, each replica at most once. The replica that answered becomes the one in use. The last
 * error is thrown when none answered. Only for calls that are safe to send again: the caller
 * decides (a call the server refused before acting — connection failed, UNAVAILABLE — is).
 */
export async function callWithFailover<T>(endpoints: Endpoints, call: (url: string) => Promise<T>, options: FailoverOptions = {}): Promise<T> {
  const retryIf = options.retryIf ?? isFailover;
  const order = endpoints.rotation();
  for (let i = 0; ; i++) {
    const url = order[i]!;
    try {
      const out = await call(url);
      endpoints.use(url);
      return out;
    } catch (err) {
      const next = order[i + 1];
      if (next === undefined || !retryIf(err)) throw err;
      options.onFailover?.(url, err, next);
    }
  }
}
