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

  it("counts an IPv6 source by its /64 (one host usually holds a whole /64)", () => {
    const b = new RefusalBudget({ perSourceBurst: 2, perSourcePerMinute: 1, totalPerMinute: 1000 });
    expect(b.take("2001:db8:1:2::1", T0).write).toBe(true);
    expect(b.take("2001:db8:1:2:ffff::9", T0).write).toBe(true);
    expect(b.take("2001:0db8:0001:0002:abcd::", T0).write).toBe(false);
    expect(b.take("2001:db8:1:3::1", T0).write).toBe(true);
  });

  it("asks for one summary of what it counted at most once a minute", () => {
    const b = new RefusalBudget({ perSourceBurst: 1, perSourcePerMinute: 1, totalPerMinute: 1000 });
    b.take("a", T0);
    expect(b.take("a", T0)).toEqual({ write: false, summary: { suppressed: 1, sources: 1 } });
    expect(b.take("a", T0 + 10)).toEqual({ write: false });
    b.take("b", T0 + 20);
    expect(b.take("b", T0 + 30)).toEqual({ write: false });
    expect(b.take("b", T0 + 60_000)).toEqual({ write: false, summary: { suppressed: 3, sources: 2 } });
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
    const log = createAuditLog(store, { clock: { now: () => new Date(now) }, monotonicMs: () => now, refusals: { perSourceBurst: 2, perSourcePerMinute: 2, totalPerMinute: 100 } });
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
    // The first refusal counted brings a summary entry (the next is due a minute later).
    expect(all.map((e) => [e.actor, e.action, e.details["suppressed_refusals"] ?? ""])).toEqual([
      ["anonymous", "ca.version.create", ""],
      ["anonymous", "ca.version.create", ""],
      ["system", "audit.refusals_suppressed", "1"],
      ["token:abc", "ca.version.create", ""],
      ["anonymous", "ca.version.create", "4"],
    ]);
    expect(all[2]!.details["sources"]).toBe("1");
    expect((await log.verify()).ok).toBe(true);
  });
});
