import { createHash, generateKeyPairSync, sign, verify } from "node:crypto";
import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import {
  describePublicKey,
  exportPrivateKeyPkcs8Der,
  exportPublicKeySpkiDer,
  generateKeyPair,
  importPrivateKeyPkcs8Der,
  importPublicKeySpkiDer,
  isKeyAlgorithm,
  keyAlgorithmOf,
  keyId,
  privateKeyMatchesSpki,
  subjectKeyIdentifier,
  type KeyAlgorithm,
} from "../../../src/pki/keys.js";
import { signatureAlgorithmFor } from "../../../src/pki/signature.js";
import { encodePem } from "../../../src/pki/pem.js";
import { opensslOk } from "./support.js";

describe("keys", () => {
  it("generates P-256, round-trips PKCS#8 and SPKI DER, and the imported key signs what the public key verifies", async () => {
    const pair = await generateKeyPair("ecdsa-p256");
    const pkcs8 = exportPrivateKeyPkcs8Der(pair.privateKey);
    const spki = exportPublicKeySpkiDer(pair.privateKey);
    expect(Buffer.from(spki).equals(Buffer.from(exportPublicKeySpkiDer(pair.publicKey)))).toBe(true);
    const priv = importPrivateKeyPkcs8Der(pkcs8);
    const pub = importPublicKeySpkiDer(spki);
    const sig = sign("sha256", Buffer.from("m"), priv);
    expect(verify("sha256", Buffer.from("m"), pub, sig)).toBe(true);
    expect(privateKeyMatchesSpki(priv, spki)).toBe(true);
    expect(keyAlgorithmOf(pub)).toBe("ecdsa-p256");
    expect(signatureAlgorithmFor(priv).name).toBe("ecdsa-with-SHA256");
    // openssl reads the same PKCS#8 and prints the same SPKI.
    const pem = encodePem("PRIVATE KEY", pkcs8);
    const fromOpenssl = opensslOk(["pkey", "-pubout"], { input: pem });
    expect(fromOpenssl.replace(/-----[A-Z ]+-----|\s/g, "")).toBe(Buffer.from(spki).toString("base64"));
  });

  it("keyId is the lowercase hex SHA-256 of the SPKI DER; the SKI is 20 bytes of SHA-256 over the key bits", async () => {
    const spki = exportPublicKeySpkiDer((await generateKeyPair("ecdsa-p256")).publicKey);
    expect(keyId(spki)).toBe(createHash("sha256").update(spki).digest("hex"));
    expect(keyId(spki)).toMatch(/^[0-9a-f]{64}$/);
    const ski = subjectKeyIdentifier(spki);
    expect(ski).toHaveLength(20);
    expect(Buffer.from(ski).equals(createHash("sha256").update(spki.subarray(26)).digest().subarray(0, 20))).toBe(true);
  });

  it("names other keys' algorithms and refuses them as kmi key algorithms", () => {
    const p384 = generateKeyPairSync("ec", { namedCurve: "P-384" });
    const ed = generateKeyPairSync("ed25519");
    const rsa = generateKeyPairSync("rsa", { modulusLength: 1024 });
    expect(describePublicKey(p384.publicKey)).toBe("ecdsa-p384");
    expect(describePublicKey(exportPublicKeySpkiDer(ed.publicKey))).toBe("ed25519");
    expect(describePublicKey(rsa.publicKey)).toBe("rsa-1024");
    expect(describePublicKey(new Uint8Array([1, 2, 3]))).toBe("unknown");
    expect(() => keyAlgorithmOf(p384.publicKey)).toThrow(InvalidArgument);
    expect(() => keyAlgorithmOf(p384.publicKey)).toThrow("public_key: unsupported key algorithm ecdsa-p384; use one of ecdsa-p256, rsa-2048, rsa-3072");
    expect(() => signatureAlgorithmFor(rsa.privateKey)).toThrow("private_key: cannot sign with this key");
    expect(() => signatureAlgorithmFor(ed.privateKey)).toThrow(InvalidArgument);
    expect(isKeyAlgorithm("rsa-3072")).toBe(true);
    expect(isKeyAlgorithm("rsa-4096")).toBe(false);
  });

  it("refuses garbage key bytes with InvalidArgument and says nothing of the bytes", async () => {
    const secretish = Buffer.from("30820122deadbeefcafebabe", "hex");
    expect(() => importPrivateKeyPkcs8Der(secretish)).toThrow(InvalidArgument);
    expect(() => importPrivateKeyPkcs8Der(secretish)).toThrow(/^private_key: not a PKCS#8 DER private key$/);
    expect(() => importPublicKeySpkiDer(secretish, "public_key")).toThrow(/^public_key: not a DER SubjectPublicKeyInfo public key$/);
    await expect(generateKeyPair("dsa-1024" as KeyAlgorithm)).rejects.toThrow(InvalidArgument);
  });
});
