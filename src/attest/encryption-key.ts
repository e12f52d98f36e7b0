/**
 * The machine encryption key: a second P-256 key pair the agent makes at enrollment, used only
 * for ECDH (the KDC wraps released secrets to it), while the machine key does mutual TLS and
 * signs evidence. One key, one purpose: a flaw in how one is used (a signing oracle, a TLS
 * side channel) does not expose the other.
 *
 * The agent sends the public half with its enrollment, with a signature by the CSR's key over
 * the binding message below: the Auditserver records the key only when the machine key that
 * enrolls vouches for it, so a party that sees an enrollment cannot swap in its own key.
 *
 *   binding = "kmi machine encryption key v1" 0x00 len32(machine SPKI) machine SPKI len32(enc SPKI) enc SPKI
 *
 * Shared by the agent (signs), the Auditserver (verifies, records, puts it in tokens as `enc`)
 * and the KDC (wraps to it).
 */
import { createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { InvalidArgument } from "../common/errors.js";
import { assertP256 } from "./keys.js";

const BINDING_CONTEXT = "kmi machine encryption key v1";

/** What the agent sends at enrollment for its encryption key. */
export interface EncryptionKeyBinding {
  /** The encryption public key, DER SubjectPublicKeyInfo. */
  publicKeyDer: Uint8Array;
  /** ECDSA P-256 signature (DER) by the machine key over the binding. */
  signature: Uint8Array;
}

/** A fresh encryption key pair (ECDH P-256). */
export function generateEncryptionKey(): KeyObject {
  return generateKeyPairSync("ec", { namedCurve: "prime256v1" }).privateKey;
}

/** The DER SubjectPublicKeyInfo of a key (or of the public half of a private key). */
export function spkiDer(key: KeyObject): Buffer {
  const publicKey = key.type === "private" ? createPublicKey(key) : key;
  return publicKey.export({ format: "der", type: "spki" });
}

function bindingMessage(machineSpki: Uint8Array, encryptionSpki: Uint8Array): Buffer {
  const len = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return b;
  };
  return Buffer.concat([Buffer.from(BINDING_CONTEXT, "utf8"), Buffer.alloc(1), len(machineSpki.length), machineSpki, len(encryptionSpki.length), encryptionSpki]);
}

/** Signs the binding of `encryptionKey` to `machineKey` (both P-256; the encryption key is not the machine key). */
export function bindEncryptionKey(machineKey: KeyObject, encryptionKey: KeyObject): EncryptionKeyBinding {
  if (machineKey.type !== "private") throw new InvalidArgument("machine key: not a private key");
  assertP256(machineKey, "machine key");
  assertP256(encryptionKey, "encryption key");
  const publicKeyDer = spkiDer(encryptionKey);
  const machineSpki = spkiDer(machineKey);
  if (publicKeyDer.equals(machineSpki)) throw new InvalidArgument("encryption key: must not be the machine key (one key, one purpose)");
  const signature = sign("sha256", bindingMessage(machineSpki, publicKeyDer), { key: machineKey, dsaEncoding: "der" });
  return { publicKeyDer, signature };
}

/**
 * Checks an enrollment's encryption key against the machine key of its CSR: a P-256 SPKI, not
 * the machine key, with a binding signature that verifies. Returns the key; throws
 * InvalidArgument naming the field.
 */
export function verifyEncryptionKeyBinding(machinePublicKey: KeyObject, binding: EncryptionKeyBinding): KeyObject {
  const key = parseEncryptionPublicKey(binding.publicKeyDer, "encryption_public_key");
  const machineSpki = spkiDer(machinePublicKey);
  if (Buffer.from(binding.publicKeyDer).equals(machineSpki)) {
    throw new InvalidArgument("encryption_public_key: is the CSR's key; generate a separate key for unwrapping secrets (one key, one purpose)");
  }
  if (binding.signature.length === 0) throw new InvalidArgument("encryption_key_signature: required with encryption_public_key");
  let ok = false;
  try {
    ok = verify("sha256", bindingMessage(machineSpki, binding.publicKeyDer), { key: machinePublicKey, dsaEncoding: "der" }, binding.signature);
  } catch {
    ok = false;
  }
  if (!ok) throw new InvalidArgument("encryption_key_signature: does not verify with the CSR's key; sign the binding of the encryption key with the key of the CSR");
  return key;
}

/** Parses a DER SPKI that must be P-256; throws InvalidArgument naming `field`. */
export function parseEncryptionPublicKey(der: Uint8Array, field: string): KeyObject {
  let key: KeyObject;
  try {
    key = createPublicKey({ key: Buffer.from(der), format: "der", type: "spki" });
  } catch {
    throw new InvalidArgument(`${field}: not a DER SubjectPublicKeyInfo`);
  }
  try {
    assertP256(key, field);
  } catch {
    throw new InvalidArgument(`${field}: must be a P-256 key (ECDH), not ${key.asymmetricKeyType ?? "unknown"} ${key.asymmetricKeyDetails?.namedCurve ?? ""}`.trimEnd());
  }
  return key;
}
