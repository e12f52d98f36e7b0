/**
 * Contract test of src/proxy/v8-gc.ts: Node hands over V8's full collection at run time (the
 * `--expose-gc` flag set, then read from a new vm context), the collection frees an object
 * nothing references, and the flag does not stay on for the program's own context.
 */
import { setImmediate as tick } from "node:timers/promises";
import { describe, expect, it } from "vitest";
import { fullGc } from "../../../src/proxy/v8-gc.js";

/** A WeakRef to an object made and dropped in another job (a WeakRef target lives to the end of its job). */
async function droppedObject(): Promise<WeakRef<object>> {
  const ref = new WeakRef({ payload: new Array(1000).fill(7) });
  await tick();
  return ref;
}

describe("fullGc (V8 adapter)", () => {
  it("returns V8's collection, which frees an unreferenced object", async () => {
    const gc = fullGc();
    expect(typeof gc).toBe("function");
    const ref = await droppedObject();
    gc!();
    expect(ref.deref()).toBeUndefined();
  });

  it("does not leave gc on the program's global object", () => {
    const had = typeof (globalThis as { gc?: unknown }).gc === "function";
    fullGc();
    expect(typeof (globalThis as { gc?: unknown }).gc === "function").toBe(had);
  });
});
