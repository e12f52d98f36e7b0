/**
 * Test helpers: temporary directories, running commands, spawning long-lived processes and
 * waiting for them to say something.
 */
import { spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A temporary directory, removed by `cleanup()`. */
export interface TempDir {
  /** Absolute path. */
  readonly path: string;
  /** Removes the directory and everything in it. */
  cleanup(): Promise<void>;
}

/** Creates a temporary directory (mode 0700) under the OS temp dir. */
export async function makeTempDir(prefix = "kmi-test-"): Promise<TempDir> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  return { path, cleanup: () => rm(path, { recursive: true, force: true }) };
}

/** Result of {@link run}. */
export interface RunResult {
  /** Exit code (null when killed by a signal). */
  code: number | null;
  /** Signal that ended the process, if any. */
  signal: NodeJS.Signals | null;
  /** Everything written to stdout. */
  stdout: string;
  /** Everything written to stderr. */
  stderr: string;
}

/** Options of {@link run}. */
export interface RunOptions {
  /** Working directory. */
  cwd?: string;
  /** Extra environment variables. */
  env?: Record<string, string>;
  /** Standard input. */
  input?: string | Uint8Array;
  /** Kill after this many ms (default 30 s). */
  timeoutMs?: number;
}

/** Runs a command to completion and collects its output; never throws for a non-zero exit. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const spawnOpts: SpawnOptions = { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, ...opts.env } };
    if (opts.cwd !== undefined) spawnOpts.cwd = opts.cwd;
    const child = spawn(cmd, args, spawnOpts);
    let stdout = "";
    let stderr = "";
    child.stdout?.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr?.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs ?? 30_000);
    child.once("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin?.end(opts.input);
  });
}

/** A spawned long-lived process with its output so far. */
export interface Spawned {
  /** The child process. */
  readonly child: ChildProcess;
  /** stdout so far. */
  stdout(): string;
  /** stderr so far. */
  stderr(): string;
  /** Resolves with the first line of `stream` (default stdout) that matches, or rejects on exit or timeout. */
  waitForLine(match: RegExp, timeoutMs?: number, stream?: "stdout" | "stderr"): Promise<string>;
  /** Resolves with the exit code and signal. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Kills the process (SIGKILL) if it still runs. */
  kill(): void;
}

/** Spawns a long-lived process (a server) and keeps its output. */
export function spawnProcess(cmd: string, args: readonly string[], opts: RunOptions = {}): Spawned {
  const spawnOpts: SpawnOptions = { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...opts.env } };
  if (opts.cwd !== undefined) spawnOpts.cwd = opts.cwd;
  const child = spawn(cmd, args, spawnOpts);
  let out = "";
  let err = "";
  const waiters = new Set<() => void>();
  child.stdout?.setEncoding("utf8").on("data", (d: string) => {
    out += d;
    for (const w of [...waiters]) w();
  });
  child.stderr?.setEncoding("utf8").on("data", (d: string) => {
    err += d;
    for (const w of [...waiters]) w();
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once("exit", (code, signal) => {
      resolve({ code, signal });
      for (const w of [...waiters]) w();
    });
  });
  let done = false;
  void exited.then(() => (done = true));
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    exited,
    kill() {
      if (!done) child.kill("SIGKILL");
    },
    waitForLine(match, timeoutMs = 20_000, stream = "stdout") {
      return new Promise((resolve, reject) => {
        const check = () => {
          const line = (stream === "stdout" ? out : err).split("\n").find((l) => match.test(l));
          if (line !== undefined) {
            cleanup();
            resolve(line);
          } else if (done || child.exitCode !== null) {
            cleanup();
            reject(new Error(`process exited before printing ${match}; stderr:\n${err}`));
          }
        };
        const timer = setTimeout(() => {
          cleanup();
          reject(new Error(`timed out waiting for ${match}; stdout:\n${out}\nstderr:\n${err}`));
        }, timeoutMs);
        const cleanup = () => {
          clearTimeout(timer);
          waiters.delete(check);
        };
        waiters.add(check);
        check();
      });
    },
  };
}

/** Polls `fn` until it returns a value other than undefined, or throws after `timeoutMs`. */
export async function waitFor<T>(fn: () => T | undefined | Promise<T | undefined>, timeoutMs = 10_000, what = "condition"): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** True while process `pid` exists (also when it is another user's: EPERM). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}
