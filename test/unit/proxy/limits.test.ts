import { describe, expect, it } from "vitest";
import { LearnedBypass } from "../../../src/proxy/learned-bypass.js";
import { LeafHosts } from "../../../src/proxy/leaf-hosts.js";
import { ClientRateLimiter } from "../../../src/common/rate-limit.js";

describe("ClientRateLimiter", () => {
  it("allows a burst, then the refill rate, per client", () => {
    let now = 0;
    const r = new ClientRateLimiter({ perSecond: 2, burst: 3, now: () => now });
    expect([r.take("a"), r.take("a"), r.take("a"), r.take("a")]).toEqual([true, true, true, false]);
    expect(r.take("b")).toBe(true);
    now += 500;
    expect(r.take("a")).toBe(true);
    expect(r.take("a")).toBe(false);
    now += 10_000;
    expect([r.take("a"), r.take("a"), r.take("a"), r.take("a")]).toEqual([true, true, true, false]);
  });

  it("tokens and exhausted read a bucket without taking; assume sets it (a worker's view of the primary's)", () => {
    let now = 0;
    const r = new ClientRateLimiter({ perSecond: 2, burst: 3, now: () => now });
    expect([r.tokens("a"), r.exhausted("a")]).toEqual([3, false]);
    r.take("a");
    r.take("a");
    expect(r.tokens("a")).toBe(1);
    expect(r.exhausted("a")).toBe(false);
    r.assume("b", 0.5);
    expect(r.exhausted("b")).toBe(true);
    now += 250;
    expect(r.tokens("b")).toBe(1);
    expect(r.exhausted("b")).toBe(false);
    r.assume("c", 7);
    expect(r.tokens("c")).toBe(3);
    r.assume("c", -1);
    expect(r.tokens("c")).toBe(0);
    expect(r.take("c")).toBe(false);
    const off = new ClientRateLimiter({ perSecond: 0, burst: 1 });
    off.assume("a", 0);
    expect(off.exhausted("a")).toBe(false);
  });

  it("0 per second disables the limit; the client table is bounded", () => {
    const off = new ClientRateLimiter({ perSecond: 0, burst: 1 });
    for (let i = 0; i < 100; i++) expect(off.take("a")).toBe(true);
    const r = new ClientRateLimiter({ perSecond: 1, burst: 1, maxClients: 2, now: () => 0 });
    expect(r.take("a")).toBe(true);
    expect(r.take("b")).toBe(true);
    expect(r.take("c")).toBe(true); // forgets a
    expect(r.take("a")).toBe(true);
  });
});

describe("LeafHosts", () => {
  it("remembers tenant + target pairs, per tenant, forgetting the least recently used past its bound", () => {
    const h = new LeafHosts(2);
    h.remember("t", "a.example:443");
    h.remember("t", "b.example:443");
    expect([h.has("t", "a.example:443"), h.has("u", "a.example:443"), h.has("t", "a.example:8443")]).toEqual([true, false, false]);
    h.remember("t", "a.example:443"); // used again: b is now the least recent
    h.remember("t", "c.example:443");
    expect([h.has("t", "a.example:443"), h.has("t", "b.example:443"), h.has("t", "c.example:443")]).toEqual([true, false, true]);
  });
});

describe("LearnedBypass", () => {
  const on = { enabled: true, threshold: 3, windowSeconds: 60, ttlSeconds: 600 };

  it("turns pinned-app bypass on after `threshold` rejections within the window, per tenant and host, for ttl", () => {
    let now = 0;
    const l = new LearnedBypass({ now: () => now });
    expect(l.recordRejection("t", "app.example", on)).toBe(false);
    now += 61_000; // the first one falls out of the window
    expect(l.recordRejection("t", "app.example", on)).toBe(false);
    expect(l.recordRejection("t", "app.example", on)).toBe(false);
    expect(l.recordRejection("t", "app.example", on)).toBe(true);
    expect(l.pinnedBypass("t", "app.example")).toBe(true);
    expect(l.pinnedBypass("u", "app.example")).toBe(false);
    now += 600_001;
    expect(l.pinnedBypass("t", "app.example")).toBe(false);
  });

  it("does nothing when the policy leaves it off", () => {
    const l = new LearnedBypass();
    for (let i = 0; i < 10; i++) expect(l.recordRejection("t", "h", { ...on, enabled: false })).toBe(false);
    expect(l.pinnedBypass("t", "h")).toBe(false);
  });

  it("remembers client-certificate origins for a while", () => {
    let now = 0;
    const l = new LearnedBypass({ now: () => now, clientCertTtlMs: 1000 });
    l.markClientCert("h:443");
    expect(l.demandsClientCert("h:443")).toBe(true);
    expect(l.demandsClientCert("h:8443")).toBe(false);
    now = 1001;
    expect(l.demandsClientCert("h:443")).toBe(false);
  });
});
