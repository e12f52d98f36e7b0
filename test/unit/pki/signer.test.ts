import { generateKeyPairSync, sign, verify } from "node:crypto";
import { describe, expect, it } from "vitest";
import { createRootCa, issueIntermediateCa } from "../../../src/pki/issue.js";
import { ecdsaRawToDer, isSigner, keyObjectSigner, type Signer } from "../../../src/pki/signer.js";

const p256 = () => generateKeyPairSync("ec", { namedCurve: "P-256" });

describe("Signer", () => {
  it("ecdsaRawToDer turns r || s (what PKCS#11 CKM_ECDSA returns) into the DER signature X.509 wants", () => {
    const { privateKey, publicKey } = p256();
    for (let i = 0; i < 50; i++) {
      const data = Buffer.from(`message ${i}`);
      const raw = sign("sha256", data, { key: privateKey, dsaEncoding: "ieee-p1363" });
      const der = ecdsaRawToDer(raw);
      expect(verify("sha256", data, { key: publicKey, dsaEncoding: "der" }, der)).toBe(true);
    }
    expect(() => ecdsaRawToDer(new Uint8Array(63))).toThrow(/63 bytes is not r \|\| s/);
  });

  it("a root and an intermediate can be signed through a Signer that is not a KeyObject, and a signer of another key is refused", () => {
    const root = p256();
    const inner = keyObjectSigner(root.privateKey);
    // A signer that only forwards: issuing code never sees a KeyObject.
    const opaque: Signer = { spkiDer: inner.spkiDer, signatureAlgorithm: inner.signatureAlgorithm, sign: (d) => inner.sign(d) };
    expect(isSigner(opaque)).toBe(true);
    expect(isSigner(root.privateKey)).toBe(false);
    const now = new Date();
    const rootDer = createRootCa({ subject: { commonName: "Token Root" }, privateKey: opaque, now, validitySeconds: 86_400 });
    const inter = p256().publicKey.export({ type: "spki", format: "der" });
    const interDer = issueIntermediateCa({ issuer: { certificateDer: rootDer, privateKey: opaque }, subject: { commonName: "I" }, publicKeySpkiDer: inter, now, validitySeconds: 3600 });
    expect(interDer.length).toBeGreaterThan(0);
    const other = keyObjectSigner(p256().privateKey);
    expect(() => issueIntermediateCa({ issuer: { certificateDer: rootDer, privateKey: other }, subject: { commonName: "I" }, publicKeySpkiDer: inter, now, validitySeconds: 3600 })).toThrow(
      /issuer: the private key does not belong to the CA certificate/,
    );
  });
});
