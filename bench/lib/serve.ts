/**
 * The child side of bench/lib/child.ts: read the config argument, announce readiness, answer
 * commands, and on "stop" close everything and exit (exiting normally also writes a
 * `--cpu-prof` profile).
 */
import { writeFile } from "node:fs/promises";
import { Session } from "node:inspector";
import type { Reply, Request } from "./child.js";

/** A command handler: gets the command's args, returns the answer. */
export type Handler = (args: unknown) => unknown;

/** The config the parent passed (first argument, JSON). */
export function childConfig<T>(): T {
  return JSON.parse(process.argv[2] ?? "{}") as T;
}

function send(msg: unknown): Promise<void> {
  return new Promise((resolve) => {
    if (process.send === undefined || !process.connected) return resolve();
    process.send(msg, undefined, {}, () => resolve());
  });
}

/** Posts an inspector command. */
function post<T>(session: Session, method: string, params?: object): Promise<T> {
  return new Promise((resolve, reject) => session.post(method, params ?? {}, (err, res) => (err ? reject(err) : resolve(res as T))));
}

/**
 * CPU profiling of this process on command (V8's sampling profiler through node:inspector,
 * the same profiler as `--cpu-prof`), so that only the measured window is profiled.
 */
function profilerHandlers(): Record<string, Handler> {
  let session: Session | undefined;
  return {
    "profile:start": async () => {
      session = new Session();
      session.connect();
      await post(session, "Profiler.enable");
      await post(session, "Profiler.setSamplingInterval", { interval: 200 });
      await post(session, "Profiler.start");
      return null;
    },
    "profile:stop": async (args) => {
      if (session === undefined) throw new Error("profile:stop without profile:start");
      const { profile } = await post<{ profile: unknown }>(session, "Profiler.stop");
      session.disconnect();
      session = undefined;
      await writeFile((args as { path: string }).path, JSON.stringify(profile));
      return null;
    },
  };
}

/**
 * Announces `info` to the parent and serves `handlers` (plus `profile:start` / `profile:stop`);
 * `stop` closes the child's servers. If the parent goes away, the child stops too.
 */
export async function serveParent(info: unknown, handlers: Record<string, Handler>, stop: () => Promise<void>): Promise<void> {
  let stopping = false;
  const profiling = profilerHandlers();
  const shutdown = async (): Promise<void> => {
    if (stopping) return;
    stopping = true;
    try {
      await stop();
    } catch (err) {
      process.stderr.write(`stop failed: ${(err as Error).message}\n`);
    }
  };
  process.on("disconnect", () => {
    void shutdown().then(() => process.exit(0));
  });
  process.on("message", (m: Request) => {
    void (async () => {
      if (m.cmd === "stop") {
        await shutdown();
        await send({ id: m.id, ok: true, result: null } satisfies Reply);
        process.exit(0);
      }
      const h = handlers[m.cmd] ?? profiling[m.cmd];
      let reply: Reply;
      if (h === undefined) reply = { id: m.id, ok: false, error: `unknown command ${m.cmd}` };
      else {
        try {
          reply = { id: m.id, ok: true, result: await h(m.args) };
        } catch (err) {
          reply = { id: m.id, ok: false, error: err instanceof Error ? `${err.message}\n${err.stack ?? ""}` : String(err) };
        }
      }
      await send(reply);
    })();
  });
  await send({ ready: true, info });
}

/** Fails the child with a message on stderr (the parent shows it). */
export function dieOnError(p: Promise<unknown>): void {
  p.catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  });
}

/** The peak resident set of this process (VmHWM), bytes; undefined where /proc is missing. */
export async function peakRss(pid: number | "self" = "self"): Promise<number | undefined> {
  const { readFile } = await import("node:fs/promises");
  try {
    const text = await readFile(`/proc/${pid}/status`, "utf8");
    const m = /VmHWM:\s+(\d+)\s+kB/.exec(text);
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** Resets the peak resident set of a process (Linux: write 5 to clear_refs); false when not possible. */
export async function resetPeakRss(pid: number | "self" = "self"): Promise<boolean> {
  const { writeFile } = await import("node:fs/promises");
  try {
    await writeFile(`/proc/${pid}/clear_refs`, "5");
    return true;
  } catch {
    return false;
  }
}
