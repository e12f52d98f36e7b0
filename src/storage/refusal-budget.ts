/**
 * How many refusals of callers that proved nothing (no or a wrong token, no client
 * certificate, an unknown join token) go into an audit log. Anyone who reaches a server's port
 * can make such refusals, and each would be a permanent, hash-chained entry: without a bound,
 * a loop of bad calls fills the disk. So each source (the peer address) may write a burst and
 * then a steady trickle, all sources together a larger one; past that, refusals are counted
 * instead of written, and the count goes into the next entry written for that source
 * (`suppressed_refusals`); and at most once a minute while refusals are being counted, one
 * summary entry says how many were and from how many sources, so the log itself shows that it
 * was flooded. An IPv6 source is its /64 (one host usually holds a whole /64). Callers that
 * authenticated are not limited: they are accountable.
 */
import { budgetSource } from "../common/ip.js";

/** Limits of a {@link RefusalBudget}. */
export interface RefusalBudgetOptions {
  /** Entries one source may write in a burst; default 30. */
  readonly perSourceBurst?: number;
  /** Entries one source may write per minute once its burst is spent; default 30. */
  readonly perSourcePerMinute?: number;
  /** Entries all sources together may write in a burst, and per minute; default 600. */
  readonly totalPerMinute?: number;
  /** Sources tracked at once (least recently seen go first); default 10,000. */
  readonly maxSources?: number;
}

interface Bucket {
  tokens: number;
  at: number;
  suppressed: number;
}

/** The decision on one refusal; `summary` when a summary entry is due (counted since the last one). */
export type RefusalDecision =
  | { readonly write: true; readonly suppressedBefore: number }
  | { readonly write: false; readonly summary?: { readonly suppressed: number; readonly sources: number } };

/** How often a summary of counted refusals is due, at most. */
const SUMMARY_EVERY_MS = 60_000;

/** Token buckets per source and in total; time comes from the caller. */
export class RefusalBudget {
  readonly #sources = new Map<string, Bucket>();
  readonly #total: Bucket;
  readonly #burst: number;
  readonly #perMs: number;
  readonly #totalPerMs: number;
  readonly #totalBurst: number;
  readonly #maxSources: number;
  /** Refusals counted but not written, since the budget was made. */
  suppressed = 0;
  #sinceSummary = 0;
  #sourcesSinceSummary = new Set<string>();
  #lastSummaryAt = -Infinity;

  constructor(o: RefusalBudgetOptions = {}) {
    this.#burst = o.perSourceBurst ?? 30;
    this.#perMs = (o.perSourcePerMinute ?? 30) / 60_000;
    this.#totalBurst = o.totalPerMinute ?? 600;
    this.#totalPerMs = this.#totalBurst / 60_000;
    this.#maxSources = o.maxSources ?? 10_000;
    // Full from the start; `at` is set by the first refill (no clock is read here).
    this.#total = { tokens: this.#totalBurst, at: 0, suppressed: 0 };
  }

  /** Whether a refusal from `source` is written now; when it is, how many were suppressed before it. */
  take(address: string, nowMs: number): RefusalDecision {
    const source = budgetSource(address);
    let b = this.#sources.get(source);
    if (b === undefined) {
      b = { tokens: this.#burst, at: nowMs, suppressed: 0 };
      if (this.#sources.size >= this.#maxSources) this.#sources.delete(this.#sources.keys().next().value as string);
    } else {
      this.#sources.delete(source);
    }
    this.#sources.set(source, b);
    refill(b, nowMs, this.#perMs, this.#burst);
    refill(this.#total, nowMs, this.#totalPerMs, this.#totalBurst);
    if (b.tokens < 1 || this.#total.tokens < 1) {
      b.suppressed++;
      this.suppressed++;
      this.#sinceSummary++;
      if (this.#sourcesSinceSummary.size < this.#maxSources) this.#sourcesSinceSummary.add(source);
      if (nowMs - this.#lastSummaryAt < SUMMARY_EVERY_MS) return { write: false };
      const summary = { suppressed: this.#sinceSummary, sources: this.#sourcesSinceSummary.size };
      this.#lastSummaryAt = nowMs;
      this.#sinceSummary = 0;
      this.#sourcesSinceSummary = new Set();
      return { write: false, summary };
    }
    b.tokens--;
    this.#total.tokens--;
    const suppressedBefore = b.suppressed;
    b.suppressed = 0;
    return { write: true, suppressedBefore };
  }
}

function refill(b: Bucket, nowMs: number, perMs: number, cap: number): void {
  if (nowMs > b.at) b.tokens = Math.min(cap, b.tokens + (nowMs - b.at) * perMs);
  b.at = Math.max(b.at, nowMs);
}
