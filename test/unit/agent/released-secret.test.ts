import { execFileSync } from "node:child_process";
import { generateKeyPairSync } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { openReleasedSecret } from "../../../src/agent/released-secret.js";
import { FailedPrecondition } from "../../../src/common/errors.js";
import { KeyAlgorithm, KeyPurpose } from "../../../src/gen/kmi/common/v1/common_pb.js";
import type { ReleasedSecret } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { formatWrapAad, keyIdOf, wrapKeyForMachine } from "../../../src/keywrap/index.js";
import { intermediateSecret, makeIntermediate, makeRoot, makeSigningKey, pkcs8Of, releasedSecret, signingSecret } from "../../fixtures/agent/tenant-ca.js";

const machineId = "m-00112233445566aa";
const machine = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
const dir = mkdtempSync(join(tmpdir(), "kmi-agent-rs-"));
writeFileSync(join(dir, "m.key"), machine.privateKey.export({ format: "pem", type: "pkcs8" }));
execFileSync("openssl", ["req", "-new", "-x509", "-key", join(dir, "m.key"), "-subj", "/CN=m", "-days", "1", "-out", join(dir, "m.crt")]);
const machineCert = readFileSync(join(dir, "m.crt"), "utf8");
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const root = makeRoot(Date.now() - 86_400_000);
const inter = makeIntermediate(root, "acme", 3, { now: Date.now() - 86_400_000 });
const signer = makeSigningKey("acme", "signer");
const ctx = { machineId, machineKey: machine.privateKey, now: Date.now(), clockSkewMs: 0 };

describe("openReleasedSecret", () => {
  it("unwraps an intermediate and a signing key to the exact private keys", () => {
    const a = openReleasedSecret(releasedSecret(intermediateSecret(inter), machineId, machineCert), ctx);
    expect(a.purpose).toBe(KeyPurpose.INTERMEDIATE_CA);
    expect(a.version).toBe(3);
    expect(pkcs8Of(a.privateKey!).equals(pkcs8Of(inter.key))).toBe(true);
    const b = openReleasedSecret(releasedSecret(signingSecret(signer), machineId, machineCert), ctx);
    expect(b.name).toBe("signer");
    expect(pkcs8Of(b.privateKey!).equals(pkcs8Of(signer.key))).toBe(true);
  });

  describe("with a machine encryption key", () => {
    const encryption = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
    const encPem = encryption.publicKey.export({ format: "pem", type: "spki" }).toString();
    const withEnc = { ...ctx, encryptionKey: encryption.privateKey };
    const tagged = (rs: ReleasedSecret, to: string) => {
      rs.wrappedKey!.recipientKeyId = to;
      return rs;
    };

    it("unwraps a secret wrapped to the encryption key", () => {
      const rs = tagged(releasedSecret(signingSecret(signer), machineId, encPem), keyIdOf(encryption.publicKey));
      expect(pkcs8Of(openReleasedSecret(rs, withEnc).privateKey!).equals(pkcs8Of(signer.key))).toBe(true);
    });

    it("refuses a secret wrapped to the machine key, named by recipient_key_id or not (the machine key never does ECDH)", () => {
      const named = tagged(releasedSecret(signingSecret(signer), machineId, machineCert), keyIdOf(machine.publicKey));
      expect(() => openReleasedSecret(named, withEnc)).toThrow(/wrapped_key is wrapped to key [0-9a-f]{16}, not to this machine's encryption key/);
      const unnamed = tagged(releasedSecret(signingSecret(signer), machineId, machineCert), "");
      expect(() => openReleasedSecret(unnamed, withEnc)).toThrow(/wrapped_key: does not open/);
    });

    it("a legacy identity (no encryption key) refuses a secret wrapped to an encryption key", () => {
      const rs = tagged(releasedSecret(signingSecret(signer), machineId, encPem), keyIdOf(encryption.publicKey));
      expect(() => openReleasedSecret(rs, ctx)).toThrow(/not to this machine's machine key \(this identity has no encryption key\)/);
    });
  });

  it("moves the lease into local time by the KDC's clock skew", () => {
    const rs = releasedSecret(signingSecret(signer, 10_000, 1_000_000), machineId, machineCert);
    expect(openReleasedSecret(rs, { ...ctx, clockSkewMs: 2_000 }).leaseExpiresAt).toBe(1_010_000 - 2_000);
  });

  const good = () => releasedSecret(signingSecret(signer), machineId, machineCert);
  const other = makeSigningKey("acme", "other");
  it.each<[string, () => ReleasedSecret, RegExp]>([
    ["a secret wrapped for another machine id (aad)", () => releasedSecret(signingSecret(signer), "m-ffffffffffffffff", machineCert), /wrapped_key\.aad: is "m-ffffffffffffffff\|/],
    ["a secret wrapped to another machine's key", () => {
      const otherMachine = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
      const rs = good();
      rs.wrappedKey = wrapKeyForMachine({ machinePublicKey: otherMachine.publicKey, privateKey: signer.key, aad: rs.wrappedKey!.aad });
      return rs;
    }, /wrapped_key: does not open/],
    ["a version other than the aad's", () => ({ ...good(), version: 0 + 1 }) as ReleasedSecret, /wrapped_key\.aad: is/],
    ["a private key that is not the announced one", () => {
      const rs = good();
      rs.wrappedKey = wrapKeyForMachine({ machinePublicKey: machine.publicKey, privateKey: other.key, aad: formatWrapAad({ machineId, tenantId: "acme", keyId: signer.keyId, version: 0 }) });
      return rs;
    }, /the unwrapped private key does not match key_id/],
    ["a key_id that is not the public key's", () => ({ ...good(), keyId: keyIdOf(other.publicKey) }) as ReleasedSecret, /key_id is not the SHA-256 of public_key_pem/],
    ["an unspecified purpose", () => ({ ...good(), purpose: KeyPurpose.UNSPECIFIED }) as ReleasedSecret, /purpose 0 is not/],
    ["a wrong algorithm", () => ({ ...good(), keyAlgorithm: KeyAlgorithm.RSA_2048 }) as ReleasedSecret, /public key is not RSA_2048/],
    ["no lease", () => ({ ...good(), leaseExpiresAt: undefined }) as ReleasedSecret, /lease_expires_at is required/],
    ["no wrapped key", () => ({ ...good(), wrappedKey: undefined }) as ReleasedSecret, /wrapped_key is required/],
    ["a bad tenant", () => ({ ...good(), tenantId: "Acme" }) as ReleasedSecret, /tenant_id is not a tenant id/],
    ["a signing key with a chain", () => ({ ...good(), chainPem: inter.pem }) as ReleasedSecret, /chain_pem must be empty/],
    ["an intermediate whose chain is for another key", () => {
      const rs = releasedSecret(intermediateSecret(inter), machineId, machineCert);
      return { ...rs, chainPem: makeIntermediate(root, "acme", 4).pem } as ReleasedSecret;
    }, /chain_pem's first certificate is not for this key/],
  ])("refuses %s", (_name, make, message) => {
    let caught: unknown;
    try {
      openReleasedSecret(make(), ctx);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(FailedPrecondition);
    expect((caught as Error).message).toMatch(message);
  });
});
