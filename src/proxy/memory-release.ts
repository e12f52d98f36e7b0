/**
 * Gives memory back when the load falls. V8 keeps the heap pages of closed connections until
 * its next full collection, which an idle process may not run for a long time; so once the open
 * connections have fallen to half their high-water mark, by at least `minDrop`, two full
 * collections run (after `delayMs`, so a burst of closes costs one release, and at most once per
 * `minIntervalMs`). Under a steady or rising load it never runs: the check on each connection
 * event is a comparison. What the collection frees on the native side (nghttp2 sessions, OpenSSL
 * connections) goes back to the allocator; whether the allocator gives it to the system is the
 * allocator's choice (see docs/proxy.md, "Connections, descriptors and memory").
 */
import type { Logger } from "../common/logger.js";
import type { FullGc } from "./v8-gc.js";

/** Settings of {@link MemoryRelease}. */
export interface MemoryReleaseOptions {
  /** The full collection. */
  readonly gc: FullGc;
  /** Client connections open now. */
  readonly open: () => number;
  /** Fewest connections that must have closed since the high-water mark; default 1,000. */
  readonly minDrop?: number;
  /** Wait after the fall is seen, so one collection covers a burst of closes; default 1 s. */
  readonly delayMs?: number;
  /** Least time between two collections; default 60 s. */
  readonly minIntervalMs?: number;
  /** Milliseconds since some fixed point (tests inject one); default performance.now(). */
  readonly now?: () => number;
  /** Resident set size now, bytes (logged before and after); default process.memoryUsage.rss(). */
  readonly rss?: () => number;
  readonly logger: Logger;
}

/** Watches the open-connection count and runs a full collection when it falls by a large fraction. */
export class MemoryRelease {
  private high = 0;
  private timer: NodeJS.Timeout | undefined;
  private last = Number.NEGATIVE_INFINITY;
  private readonly minDrop: number;
  private readonly delayMs: number;
  private readonly minIntervalMs: number;
  private readonly now: () => number;
  private readonly rss: () => number;
  /** Collections run so far. */
  releases = 0;

  constructor(private readonly o: MemoryReleaseOptions) {
    this.minDrop = o.minDrop ?? 1000;
    this.delayMs = o.delayMs ?? 1000;
    this.minIntervalMs = o.minIntervalMs ?? 60_000;
    this.now = o.now ?? (() => performance.now());
    this.rss = o.rss ?? (() => process.memoryUsage.rss());
  }

  /** Call after a connection opened or closed. */
  observe(): void {
    const open = this.o.open();
    if (open > this.high) this.high = open;
    if (this.timer !== undefined || !this.fell(open)) return;
    const wait = Math.max(this.delayMs, this.last + this.minIntervalMs - this.now());
    this.timer = setTimeout(() => this.release(), wait);
    this.timer.unref();
  }

  /** Stops a pending collection. */
  close(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  private fell(open: number): boolean {
    return this.high - open >= this.minDrop && open <= this.high / 2;
  }

  private release(): void {
    this.timer = undefined;
    const open = this.o.open();
    const high = this.high;
    // The load came back meanwhile: its connections will use the memory.
    if (!this.fell(open)) return;
    const before = this.rss();
    const t0 = this.now();
    // Twice: the second collection gives back the pages the first one emptied (measured: with
    // one, V8 kept its committed heap at the peak's size; with two, it shrank by a third).
    this.o.gc();
    this.o.gc();
    this.last = this.now();
    this.high = open;
    this.releases++;
    const mib = (b: number): number => Math.round(b / 2 ** 17) / 8;
    this.o.logger.info("memory released after connections closed", { open, highWater: high, rssBeforeMiB: mib(before), rssAfterMiB: mib(this.rss()), gcMs: Math.round(this.last - t0) });
  }
}
