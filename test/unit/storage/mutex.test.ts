import { describe, expect, it } from "vitest";
import { Mutex } from "../../../src/storage/mutex.js";

describe("Mutex", () => {
  it("runs callers one at a time, in call order, and a rejection does not block the next", async () => {
    const mutex = new Mutex();
    const events: string[] = [];
    const task = (name: string, ms: number, fail = false) =>
      mutex.runExclusive(async () => {
        events.push(`start ${name}`);
        await new Promise((r) => setTimeout(r, ms));
        events.push(`end ${name}`);
        if (fail) throw new Error(`${name} failed`);
        return name;
      });
    const results = await Promise.allSettled([task("a", 20), task("b", 1, true), task("c", 5)]);
    expect(events).toEqual(["start a", "end a", "start b", "end b", "start c", "end c"]);
    expect(results.map((r) => r.status)).toEqual(["fulfilled", "rejected", "fulfilled"]);
    expect(mutex.locked).toBe(false);
  });
});
