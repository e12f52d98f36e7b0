/**
 * Supervision of the parts: each runs as a child process (`node kmi.js <part> …`) in its own
 * process group, its stdout and stderr appended to `<data>/logs/<part>.log` and the last lines
 * kept in memory. A part that dies after it was healthy is reported (exit code or signal and
 * its last log lines) and restarted with exponential backoff; `stop()` ends them in reverse
 * start order, SIGTERM first and SIGKILL only after a grace period.
 *
 * Why a process group of their own: Ctrl-C in a terminal signals the whole foreground group.
 * If the parts were in it they would all stop at once, in no order, while `kmi up` still
 * thought them healthy; in their own groups only `kmi up` gets the signal and stops them one
 * after the other (proxy, agent, Auditserver, KDC).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, type WriteStream } from "node:fs";
import { createInterface } from "node:readline";
import { backoffMs } from "../common/backoff.js";
import type { PartId } from "./layout.js";
import type { Progress } from "./progress.js";

/** A parsed JSON log line of a part (fields as the part wrote them). */
export type LogRecord = Record<string, unknown> & { msg?: string; level?: string };

/** How a process ended. */
export interface ExitInfo {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
}

/** One running process of a part, as readiness checks see it. */
export interface PartProcess {
  /** Process id. */
  readonly pid: number;
  /** Resolves once the process exited. */
  readonly exited: Promise<ExitInfo>;
  /** True until the process exited. */
  alive(): boolean;
  /** Resolves with the first log record (from now on, or already seen) that `match` accepts; rejects if the process exits first or `signal` aborts. */
  waitForLog(match: (r: LogRecord) => boolean, signal: AbortSignal): Promise<LogRecord>;
  /** The last log lines, oldest first. */
  tail(n?: number): string[];
}

/** What the supervisor needs to know about a part. */
export interface PartDefinition {
  /** Which part. */
  readonly name: PartId;
  /** The program to run instead of kmi (an etcd member: the system's `etcd`); `args` are then all of its arguments. */
  readonly executable?: string;
  /** The arguments after `kmi` (or `executable`) for a spawn (asked again before every restart). */
  args(): string[] | Promise<string[]>;
  /**
   * Waits until a freshly spawned process serves; resolves with a short description for the
   * progress line ("healthy on 127.0.0.1:7443"). Rejects when `signal` aborts.
   */
  ready(proc: PartProcess, signal: AbortSignal): Promise<string>;
  /**
   * Called with each JSON log record the part writes (what a part wants on the terminal, such
   * as the proxy's `event: "policy-reload-failed"`, is picked out here).
   */
  onLog?(record: LogRecord): void;
}

/** Where a part stands. */
export type PartState = "starting" | "running" | "restarting" | "stopping" | "stopped" | "failed";

/** A part's status as `kmi up` reports it. */
export interface PartStatus {
  readonly name: PartId;
  readonly state: PartState;
  /** Pid of the current process, when one runs. */
  readonly pid: number | undefined;
  /** Restarts since `kmi up` started. */
  readonly restarts: number;
  /** Version from the part's "started" log line. */
  readonly version: string | undefined;
  /** When the current process became healthy. */
  readonly since: Date | undefined;
  /** How the last process ended, if one did. */
  readonly lastExit: (ExitInfo & { at: Date }) | undefined;
}

/** Options of {@link Supervisor}. */
export interface SupervisorOptions {
  /** The command that runs kmi: `[node, /path/to/dist/cmd/kmi.js]`. */
  readonly kmi: readonly string[];
  /** Working directory of the parts. */
  readonly cwd: string;
  /** Environment of the parts. */
  readonly env: Record<string, string>;
  /** Log file of a part. */
  readonly logFile: (part: PartId) => string;
  /** Progress output. */
  readonly progress: Progress;
  /** How long a (re)started part may take to become healthy. */
  readonly readyTimeoutMs: number;
  /** Grace between SIGTERM and SIGKILL at stop. Default 15 s. */
  readonly stopTimeoutMs?: number;
  /** First restart delay; doubles per consecutive failure up to {@link maxBackoffMs}, each drawn in [delay/2, delay]. Default 1 s. */
  readonly initialBackoffMs?: number;
  /** Longest restart delay. Default 30 s. */
  readonly maxBackoffMs?: number;
  /** A process that ran this long before dying resets the backoff. Default 60 s. */
  readonly stableAfterMs?: number;
  /** Called whenever a part's pid or state changes (to rewrite the run-state file); awaited when a part turns healthy. */
  readonly onChange?: () => void | Promise<void>;
}

