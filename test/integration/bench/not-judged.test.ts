/**
 * A figure whose requests fail beyond the limit in a window is not a valid figure: it is
 * printed as "not judged: N of M requests failed (first error …)", with no rate, and nothing
 * is compared with it. In-process, on the bench's own modules.
 */
import { describe, expect, it } from "vitest";
import { notJudgedReason, tallyFailures } from "../../../bench/lib/failures.js";
import { RowBuilder, ratioText, targetText, valueText } from "../../../bench/lib/results.js";

describe("failed requests in a window", () => {
  it.each([
    ["none failed", [{ ops: 1000, errors: 0 }], 0],
    ["1% failed: within the limit", [{ ops: 990, errors: 10, firstError: "h2 status 502" }], 0],
    ["just over 1%", [{ ops: 989, errors: 11, firstError: "h2 status 502" }], 1],
    ["most failed (the mitmdump h2 1 MiB run)", [{ ops: 30, errors: 160, firstError: "h2 status 502" }], 1],
    ["one window of three", [{ ops: 500, errors: 0 }, { ops: 30, errors: 160, firstError: "h2 status 502" }, { ops: 500, errors: 0 }], 1],
    ["no request at all", [{ ops: 0, errors: 0, firstError: "the load could not start: ECONNREFUSED" }], 1],
  ])("%s", (_name, windows, bad) => {
    expect(tallyFailures(windows).bad).toBe(bad);
  });

  it("says how many of how many failed, and the first error", () => {
    const w = [
      { ops: 40, errors: 160, firstError: "h2 status 502" },
      { ops: 30, errors: 170 },
      { ops: 200, errors: 0 },
    ];
    expect(notJudgedReason(tallyFailures(w), w.length)).toBe("330 of 600 requests failed (first error: h2 status 502); over 1% in 2 of 3 windows");
  });
});

describe("a not-judged figure", () => {
  it("prints no rate, and no ratio can be taken against it", () => {
    const row = new RowBuilder("3", "t", "m");
    const direct = row.figure("proxy.h2_1m.direct", "direct", "req/s", [900, 950, 1000], { p50: [16, 16, 17], p99: [30, 31, 32] }, true);
    const mitm = row.figure("proxy.h2_1m.mitm", "mitm", "req/s", [16, 17, 11], { p50: [90, 84, 140], p99: [180, 190, 200] });
    const kmi = row.figure("proxy.h2_1m.kmi", "kmi", "req/s", [300, 310, 330]);
    row.notJudged(mitm, "484 of 581 requests failed (first error: h2 status 502)");
    expect(valueText(mitm)).toBe("not judged: 484 of 581 requests failed (first error: h2 status 502)");
    expect(() => row.ratio(kmi, mitm)).toThrow(/not judged/);
    expect(() => row.ratio(mitm, direct)).toThrow(/not judged/);
    row.targetNotJudged(kmi, "≥ 5× mitmdump", "through mitmdump, 484 of 581 requests failed");
    expect(targetText(kmi)).toBe("≥ 5× mitmdump: not judged: through mitmdump, 484 of 581 requests failed");
    expect(ratioText(kmi)).toBe("");
  });

  it("a target can be met on the median with the min below it", () => {
    const row = new RowBuilder("1", "t", "m");
    const f = row.figure("agent.issue.c16", "issue", "calls/s", [1900, 2100, 2200]);
    row.target(f, "≥ 2,000/s", true, "met (median), min below target");
    expect(targetText(f)).toBe("≥ 2,000/s: met (median), min below target");
  });
});
