import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { checkNames, encodeIpAddress, formatIpAddress, normalizeDnsName } from "../../../src/pki/san.js";

const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex");

describe("san", () => {
  it.each([
    ["192.0.2.1", "c0000201", "192.0.2.1"],
    ["::", "00000000000000000000000000000000", "::"],
    ["::1", "00000000000000000000000000000001", "::1"],
    ["2001:DB8::1", "20010db8000000000000000000000001", "2001:db8::1"],
    ["2001:db8:0:0:1:0:0:1", "20010db8000000000001000000000001", "2001:db8::1:0:0:1"],
    ["fe80::", "fe800000000000000000000000000000", "fe80::"],
    ["::ffff:192.0.2.1", "00000000000000000000ffffc0000201", "::ffff:192.0.2.1"],
    ["1:2:3:4:5:6:7:8", "00010002000300040005000600070008", "1:2:3:4:5:6:7:8"],
    ["1:2:3:4:5:6:1.2.3.4", "00010002000300040005000601020304", "1:2:3:4:5:6:102:304"],
    ["2001:db8:0:1:1:1:1:1", "20010db8000000010001000100010001", "2001:db8:0:1:1:1:1:1"],
  ])("IP %s encodes to %s and formats as %s", (ip, bytes, text) => {
    expect(hex(encodeIpAddress(ip, "ip"))).toBe(bytes);
    expect(formatIpAddress(encodeIpAddress(ip, "ip"))).toBe(text);
  });

  it.each(["", "1.2.3.4.5", "256.1.1.1", "1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "::g", "12345::", "1:2:3:4:5:6:7::8", "localhost"])(
    "refuses IP %j",
    (ip) => {
      expect(() => encodeIpAddress(ip, "ip_addresses[0]")).toThrow(InvalidArgument);
    },
  );

  it("lowercases hostnames, accepts LDH, xn-- and single labels", () => {
    expect(normalizeDnsName("WWW.Example.COM", "d")).toBe("www.example.com");
    expect(normalizeDnsName("xn--bcher-kva.example", "d")).toBe("xn--bcher-kva.example");
    expect(normalizeDnsName("localhost", "d")).toBe("localhost");
    expect(normalizeDnsName("*.a.b", "d")).toBe("*.a.b");
    expect(normalizeDnsName(`${"a".repeat(63)}.b`, "d")).toHaveLength(65);
  });

  it("deduplicates names and keeps first-seen order", () => {
    const n = checkNames(["B.example", "a.example", "b.example"], ["::1", "0:0:0:0:0:0:0:1", "10.0.0.1"], { requireOne: true });
    expect(n.dnsNames).toEqual(["b.example", "a.example"]);
    expect(n.ipAddresses).toEqual(["::1", "10.0.0.1"]);
    expect(n.ipBytes.map((b) => b.length)).toEqual([16, 4]);
  });
});
