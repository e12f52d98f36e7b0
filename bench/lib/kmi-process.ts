/**
 * kmi programs as a user starts them (the built dist/cmd/kmi.js), for the rows that measure a
 * whole program rather than a class in a bench child: started with a clean environment (no
 * KMI_* variables of the caller), ready once they log "started", stopped with a signal.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";

/** The built CLI. */
export const KMI = fileURLToPath(new URL("../../cmd/kmi.js", import.meta.url));

/** The caller's environment without KMI_* (a bench run must not pick up an operator's settings), plus `extra`. */
export function cleanEnv(extra: Readonly<Record<string, string>> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("KMI_")) env[k] = v;
  return { ...env, ...extra };
}

/** Runs `kmi <args>` to completion (environment: {@link cleanEnv} plus `extraEnv`); its stdout, or throws with its stderr unless it exits 0. */
export function runKmi(args: string[], extraEnv: Readonly<Record<string, string>> = {}): Promise<string> {
  return new Promise((res, rej) => {
    const c = spawn(process.execPath, [KMI, ...args], { env: cleanEnv(extraEnv), stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    c.stdout!.on("data", (d: Buffer) => (out += d.toString()));
    c.stderr!.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-20_000)));
    c.once("close", (code) => (code === 0 ? res(out) : rej(new Error(`kmi ${args.slice(0, 2).join(" ")} exited ${code}: ${err.slice(-600)}`))));
  });
}

/** A long-running kmi program. */
export interface KmiProcess {
  readonly child: ChildProcess;
  /** The line (JSON) that said it started. */
  readonly started: string;
  kill(signal: NodeJS.Signals): Promise<void>;
}

/**
 * Starts `kmi <args>` (environment: {@link cleanEnv} plus `extraEnv`) and resolves once a
 * stderr line matches `ready` (default: a "started" line); rejects with its last stderr when it
 * exits first or takes longer than 30 s.
 */
export async function startKmi(args: string[], what: string, ready = /"msg":"started"/, extraEnv: Readonly<Record<string, string>> = {}): Promise<KmiProcess> {
  const child = spawn(process.execPath, [KMI, ...args], { env: cleanEnv(extraEnv), stdio: ["ignore", "ignore", "pipe"] });
  const exited = new Promise<void>((res) => child.once("exit", () => res()));
  let err = "";
  const started = await new Promise<string>((res, rej) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      rej(new Error(`${what} did not start in 30 s: ${err.slice(-600)}`));
    }, 30_000);
    child.stderr!.on("data", (b: Buffer) => {
      err = (err + b.toString()).slice(-20_000);
      const line = err.split("\n").find((l) => ready.test(l));
      if (line !== undefined) {
        clearTimeout(timer);
        res(line);
      }
    });
    void exited.then(() => {
      clearTimeout(timer);
      rej(new Error(`${what} exited before it started: ${err.slice(-600)}`));
    });
  });
  return {
    child,
    started,
    async kill(signal) {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(signal);
      await exited;
    },
  };
}
