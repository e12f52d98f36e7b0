/**
 * Key pairs for kmi's CAs, services and machines: generation, PKCS#8/SPKI import and export,
 * key identifiers, and naming a public key's algorithm.
 */
import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPair as generateKeyPairCb,
  type KeyObject,
} from "node:crypto";
import { promisify } from "node:util";
import { InvalidArgument } from "../common/errors.js";
import { children, contentBytes, expectTlv, Tag } from "./der.js";

/** The key algorithms kmi generates: ECDSA P-256 (the default) and RSA 2048/3072. */
export type KeyAlgorithm = "ecdsa-p256" | "rsa-2048" | "rsa-3072";

/** Every {@link KeyAlgorithm}, default first. */
export const KEY_ALGORITHMS: readonly KeyAlgorithm[] = ["ecdsa-p256", "rsa-2048", "rsa-3072"];

/** True when `value` names a {@link KeyAlgorithm}. */
export function isKeyAlgorithm(value: string): value is KeyAlgorithm {
  return (KEY_ALGORITHMS as readonly string[]).includes(value);
}

/** A generated key pair as node:crypto KeyObjects. */
export interface KeyPair {
  /** What was generated. */
  readonly algorithm: KeyAlgorithm;
  /** The private key; keep it in memory or store it encrypted, never log it. */
  readonly privateKey: KeyObject;
  /** The matching public key. */
  readonly publicKey: KeyObject;
}

const generate = promisify(generateKeyPairCb);

/**
 * Generates a key pair off the event loop (libuv thread pool).
 *
 * RSA keygen is slow and erratic (p50 ~150 ms, up to ~0.5 s for 2048 bits on these machines,
 * several times that for 3072): never call it on a request path; make CA keys in an admin
 * operation. P-256 takes ~0.1 ms.
 */
export async function generateKeyPair(algorithm: KeyAlgorithm): Promise<KeyPair> {
  switch (algorithm) {
    case "ecdsa-p256": {
      const { privateKey, publicKey } = await generate("ec", { namedCurve: "P-256" });
      return { algorithm, privateKey, publicKey };
    }
    case "rsa-2048":
    case "rsa-3072": {
      const modulusLength = algorithm === "rsa-2048" ? 2048 : 3072;
      const { privateKey, publicKey } = await generate("rsa", { modulusLength, publicExponent: 0x10001 });
      return { algorithm, privateKey, publicKey };
    }
    default:
      throw new InvalidArgument(`algorithm: unknown key algorithm; use one of ${KEY_ALGORITHMS.join(", ")}`);
  }
}

/** The private key as unencrypted PKCS#8 DER (encrypt it before it touches a disk). */
export function exportPrivateKeyPkcs8Der(privateKey: KeyObject): Uint8Array {
  return new Uint8Array(privateKey.export({ format: "der", type: "pkcs8" }));
}

/** Imports a PKCS#8 DER private key; InvalidArgument naming `field` when it is not one. */
export function importPrivateKeyPkcs8Der(der: Uint8Array, field = "private_key"): KeyObject {
  try {
    return createPrivateKey({ key: Buffer.from(der), format: "der", type: "pkcs8" });
  } catch (err) {
    // The cause carries OpenSSL's reason only, never the bytes.
    throw new InvalidArgument(`${field}: not a PKCS#8 DER private key`, { cause: err });
  }
}

/** The SubjectPublicKeyInfo DER of a key (of its public half when given a private key). */
export function exportPublicKeySpkiDer(key: KeyObject): Uint8Array {
  const pub = key.type === "private" ? createPublicKey(key) : key;
  return new Uint8Array(pub.export({ format: "der", type: "spki" }));
}

/** Imports a SubjectPublicKeyInfo DER public key; InvalidArgument naming `field` when it does not parse. */
export function importPublicKeySpkiDer(der: Uint8Array, field = "public_key"): KeyObject {
  try {
    return createPublicKey({ key: Buffer.from(der), format: "der", type: "spki" });
  } catch (err) {
    throw new InvalidArgument(`${field}: not a DER SubjectPublicKeyInfo public key`, { cause: err });
  }
}

/** kmi's key id: lowercase hex SHA-256 of the SPKI DER (stable across encodings of the same key). */
export function keyId(spkiDer: Uint8Array): string {
  return createHash("sha256").update(spkiDer).digest("hex");
}

/**
 * A label for any public (or private) key's algorithm: `ecdsa-p256`, `ecdsa-p384`, `ecdsa-p521`,
 * `rsa-<bits>`, `rsa-pss-<bits>`, `ed25519`, `ed448`, or `unknown`. Accepts a KeyObject or SPKI DER.
 */
export function describePublicKey(key: KeyObject | Uint8Array): string {
  let k: KeyObject;
  try {
    k = key instanceof Uint8Array ? createPublicKey({ key: Buffer.from(key), format: "der", type: "spki" }) : key;
  } catch {
    return "unknown";
  }
  const details = k.asymmetricKeyDetails ?? {};
  switch (k.asymmetricKeyType) {
    case "ec": {
      const curve = { prime256v1: "p256", secp384r1: "p384", secp521r1: "p521" }[details.namedCurve ?? ""];
      return curve ? `ecdsa-${curve}` : "unknown";
    }
    case "rsa":
      return `rsa-${details.modulusLength}`;
    case "rsa-pss":
      return `rsa-pss-${details.modulusLength}`;
    case "ed25519":
    case "ed448":
      return k.asymmetricKeyType;
    default:
      return "unknown";
  }
}

/** The {@link KeyAlgorithm} of a key, or InvalidArgument naming `field` when it is not one kmi generates. */
export function keyAlgorithmOf(key: KeyObject | Uint8Array, field = "public_key"): KeyAlgorithm {
  const label = describePublicKey(key);
  if (isKeyAlgorithm(label)) return label;
  throw new InvalidArgument(`${field}: unsupported key algorithm ${label}; use one of ${KEY_ALGORITHMS.join(", ")}`);
}

/** The subjectPublicKey BIT STRING's bytes of an SPKI (the key itself, without the algorithm). */
export function subjectPublicKeyBits(spkiDer: Uint8Array): Uint8Array {
  const outer = expectTlv(spkiDer, 0, Tag.sequence);
  const [, bits] = children(spkiDer, outer);
  if (!bits || bits.tag !== Tag.bitString) throw new InvalidArgument("public_key: not a SubjectPublicKeyInfo");
  return contentBytes(spkiDer, bits).subarray(1);
}

/**
 * The subjectKeyIdentifier for an SPKI: the leftmost 160 bits of the SHA-256 of the
 * subjectPublicKey bits (RFC 7093 section 2, method 1): the 20-byte size that RFC 5280's
 * SHA-1 method made customary, without SHA-1.
 */
export function subjectKeyIdentifier(spkiDer: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(subjectPublicKeyBits(spkiDer)).digest().subarray(0, 20));
}

/** True when `privateKey` is the private half of the public key in `spkiDer`. */
export function privateKeyMatchesSpki(privateKey: KeyObject, spkiDer: Uint8Array): boolean {
  return Buffer.from(exportPublicKeySpkiDer(privateKey)).equals(Buffer.from(spkiDer));
}