/** A part failed to become healthy; the message says which and why. */
export class PartStartError extends Error {
  override name = "PartStartError";
  constructor(
    readonly part: PartId,
    message: string,
    /** The part's last log lines. */
    readonly lastLines: string[],
  ) {
    super(message);
  }
}

const TAIL_LINES = 200;

/** One line of a part's log, shortened for a person: `level msg (error)` for JSON lines. */
export function summarizeLogLine(line: string, max = 300): string {
  let out = line;
  if (line.startsWith("{")) {
    try {
      const r = JSON.parse(line) as LogRecord;
      const extra: string[] = [];
      for (const key of ["error", "err", "reason", "problem", "cause"]) {
        const v = r[key];
        if (v === undefined) continue;
        if (typeof v === "string") extra.push(v);
        else if (typeof v === "object" && v !== null && typeof (v as { message?: unknown }).message === "string") extra.push((v as { message: string }).message);
      }
      // An RPC line is only useful with its method and outcome.
      const method = typeof r["method"] === "string" ? ` ${r["method"].replace(/^\/kmi\.|^\//, "")}` : "";
      const code = typeof r["code"] === "string" && method !== "" ? ` ${r["code"]}` : "";
      out = `${r.level ?? "?"} ${r.msg ?? ""}${method}${code}${extra.length > 0 ? `: ${extra.join("; ")}` : ""}`;
    } catch {
      // not JSON after all: keep the line
    }
  }
  return out.length > max ? out.slice(0, max - 1) + "…" : out;
}

/** A part's last log lines for a person: each summarized, repeats folded into one ("(×5)"). */
export function summarizeLogLines(lines: readonly string[]): string[] {
  const out: { text: string; n: number }[] = [];
  for (const l of lines) {
    const text = summarizeLogLine(l);
    const prev = out[out.length - 1];
    if (prev !== undefined && prev.text === text) prev.n++;
    else out.push({ text, n: 1 });
  }
  return out.map((o) => (o.n > 1 ? `${o.text} (×${o.n})` : o.text));
}

/** How an exit reads: "exited with code 1", "killed by SIGKILL". */
export function describeExit(e: ExitInfo): string {
  if (e.signal !== null) return `killed by ${e.signal}`;
  return `exited with code ${e.code ?? "?"}`;
}

