import { describe, expect, it } from "vitest";
import {
  children,
  decodeOid,
  DerError,
  encodeLength,
  oid,
  readTlv,
  smallInteger,
  unsignedInteger,
  x509Time,
} from "../../../src/pki/der.js";
import { decodeTime } from "../../../src/pki/parse.js";

const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex");

describe("der", () => {
  it.each([
    [0, "00"],
    [127, "7f"],
    [128, "8180"],
    [255, "81ff"],
    [256, "820100"],
    [65535, "82ffff"],
    [65536, "83010000"],
  ])("encodes length %i as %s", (n, expected) => {
    expect(hex(encodeLength(n))).toBe(expected);
  });

  it.each([
    ["00", "020100"],
    ["0000ff", "020200ff"],
    ["7f", "02017f"],
    ["80", "02020080"],
    ["000102", "02020102"],
  ])("encodes unsigned integer %s minimally as %s", (input, expected) => {
    expect(hex(unsignedInteger(Buffer.from(input, "hex")))).toBe(expected);
  });

  it("encodes small integers and OIDs, and decodes OIDs back", () => {
    expect(hex(smallInteger(0))).toBe("020100");
    expect(hex(smallInteger(300))).toBe("0202012c");
    expect(hex(oid("1.2.840.10045.4.3.2"))).toBe("06082a8648ce3d040302");
    expect(hex(oid("2.5.29.19"))).toBe("0603551d13");
    for (const o of ["1.2.840.113549.1.1.11", "2.5.4.3", "0.9.2342.19200300.100.1.25", "2.999.1"]) {
      expect(decodeOid(oid(o).subarray(2))).toBe(o);
    }
    expect(() => decodeOid(Uint8Array.of(0x2a, 0x86))).toThrow(DerError);
  });

  it("writes UTCTime until 2049 and GeneralizedTime from 2050, and reads both back", () => {
    const utc = x509Time(new Date(Date.UTC(2049, 11, 31, 23, 59, 59, 999)));
    expect(Buffer.from(utc.subarray(2)).toString()).toBe("491231235959Z");
    expect(utc[0]).toBe(0x17);
    const gen = x509Time(new Date(Date.UTC(2050, 0, 1, 0, 0, 0)));
    expect(Buffer.from(gen.subarray(2)).toString()).toBe("20500101000000Z");
    expect(gen[0]).toBe(0x18);
    expect(decodeTime(utc, readTlv(utc)).toISOString()).toBe("2049-12-31T23:59:59.000Z");
    expect(decodeTime(gen, readTlv(gen)).toISOString()).toBe("2050-01-01T00:00:00.000Z");
    const y1999 = x509Time(new Date(Date.UTC(1999, 5, 1)));
    expect(decodeTime(y1999, readTlv(y1999)).getUTCFullYear()).toBe(1999);
  });

  it.each([
    ["indefinite length", "3080"],
    ["non-minimal long length", "30810100"],
    ["truncated content", "300500"],
    ["truncated header", "30"],
    ["multi-byte tag", "1f0100"],
  ])("reader refuses %s", (_name, input) => {
    const b = Buffer.from(input, "hex");
    expect(() => children(b, readTlv(b))).toThrow(DerError);
  });
});
