/**
 * Progress of long work with an estimate, on stderr: `kmi kdc backup` and `restore`, and
 * `kmi ctl ca status --wait` (a rollout to many agents). Shown only on a terminal or when asked
 * (`--progress`), never in the way of a script's stdout. On a terminal the line is rewritten in
 * place; elsewhere (a log file, with --progress) one line is written per interval.
 */

/** Where progress goes (process.stderr in the programs). */
export interface ProgressSink {
  write(text: string): unknown;
  isTTY?: boolean;
}

/** Options of {@link ProgressMeter}. */
export interface ProgressMeterOptions {
  /** Where to write. */
  out: ProgressSink;
  /** Printed first, e.g. "kmi kdc restore". */
  label: string;
  /** What is counted, e.g. "records" or "machines hold v3". */
  unit: string;
  /** Show anything at all: a terminal, or --progress. */
  enabled: boolean;
  /** Least time between two updates, ms (default 250 on a terminal, 1000 otherwise). */
  intervalMs?: number;
  /**
   * Also update, sooner than the interval, once the count moved by this share of the total
   * (e.g. 0.05: every 5%); a fast run then still shows where it is. Off by default.
   */
  stepFraction?: number;
  /** Clock, ms (tests). */
  now?: () => number;
  /** How a count is shown (default as is; e.g. bytes as "3.1 MB"). */
  format?: (n: number) => string;
}

/** Whether progress is shown: on a terminal, or when the user asked with --progress (and never with --json). */
export function progressWanted(out: ProgressSink, asked: boolean, json = false): boolean {
  return !json && (asked || out.isTTY === true);
}

/** "4 s", "2 min 5 s", "1 h 3 min": a duration for people. */
export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min${s % 60 !== 0 ? ` ${s % 60} s` : ""}`;
  return `${Math.floor(m / 60)} h${m % 60 !== 0 ? ` ${m % 60} min` : ""}`;
}

/**
 * The time left, from the average rate since the start: undefined until something is done (no
 * rate yet) or when nothing is left.
 */
export function estimateLeftMs(done: number, total: number, elapsedMs: number, doneAtStart = 0): number | undefined {
  const progressed = done - doneAtStart;
  if (progressed <= 0 || done >= total || elapsedMs <= 0) return undefined;
  return ((total - done) * elapsedMs) / progressed;
}

/** One progress line: "label: 1200 of 5000 records (24%), about 9 s left". */
export function progressText(label: string, unit: string, done: number, total: number | undefined, leftMs: number | undefined, format: (n: number) => string = String): string {
  if (total === undefined || total <= 0) return `${label}: ${format(done)} ${unit}…`;
  const pct = Math.floor((Math.min(done, total) * 100) / total);
  const eta = leftMs === undefined ? (done >= total ? "done" : "estimating…") : `about ${formatDuration(leftMs)} left`;
  return `${label}: ${format(done)} of ${format(total)} ${unit} (${pct}%), ${eta}`;
}

/** Bytes for people: "812 KB", "3.1 MB". */
export function formatBytes(n: number): string {
  if (n < 1024 * 1024) return `${Math.round(n / 1024)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

/** A progress line with an estimate, throttled. */
export class ProgressMeter {
  private readonly now: () => number;
  private readonly start: number;
  private readonly interval: number;
  private last = -Infinity;
  private lastDone = -Infinity;
  private drawn = false;
  private doneAtStart: number | undefined;

  constructor(private readonly opts: ProgressMeterOptions) {
    this.now = opts.now ?? (() => Date.now());
    this.start = this.now();
    this.interval = opts.intervalMs ?? (opts.out.isTTY === true ? 250 : 1000);
  }

  /** Reports `done` of `total` (total unknown: a count only); writes at most once per interval. */
  update(done: number, total?: number): void {
    if (!this.opts.enabled) return;
    this.doneAtStart ??= done;
    const t = this.now();
    const step = this.opts.stepFraction !== undefined && total !== undefined ? Math.max(1, Math.ceil(total * this.opts.stepFraction)) : Infinity;
    if (t - this.last < this.interval && done - this.lastDone < step) return;
    this.last = t;
    this.lastDone = done;
    const left = total === undefined ? undefined : estimateLeftMs(done, total, t - this.start, this.doneAtStart);
    this.draw(progressText(this.opts.label, this.opts.unit, done, total, left, this.opts.format));
  }

  /** Ends the progress line (a terminal's line is cleared), then writes `line` when given. */
  finish(line?: string): void {
    if (this.drawn && this.opts.out.isTTY === true) this.opts.out.write("\r\x1b[K");
    this.drawn = false;
    if (line !== undefined) this.opts.out.write(`${this.opts.label}: ${line}\n`);
  }

  private draw(text: string): void {
    if (this.opts.out.isTTY === true) {
      this.opts.out.write(`\r\x1b[K${text}`);
      this.drawn = true;
    } else this.opts.out.write(text + "\n");
  }
}
