import { describe, expect, it } from "vitest";
import { backoffMs, jittered, sleep, spreadMs } from "../../../src/common/backoff.js";

describe("backoffMs", () => {
  it("grows exponentially, is capped, and is jittered in [cap/2, cap]", () => {
    expect(backoffMs(1, 500, 30_000, () => 1)).toBe(500);
    expect(backoffMs(2, 500, 30_000, () => 1)).toBe(1000);
    expect(backoffMs(5, 500, 30_000, () => 1)).toBe(8000);
    expect(backoffMs(40, 500, 30_000, () => 1)).toBe(30_000);
    expect(backoffMs(40, 500, 30_000, () => 0)).toBe(15_000);
    const samples = new Set(Array.from({ length: 50 }, () => backoffMs(6, 500, 30_000)));
    expect(samples.size).toBeGreaterThan(10);
    for (const s of samples) expect(s).toBeGreaterThanOrEqual(8000);
  });

  it("jitters the first retry too (a fleet that failed together does not come back together)", () => {
    expect(backoffMs(1, 500, 30_000, () => 0)).toBe(250);
    const first = Array.from({ length: 200 }, () => backoffMs(1, 500, 30_000));
    expect(new Set(first).size).toBeGreaterThan(20);
    for (const s of first) {
      expect(s).toBeGreaterThanOrEqual(250);
      expect(s).toBeLessThanOrEqual(500);
    }
  });
});

describe("spreadMs and jittered", () => {
  it("stay within their bounds and differ between draws", () => {
    expect(spreadMs(1000, () => 0)).toBe(0);
    expect(spreadMs(1000, () => 1)).toBe(1000);
    expect(spreadMs(-5, () => 1)).toBe(0);
    expect(jittered(1000, 0.2, () => 0)).toBe(800);
    expect(jittered(1000, 0.2, () => 1)).toBe(1200);
    const draws = Array.from({ length: 100 }, () => jittered(1000));
    expect(new Set(draws).size).toBeGreaterThan(20);
    for (const d of draws) expect(d >= 800 && d <= 1200).toBe(true);
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
