import { afterEach, describe, expect, it } from "vitest";
import { createAuditLog } from "../../../src/storage/audit-log.js";
import { openLevelStore, type LevelStore } from "../../../src/storage/level-store.js";
import { RefusalBudget } from "../../../src/storage/refusal-budget.js";
import { tempDir } from "./tmp-dir.js";

const T0 = Date.UTC(2026, 10, 25, 12, 0, 0);

describe("RefusalBudget", () => {
  it("lets a source write its burst, then one per refill interval, and reports what it suppressed", () => {
    const b = new RefusalBudget({ perSourceBurst: 3, perSourcePerMinute: 6, totalPerMinute: 1000 });
    const took = Array.from({ length: 5 }, () => b.take("10.0.0.1", T0).write);
    expect(took).toEqual([true, true, true, false, false]);
    expect(b.suppressed).toBe(2);
    // 6 per minute = one per 10 s.
    expect(b.take("10.0.0.1", T0 + 9_000).write).toBe(false);
    expect(b.take("10.0.0.1", T0 + 10_000)).toEqual({ write: true, suppressedBefore: 3 });
    expect(b.take("10.0.0.1", T0 + 10_001).write).toBe(false);
    // Another source has its own burst.
    expect(b.take("10.0.0.2", T0 + 10_001)).toEqual({ write: true, suppressedBefore: 0 });
  });

  it("bounds all sources together (many addresses cannot add up to a flood)", () => {
    const b = new RefusalBudget({ perSourceBurst: 5, perSourcePerMinute: 5, totalPerMinute: 10 });
    const written = Array.from({ length: 40 }, (_, i) => b.take(`10.0.${i}.1`, T0).write).filter(Boolean).length;
    expect(written).toBe(10);
    expect(b.suppressed).toBe(30);
  });

  it("forgets the least recently seen source past maxSources", () => {
    const b = new RefusalBudget({ perSourceBurst: 1, perSourcePerMinute: 1, totalPerMinute: 1000, maxSources: 2 });
    expect(b.take("a", T0).write).toBe(true);
    expect(b.take("a", T0).write).toBe(false);
    b.take("b", T0);
    b.take("c", T0); // "a" is dropped
    expect(b.take("a", T0)).toEqual({ write: true, suppressedBefore: 0 });
  });
});

describe("AuditLog.appendUnauthenticated", () => {
  const stores: LevelStore[] = [];
  afterEach(async () => {
    await Promise.all(stores.splice(0).map((s) => s.close()));
  });

  it("writes a source's refusals up to its budget, counts the rest, and names the count in its next entry", async () => {
    let now = T0;
    const store = await openLevelStore(await tempDir(), { sync: false });
    stores.push(store);
    const log = createAuditLog(store, { clock: { now: () => new Date(now) }, refusals: { perSourceBurst: 2, perSourcePerMinute: 2, totalPerMinute: 100 } });
    const refusal = { actor: "anonymous", action: "ca.version.create", target: "tenant/acme", outcome: "refused: unauthenticated", details: { error: "no token" } };
    const results = [];
    for (let i = 0; i < 6; i++) results.push(await log.appendUnauthenticated(refusal, "192.0.2.7"));
    expect(results.map((r) => r !== undefined)).toEqual([true, true, false, false, false, false]);
    expect(log.suppressedRefusals).toBe(4);
    // An authenticated refusal is never limited.
    await log.append({ ...refusal, actor: "token:abc", outcome: "refused: permission_denied" });
    now += 30_000; // one more token (2 per minute)
    const next = await log.appendUnauthenticated(refusal, "192.0.2.7");
    expect(next?.details).toEqual({ error: "no token", suppressed_refusals: "4" });
    const all = await log.tail({ limit: 100 });
    expect(all.map((e) => [e.actor, e.details["suppressed_refusals"] ?? ""])).toEqual([
      ["anonymous", ""],
      ["anonymous", ""],
      ["token:abc", ""],
      ["anonymous", "4"],
    ]);
    expect((await log.verify()).ok).toBe(true);
  });
});
