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
