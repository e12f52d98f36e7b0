/**
 * Failed requests of a load, judged per measured window: up to a small share may fail; above
 * it the window's rate is no valid figure (a proxy that answers 502 fast is not fast), and the
 * figure is "not judged".
 */

/** Requests of one window that may fail before its rate stops being a valid figure. */
export const ERROR_SHARE_LIMIT = 0.01;

/** {@link ERROR_SHARE_LIMIT} as printed (`1%`). */
export const ERROR_SHARE_LIMIT_TEXT = `${ERROR_SHARE_LIMIT * 100}%`;

/** What one measured window counted. */
export interface WindowCounts {
  /** Requests that succeeded. */
  readonly ops: number;
  /** Requests that failed. */
  readonly errors: number;
  /** The first failure's message. */
  readonly firstError?: string;
}

/** Failed and attempted requests over a figure's windows. */
export interface FailureTally {
  /** Failed requests, all windows. */
  readonly failed: number;
  /** Attempted requests (succeeded + failed), all windows. */
  readonly total: number;
  /** Windows over the limit, or with no request at all. */
  readonly bad: number;
  /** The first failure's message, in window order. */
  readonly firstError: string | undefined;
}

/** Tallies the failures of `windows`; the figure is valid only when `bad` is 0. */
export function tallyFailures(windows: readonly WindowCounts[]): FailureTally {
  let failed = 0;
  let total = 0;
  let bad = 0;
  let firstError: string | undefined;
  for (const w of windows) {
    const n = w.ops + w.errors;
    failed += w.errors;
    total += n;
    if (n === 0 || w.errors / n > ERROR_SHARE_LIMIT) bad++;
    if (w.errors > 0 || n === 0) firstError ??= w.firstError;
  }
  return { failed, total, bad, firstError };
}

/** Why a figure with failures over the limit is not judged: `484 of 581 requests failed (first error: h2 status 502)`. */
export function notJudgedReason(t: FailureTally, windows: number): string {
  if (t.total === 0) return t.firstError ?? "no request was attempted";
  const over = windows > 1 ? `; over ${ERROR_SHARE_LIMIT_TEXT} in ${t.bad} of ${windows} windows` : "";
  return `${count(t.failed)} of ${count(t.total)} requests failed (first error: ${t.firstError ?? "none"})${over}`;
}

/** A count with thousands separators. */
export function count(n: number): string {
  return n.toLocaleString("en-US");
}
