/**
 * The Auditserver's token-signing key as the verifiers see it: an ECDSA P-256 public key,
 * named by its RFC 7638 JWK thumbprint (the `kid` of every token it signs).
 */
import { createPublicKey, generateKeyPairSync, type KeyObject } from "node:crypto";
import { InvalidArgument } from "../common/errors.js";
import { base64url, sha256 } from "./encoding.js";

/** A public key as callers hold it: a KeyObject, SPKI PEM, or SPKI DER. */
export type PublicKeyInput = KeyObject | string | Uint8Array;

/**
 * Turns `input` into an ECDSA P-256 public KeyObject (a private KeyObject gives its public
 * half). Throws InvalidArgument naming `field` when it is not one.
 */
export function toP256PublicKey(input: PublicKeyInput, field = "public_key"): KeyObject {
  let key: KeyObject;
  try {
    if (typeof input === "string") key = createPublicKey(input);
    else if (input instanceof Uint8Array) key = createPublicKey({ key: Buffer.from(input), format: "der", type: "spki" });
    else key = input.type === "private" ? createPublicKey(input) : input;
  } catch {
    throw new InvalidArgument(`${field}: not a public key (want PEM or DER SubjectPublicKeyInfo)`);
  }
  if (key.type !== "public") throw new InvalidArgument(`${field}: not a public key`);
  assertP256(key, field);
  return key;
}

/** Throws InvalidArgument unless `key` is an EC key on P-256. */
export function assertP256(key: KeyObject, field: string): void {
  if (key.asymmetricKeyType !== "ec" || key.asymmetricKeyDetails?.namedCurve !== "prime256v1") {
    const kind = key.asymmetricKeyType === "ec" ? `EC ${key.asymmetricKeyDetails?.namedCurve ?? "?"}` : (key.asymmetricKeyType ?? "unknown");
    throw new InvalidArgument(`${field}: must be an ECDSA P-256 key, not ${kind}`);
  }
}

/**
 * The key id of an attestation key: its RFC 7638 JWK thumbprint, base64url SHA-256 of
 * `{"crv":"P-256","kty":"EC","x":…,"y":…}` (members in that order, no whitespace). Any JOSE
 * library computes the same id from the same key.
 */
export function attestationKeyId(publicKey: PublicKeyInput): string {
  const { x, y } = p256Coordinates(toP256PublicKey(publicKey));
  return base64url(sha256(JSON.stringify({ crv: "P-256", kty: "EC", x, y })));
}

/**
 * A P-256 public key's coordinates, base64url, read from its SubjectPublicKeyInfo (which ends
 * with the uncompressed point 04 || x || y). Not `export({ format: "jwk" })`: Node 20 holds the
 * key's lock while it builds the JWK's strings, and a garbage collection that runs then and
 * finalizes the job that generated the key takes the same lock: the process hangs (seen in CI,
 * main thread in ExportJWKEcKey → GC → ~KeyGenJob → mutex).
 */
function p256Coordinates(key: KeyObject): { x: string; y: string } {
  const der = key.export({ type: "spki", format: "der" });
  const point = der.subarray(der.length - 65);
  if (point[0] !== 0x04) throw new InvalidArgument("public key: not an uncompressed P-256 point");
  return { x: point.subarray(1, 33).toString("base64url"), y: point.subarray(33).toString("base64url") };
}

/** The public key as PEM SubjectPublicKeyInfo. */
export function publicKeyPem(publicKey: PublicKeyInput): string {
  return toP256PublicKey(publicKey).export({ format: "pem", type: "spki" }).toString();
}

/** A fresh ECDSA P-256 key pair, e.g. the Auditserver's token-signing key at `kmi audit init`. */
export function generateP256KeyPair(): { privateKey: KeyObject; publicKey: KeyObject } {
  return generateKeyPairSync("ec", { namedCurve: "P-256" });
}
