/**
 * Runs a server until SIGTERM or SIGINT, then shuts it down gracefully and exits 0. A second
 * signal during the shutdown exits at once (code 1).
 */
import type { Logger } from "./logger.js";
import { VERSION } from "./version.js";

/** Something with the server lifecycle: `start()` binds, `destroy()` drains and closes. */
export interface Runnable<A = unknown> {
  /** Starts serving; resolves with what was bound. */
  start(): Promise<A>;
  /** Stops gracefully. */
  destroy(): Promise<void>;
}

/** Options of {@link runUntilSignal}. */
export interface RunUntilSignalOptions<A> {
  /** Logs start and stop. */
  logger: Logger;
  /** Signals that stop the server; default SIGTERM and SIGINT. */
  signals?: NodeJS.Signals[];
  /** Called once the server is started, with what `start()` returned (print addresses, write a ready file). */
  onStarted?: (bound: A) => void | Promise<void>;
  /** Run after the server stopped, before exit (close the store, the metrics endpoint). */
  onStopped?: () => void | Promise<void>;
  /** Exits the process; default `process.exit`. Tests pass a recorder. */
  exit?: (code: number) => void;
  /** Where signals come from; default `process`. */
  signalSource?: NodeJS.EventEmitter;
}

/**
 * Starts `server`, waits for a signal, destroys it and exits 0 (1 if the shutdown failed, or on a
 * second signal). Resolves with the exit code after calling `exit` (useful when `exit` does not
 * end the process, as in tests). Start failures reject, so the caller prints one line and exits 1.
 */
export async function runUntilSignal<A>(server: Runnable<A>, options: RunUntilSignalOptions<A>): Promise<number> {
  const { logger } = options;
  const signals = options.signals ?? ["SIGTERM", "SIGINT"];
  const source = options.signalSource ?? process;
  const exit = options.exit ?? ((code: number) => process.exit(code));

  // One handler per signal for the whole run: the first signal starts the shutdown, a second
  // one forces the exit. Keeping the handlers installed avoids a window with the default action.
  let forced = false;
  let first: ((s: NodeJS.Signals) => void) | undefined;
  const handlers = signals.map((s) => {
    const h = () => {
      if (first !== undefined) {
        const f = first;
        first = undefined;
        f(s);
        return;
      }
      forced = true;
      logger.warn("second signal; exiting without waiting for in-flight calls", { signal: s });
      exit(1);
    };
    source.on(s, h);
    return [s, h] as const;
  });
  const signalled = new Promise<NodeJS.Signals>((resolve) => (first = resolve));
  try {
    const bound = await server.start();
    logger.info("started", { version: VERSION, pid: process.pid, bound });
    await options.onStarted?.(bound);
  } catch (err) {
    for (const [s, h] of handlers) source.off(s, h);
    throw err;
  }
  const signal = await signalled;
  logger.info("signal received; shutting down", { signal });

  let code = 0;
  try {
    await server.destroy();
    await options.onStopped?.();
  } catch (err) {
    logger.error("shutdown failed", { err });
    code = 1;
  }
  for (const [s, h] of handlers) source.off(s, h);
  if (forced) return 1;
  logger.info("exiting", { code });
  exit(code);
  return code;
}
