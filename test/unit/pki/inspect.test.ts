import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { certificateInfo } from "../../../src/pki/inspect.js";
import { parseOneCertificate } from "../../../src/pki/pem.js";
import { opensslOk, tempDir, type TempDir } from "./support.js";

describe("certificateInfo on an openssl-made certificate agrees with openssl", () => {
  let tmp: TempDir;
  let der: Uint8Array;
  beforeAll(() => {
    tmp = tempDir();
    const ext = [
      "basicConstraints=critical,CA:TRUE,pathlen:3",
      "keyUsage=critical,digitalSignature,keyCertSign,cRLSign,decipherOnly,keyAgreement",
      "extendedKeyUsage=serverAuth,clientAuth,codeSigning",
      "subjectAltName=DNS:a.example,DNS:*.b.example,IP:10.9.8.7,IP:2001:db8::5,URI:kmi://machine/m-1,email:x@example.com",
      "authorityKeyIdentifier=keyid",
    ];
    opensslOk([
      "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", join(tmp.dir, "k.pem"), "-out", join(tmp.dir, "c.pem"),
      "-days", "10", "-subj", "/C=DE/O=Example GmbH/OU=Ops/CN=inspect me", "-set_serial", "0x00ff0102030405",
      ...ext.flatMap((e) => ["-addext", e]),
    ]);
    der = parseOneCertificate(readFileSync(join(tmp.dir, "c.pem")), "c");
  }, 20_000);
  afterAll(() => tmp.cleanup());

  it("matches names, serial, dates, fingerprint and extensions", () => {
    const info = certificateInfo(der);
    const o = (args: string[]): string => opensslOk(["x509", "-inform", "DER", "-noout", ...args], { input: der }).trim();
    expect(`subject=${info.subject}`).toBe(o(["-subject", "-nameopt", "RFC2253"]));
    expect(`issuer=${info.issuer}`).toBe(o(["-issuer", "-nameopt", "RFC2253"]));
    expect(info.subject).toBe("CN=inspect me,OU=Ops,O=Example GmbH,C=DE");
    expect(info.commonName).toBe("inspect me");
    expect(info.serialHex).toBe("ff0102030405");
    expect(o(["-serial"])).toBe(`serial=${info.serialHex.toUpperCase()}`);
    expect(`sha256 Fingerprint=${info.sha256Fingerprint}`).toBe(o(["-fingerprint", "-sha256"]));
    expect(info.notBefore.getTime()).toBe(new Date(o(["-startdate"]).slice("notBefore=".length)).getTime());
    expect(info.notAfter.getTime()).toBe(new Date(o(["-enddate"]).slice("notAfter=".length)).getTime());
    expect(info.isCa).toBe(true);
    expect(info.pathLenConstraint).toBe(3);
    expect(info.keyUsage).toEqual(["digitalSignature", "keyAgreement", "keyCertSign", "cRLSign", "decipherOnly"]);
    expect(info.extKeyUsage).toEqual(["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2", "1.3.6.1.5.5.7.3.3"]);
    expect(info.dnsNames).toEqual(["a.example", "*.b.example"]);
    expect(info.ipAddresses).toEqual(["10.9.8.7", "2001:db8::5"]);
    expect(info.uris).toEqual(["kmi://machine/m-1"]);
    expect(info.keyAlgorithm).toBe("rsa-2048");
    expect(info.signatureAlgorithm).toBe("sha256WithRSAEncryption");
    const text = o(["-text"]);
    const ski = /Subject Key Identifier: \n\s+([0-9A-F:]+)/.exec(text)![1]!;
    expect(info.subjectKeyIdHex).toBe(ski.replace(/:/g, "").toLowerCase());
    const aki = /Authority Key Identifier: \n\s+(?:keyid:)?([0-9A-F:]+)/.exec(text)?.[1];
    expect(info.authorityKeyIdHex).toBe(aki ? aki.replace(/:/g, "").toLowerCase() : null);
    expect(info.selfIssued).toBe(true);
    expect(info.criticalExtensions).toEqual(["2.5.29.19", "2.5.29.15"]);
  });

  it("refuses a certificate whose extension is malformed, naming the field", () => {
    // Corrupt the basicConstraints value's inner SEQUENCE tag (30 -> 31) where it appears.
    const bc = Buffer.from("0603551d130101ff0408", "hex");
    const at = Buffer.from(der).indexOf(bc);
    expect(at).toBeGreaterThan(0);
    const bad = der.slice();
    bad[at + bc.length]! = 0x31;
    expect(() => certificateInfo(bad, "customer_root")).toThrow(InvalidArgument);
    expect(() => certificateInfo(bad, "customer_root")).toThrow("customer_root:");
  });
});