function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms} ms`;
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s} s`;
  const m = Math.floor(s / 60);
  return m < 120 ? `${m} min ${s % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** A spawned process with its log plumbing. */
class ChildHandle implements PartProcess {
  readonly pid: number;
  readonly exited: Promise<ExitInfo>;
  private readonly lines: string[] = [];
  private readonly records: LogRecord[] = [];
  private readonly waiters = new Set<() => void>();
  private done = false;

  constructor(
    readonly child: ChildProcess,
    shared: { tail: string[]; readonly def?: Pick<PartDefinition, "onLog"> },
    log: WriteStream,
  ) {
    if (child.pid === undefined) throw new Error("spawn failed: no pid");
    this.pid = child.pid;
    const onLine = (line: string) => {
      log.write(line + "\n");
      this.lines.push(line);
      if (this.lines.length > TAIL_LINES) this.lines.shift();
      shared.tail.push(line);
      if (shared.tail.length > TAIL_LINES) shared.tail.shift();
      if (line.startsWith("{")) {
        try {
          const record = JSON.parse(line) as LogRecord;
          this.records.push(record);
          if (this.records.length > 1000) this.records.shift();
          shared.def?.onLog?.(record);
        } catch {
          // a partial or non-JSON line is kept as text only
        }
      }
      for (const w of [...this.waiters]) w();
    };
    for (const stream of [child.stdout, child.stderr]) {
      if (stream !== null) createInterface({ input: stream, crlfDelay: Infinity }).on("line", onLine);
    }
    this.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        this.done = true;
        resolve({ code, signal });
        // Let the pipes drain their last lines before waiters give up.
        setImmediate(() => {
          for (const w of [...this.waiters]) w();
        });
      });
    });
  }

  alive(): boolean {
    return !this.done;
  }

  tail(n = 8): string[] {
    return this.lines.slice(-n);
  }

  waitForLog(match: (r: LogRecord) => boolean, signal: AbortSignal): Promise<LogRecord> {
    return new Promise((resolve, reject) => {
      let seen = 0;
      const check = () => {
        for (; seen < this.records.length; seen++) {
          const r = this.records[seen]!;
          if (match(r)) {
            cleanup();
            resolve(r);
            return;
          }
        }
        if (signal.aborted) {
          cleanup();
          reject(signal.reason instanceof Error ? signal.reason : new Error("aborted"));
        } else if (this.done) {
          cleanup();
          reject(new Error("the process exited"));
        }
      };
      const cleanup = () => {
        this.waiters.delete(check);
        signal.removeEventListener("abort", check);
      };
      this.waiters.add(check);
      signal.addEventListener("abort", check);
      check();
    });
  }
}

interface PartEntry {
  readonly def: PartDefinition;
  state: PartState;
  proc: ChildHandle | undefined;
  restarts: number;
  failures: number;
  version: string | undefined;
  since: Date | undefined;
  spawnedAt: number;
  lastExit: (ExitInfo & { at: Date }) | undefined;
  readonly tail: string[];
  log: WriteStream;
}

/** Starts, watches, restarts and stops the parts. */
export class Supervisor {
  private readonly parts: PartEntry[] = [];
  private stopping = false;
  private readonly stopController = new AbortController();
  private readonly loops: Promise<void>[] = [];

  constructor(private readonly opts: SupervisorOptions) {}

  /** The status of every part started so far, in start order. */
  statuses(): PartStatus[] {
    return this.parts.map((p) => ({
      name: p.def.name,
      state: p.state,
      pid: p.proc?.alive() === true ? p.proc.pid : undefined,
      restarts: p.restarts,
      version: p.version,
      since: p.since,
      lastExit: p.lastExit,
    }));
  }

  /** The status of one part, if it was started. */
  status(name: PartId): PartStatus | undefined {
    return this.statuses().find((s) => s.name === name);
  }

  /** Pids of every live part process (for a last-resort kill on exit). */
  livePids(): number[] {
    return this.parts.flatMap((p) => (p.proc?.alive() === true ? [p.proc.pid] : []));
  }

  /** The current process of a part (for health checks). */
  process(name: PartId): PartProcess | undefined {
    return this.parts.find((p) => p.def.name === name)?.proc;
  }

  /**
   * Spawns a part and waits until it is healthy; from then on it is restarted when it dies.
   * Throws {@link PartStartError} (with its last log lines) when it exits or times out first;
   * the process is then killed.
   */
  async start(def: PartDefinition): Promise<string> {
    if (this.stopping) throw new PartStartError(def.name, "not started: kmi up is stopping", []);
    const entry: PartEntry = {
      def,
      state: "starting",
      proc: undefined,
      restarts: 0,
      failures: 0,
      version: undefined,
      since: undefined,
      spawnedAt: 0,
      lastExit: undefined,
      tail: [],
      log: createWriteStream(this.opts.logFile(def.name), { flags: "a", mode: 0o600 }),
    };
    entry.log.on("error", () => undefined);
    this.parts.push(entry);
    const outcome = await this.spawnAndWait(entry);
    if (outcome.ok) {
      this.loops.push(this.superviseLoop(entry));
      return outcome.description;
    }
    entry.state = "failed";
    this.opts.onChange?.();
    throw new PartStartError(def.name, outcome.reason, outcome.lastLines);
  }

  private async spawnAndWait(entry: PartEntry): Promise<{ ok: true; description: string } | { ok: false; reason: string; lastLines: string[] }> {
    const args = await entry.def.args();
    const [cmd, ...pre] = entry.def.executable !== undefined ? [entry.def.executable] : this.opts.kmi;
    const child = spawn(cmd!, [...pre, ...args], {
      cwd: this.opts.cwd,
      env: this.opts.env,
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
    });
    const spawnError = new Promise<Error>((resolve) => child.once("error", resolve));
    if (child.pid === undefined) {
      const err = await spawnError;
      return { ok: false, reason: `could not start: ${err.message}`, lastLines: [] };
    }
    entry.log.write(
      JSON.stringify({ time: new Date().toISOString(), level: "info", msg: "kmi up: process started", program: "up", part: entry.def.name, pid: child.pid, args }) + "\n",
    );
    const proc = new ChildHandle(child, entry, entry.log);
    entry.proc = proc;
    entry.spawnedAt = Date.now();
    entry.since = undefined;
    this.opts.onChange?.();
    // The version every part logs on its "started" line.
    void proc
      .waitForLog((r) => r.msg === "started" && typeof r["version"] === "string", this.stopController.signal)
      .then((r) => (entry.version = r["version"] as string))
      .catch(() => undefined);

    const ready = new AbortController();
    const timer = setTimeout(() => ready.abort(new Error(`not healthy after ${formatDuration(this.opts.readyTimeoutMs)}`)), this.opts.readyTimeoutMs);
    const onStop = () => ready.abort(new Error("kmi up is stopping"));
    this.stopController.signal.addEventListener("abort", onStop);
    try {
      const description = await Promise.race([
        entry.def.ready(proc, ready.signal),
        proc.exited.then((e) => {
          throw new Error(`${describeExit(e)} before it was healthy`);
        }),
      ]);
      entry.state = "running";
      entry.since = new Date();
      // Whoever reads the run-state file after "healthy"/"back" is printed sees the new pid.
      await this.opts.onChange?.();
      return { ok: true, description };
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      // When kmi up is stopping, stop() ends the process the gentle way (SIGTERM).
      if (proc.alive() && !this.stopping) {
        child.kill("SIGKILL");
        await proc.exited;
      }
      // Give the pipes a moment to deliver the last lines (the reason is usually there).
      await new Promise((r) => setTimeout(r, 50));
      return { ok: false, reason, lastLines: proc.tail(12) };
    } finally {
      clearTimeout(timer);
      this.stopController.signal.removeEventListener("abort", onStop);
    }
  }

  /** Watches a healthy part; reports and restarts it when it dies, until stop(). */
  private async superviseLoop(entry: PartEntry): Promise<void> {
    const { progress } = this.opts;
    const name = entry.def.name;
    for (;;) {
      const proc = entry.proc!;
      const exit = await proc.exited;
      if (this.stopping) return;
      const ranMs = Date.now() - entry.spawnedAt;
      entry.lastExit = { ...exit, at: new Date() };
      entry.failures = ranMs >= (this.opts.stableAfterMs ?? 60_000) ? 1 : entry.failures + 1;
      // Jittered (src/common/backoff.ts): parts that died together do not all come back at once.
      const delay = backoffMs(entry.failures, this.opts.initialBackoffMs ?? 1000, this.opts.maxBackoffMs ?? 30_000);
      entry.state = "restarting";
      this.opts.onChange?.();
      await new Promise((r) => setTimeout(r, 50));
      progress.error(name, `died: ${describeExit(exit)} after ${formatDuration(ranMs)} (pid ${proc.pid}); its last log lines (${this.opts.logFile(name)}):`);
      progress.detail(summarizeLogLines(proc.tail(6)).map((l) => "  " + l));
      progress.step(name, `restarting in ${formatDuration(delay)} (restart ${entry.restarts + 1})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, delay);
        this.stopController.signal.addEventListener("abort", () => {
          clearTimeout(t);
          resolve();
        });
      });
      if (this.stopping) return;
      entry.restarts++;
      const outcome = await this.spawnAndWait(entry);
      if (this.stopping) return;
      if (outcome.ok) {
        progress.step(name, `back: ${outcome.description} (pid ${entry.proc!.pid})`);
      } else {
        progress.error(name, `restart failed: ${outcome.reason}`);
        // The loop sees the exit (the process was killed) and backs off further.
      }
    }
  }

  /**
   * Stops every part in reverse start order: SIGTERM, then SIGKILL after the grace period.
   * Resolves once every process exited, with the parts that had to be killed.
   */
  async stop(): Promise<PartId[]> {
    this.stopping = true;
    this.stopController.abort(new Error("kmi up is stopping"));
    const killed: PartId[] = [];
    for (const entry of [...this.parts].reverse()) {
      const proc = entry.proc;
      const name = entry.def.name;
      if (proc === undefined || !proc.alive()) {
        entry.state = "stopped";
        continue;
      }
      entry.state = "stopping";
      this.opts.onChange?.();
      this.opts.progress.step(name, `stopping (pid ${proc.pid})…`);
      proc.child.kill("SIGTERM");
      const grace = this.opts.stopTimeoutMs ?? 15_000;
      let timer: NodeJS.Timeout | undefined;
      const exit = await Promise.race([proc.exited, new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), grace)))]);
      clearTimeout(timer);
      if (exit === undefined) {
        this.opts.progress.warn(name, `still running ${formatDuration(grace)} after SIGTERM; sending SIGKILL`);
        proc.child.kill("SIGKILL");
        await proc.exited;
        killed.push(name);
      } else if (exit.code !== 0 && exit.signal !== "SIGTERM") {
        // (killed by SIGTERM: the part was stopped before it had set up its signal handling)
        this.opts.progress.warn(name, `${describeExit(exit)} while stopping; see ${this.opts.logFile(name)}`);
      }
      entry.state = "stopped";
      this.opts.onChange?.();
    }
    await Promise.all(this.loops);
    for (const entry of this.parts) await new Promise<void>((r) => entry.log.end(r));
    return killed;
  }

  /** Last resort when `kmi up` itself exits unexpectedly: SIGTERM every live part (synchronous). */
  terminateAll(): void {
    for (const entry of this.parts) {
      if (entry.proc?.alive() === true) {
        try {
          entry.proc.child.kill("SIGTERM");
        } catch {
          // already gone
        }
      }
    }
  }
}
