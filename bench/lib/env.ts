/**
 * What the rows of one run share: the mode (quick or full), durations, a temp directory, and
 * the helper processes, started on first use and all stopped at the end.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Child, type StartChildOptions } from "./child.js";

/** How long and how often each figure is measured. */
export interface Budget {
  /** Measured window of one repeat of one configuration, ms. */
  readonly windowMs: number;
  /** Repeats of each figure. */
  readonly repeats: number;
  /** Connections per repeat of the leaf-minting row. */
  readonly mintSamples: number;
}

/** Budgets: `--quick` keeps each benchmark to about a second or two. */
export const BUDGETS: Record<"quick" | "full", Budget> = {
  quick: { windowMs: 250, repeats: 1, mintSamples: 15 },
  full: { windowMs: 2000, repeats: 3, mintSamples: 100 },
};

/** The run's shared state. */
export class Env {
  private readonly children = new Map<string, Promise<Child>>();
  private readonly extra: Child[] = [];
  private readonly cleanups: (() => Promise<void>)[] = [];

  private constructor(
    /** quick or full. */
    readonly mode: "quick" | "full",
    /** Durations. */
    readonly budget: Budget,
    /** Temp directory of the run. */
    readonly dir: string,
    /** Write progress lines to stderr. */
    readonly verbose: boolean,
    /** Take a CPU profile where a target is missed. */
    readonly profile: boolean,
    /** Watch sessions of the rotation fan-out over replicas (row 9), when not its default (`--sessions`). */
    readonly sessions: number | undefined,
    /** Sessions on the killed replica of the reattachment row (row 11), when not its default (`--agents`). */
    readonly agents: number | undefined,
  ) {}

  /** Makes the temp directory. */
  static async create(mode: "quick" | "full", verbose: boolean, profile: boolean, sessions?: number, agents?: number): Promise<Env> {
    // Short path: Unix socket paths are limited to 107 bytes.
    const dir = await mkdtemp(join(tmpdir(), "kmi-bench-"));
    return new Env(mode, BUDGETS[mode], dir, verbose, profile, sessions, agents);
  }

  /** The helper process `name`, started once with `config` (later calls share it). */
  shared<Info>(name: string, config: () => unknown, options?: StartChildOptions): Promise<Child<Info>> {
    let p = this.children.get(name);
    if (p === undefined) {
      p = Child.start<unknown>(name, config(), options);
      this.children.set(name, p);
      p.catch(() => this.children.delete(name));
    }
    return p as Promise<Child<Info>>;
  }

  /** A helper process of its own (stopped at the end unless stopped before). */
  async own<Info>(name: string, config: unknown, options?: StartChildOptions): Promise<Child<Info>> {
    const c = await Child.start<Info>(name, config, options);
    this.extra.push(c as Child);
    return c;
  }

  private readonly memos = new Map<string, Promise<unknown>>();
  private readonly counters = new Map<string, number>();

  /** A run-wide counter: returns its value (starting at `start`), then adds `step`. */
  counter(name: string, start = 0, step = 1): number {
    const v = this.counters.get(name) ?? start;
    this.counters.set(name, v + step);
    return v;
  }

  /** A resource made once per run by `make` (later calls share it, or its failure), closed at the end. */
  memo<T>(key: string, make: () => Promise<T>, close: (t: T) => Promise<void>): Promise<T> {
    let p = this.memos.get(key) as Promise<T> | undefined;
    if (p === undefined) {
      p = make();
      this.memos.set(key, p);
      p.then(
        (t) => this.onClose(() => close(t)),
        () => undefined,
      );
    }
    return p;
  }

  /** Runs `fn` at the end (servers the run started itself). */
  onClose(fn: () => Promise<void>): void {
    this.cleanups.push(fn);
  }

  /** A progress line. */
  log(msg: string): void {
    if (this.verbose) process.stderr.write(`  · ${msg}\n`);
  }

  /** Stops every helper process and server, removes the temp directory. */
  async close(): Promise<void> {
    for (const fn of this.cleanups.reverse()) await fn().catch(() => undefined);
    const all: Child[] = [...this.extra];
    for (const p of this.children.values()) {
      const c = await p.catch(() => undefined);
      if (c !== undefined) all.push(c);
    }
    // The proxy first (it holds connections to the agent and the origin), then the rest.
    all.sort((a, b) => (a.name === "proxy" ? -1 : b.name === "proxy" ? 1 : 0));
    for (const c of all) await c.stop().catch(() => undefined);
    await rm(this.dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
  }
}
