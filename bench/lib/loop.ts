/**
 * A closed-loop driver: `concurrency` workers each run `op` back to back until the time or
 * the count runs out; a warm-up first (not recorded). Bounded in time and in count.
 */
import { percentiles, Samples } from "./stats.js";

/** Options of {@link closedLoop}. */
export interface LoopOptions {
  /** Operations in flight at once. */
  readonly concurrency: number;
  /** Measured duration, ms. */
  readonly durationMs: number;
  /** At most this many measured operations (default 10 million). */
  readonly maxOps?: number;
  /** Warm-up duration, ms (not recorded); default 20% of the duration, at most 500 ms. */
  readonly warmupMs?: number;
  /** Called as the measured window starts (after the warm-up), and as it ends (its last operation done). */
  readonly onWindow?: { readonly start: () => void; readonly end: () => void };
}

/** What a loop measured. */
export interface LoopResult {
  /** Operations that succeeded in the measured window (failed ones are in `errors`, never here). */
  readonly ops: number;
  /** Failed operations in the measured window. */
  readonly errors: number;
  /** First error message, if any. */
  readonly firstError?: string;
  /** Length of the measured window, s. */
  readonly seconds: number;
  /** ops / seconds: successful operations only. */
  readonly perSecond: number;
  /** Latency percentiles of the successful operations, ms. */
  readonly p50: number;
  readonly p99: number;
  /** The raw latencies, ms (for further analysis). */
  readonly latencies: Float64Array;
}

/** Monotonic milliseconds (CLOCK_MONOTONIC: the same clock in every process of the machine). */
export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

/** How long past its window a loop waits for operations still in flight. */
const HANG_GRACE_MS = 30_000;

async function run(op: () => Promise<unknown>, concurrency: number, durationMs: number, maxOps: number, record: boolean, onWindow?: LoopOptions["onWindow"]) {
  const lat = new Samples(record ? 16384 : 16);
  let ops = 0;
  let errors = 0;
  let firstError: string | undefined;
  let started = 0;
  onWindow?.start();
  const t0 = nowMs();
  const deadline = t0 + durationMs;
  const worker = async (): Promise<void> => {
    while (started < maxOps) {
      const s = nowMs();
      if (s >= deadline) return;
      started++;
      try {
        await op();
        if (record) lat.push(nowMs() - s);
        ops++;
      } catch (err) {
        errors++;
        firstError ??= err instanceof Error ? err.message : String(err);
        // A failing op must not spin: give the event loop a turn.
        await new Promise((r) => setImmediate(r));
      }
    }
  };
  // An op that never completes must not hang the run: stop waiting 30 s after the deadline.
  let watchdog: NodeJS.Timeout | undefined;
  const hung = new Promise<"hung">((resolve) => {
    watchdog = setTimeout(() => resolve("hung"), durationMs + HANG_GRACE_MS);
  });
  const outcome = await Promise.race([Promise.all(Array.from({ length: concurrency }, worker)), hung]);
  clearTimeout(watchdog);
  onWindow?.end();
  if (outcome === "hung") {
    errors += started - ops - errors;
    firstError ??= `operations still pending ${HANG_GRACE_MS / 1000} s after the window ended`;
  }
  const seconds = (Math.min(nowMs(), deadline + 1000) - t0) / 1000;
  return { ops, errors, firstError, seconds, lat };
}

/** Runs the loop: warm-up, then the measured window. */
export async function closedLoop(op: () => Promise<unknown>, o: LoopOptions): Promise<LoopResult> {
  const warmupMs = o.warmupMs ?? Math.min(500, o.durationMs * 0.2);
  if (warmupMs > 0) await run(op, o.concurrency, warmupMs, Number.MAX_SAFE_INTEGER, false);
  const r = await run(op, o.concurrency, o.durationMs, o.maxOps ?? 10_000_000, true, o.onWindow);
  const values = r.lat.values();
  const [p50, p99] = percentiles(values, [0.5, 0.99]);
  return {
    ops: r.ops,
    errors: r.errors,
    ...(r.firstError !== undefined ? { firstError: r.firstError } : {}),
    seconds: r.seconds,
    perSecond: r.ops / r.seconds,
    p50: p50!,
    p99: p99!,
    latencies: Float64Array.from(values),
  };
}

/** A synchronous op in a tight loop for `durationMs` (in-process limits); ops/s. */
export function tightLoop(fn: () => unknown, durationMs: number, warmupMs = 100): { ops: number; seconds: number; perSecond: number } {
  const w = nowMs() + warmupMs;
  while (nowMs() < w) for (let i = 0; i < 10; i++) fn();
  const t0 = nowMs();
  const deadline = t0 + durationMs;
  let ops = 0;
  let t = t0;
  while (t < deadline) {
    for (let i = 0; i < 10; i++) fn();
    ops += 10;
    t = nowMs();
  }
  const seconds = (t - t0) / 1000;
  return { ops, seconds, perSecond: ops / seconds };
}
