import { X509Certificate } from "node:crypto";
import { describe, expect, it } from "vitest";
import { compressIpv6, describeOriginCertificate, isLeafDnsName, leafNames, MAX_LEAF_NAMES } from "../../../src/proxy/origin-cert.js";
import { makeOriginPki } from "../../fixtures/proxy/origins.js";

describe("origin certificate facts", () => {
  it("reads names, end of validity and fingerprint from a real certificate", () => {
    const pki = makeOriginPki();
    const x = new X509Certificate(pki.other.cert);
    const d = describeOriginCertificate(x);
    expect(d.dnsNames).toEqual(["localhost", "alt.localhost"]);
    expect(d.ipAddresses).toEqual(["127.0.0.1"]);
    expect(d.notAfter.getTime()).toBe(Date.parse(x.validTo));
    expect(d.fingerprint).toBe(x.fingerprint256);
  });

  it.each([
    ["0:0:0:0:0:0:0:1", "::1"],
    ["2001:DB8:0:0:1:0:0:1", "2001:db8::1:0:0:1"],
    ["2001:db8:0:0:0:0:2:1", "2001:db8::2:1"],
    ["fe80:0:0:0:0:0:0:0", "fe80::"],
    ["1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"],
    ["10.0.0.1", "10.0.0.1"],
  ])("compressIpv6(%s) = %s", (a, b) => {
    expect(compressIpv6(a)).toBe(b);
  });

  it.each([
    ["www.example.com", true],
    ["*.example.com", true],
    ["a_b.example", true],
    ["*", false],
    ["a.*.example", false],
    ["-bad.example", false],
    ["exa mple.com", false],
  ])("isLeafDnsName(%s) = %s", (n, ok) => {
    expect(isLeafDnsName(n)).toBe(ok);
  });

  it("caps the leaf at 100 names and keeps the ones matching the requested host first", () => {
    const dnsNames = Array.from({ length: 150 }, (_, i) => `h${i}.example`);
    dnsNames.push("*.target.example");
    const origin = { fingerprint: "F", dnsNames, ipAddresses: ["10.0.0.1"], notAfter: new Date() };
    const n = leafNames(origin, "www.target.example");
    expect(n.truncated).toBe(true);
    expect(n.dnsNames[0]).toBe("*.target.example");
    expect(n.dnsNames.length + n.ipAddresses.length).toBe(MAX_LEAF_NAMES);
    const small = leafNames({ ...origin, dnsNames: ["a.example"] }, "a.example");
    expect(small).toEqual({ dnsNames: ["a.example"], ipAddresses: ["10.0.0.1"], truncated: false });
  });
});
