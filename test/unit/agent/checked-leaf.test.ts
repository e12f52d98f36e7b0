/**
 * The agent's check of a leaf the KDC signed with a token-held intermediate (leaf-issuer.ts
 * `checkedLeaf`): handed out only when the intermediate the agent holds signed it, it is not a
 * CA, and it is for the key and exactly the names asked for; its serial and end are read from
 * the certificate, not from the KDC's answer.
 */
import { execFileSync } from "node:child_process";
import { generateKeyPairSync, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { checkedLeaf, type LeafSpec } from "../../../src/agent/leaf-issuer.js";
import { exportPublicKeySpkiDer } from "../../../src/pki/keys.js";
import { createLeafIssuer } from "../../../src/pki/leaf.js";
import { makeIntermediate, makeRoot } from "../../fixtures/agent/tenant-ca.js";

const root = makeRoot();
const inter = makeIntermediate(root, "acme", 1);
const other = makeIntermediate(root, "acme", 2);
const interCert = new X509Certificate(inter.der);
const now = Date.now();

const freshKey = () => exportPublicKeySpkiDer(generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey);
const spec = (over: Partial<LeafSpec> = {}): LeafSpec => ({
  publicKeySpkiDer: freshKey(),
  dnsNames: ["www.example.test"],
  ipAddresses: ["2001:db8::1"],
  commonName: undefined,
  notBefore: new Date(now - 60_000),
  notAfter: new Date(now + 86_400_000),
  ...over,
});
/** What a KDC would answer: a leaf built by `by` for `s`. */
function answer(by: { der: Uint8Array; key: import("node:crypto").KeyObject }, s: LeafSpec): Uint8Array {
  return createLeafIssuer({ certificateDer: by.der, privateKey: by.key }).issueLeaf({ ...s, commonName: s.commonName ?? null });
}

describe("checkedLeaf", () => {
  it("hands out a leaf the held intermediate signed for the key and names asked for, with serial and end from the certificate", () => {
    const s = spec({ dnsNames: ["WWW.Example.test"], ipAddresses: ["2001:0db8:0:0:0:0:0:1"] });
    const out = checkedLeaf(answer(inter, s), s, interCert);
    const leaf = new X509Certificate(out.certificateDer);
    expect(out.serialHex.replace(/^0+/, "")).toBe(leaf.serialNumber.toLowerCase().replace(/^0+/, ""));
    expect(out.notAfter.getTime()).toBe(Date.parse(leaf.validTo));
  });

  it("refuses a leaf another intermediate signed", () => {
    const s = spec();
    expect(() => checkedLeaf(answer(other, s), s, interCert)).toThrow(/the intermediate did not sign/);
  });

  it("refuses a leaf for another key", () => {
    const s = spec();
    expect(() => checkedLeaf(answer(inter, spec({ dnsNames: s.dnsNames, ipAddresses: s.ipAddresses })), s, interCert)).toThrow(/another key/);
  });

  it("refuses a leaf with a name more, or one less, than asked", () => {
    const s = spec();
    expect(() => checkedLeaf(answer(inter, { ...s, dnsNames: [...s.dnsNames, "bank.example"] }), s, interCert)).toThrow(/names other hosts/);
    expect(() => checkedLeaf(answer(inter, { ...s, ipAddresses: [] }), s, interCert)).toThrow(/names other hosts/);
  });

  it("refuses a CA certificate (made with openssl: kmi's own pki will not issue one under pathlen 0), and bytes that do not parse", () => {
    const dir = mkdtempSync(join(tmpdir(), "kmi-checked-leaf-"));
    try {
      const leafKey = generateKeyPairSync("ec", { namedCurve: "P-256" });
      writeFileSync(join(dir, "leaf.key"), leafKey.privateKey.export({ type: "pkcs8", format: "pem" }));
      writeFileSync(join(dir, "inter.key"), inter.key.export({ type: "pkcs8", format: "pem" }));
      writeFileSync(join(dir, "inter.pem"), inter.pem);
      execFileSync("openssl", ["req", "-x509", "-new", "-key", join(dir, "leaf.key"), "-CA", join(dir, "inter.pem"), "-CAkey", join(dir, "inter.key"), "-subj", "/CN=www.example.test", "-days", "1",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "subjectAltName=DNS:www.example.test,IP:2001:db8::1", "-outform", "DER", "-out", join(dir, "ca.der")]);
      const s = spec({ publicKeySpkiDer: exportPublicKeySpkiDer(leafKey.publicKey) });
      expect(() => checkedLeaf(readFileSync(join(dir, "ca.der")), s, interCert)).toThrow(/is a CA/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    expect(() => checkedLeaf(new Uint8Array([1, 2, 3]), spec(), interCert)).toThrow(/does not parse/);
  });
});
