import { describe, expect, it } from "vitest";
import { EICAR, EicarScanner } from "../../../src/proxy/eicar.js";

function scan(chunks: Buffer[]): boolean {
  const s = new EicarScanner();
  let hit = false;
  for (const c of chunks) hit = s.push(c) || hit;
  return hit;
}

describe("EicarScanner", () => {
  const body = Buffer.concat([Buffer.alloc(500, 0x61), EICAR, Buffer.alloc(500, 0x62)]);

  it("finds the signature in one chunk", () => {
    expect(scan([body])).toBe(true);
  });

  it("finds it split at every possible point", () => {
    for (let cut = 1; cut < body.length; cut += 1) {
      expect(scan([body.subarray(0, cut), body.subarray(cut)])).toBe(true);
    }
  });

  it("finds it in 1-byte and 3-byte chunks", () => {
    for (const size of [1, 3]) {
      const chunks: Buffer[] = [];
      for (let o = 0; o < body.length; o += size) chunks.push(body.subarray(o, o + size));
      expect(scan(chunks)).toBe(true);
    }
  });

  it("finds it across three chunks with the middle one shorter than the signature", () => {
    const at = 500;
    expect(scan([body.subarray(0, at + 10), body.subarray(at + 10, at + 20), body.subarray(at + 20)])).toBe(true);
  });

  it("does not fire on clean data or on a near miss", () => {
    expect(scan([Buffer.alloc(100_000, 0x41)])).toBe(false);
    const nearMiss = Buffer.from(EICAR);
    nearMiss[40] = 0x2e;
    expect(scan([nearMiss.subarray(0, 30), nearMiss.subarray(30)])).toBe(false);
    expect(scan([EICAR.subarray(0, 67)])).toBe(false);
  });

  it("stays positive once found", () => {
    const s = new EicarScanner();
    expect(s.push(EICAR)).toBe(true);
    expect(s.push(Buffer.from("clean"))).toBe(true);
    expect(s.found).toBe(true);
  });
});
