/**
 * What a benchmark row reports: figures (each a median with min–max over repeats, optionally
 * with latency percentiles, ratios against a baseline measured in the same run, and targets
 * marked met or missed), notes, and "not measured" lines that say why. A figure whose requests
 * failed too often is kept but marked "not judged": its rate is not printed and nothing is
 * compared with it.
 */
import { fmt, fmtStat, statOf, type Stat } from "./stats.js";

/** A target from the issue, judged on this run's figures. */
export interface Target {
  /** The target as written (`≥ 6,000/s at concurrency 64`). */
  readonly text: string;
  /** Whether this run met it; undefined when it could not be judged (a figure it needs is not judged). */
  readonly met: boolean | undefined;
  /** The verdict as printed when it is more than met / MISSED (`met (median), min below target`, `not judged: …`). */
  readonly verdict?: string;
}

/** A ratio of one figure against a baseline of the same run. */
export interface Ratio {
  /** The baseline's label. */
  readonly vs: string;
  /** figure median / baseline median. */
  readonly value: number;
}

/** One measured figure. */
export interface Figure {
  /** Stable id (`agent.sign.c64`), used by --json and the test. */
  readonly id: string;
  /** Label printed in the table. */
  readonly label: string;
  /** Unit of `value` (`calls/s`, `req/s`, `ms`, `MiB`). */
  readonly unit: string;
  /** The figure over its repeats. */
  readonly value: Stat;
  /** Latency p50 over the repeats (ms), when the figure has latencies. */
  readonly p50?: Stat;
  /** Latency p99 over the repeats (ms). */
  readonly p99?: Stat;
  /** Ratios against baselines measured in the same run. */
  readonly ratios: Ratio[];
  /** Targets, judged. */
  readonly targets: Target[];
  /** True for a baseline (the reference other figures are divided by). */
  readonly baseline?: boolean;
  /**
   * Why this figure is not a valid measurement (`484 of 581 requests failed (first error: …)`).
   * Its value is then not printed, and no ratio or target is computed against it.
   */
  notJudged?: string;
}

/** A figure that could not be measured, and why. */
export interface NotMeasured {
  /** Stable id. */
  readonly id: string;
  /** Label printed in the table. */
  readonly label: string;
  /** Why. */
  readonly reason: string;
}

/** One numbered benchmark of the issue. */
export interface RowResult {
  /** `1`..`5`. */
  readonly id: string;
  /** Title printed above its figures. */
  readonly title: string;
  /** How it was measured (one paragraph). */
  readonly method: string;
  /** Figures. */
  readonly figures: Figure[];
  /** Figures or whole parts that were not measured. */
  readonly notMeasured: NotMeasured[];
  /** Profile notes, step shares and other findings. */
  readonly notes: string[];
  /** Why the run fails although the row finished (requests through kmi that failed, say); empty when none. */
  readonly failures: string[];
  /** Seconds the row took. */
  seconds: number;
}

/** Builds a row's result. */
export class RowBuilder {
  readonly result: RowResult;

  constructor(id: string, title: string, method: string) {
    this.result = { id, title, method, figures: [], notMeasured: [], notes: [], failures: [], seconds: 0 };
  }

  /** Adds a figure from its per-repeat values (and per-repeat p50/p99 in ms, when latencies exist). */
  figure(
    id: string,
    label: string,
    unit: string,
    repeats: readonly number[],
    latency?: { p50: readonly number[]; p99: readonly number[] },
    baseline = false,
  ): Figure {
    const f: Figure = {
      id,
      label,
      unit,
      value: statOf(repeats),
      ...(latency !== undefined ? { p50: statOf(latency.p50), p99: statOf(latency.p99) } : {}),
      ratios: [],
      targets: [],
      ...(baseline ? { baseline: true } : {}),
    };
    this.result.figures.push(f);
    return f;
  }

  /** Marks `f` as not a valid measurement, and why; nothing is compared with it afterwards. */
  notJudged(f: Figure, why: string): void {
    f.notJudged = why;
  }

  /** Adds the ratio of `f` against `base` (medians); neither may be marked not judged. */
  ratio(f: Figure, base: Figure, vs = base.label): number {
    if (f.notJudged !== undefined || base.notJudged !== undefined) {
      throw new Error(`bench: ratio of ${f.id} against ${base.id}, but ${f.notJudged !== undefined ? f.id : base.id} is not judged`);
    }
    const value = f.value.median / base.value.median;
    f.ratios.push({ vs, value });
    return value;
  }

  /** Judges a target on `f`; `verdict` replaces the plain met / MISSED when given. */
  target(f: Figure, text: string, met: boolean, verdict?: string): boolean {
    f.targets.push({ text, met, ...(verdict !== undefined ? { verdict } : {}) });
    return met;
  }

  /** Records a target on `f` that this run cannot judge, and why. */
  targetNotJudged(f: Figure, text: string, why: string): void {
    f.targets.push({ text, met: undefined, verdict: `not judged: ${why}` });
  }

  /** Records why the run fails although this row finished (the run then exits non-zero). */
  fail(reason: string): void {
    this.result.failures.push(reason);
  }

  /** Records something that was not measured, and why. */
  notMeasured(id: string, label: string, reason: string): void {
    this.result.notMeasured.push({ id, label, reason });
  }

  /** Adds a note. */
  note(text: string): void {
    this.result.notes.push(text);
  }
}

/** The value column of a figure: `12,300 calls/s (12,100–12,500)`. */
export function valueText(f: Figure): string {
  if (f.notJudged !== undefined) return `not judged: ${f.notJudged}`;
  return fmtStat(f.value, f.unit);
}

/** The latency column: `p50 0.21 ms (0.20–0.22) · p99 0.61 ms`. */
export function latencyText(f: Figure): string {
  if (f.notJudged !== undefined || f.p50 === undefined || f.p99 === undefined) return "";
  return `p50 ${fmtStat(f.p50, "ms")} · p99 ${fmtStat(f.p99, "ms")}`;
}

/** The ratio column: `0.93× no-op c=64`. */
export function ratioText(f: Figure): string {
  return f.ratios.map((r) => `${fmtRatio(r.value)} ${r.vs}`).join("; ");
}

/** The target column: `≥ 6,000/s: met`. */
export function targetText(f: Figure): string {
  return f.targets.map((t) => `${t.text}: ${t.verdict ?? (t.met === true ? "met" : "MISSED")}`).join("; ");
}

/** A ratio as `0.93×` or `41%` style: × for ratios. */
export function fmtRatio(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  return `${v >= 10 ? v.toFixed(1) : v >= 1 ? v.toFixed(2) : v.toFixed(3)}×`;
}

/** A share as a percentage. */
export function fmtPct(v: number): string {
  return `${fmt(v * 100)}%`;
}
