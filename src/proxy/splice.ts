/**
 * Joins two byte streams both ways (a tunnel, a WebSocket after its handshake), counting
 * bytes, honouring backpressure and half-close, closing both on error or idleness, and
 * reporting once when both are gone.
 */
import type { Duplex } from "node:stream";

/** Bytes moved by a splice. */
export interface SpliceResult {
  /** Bytes from `a` to `b` (client to origin). */
  readonly up: number;
  /** Bytes from `b` to `a` (origin to client). */
  readonly down: number;
  /** The first error seen, if any. */
  readonly error?: Error;
}

interface Settable {
  setTimeout?(ms: number, cb?: () => void): unknown;
}

/** Splices `a` (client side) and `b` (origin side). */
export function splice(a: Duplex, b: Duplex, idleMs: number, onDone: (r: SpliceResult) => void): void {
  let up = 0;
  let down = 0;
  let error: Error | undefined;
  let closed = 0;
  let reported = false;
  const report = (): void => {
    if (reported) return;
    reported = true;
    onDone({ up, down, error });
  };
  const fail = (err?: Error): void => {
    if (err !== undefined && error === undefined) error = err;
    a.destroy();
    b.destroy();
  };
  const pump = (from: Duplex, to: Duplex, count: (n: number) => void): void => {
    from.on("data", (chunk: Buffer) => {
      count(chunk.length);
      if (!to.write(chunk)) from.pause();
    });
    to.on("drain", () => from.resume());
    from.on("end", () => {
      // Half-close: pass the FIN on; the other direction may go on.
      if (!to.destroyed) to.end();
    });
    from.on("error", fail);
    from.on("close", () => {
      if (++closed === 2) report();
      else if (!to.writableEnded && !to.destroyed) {
        // One side is gone without a FIN (reset): nothing more can flow.
        if (!from.readableEnded) fail();
      }
    });
  };
  pump(a, b, (n) => (up += n));
  pump(b, a, (n) => (down += n));
  const onIdle = (): void => fail(new Error(`idle for ${idleMs} ms`));
  for (const s of [a, b] as (Duplex & Settable)[]) s.setTimeout?.(idleMs, onIdle);
  // A side that closed before the splice started will not emit 'close' again.
  for (const s of [a, b]) if (s.destroyed) closed++;
  if (closed === 2) report();
  else if (closed === 1) fail();
  a.resume();
  b.resume();
}
