import { describe, expect, it } from "vitest";
import { escapeJsonControls, hasControlChars, neutralizeControlChars } from "../../../src/common/control-chars.js";
import { createLogger } from "../../../src/common/logger.js";

describe("control characters", () => {
  it.each([
    ["plain text", false],
    ["tab\there", true],
    ["del\u007f", true],
    ["csi\u009b2J", true],
    ["nbsp\u00a0é ü", false],
    ["emoji 🔑", false],
  ])("hasControlChars(%j) is %s", (s, want) => {
    expect(hasControlChars(s)).toBe(want);
  });

  it("neutralizes C0, DEL and C1, and keeps the rest", () => {
    expect(neutralizeControlChars("a\u0007b\u007fc\u0085d\u009be\u00a0f")).toBe("a?b?c?d?e\u00a0f");
  });

  it("escapes DEL, C1 and the line separators inside JSON, and the JSON reads back the same", () => {
    const value = { s: "a\u007fb\u0085c\u009bd\u2028e\u2029f\u00a0g" };
    const json = escapeJsonControls(JSON.stringify(value));
    expect(json).not.toMatch(/[\u007f-\u009f\u2028\u2029]/);
    expect(json).toBe('{"s":"a\\u007fb\\u0085c\\u009bd\\u2028e\\u2029f\u00a0g"}');
    expect(JSON.parse(json)).toEqual(value);
    expect(escapeJsonControls('{"plain":1}')).toBe('{"plain":1}');
  });

  it("the logger writes a field's C1 characters as escapes", () => {
    const lines: string[] = [];
    createLogger({ write: (l) => void lines.push(l) }).warn("client said", { header: "x\u009b[2Jy" });
    expect(lines[0]).not.toMatch(/[\u007f-\u009f]/);
    expect(JSON.parse(lines[0]!)).toMatchObject({ header: "x\u009b[2Jy" });
  });
});
