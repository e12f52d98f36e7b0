/**
 * MemoryRelease: full collections (two back to back) once the open connections fall to half their high-water
 * mark by at least minDrop, after the delay, at most once per interval, and none when the load
 * came back meanwhile. Clock and timers are vitest's fake ones; the collection is a counter.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { createLogger } from "../../../src/common/logger.js";
import { MemoryRelease } from "../../../src/proxy/memory-release.js";

function setup(minDrop = 100) {
  let open = 0;
  const lines: Record<string, unknown>[] = [];
  const gc = vi.fn();
  const r = new MemoryRelease({
    gc,
    open: () => open,
    minDrop,
    delayMs: 1000,
    minIntervalMs: 60_000,
    now: () => Date.now(),
    rss: () => 64 * 2 ** 20,
    logger: createLogger({ write: (l) => void lines.push(JSON.parse(l) as Record<string, unknown>) }),
  });
  /** Opens or closes connections one at a time, as the server reports them. */
  const to = (n: number): void => {
    while (open !== n) {
      open += open < n ? 1 : -1;
      r.observe();
    }
  };
  return { r, gc, to, lines };
}

describe("MemoryRelease", () => {
  beforeEach(() => void vi.useFakeTimers());
  afterEach(() => void vi.useRealTimers());

  it("collects (twice back to back) once, after the delay, when the open connections fall to half their peak", () => {
    const { gc, to, lines } = setup();
    to(400);
    to(201);
    vi.advanceTimersByTime(5000);
    expect(gc).not.toHaveBeenCalled();
    to(0);
    expect(gc).not.toHaveBeenCalled();
    vi.advanceTimersByTime(999);
    expect(gc).not.toHaveBeenCalled();
    vi.advanceTimersByTime(1);
    expect(gc).toHaveBeenCalledTimes(2);
    expect(lines.find((l) => l.msg === "memory released after connections closed")).toMatchObject({ open: 0, highWater: 400 });
  });

  it("does not collect when fewer than minDrop connections closed", () => {
    const { gc, to } = setup(100);
    to(150);
    to(51);
    vi.advanceTimersByTime(10_000);
    expect(gc).not.toHaveBeenCalled();
  });

  it("does not collect when the load came back before the delay ran out", () => {
    const { gc, to } = setup();
    to(400);
    to(100);
    to(350);
    vi.advanceTimersByTime(10_000);
    expect(gc).not.toHaveBeenCalled();
  });

  it("collects at most once per interval, measuring the next fall from the level it collected at", () => {
    const { r, gc, to } = setup();
    to(1000);
    to(400);
    vi.advanceTimersByTime(1000);
    expect(r.releases).toBe(1);
    to(0);
    vi.advanceTimersByTime(30_000);
    expect(r.releases).toBe(1);
    vi.advanceTimersByTime(30_000);
    expect(r.releases).toBe(2);
    expect(gc).toHaveBeenCalledTimes(4);
  });

  it("close() cancels a pending collection", () => {
    const { r, gc, to } = setup();
    to(400);
    to(0);
    r.close();
    vi.advanceTimersByTime(10_000);
    expect(gc).not.toHaveBeenCalled();
  });
});
