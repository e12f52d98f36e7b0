import { describe, expect, it } from "vitest";
import { backoffMs, sleep } from "../../../src/common/backoff.js";

describe("backoffMs", () => {
  it("grows exponentially, is capped, and is jittered", () => {
    expect(backoffMs(1, 500, 30_000, () => 1)).toBe(500);
    expect(backoffMs(2, 500, 30_000, () => 1)).toBe(1000);
    expect(backoffMs(5, 500, 30_000, () => 1)).toBe(8000);
    expect(backoffMs(40, 500, 30_000, () => 1)).toBe(30_000);
    expect(backoffMs(40, 500, 30_000, () => 0)).toBe(500);
    const samples = new Set(Array.from({ length: 50 }, () => backoffMs(6, 500, 30_000)));
    expect(samples.size).toBeGreaterThan(10);
    for (const s of samples) expect(s).toBeGreaterThanOrEqual(500);
  });
});

describe("sleep", () => {
  it("resolves early, without error, when its signal aborts (and at once when it already has)", async () => {
    const abort = new AbortController();
    const slept = sleep(3_600_000, abort.signal);
    abort.abort(new Error("stop"));
    await expect(slept).resolves.toBeUndefined();
    await expect(sleep(3_600_000, abort.signal)).resolves.toBeUndefined();
  });
});
