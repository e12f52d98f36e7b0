/**
 * Statistics of the benchmark: percentiles of one run's latencies, and the median with
 * min–max of a figure over its repeats.
 */

/** A figure over its repeats: the median, the smallest and the largest. */
export interface Stat {
  /** Median of the repeats. */
  readonly median: number;
  /** Smallest repeat. */
  readonly min: number;
  /** Largest repeat. */
  readonly max: number;
  /** Number of repeats. */
  readonly n: number;
}

/** The value at quantile `q` (0..1) of `values` (nearest rank on a sorted copy); NaN when empty. */
export function percentile(values: ArrayLike<number>, q: number): number {
  const n = values.length;
  if (n === 0) return NaN;
  const sorted = Float64Array.from(values).sort();
  const rank = Math.min(n - 1, Math.max(0, Math.ceil(q * n) - 1));
  return sorted[rank]!;
}

/** Several quantiles at once, sorting once. */
export function percentiles(values: ArrayLike<number>, qs: readonly number[]): number[] {
  const n = values.length;
  if (n === 0) return qs.map(() => NaN);
  const sorted = Float64Array.from(values).sort();
  return qs.map((q) => sorted[Math.min(n - 1, Math.max(0, Math.ceil(q * n) - 1))]!);
}

/** Arithmetic mean; NaN when empty. */
export function mean(values: ArrayLike<number>): number {
  if (values.length === 0) return NaN;
  let s = 0;
  for (let i = 0; i < values.length; i++) s += values[i]!;
  return s / values.length;
}

/** The median with min–max of repeated measurements. */
export function statOf(repeats: readonly number[]): Stat {
  if (repeats.length === 0) return { median: NaN, min: NaN, max: NaN, n: 0 };
  const sorted = [...repeats].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  return { median, min: sorted[0]!, max: sorted[sorted.length - 1]!, n: sorted.length };
}

/** A growable array of latencies (ms), cheap to append on the hot path. */
export class Samples {
  private buf: Float64Array;
  private len = 0;

  constructor(capacity = 4096) {
    this.buf = new Float64Array(capacity);
  }

  /** Appends one value. */
  push(v: number): void {
    if (this.len === this.buf.length) {
      const next = new Float64Array(this.buf.length * 2);
      next.set(this.buf);
      this.buf = next;
    }
    this.buf[this.len++] = v;
  }

  /** Number of values. */
  get length(): number {
    return this.len;
  }

  /** The values, as a view. */
  values(): Float64Array {
    return this.buf.subarray(0, this.len);
  }
}

/** Formats a number with 3 significant digits and thousands separators (12,300; 4.56; 0.0123). */
export function fmt(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a >= 1000) return Math.round(v).toLocaleString("en-US");
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  if (a === 0) return "0";
  return v.toPrecision(3);
}

/** "median (min–max)" of a stat; just the median when there was one repeat or no spread. */
export function fmtStat(s: Stat, unit = ""): string {
  const u = unit === "" ? "" : ` ${unit}`;
  if (s.n <= 1 || fmt(s.min) === fmt(s.max)) return `${fmt(s.median)}${u}`;
  return `${fmt(s.median)}${u} (${fmt(s.min)}–${fmt(s.max)})`;
}
