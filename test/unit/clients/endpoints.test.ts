import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { callWithFailover, Endpoints, isFailover, retryAfterMs, stableIndex } from "../../../src/clients/endpoints.js";

const urls = ["https://a:1", "https://b:2", "https://c:3"];

describe("Endpoints", () => {
  it("starts at the replica a stable hash of the key picks, and spreads many keys over all of them", () => {
    expect(new Endpoints(urls, "machine-1").current).toBe(new Endpoints(urls, "machine-1").current);
    expect(new Endpoints(urls).current).toBe("https://a:1");
    const counts = [0, 0, 0];
    for (let i = 0; i < 3000; i++) counts[stableIndex(`m-${i}`, 3)]!++;
    for (const c of counts) expect(c).toBeGreaterThan(800);
    expect(() => new Endpoints([])).toThrow(/at least one URL/);
  });

  it("walks an order of its own: the clients of a replica that dies spread over the others", () => {
    const four = [...urls, "https://d:4"];
    const next = new Map<string, number>();
    let onA = 0;
    for (let i = 0; i < 1200; i++) {
      const e = new Endpoints(four, `machine-${i}`);
      expect([...e.rotation()].sort()).toEqual([...four].sort());
      expect(e.current).toBe(four[stableIndex(`machine-${i}`, 4)]);
      if (e.current !== "https://a:1") continue;
      onA++;
      const to = e.advance(0);
      next.set(to, (next.get(to) ?? 0) + 1);
    }
    // About a third of a's clients each to b, c and d (with one fixed order they would all go to b).
    expect([...next.keys()].sort()).toEqual(["https://b:2", "https://c:3", "https://d:4"]);
    for (const n of next.values()) expect(n).toBeGreaterThan(onA / 5);
    // use() moves to a URL's place in that order, so advancing goes on from there.
    const e = new Endpoints(four, "machine-7");
    const order = e.rotation();
    e.use(order[2]!);
    expect(e.advance(0)).toBe(order[3]);
  });

  it("advances round the list, skipping a replica that asked to be left alone until its time is up", () => {
    const e = new Endpoints(urls);
    e.avoid("https://b:2", 1000, 0);
    expect(e.advance(10)).toBe("https://c:3");
    expect(e.advance(10)).toBe("https://a:1");
    e.avoid("https://a:1", 500, 10);
    e.avoid("https://c:3", 100, 10);
    // Every replica asked for a pause: the one free soonest.
    expect(e.advance(20)).toBe("https://c:3");
    expect(e.waitMs("https://c:3", 20)).toBe(90);
    expect(e.advance(2000)).toBe("https://a:1");
    expect(e.waitMs("https://a:1", 2000)).toBe(0);
  });
});

describe("callWithFailover", () => {
  it("moves on after UNAVAILABLE or a failed connection, each replica once, and keeps the one that answered", async () => {
    const e = new Endpoints(urls);
    const tried: string[] = [];
    const out = await callWithFailover(e, async (url) => {
      tried.push(url);
      if (url !== "https://c:3") throw new ConnectError("connect ECONNREFUSED", Code.Unavailable);
      return "ok";
    });
    expect(out).toBe("ok");
    expect(tried).toEqual(urls);
    expect(e.current).toBe("https://c:3");
  });

  it("does not move on when the replica answered (the call may have acted), and throws the last error when none answered", async () => {
    const tried: string[] = [];
    await expect(
      callWithFailover(new Endpoints(urls), async (url) => {
        tried.push(url);
        throw new ConnectError("tenant_id: not found", Code.NotFound);
      }),
    ).rejects.toMatchObject({ code: Code.NotFound });
    expect(tried).toEqual(["https://a:1"]);
    await expect(callWithFailover(new Endpoints(urls), async () => Promise.reject(new ConnectError("down", Code.Unavailable)))).rejects.toMatchObject({ code: Code.Unavailable });
  });

  it("reads a replica's retry hint from the error's metadata", () => {
    expect(retryAfterMs(new ConnectError("shed", Code.Unavailable, { "retry-after-ms": "1500" }))).toBe(1500);
    expect(retryAfterMs(new ConnectError("shed", Code.Unavailable))).toBeUndefined();
    expect(retryAfterMs(new ConnectError("shed", Code.Unavailable, { "retry-after-ms": "soon" }))).toBeUndefined();
    expect(isFailover(new ConnectError("x", Code.Unavailable))).toBe(true);
    expect(isFailover(new ConnectError("x", Code.PermissionDenied))).toBe(false);
    expect(isFailover(new Error("x"))).toBe(false);
  });
});
