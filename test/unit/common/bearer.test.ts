import { describe, expect, it } from "vitest";
import { bearerAuthorization } from "../../../src/common/bearer.js";
import { InvalidArgument } from "../../../src/common/errors.js";

const TOKEN = "kmi_a7c1bed3f8201061_EqVegccpBWAtRHnHWWTFw71IdO1oat2sGfdtkLKDeuE";

describe("bearerAuthorization", () => {
  it("makes the header value of a well-formed token", () => {
    expect(bearerAuthorization(TOKEN)).toBe(`Bearer ${TOKEN}`);
  });

  it.each([
    ["a second line", `${TOKEN}\n# note`],
    ["a carriage return inside", `${TOKEN}\rX`],
    ["a space", `${TOKEN} x`],
    ["a non-ASCII character", `${TOKEN}\u200b`],
  ])("refuses a token with %s, and never quotes it", (_what, bad) => {
    let err: unknown;
    try {
      bearerAuthorization(bad);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidArgument);
    expect(String((err as Error).message)).not.toContain("EqVegccpBWAtRHnHWWTFw71IdO1oat2sGfdtkLKDeuE");
  });

  it("refuses an empty token", () => {
    expect(() => bearerAuthorization("")).toThrow("empty");
  });
});
