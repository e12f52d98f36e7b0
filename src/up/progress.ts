/**
 * The lines `kmi up` prints while it works: one line per step, `HH:MM:SS part: what`, so the
 * output reads the same in a terminal and in a log file. On a terminal the part name is
 * coloured; nothing else differs (no cursor movement, no spinners, no rewriting of lines), so a
 * copy of the terminal is a faithful log.
 */

/** Where progress goes and how it looks. */
export interface ProgressOptions {
  /** Writes text (a whole line, newline included). */
  readonly write: (text: string) => void;
  /** Colour the part names (a terminal without NO_COLOR). */
  readonly color: boolean;
  /** Clock, for tests. */
  readonly now?: () => Date;
}

const COLORS: Record<string, string> = {
  kdc: "\x1b[35m",
  audit: "\x1b[34m",
  agent: "\x1b[36m",
  proxy: "\x1b[32m",
  etcd: "\x1b[94m",
  up: "\x1b[1m",
};
const RESET = "\x1b[0m";
const WARN = "\x1b[33m";
const ERROR = "\x1b[31m";

/** Prints progress lines. */
export class Progress {
  private readonly now: () => Date;

  constructor(private readonly opts: ProgressOptions) {
    this.now = opts.now ?? (() => new Date());
  }

  private stamp(): string {
    const d = this.now();
    const p = (n: number) => String(n).padStart(2, "0");
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  private format(part: string, text: string, tone?: string): string {
    // A replica (kdc-2) or an etcd member (etcd-1) takes its program's colour.
    const name = this.opts.color ? `${COLORS[part] ?? COLORS[part.replace(/-\d+$/, "")] ?? ""}${part}${RESET}` : part;
    const body = this.opts.color && tone !== undefined ? `${tone}${text}${RESET}` : text;
    return `${this.stamp()} ${name}: ${body}\n`;
  }

  private line(part: string, text: string, tone?: string): void {
    this.opts.write(this.format(part, text, tone));
  }

  /** A step of `part` ("kdc", "audit", "agent", "proxy" or "up"). */
  step(part: string, text: string): void {
    this.line(part, text);
  }

  /** A step followed by a block of text, written at once (a reader never sees the step without the block). */
  stepWith(part: string, text: string, block: string): void {
    this.opts.write(this.format(part, text) + (block.endsWith("\n") ? block : block + "\n"));
  }

  /** Something the operator should look at. */
  warn(part: string, text: string): void {
    this.line(part, `warning: ${text}`, WARN);
  }

  /** A failure. */
  error(part: string, text: string): void {
    this.line(part, text, ERROR);
  }

  /** Indented detail lines under the previous step (e.g. a part's last log lines). */
  detail(lines: readonly string[]): void {
    for (const l of lines) this.opts.write(`         ${l}\n`);
  }

  /** Text as is (the banner). */
  raw(text: string): void {
    this.opts.write(text.endsWith("\n") ? text : text + "\n");
  }
}
