import "../../../src/pki/engine.js";
import { generateKeyPairSync } from "node:crypto";
import * as asn1js from "asn1js";
import * as pkijs from "pkijs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FailedPrecondition, InvalidArgument } from "../../../src/common/errors.js";
import { certificateInfo } from "../../../src/pki/inspect.js";
import { decodeCertificate } from "../../../src/pki/parse.js";
import { issueServiceCertificate } from "../../../src/pki/issue.js";
import { exportPublicKeySpkiDer, generateKeyPair, subjectKeyIdentifier } from "../../../src/pki/keys.js";
import { createLeafIssuer, type IssueLeafRequest, type LeafIssuer } from "../../../src/pki/leaf.js";
import { certificateToPem } from "../../../src/pki/pem.js";
import { DAY, makeKmiPki, openssl, opensslOk, tempDir, x509Text, type KmiPki, type TempDir } from "./support.js";

const ab = (b: Uint8Array): ArrayBuffer => b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
const hex = (b: ArrayBuffer | Uint8Array): string => Buffer.from(b instanceof Uint8Array ? b : new Uint8Array(b)).toString("hex");

describe("fast leaf builder", () => {
  let pki: KmiPki;
  let issuer: LeafIssuer;
  let spki: Uint8Array;
  let tmp: TempDir;
  let base: IssueLeafRequest;

  beforeAll(async () => {
    pki = await makeKmiPki();
    issuer = createLeafIssuer({ certificateDer: pki.intermediate.der, privateKey: pki.intermediate.key.privateKey });
    spki = exportPublicKeySpkiDer((await generateKeyPair("ecdsa-p256")).publicKey);
    tmp = tempDir();
    base = {
      publicKeySpkiDer: spki,
      dnsNames: ["www.example.com"],
      notBefore: new Date(pki.now.getTime() - 60_000),
      notAfter: new Date(pki.now.getTime() + 30 * DAY * 1000),
    };
  });
  afterAll(() => tmp.cleanup());

  it("parses with pkijs with the intended semantics, and pkijs verifies its signature with the intermediate", async () => {
    const start = Math.floor(pki.now.getTime() / 1000) * 1000 + DAY * 1000;
    const notBefore = new Date(start + 678);
    const notAfter = new Date(start + 31 * DAY * 1000 + 999);
    const iss = createLeafIssuer({ certificateDer: pki.intermediate.der, privateKey: pki.intermediate.key.privateKey });
    const leaf = iss.issueLeafDetailed({
      ...base,
      dnsNames: ["WWW.Example.com", "*.api.example.com", "www.example.com"],
      ipAddresses: ["10.1.2.3", "2001:db8::8:800:200c:417a"],
      notBefore,
      notAfter,
    });
    const cert = pkijs.Certificate.fromBER(ab(leaf.der));
    const intermediate = pkijs.Certificate.fromBER(ab(pki.intermediate.der));
    expect(cert.version).toBe(2);
    expect(hex(cert.serialNumber.valueBlock.valueHexView)).toBe(leaf.serialHex);
    expect(cert.issuer.isEqual(intermediate.subject)).toBe(true);
    expect(cert.subject.typesAndValues.map((t) => [t.type, t.value.valueBlock.value])).toEqual([["2.5.4.3", "www.example.com"]]);
    // Whole seconds: the fraction is dropped, never rounded up.
    expect(cert.notBefore.value.getTime()).toBe(start);
    expect(cert.notAfter.value.getTime()).toBe(start + 31 * DAY * 1000);
    expect(cert.notBefore.type).toBe(0); // UTCTime before 2050
    expect(hex(cert.subjectPublicKeyInfo.toSchema().toBER())).toBe(hex(spki));

    const ext = new Map(cert.extensions!.map((e) => [e.extnID, e]));
    expect([...ext.keys()]).toEqual(["2.5.29.19", "2.5.29.15", "2.5.29.37", "2.5.29.17", "2.5.29.14", "2.5.29.35"]);
    const bc = ext.get("2.5.29.19")!;
    expect(bc.critical).toBe(true);
    expect((bc.parsedValue as pkijs.BasicConstraints).cA).toBe(false);
    expect(ext.get("2.5.29.15")!.critical).toBe(true);
    expect(hex((ext.get("2.5.29.15")!.parsedValue as asn1js.BitString).valueBlock.valueHexView)).toBe("80");
    expect((ext.get("2.5.29.37")!.parsedValue as pkijs.ExtKeyUsage).keyPurposes).toEqual(["1.3.6.1.5.5.7.3.1"]);
    const san = (ext.get("2.5.29.17")!.parsedValue as pkijs.AltName).altNames.map((n) =>
      n.type === 7 ? [7, hex((n.value as asn1js.OctetString).valueBlock.valueHexView)] : [n.type, n.value],
    );
    expect(san).toEqual([
      [2, "www.example.com"],
      [2, "*.api.example.com"],
      [7, "0a010203"],
      [7, "20010db8000000000008080020 0c417a".replace(" ", "")],
    ]);
    expect(ext.get("2.5.29.17")!.critical).toBe(false); // the subject has a CN
    expect(hex((ext.get("2.5.29.14")!.parsedValue as asn1js.OctetString).valueBlock.valueHexView)).toBe(hex(subjectKeyIdentifier(spki)));
    const aki = ext.get("2.5.29.35")!.parsedValue as pkijs.AuthorityKeyIdentifier;
    expect(hex(aki.keyIdentifier!.valueBlock.valueHexView)).toBe(certificateInfo(pki.intermediate.der).subjectKeyIdHex);
    expect(aki.keyIdentifier!.valueBlock.valueHexView.length).toBe(20);
    // pkijs re-encodes the parsed TBSCertificate to the very same bytes: our DER is canonical.
    expect(hex(cert.encodeTBS().toBER())).toBe(hex(cert.tbsView));
    // An independent signature check: pkijs over WebCrypto (the engine), not node:crypto's sign path.
    expect(await cert.verify(intermediate)).toBe(true);
    expect(await cert.verify(pkijs.Certificate.fromBER(ab(pki.root.der)))).toBe(false);
    expect(leaf.dnsNames).toEqual(["www.example.com", "*.api.example.com"]);
    expect(leaf.ipAddresses).toEqual(["10.1.2.3", "2001:db8::8:800:200c:417a"]);
  });

  it("parses with openssl with the same names, serial and dates", () => {
    const leaf = issuer.issueLeafDetailed({ ...base, dnsNames: ["shop.example.net"], ipAddresses: ["198.51.100.1"] });
    const out = opensslOk(
      ["x509", "-inform", "DER", "-noout", "-serial", "-startdate", "-enddate", "-subject", "-ext", "subjectAltName,basicConstraints", "-nameopt", "RFC2253"],
      { input: leaf.der },
    );
    expect(out).toContain(`serial=${leaf.serialHex.toUpperCase()}`);
    const fmt = (d: Date): string =>
      d.toUTCString().replace(/^\w+, (\d+) (\w+) (\d+) ([\d:]+) GMT$/, (_m, day, mon, y, t) => `${mon} ${String(Number(day)).padStart(2, " ")} ${t} ${y} GMT`);
    expect(out).toContain(`notBefore=${fmt(leaf.notBefore)}`);
    expect(out).toContain(`notAfter=${fmt(leaf.notAfter)}`);
    expect(out).toContain("subject=CN=shop.example.net");
    expect(out).toMatch(/DNS:shop.example.net, IP Address:198.51.100.1/);
    expect(out).toMatch(/CA:FALSE/);
  });

  it("clamps notAfter to the issuer's notAfter, and openssl agrees", () => {
    const intNotAfter = certificateInfo(pki.intermediate.der).notAfter;
    const leaf = issuer.issueLeafDetailed({ ...base, notAfter: new Date(intNotAfter.getTime() + 40 * DAY * 1000) });
    expect(leaf.notAfter).toEqual(intNotAfter);
    expect(certificateInfo(leaf.der).notAfter).toEqual(intNotAfter);
    expect(opensslOk(["x509", "-inform", "DER", "-noout", "-enddate"], { input: leaf.der })).toBe(
      opensslOk(["x509", "-inform", "DER", "-noout", "-enddate"], { input: pki.intermediate.der }),
    );
    // And a leaf backdated before the intermediate existed starts when the intermediate does.
    const early = issuer.issueLeafDetailed({ ...base, notBefore: new Date(pki.now.getTime() - 10 * DAY * 1000) });
    expect(early.notBefore).toEqual(certificateInfo(pki.intermediate.der).notBefore);
  });

  it("serials are unique, positive and 16 bytes across 1000 leaves", () => {
    const serials = new Set<string>();
    for (let i = 0; i < 1000; i++) {
      const der = issuer.issueLeaf(base);
      const s = decodeCertificate(der, "leaf").serialBytes.reduce((h, b) => h + b.toString(16).padStart(2, "0"), "");
      expect(s).toMatch(/^[4-7][0-9a-f]{31}$/);
      serials.add(s);
    }
    expect(serials.size).toBe(1000);
  });

  it("CN defaults: first name when shorter than 64 characters; none (and a critical SAN) otherwise; explicit CN normalized", () => {
    const long = `${"a".repeat(60)}.example.com`;
    const noCn = certificateInfo(issuer.issueLeaf({ ...base, dnsNames: [long, "b.example.com"] }));
    expect(noCn.subject).toBe("");
    expect(noCn.criticalExtensions).toContain("2.5.29.17");
    expect(x509Text(noCn.der)).toMatch(/X509v3 Subject Alternative Name: critical\n/);
    const ipFirst = certificateInfo(issuer.issueLeaf({ ...base, dnsNames: [], ipAddresses: ["192.0.2.1"] }));
    expect(ipFirst.subject).toBe("CN=192.0.2.1");
    const explicit = certificateInfo(issuer.issueLeaf({ ...base, dnsNames: ["a.example.com", "b.example.com"], commonName: "B.example.com" }));
    expect(explicit.commonName).toBe("b.example.com");
    const none = certificateInfo(issuer.issueLeaf({ ...base, commonName: null }));
    expect(none.commonName).toBeUndefined();
    const unset = certificateInfo(issuer.issueLeaf({ ...base, commonName: "" }));
    expect(unset.commonName).toBe("www.example.com");
    const ipCn = certificateInfo(issuer.issueLeaf({ ...base, ipAddresses: ["2001:db8::1"], commonName: "2001:DB8:0:0:0:0:0:1" }));
    expect(ipCn.commonName).toBe("2001:db8::1");
  });

  it("100 names, wildcards and IPv6 pass openssl verify with hostname and IP checks", () => {
    const dnsNames = Array.from({ length: 97 }, (_, i) => `h${i}.example.org`).concat(["*.wild.example.org"]);
    const der = issuer.issueLeaf({ ...base, dnsNames, ipAddresses: ["::1", "203.0.113.9"] });
    expect(certificateInfo(der).dnsNames).toHaveLength(98);
    const root = tmp.write("root.pem", pki.root.pem);
    const int = tmp.write("int.pem", pki.intermediate.pem);
    const leaf = tmp.write("many.pem", certificateToPem(der));
    const ok = (extra: string[]): number => openssl(["verify", "-CAfile", root, "-untrusted", int, ...extra, leaf]).code;
    expect(ok(["-verify_hostname", "h96.example.org"])).toBe(0);
    expect(ok(["-verify_hostname", "x.wild.example.org"])).toBe(0);
    expect(ok(["-verify_ip", "::1"])).toBe(0);
    expect(ok(["-verify_hostname", "h97.example.org"])).not.toBe(0);
  });

  const ecP384 = (): Uint8Array => exportPublicKeySpkiDer(generateKeyPairSync("ec", { namedCurve: "P-384" }).publicKey);
  const rsa1024 = (): Uint8Array => exportPublicKeySpkiDer(generateKeyPairSync("rsa", { modulusLength: 1024 }).publicKey);
  const ed25519 = (): Uint8Array => exportPublicKeySpkiDer(generateKeyPairSync("ed25519").publicKey);
  const offCurve = (): Uint8Array => {
    const s = exportPublicKeySpkiDer(generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey).slice();
    s[90]! ^= 1;
    return s;
  };

  it.each<[string, Partial<IssueLeafRequest> | (() => Partial<IssueLeafRequest>), string]>([
    ["no names", { dnsNames: [], ipAddresses: [] }, "dns_names: no names; give at least one hostname or IP address"],
    ["underscore in a label", { dnsNames: ["bad_name.example.com"] }, 'dns_names[0]: "bad_name.example.com" is not a valid hostname'],
    ["leading hyphen", { dnsNames: ["ok.example.com", "-x.example.com"] }, "dns_names[1]:"],
    ["label over 63", { dnsNames: [`${"a".repeat(64)}.example.com`] }, "a label is longer than 63 characters"],
    ["name over 253", { dnsNames: [Array.from({ length: 50 }, () => "abcde").join(".") + ".com"] }, "longer than 253 characters"],
    ["wildcard not leftmost", { dnsNames: ["a.*.example.com"] }, "a wildcard may only be the whole leftmost label"],
    ["partial wildcard", { dnsNames: ["w*.example.com"] }, "a wildcard must be the whole leftmost label"],
    ["wildcard on a TLD", { dnsNames: ["*.com"] }, "a wildcard needs at least two labels after it"],
    ["wildcard on a public suffix", { dnsNames: ["*.co.uk"] }, 'dns_names[0]: "*.co.uk" is not a valid hostname (a wildcard on the public suffix "co.uk" would cover every domain under it'],
    ["wildcard on a PSL wildcard rule's suffix", { dnsNames: ["*.anything.ck"] }, 'the public suffix "anything.ck"'],
    ["IPv4 unspecified", { ipAddresses: ["0.0.0.0"] }, 'ip_addresses[0]: "0.0.0.0" is the unspecified address, which names no server'],
    ["IPv6 unspecified", { ipAddresses: ["::"] }, 'ip_addresses[0]: "::" is the unspecified address'],
    ["broadcast", { ipAddresses: ["255.255.255.255"] }, 'ip_addresses[0]: "255.255.255.255" is the broadcast address'],
    ["IPv4 multicast", { ipAddresses: ["230.1.2.3"] }, "is a multicast address"],
    ["IPv6 multicast", { ipAddresses: ["ff05::1:3"] }, "is a multicast address"],
    ["IPv4-mapped multicast", { ipAddresses: ["::ffff:224.0.0.251"] }, "is a multicast address"],
    ["IP as hostname", { dnsNames: ["192.0.2.1"] }, "pass it as an IP address"],
    ["unicode hostname", { dnsNames: ["bücher.example"] }, "write IDNs in their xn-- form"],
    ["trailing dot", { dnsNames: ["example.com."] }, "trailing dot"],
    ["bad IPv4", { ipAddresses: ["1.2.3"] }, 'ip_addresses[0]: "1.2.3" is not a valid IP address'],
    ["IPv4 leading zero", { ipAddresses: ["01.2.3.4"] }, "ip_addresses[0]"],
    ["IPv6 zone", { ipAddresses: ["fe80::1%eth0"] }, "zone IDs have no place in a certificate"],
    ["IPv6 double ::", { ipAddresses: ["1::2::3"] }, '"::" may appear only once'],
    ["101 names", { dnsNames: Array.from({ length: 101 }, (_, i) => `n${i}.example.com`) }, "101 names in all; at most 100"],
    ["CN over 64", { commonName: "a".repeat(65) }, "common_name: longer than 64 characters"],
    ["CN not a name", { commonName: "other.example.com" }, "common_name: must be one of the certificate's dns_names or ip_addresses"],
    ["garbage key", { publicKeySpkiDer: new Uint8Array(100).fill(7) }, "public_key: does not parse"],
    ["empty key", { publicKeySpkiDer: new Uint8Array(0) }, "public_key: missing or wrong size"],
    ["P-384 key", () => ({ publicKeySpkiDer: ecP384() }), "public_key: EC keys must be on P-256"],
    ["RSA 1024 key", () => ({ publicKeySpkiDer: rsa1024() }), "public_key: RSA modulus of 1024 bits"],
    ["Ed25519 key", () => ({ publicKeySpkiDer: ed25519() }), "public_key: missing or wrong size"],
    ["point off the curve", () => ({ publicKeySpkiDer: offCurve() }), "public_key: the EC point is not on the P-256 curve"],
    ["notAfter before notBefore", { notAfter: new Date(Date.now() - 3600e3), notBefore: new Date() }, "not_after: must be after not_before"],
    ["invalid date", { notAfter: new Date(Number.NaN) }, "not_after: not a valid date"],
    ["ends before the issuer starts", { notBefore: new Date(2000, 0, 1), notAfter: new Date(2000, 0, 2) }, "is before the issuing CA's notBefore"],
  ])("refuses with InvalidArgument: %s", (_name, patch, message) => {
    const request = { ...base, ...(typeof patch === "function" ? patch() : patch) };
    let err: unknown;
    try {
      issuer.issueLeaf(request);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidArgument);
    expect((err as Error).message).toContain(message);
  });

  it("refuses a validity beyond maxValiditySeconds, and one that the issuer's validity leaves no room for", () => {
    const capped = createLeafIssuer({
      certificateDer: pki.intermediate.der,
      privateKey: pki.intermediate.key.privateKey,
      maxValiditySeconds: 47 * DAY,
    });
    expect(() => capped.issueLeaf({ ...base, notAfter: new Date(base.notBefore.getTime() + 48 * DAY * 1000) })).toThrow(
      "not_after: validity longer than the 4060800 s cap",
    );
    expect(capped.issueLeaf({ ...base, notAfter: new Date(base.notBefore.getTime() + 47 * DAY * 1000) }).length).toBeGreaterThan(300);
    const after = new Date(issuer.issuerNotAfter.getTime() + 1000);
    const call = (): Uint8Array => issuer.issueLeaf({ ...base, notBefore: after, notAfter: new Date(after.getTime() + DAY * 1000) });
    expect(call).toThrow(FailedPrecondition);
    expect(call).toThrow("issuer: valid only until");
  });

  it("createLeafIssuer refuses a non-CA certificate and a key that is not the certificate's", async () => {
    const k = await generateKeyPair("ecdsa-p256");
    const svc = issueServiceCertificate({
      issuer: { certificateDer: pki.root.der, privateKey: pki.root.key.privateKey },
      serviceName: "svc",
      publicKeySpkiDer: exportPublicKeySpkiDer(k.publicKey),
      now: pki.now,
      validitySeconds: DAY,
    });
    expect(() => createLeafIssuer({ certificateDer: svc, privateKey: k.privateKey })).toThrow(FailedPrecondition);
    expect(() => createLeafIssuer({ certificateDer: svc, privateKey: k.privateKey })).toThrow("issuer: not a CA certificate");
    expect(() => createLeafIssuer({ certificateDer: pki.intermediate.der, privateKey: k.privateKey })).toThrow(
      "issuer: the private key does not belong to the CA certificate",
    );
  });
});
