import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { createNopLogger } from "../../../src/common/logger.js";
import { audited, markAudited, recordRefusal, type RefusalEntry, type RefusalSink } from "../../../src/common/refusal-audit.js";

function sink(fail = false) {
  const written: { entry: RefusalEntry; source?: string }[] = [];
  const s: RefusalSink = {
    append: async (entry) => {
      if (fail) throw new Error("disk full");
      written.push({ entry });
    },
    appendUnauthenticated: async (entry, source) => {
      written.push({ entry, source });
    },
  };
  return { s, written };
}

describe("the refusal pipeline", () => {
  it("writes a refused call once, with its code, within the budget of a caller that proved nothing", async () => {
    const { s, written } = sink();
    const err = new InvalidArgument("name: empty");
    const run = () => audited(s, createNopLogger(), (e) => ({ actor: "anonymous", action: "x.do", target: "t", details: { reason: (e as Error).message }, source: "192.0.2.1" }), () => Promise.reject(err));
    await expect(run()).rejects.toBe(err);
    await expect(recordRefusal(s, createNopLogger(), { actor: "a", action: "b", target: "" }, err)).resolves.toBeUndefined();
    expect(written).toEqual([{ entry: { actor: "anonymous", action: "x.do", target: "t", outcome: "refused: invalid_argument", details: { reason: "name: empty" } }, source: "192.0.2.1" }]);
  });

  it("an internal error is refused: internal; an error marked as written is not written again; a failed write keeps the call's error", async () => {
    const { s, written } = sink();
    await recordRefusal(s, createNopLogger(), { actor: "token:t1", action: "a", target: "" }, new Error("secret detail"));
    expect(written[0]!.entry.outcome).toBe("refused: internal");
    await recordRefusal(s, createNopLogger(), { actor: "token:t1", action: "a", target: "" }, markAudited(new Error("x")));
    expect(written).toHaveLength(1);
    const failing = sink(true);
    const err = new InvalidArgument("bad");
    await expect(audited(failing.s, createNopLogger(), () => ({ actor: "token:t1", action: "a", target: "" }), () => Promise.reject(err))).rejects.toBe(err);
  });
});
