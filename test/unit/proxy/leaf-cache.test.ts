import { createSecureContext } from "node:tls";
import { describe, expect, it } from "vitest";
import { IssuanceRefused, LeafCache, leafCacheKey, type LeafEntry } from "../../../src/proxy/leaf-cache.js";

const ctx = createSecureContext({});
const DAY = 86_400_000;

function entry(tenant: string, notAfter: number, issuerKeyId = "k1", notBefore = notAfter - 40 * DAY): LeafEntry {
  return { tenant, context: ctx, notAfter, notBefore, issuerKeyId, intermediateVersion: 1, serialHex: "01" };
}

describe("LeafCache", () => {
  it("keys by tenant and origin fingerprint", () => {
    expect(leafCacheKey("a", "F1")).not.toBe(leafCacheKey("b", "F1"));
    expect(leafCacheKey("a", "F1", "host")).not.toBe(leafCacheKey("a", "F1"));
  });

  it("is bounded: the least recently used entry goes first", async () => {
    const now = 1_000_000;
    const c = new LeafCache({ maxEntries: 2, now: () => now });
    await c.obtain("t", "a", async () => entry("t", now + 40 * DAY));
    await c.obtain("t", "b", async () => entry("t", now + 40 * DAY));
    expect(c.get("a")).toBeDefined(); // a is now the most recent
    await c.obtain("t", "c", async () => entry("t", now + 40 * DAY));
    expect(c.size).toBe(2);
    expect(c.get("b")).toBeUndefined();
    expect(c.get("a")).toBeDefined();
    expect(c.get("c")).toBeDefined();
  });

  it("trimIdle drops the leaves not served for that long, least recently used first, and keeps the rest", async () => {
    let now = 1_000_000;
    const c = new LeafCache({ now: () => now });
    await c.obtain("t", "a", async () => entry("t", now + 40 * DAY));
    now += 1000;
    await c.obtain("t", "b", async () => entry("t", now + 40 * DAY));
    now += 1000;
    await c.obtain("t", "c", async () => entry("t", now + 40 * DAY));
    now += 1000;
    expect(c.get("a")).toBeDefined(); // served again: a is the most recent now
    now += 1500;
    // b was served 3.5 s ago, c 2.5 s ago, a 1.5 s ago.
    expect(c.trimIdle(3000)).toBe(1);
    expect(c.get("b")).toBeUndefined();
    expect(c.trimIdle(2000)).toBe(1);
    expect(c.get("c")).toBeUndefined();
    expect(c.size).toBe(1);
    expect(c.get("a")).toBeDefined();
    expect(c.trimIdle(1)).toBe(0); // just served
    now += 2;
    expect(c.trimIdle(1)).toBe(1);
    expect(c.size).toBe(0);
    // A trimmed leaf is minted again on the next request.
    let issued = 0;
    const r = await c.obtain("t", "a", async () => (issued++, entry("t", now + 40 * DAY)));
    expect([r.source, issued]).toEqual(["issued", 1]);
  });

  it("drops a leaf once a tenth of its lifetime (at most an hour) is left", async () => {
    let now = 0;
    const c = new LeafCache({ now: () => now });
    await c.obtain("t", "k", async () => entry("t", 10 * DAY, "k1", 0));
    now = 10 * DAY - 3_600_001;
    expect(c.get("k")).toBeDefined();
    now = 10 * DAY - 3_600_000;
    expect(c.get("k")).toBeUndefined();
    // A short leaf: 10 minutes, refreshed in its last minute.
    await c.obtain("t", "s", async () => entry("t", now + 600_000, "k1", now));
    now += 539_000;
    expect(c.get("s")).toBeDefined();
    now += 2000;
    expect(c.get("s")).toBeUndefined();
  });

  it("single flight: concurrent callers share one issuance; admit is asked once", async () => {
    const c = new LeafCache();
    let issued = 0;
    let admitted = 0;
    let release!: (e: LeafEntry) => void;
    const issue = () => {
      issued++;
      return new Promise<LeafEntry>((r) => (release = r));
    };
    const all = Array.from({ length: 10 }, () => c.obtain("t", "k", issue, () => (admitted++, true)));
    release(entry("t", Date.now() + 40 * DAY));
    const results = await Promise.all(all);
    expect(issued).toBe(1);
    expect(admitted).toBe(1);
    expect(results.map((r) => r.source).sort()).toEqual(["issued", ...Array<string>(9).fill("joined")]);
    expect((await c.obtain("t", "k", issue)).source).toBe("cache");
  });

  it("a failed issuance is not cached and the next caller tries again", async () => {
    const c = new LeafCache();
    await expect(c.obtain("t", "k", async () => Promise.reject(new Error("agent down")))).rejects.toThrow("agent down");
    const r = await c.obtain("t", "k", async () => entry("t", Date.now() + 40 * DAY));
    expect(r.source).toBe("issued");
  });

  it("admit refusing throws IssuanceRefused and starts nothing", async () => {
    const c = new LeafCache();
    let issued = 0;
    await expect(c.obtain("t", "k", async () => (issued++, entry("t", 0)), () => false)).rejects.toThrow(IssuanceRefused);
    expect(issued).toBe(0);
  });

  it("clearTenant drops that tenant's leaves only, and an issuance running across it is served but not cached", async () => {
    const c = new LeafCache();
    const far = Date.now() + 40 * DAY;
    await c.obtain("a", "a1", async () => entry("a", far));
    await c.obtain("b", "b1", async () => entry("b", far));
    let release!: (e: LeafEntry) => void;
    const running = c.obtain("a", "a2", () => new Promise<LeafEntry>((r) => (release = r)));
    expect(c.clearTenant("a")).toBe(1);
    release(entry("a", far));
    expect((await running).source).toBe("issued");
    expect(c.get("a2")).toBeUndefined();
    expect(c.discarded).toBe(1);
    expect(c.get("b1")).toBeDefined();
  });

  it("clear (quarantine) drops everything, including what is in flight", async () => {
    const c = new LeafCache();
    let release!: (e: LeafEntry) => void;
    const running = c.obtain("new", "n", () => new Promise<LeafEntry>((r) => (release = r)));
    await c.obtain("a", "a1", async () => entry("a", Date.now() + 40 * DAY));
    expect(c.clear()).toBe(1);
    release(entry("new", Date.now() + 40 * DAY));
    await running;
    expect(c.size).toBe(0);
  });

  it("retainActive keeps only leaves of each tenant's active intermediate", async () => {
    const c = new LeafCache();
    const far = Date.now() + 40 * DAY;
    await c.obtain("a", "old", async () => entry("a", far, "k-a1"));
    await c.obtain("a", "new", async () => entry("a", far, "k-a2"));
    await c.obtain("gone", "g", async () => entry("gone", far, "k-g"));
    expect(c.retainActive(new Map([["a", "k-a2"]]))).toBe(2);
    expect(c.get("new")).toBeDefined();
    expect(c.get("old")).toBeUndefined();
    expect(c.get("g")).toBeUndefined();
  });
});
