/**
 * The bench's helper processes (agent, origin, proxy, load generator): forked with an IPC
 * channel, asked to do things with request/response messages, and always stopped at the end
 * (a clean "stop" first, SIGKILL after a deadline; every child still alive when the bench
 * exits is killed).
 */
import { fork, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";

/** A message from parent to child. */
export interface Request {
  readonly id: number;
  readonly cmd: string;
  readonly args?: unknown;
}

/** A message from child to parent. */
export type Reply = { readonly id: number; readonly ok: true; readonly result: unknown } | { readonly id: number; readonly ok: false; readonly error: string };

/** First message of a child: it is up. */
export interface Ready {
  readonly ready: true;
  readonly info: unknown;
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const c of live) {
      try {
        c.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
  });
}

/** Options of {@link startChild}. */
export interface StartChildOptions {
  /** Extra node flags (`--cpu-prof`, `--cpu-prof-dir=…`). */
  readonly execArgv?: readonly string[];
  /** How long the child has to say it is ready; default 30 s. */
  readonly readyTimeoutMs?: number;
}

/** A running helper process. */
export class Child<Info = unknown> {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private stderrTail = "";
  private exited: Promise<void>;

  private constructor(
    /** Name, for messages. */
    readonly name: string,
    /** The process. */
    readonly proc: ChildProcess,
    /** What the child said when ready. */
    public info: Info,
  ) {
    this.exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
  }

  /** Forks `bench/children/<name>.js` with `config` as its argument and waits for its ready message. */
  static async start<Info>(name: string, config: unknown, options: StartChildOptions = {}): Promise<Child<Info>> {
    installExitHook();
    const script = fileURLToPath(new URL(`../children/${name}.js`, import.meta.url));
    const proc = fork(script, [JSON.stringify(config ?? {})], {
      stdio: ["ignore", "ignore", "pipe", "ipc"],
      execArgv: [...(options.execArgv ?? [])],
      serialization: "advanced",
    });
    live.add(proc);
    proc.once("exit", () => live.delete(proc));
    const child = new Child<Info>(name, proc, undefined as Info);
    proc.stderr?.on("data", (b: Buffer) => {
      child.stderrTail = (child.stderrTail + b.toString()).slice(-4000);
    });
    proc.on("message", (m: unknown) => child.onMessage(m));
    proc.once("exit", (code, signal) => {
      for (const p of child.pending.values()) p.reject(new Error(`${name} exited (${code ?? signal}) during a request: ${child.stderrTail.trim()}`));
      child.pending.clear();
    });
    const timeoutMs = options.readyTimeoutMs ?? 90_000;
    try {
      child.info = await new Promise<Info>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`${name} did not start within ${timeoutMs} ms: ${child.stderrTail.trim()}`)), timeoutMs);
        const onMsg = (m: unknown) => {
          if (typeof m === "object" && m !== null && (m as Ready).ready === true) {
            clearTimeout(timer);
            proc.off("message", onMsg);
            resolve((m as Ready).info as Info);
          }
        };
        proc.on("message", onMsg);
        proc.once("exit", (code, signal) => {
          clearTimeout(timer);
          reject(new Error(`${name} exited (${code ?? signal}) before it was ready: ${child.stderrTail.trim()}`));
        });
      });
    } catch (err) {
      // A child that is late must not finish starting (and bind sockets) after the run gave up on it.
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGKILL");
        await child.exited;
      }
      throw err;
    }
    return child;
  }

  private onMessage(m: unknown): void {
    if (typeof m !== "object" || m === null || !("id" in m)) return;
    const r = m as Reply;
    const p = this.pending.get(r.id);
    if (p === undefined) return;
    this.pending.delete(r.id);
    if (r.ok) p.resolve(r.result);
    else p.reject(new Error(`${this.name}: ${r.error}`));
  }

  /** Sends a command and resolves with the child's answer (rejects after `timeoutMs`, default 5 minutes). */
  call<T = unknown>(cmd: string, args?: unknown, timeoutMs = 300_000): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      if (!this.proc.connected) {
        reject(new Error(`${this.name} is not running: ${this.stderrTail.trim()}`));
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${this.name} did not answer "${cmd}" within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          (resolve as (v: unknown) => void)(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.proc.send({ id, cmd, args } satisfies Request);
    });
  }

  /** The process id. */
  get pid(): number {
    return this.proc.pid ?? -1;
  }

  /** The last lines the child wrote to stderr. */
  get stderr(): string {
    return this.stderrTail;
  }

  /** Asks the child to stop cleanly (it closes its servers and exits); kills it after `timeoutMs`. */
  async stop(timeoutMs = 10_000): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), timeoutMs);
    try {
      if (this.proc.connected) {
        await this.call("stop").catch(() => undefined);
      } else {
        this.proc.kill("SIGTERM");
      }
      await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }
}
