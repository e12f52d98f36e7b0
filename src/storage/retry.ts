/**
 * `retryOnConflict`: the one retry loop of every read-check-write on the store. The step reads
 * what it needs with revisions, decides, and commits with compares on what it read; when a
 * concurrent writer won (`Conflict`), the whole step runs again on fresh reads. Bounded, with
 * jittered exponential backoff so that two replicas that collided do not collide again in
 * lockstep. No lock is held across an await: correctness comes from the compares.
 */
import { setTimeout as sleep } from "node:timers/promises";
import { Conflict } from "./store.js";

/** Options of `retryOnConflict`. */
export interface RetryOptions {
  /** Most runs of the step, 1 or more (default 16). */
  attempts?: number;
  /** Backoff before the second run, ms (default 2); doubled after each conflict. */
  baseMs?: number;
  /** Longest backoff, ms (default 200). */
  maxMs?: number;
  /** Source of randomness in [0, 1) for the jitter (default Math.random). */
  random?: () => number;
  /** Which conflicts to retry (default: all); the others are thrown at once. */
  retryIf?: (err: Conflict) => boolean;
  /** Told of each conflict before the backoff (metrics, logs). */
  onConflict?: (attempt: number, err: Conflict) => void;
}

/** Default number of runs of a step. */
export const DEFAULT_RETRY_ATTEMPTS = 16;

/**
 * Runs `step` until it does not reject with `Conflict`, at most `attempts` times; any other
 * outcome (a value, another error) is returned or thrown at once. After the last attempt the
 * last `Conflict` is thrown (gRPC ABORTED: the caller may retry the call). The backoff before
 * attempt n+1 is uniform in [0, min(maxMs, baseMs * 2^(n-1))] ("full jitter").
 */
export async function retryOnConflict<T>(step: (attempt: number) => Promise<T>, options: RetryOptions = {}): Promise<T> {
  const attempts = options.attempts ?? DEFAULT_RETRY_ATTEMPTS;
  if (!Number.isSafeInteger(attempts) || attempts < 1) throw new RangeError("retryOnConflict: attempts must be an integer of 1 or more");
  const baseMs = options.baseMs ?? 2;
  const maxMs = options.maxMs ?? 200;
  const random = options.random ?? Math.random;
  for (let attempt = 1; ; attempt++) {
    try {
      return await step(attempt);
    } catch (err) {
      if (!(err instanceof Conflict) || attempt >= attempts || (options.retryIf !== undefined && !options.retryIf(err))) throw err;
      options.onConflict?.(attempt, err);
      const cap = Math.min(maxMs, baseMs * 2 ** (attempt - 1));
      const wait = Math.floor(random() * cap);
      if (wait > 0) await sleep(wait);
      else await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }
}
