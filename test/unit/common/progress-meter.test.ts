/**
 * The progress line of long work (backup, restore, a rollout): the estimate from the rate so
 * far, the text, when it is shown (a terminal, or --progress; never with --json), throttling,
 * and a terminal's line rewritten in place. The clock is injected.
 */
import { describe, expect, it } from "vitest";
import { estimateLeftMs, formatBytes, formatDuration, ProgressMeter, progressText, progressWanted } from "../../../src/common/progress-meter.js";

describe("the estimate", () => {
  it.each([
    [0, 100, 1000, 0, undefined],
    [50, 100, 10_000, 0, 10_000],
    [75, 100, 10_000, 50, 10_000],
    [100, 100, 10_000, 0, undefined],
  ])("%i of %i after %i ms (from %i): %s ms left", (done, total, elapsed, from, left) => {
    expect(estimateLeftMs(done, total, elapsed, from)).toBe(left);
  });

  it.each([
    [4_000, "4 s"],
    [125_000, "2 min 5 s"],
    [120_000, "2 min"],
    [3_780_000, "1 h 3 min"],
  ])("formatDuration(%i) is %s", (ms, text) => expect(formatDuration(ms)).toBe(text));

  it("texts: with a total, without one, done, and bytes", () => {
    expect(progressText("kmi kdc restore", "records", 1200, 5000, 9000)).toBe("kmi kdc restore: 1200 of 5000 records (24%), about 9 s left");
    expect(progressText("kmi kdc restore", "records", 0, 5000, undefined)).toBe("kmi kdc restore: 0 of 5000 records (0%), estimating…");
    expect(progressText("x", "machines hold v3", 5, 5, undefined)).toBe("x: 5 of 5 machines hold v3 (100%), done");
    expect(progressText("x", "records", 7, undefined, undefined)).toBe("x: 7 records…");
    expect(progressText("x", "written", 3 * 1024 * 1024, 4 * 1024 * 1024, 1000, formatBytes)).toBe("x: 3.0 MB of 4.0 MB written (75%), about 1 s left");
  });
});

describe("ProgressMeter", () => {
  it.each([
    [{ isTTY: true }, false, false, true],
    [{ isTTY: false }, false, false, false],
    [{ isTTY: false }, true, false, true],
    [{ isTTY: true }, true, true, false],
  ])("shown for %j with --progress %s and --json %s: %s", (sink, asked, json, shown) => {
    expect(progressWanted({ write: () => undefined, ...sink }, asked, json)).toBe(shown);
  });

  it("off a terminal (with --progress): one line per interval, with the estimate from the rate", () => {
    let now = 0;
    const out: string[] = [];
    const m = new ProgressMeter({ out: { write: (t) => out.push(t) }, label: "kmi kdc restore", unit: "records", enabled: true, intervalMs: 1000, now: () => now });
    m.update(0, 100);
    now = 500;
    m.update(10, 100); // within the interval: not written
    now = 1000;
    m.update(20, 100);
    now = 2000;
    m.update(40, 100);
    m.finish("100 records restored");
    expect(out).toEqual([
      "kmi kdc restore: 0 of 100 records (0%), estimating…\n",
      "kmi kdc restore: 20 of 100 records (20%), about 4 s left\n",
      "kmi kdc restore: 40 of 100 records (40%), about 3 s left\n",
      "kmi kdc restore: 100 records restored\n",
    ]);
  });

  it("with a step: also a line once the count moved by that share of the total, however fast", () => {
    const now = 0;
    const out: string[] = [];
    const m = new ProgressMeter({ out: { write: (t) => out.push(t) }, label: "kmi kdc rekey", unit: "records", enabled: true, intervalMs: 1000, stepFraction: 0.25, now: () => now });
    for (let done = 0; done <= 100; done += 10) m.update(done, 100);
    expect(out.map((l) => /: (\d+) of/.exec(l)?.[1])).toEqual(["0", "30", "60", "90"]);
  });

  it("on a terminal: the line is rewritten in place and cleared at the end", () => {
    const out: string[] = [];
    const m = new ProgressMeter({ out: { write: (t) => out.push(t), isTTY: true }, label: "x", unit: "records", enabled: true, intervalMs: 0, now: () => 0 });
    m.update(1, 2);
    m.finish("done");
    expect(out).toEqual(["\r\x1b[Kx: 1 of 2 records (50%), estimating…", "\r\x1b[K", "x: done\n"]);
  });

  it("disabled: nothing but the closing line", () => {
    const out: string[] = [];
    const m = new ProgressMeter({ out: { write: (t) => out.push(t) }, label: "x", unit: "records", enabled: false });
    m.update(1, 2);
    m.finish("done");
    expect(out).toEqual(["x: done\n"]);
  });
});
