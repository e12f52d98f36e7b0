/**
 * The one home for endpoint rotation: a client of a replicated kmi service (the agent, `kmi ctl`,
 * the KDC's Auditserver client, the Auditserver's KDC client) holds every replica's URL, starts
 * at one chosen by a stable hash of who it is (so a fleet spreads over the replicas instead of
 * all landing on the first), and moves to the next replica when a call or a session fails in a
 * way another replica could answer: the connection failed, or the server answered UNAVAILABLE
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

/** The replicas of one service and the one a client uses now. */
export class Endpoints {
  readonly urls: readonly string[];
  #index: number;
  /** Per URL: not before this time (epoch ms), as a shedding replica asked. */
  readonly #notBefore = new Map<string, number>();

  /**
   * `urls`: every replica, in the order given (at least one). `spreadKey`: who the client is
   * (a machine id, a replica's own URL); the first replica used is picked by its hash. Without
   * it the first URL is first.
   */
  constructor(urls: readonly string[], spreadKey?: string) {
    if (urls.length === 0) throw new RangeError("endpoints: at least one URL is needed");
    this.urls = [...urls];
    this.#index = spreadKey === undefined ? 0 : stableIndex(spreadKey, this.urls.length);
  }

  /** The URL in use. */
  get current(): string {
    return this.urls[this.#index]!;
  }

  /**
   * Moves to the next replica (round the list) that did not ask to be left alone, or, when
   * every one did, to the one free soonest; returns its URL.
   */
  advance(now: number = Date.now()): string {
    const n = this.urls.length;
    let best = (this.#index + 1) % n;
    for (let i = 1; i <= n; i++) {
      const j = (this.#index + i) % n;
      if (this.waitMs(this.urls[j]!, now) === 0) {
        best = j;
        break;
      }
      if (this.waitMs(this.urls[j]!, now) < this.waitMs(this.urls[best]!, now)) best = j;
    }
    this.#index = best;
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
    const i = this.urls.indexOf(url);
    if (i >= 0) this.#index = i;
  }

  /** The URLs from the one in use on, round the list: the order a call tries them. */
  rotation(): string[] {
    return this.urls.map((_, i) => this.urls[(this.#index + i) % this.urls.length]!);
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
