/**
 * The one place that reaches V8's full garbage collection from a running process: the
 * `--expose-gc` flag set at run time (`v8.setFlagsFromString`) makes V8 install `gc` in contexts
 * created afterwards, so a fresh `vm` context hands it over, and the flag is turned off again
 * right away. This is a V8 and Node behaviour, not an API: test/unit/proxy/v8-gc.test.ts fails
 * when an upgrade changes it (then {@link fullGc} returns undefined and nothing is collected
 * early, which only costs memory).
 */
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";

/** A synchronous full (mark-compact) collection of the V8 heap. */
export type FullGc = () => void;

/** V8's full collection, or undefined where this runtime does not hand it over. */
export function fullGc(): FullGc | undefined {
  const exposed = (globalThis as { gc?: unknown }).gc;
  if (typeof exposed === "function") return exposed as FullGc;
  setFlagsFromString("--expose-gc");
  try {
    const gc: unknown = runInNewContext("typeof gc === 'function' ? gc : undefined");
    return typeof gc === "function" ? (gc as FullGc) : undefined;
  } finally {
    setFlagsFromString("--no-expose-gc");
  }
}
