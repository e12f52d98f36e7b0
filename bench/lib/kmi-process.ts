/**
 * kmi programs as a user starts them (the built dist/cmd/kmi.js), for the rows that measure a
 * whole program rather than a class in a bench child: started with a clean environment (no
 * KMI_* variables of the caller), ready once they log "started", stopped with a signal.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";

/** The built CLI. */
export const KMI = fileURLToPath(new URL("../../cmd/kmi.js", import.meta.url));

/** The caller's environment without KMI_* (a bench run must not pick up an operator's settings). */
export function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("KMI_")) env[k] = v;
  return env;
}

/** A long-running kmi program. */
export interface KmiProcess {
  readonly child: ChildProcess;
  /** The line (JSON) that said it started. */
  readonly started: string;
  kill(signal: NodeJS.Signals): Promise<void>;
}

/**
 * Starts `kmi <args>` and resolves once a stderr line matches `ready` (default: a "started"
 * line); rejects with its last stderr when it exits first or takes longer than 30 s.
 */
export async function startKmi(args: string[], what: string, ready = /"msg":"started"/): Promise<KmiProcess> {
  const child = spawn(process.execPath, [KMI, ...args], { env: cleanEnv(), stdio: ["ignore", "ignore", "pipe"] });
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
