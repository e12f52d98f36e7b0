/**
 * A private key that signs without handing out its bytes: one held in this process
 * (a node:crypto KeyObject), or one held in a token and reached through PKCS#11
 * (src/common/keys/pkcs11-token.ts). Issuing code signs through this interface only.
 */
import type { KeyObject } from "node:crypto";
import { InvalidArgument } from "../common/errors.js";
import { sequence, unsignedInteger } from "./der.js";
import { exportPublicKeySpkiDer } from "./keys.js";
import { signatureAlgorithmFor, signWithKey, type SignatureAlgorithm } from "./signature.js";

/** A signing key: its public half, its algorithm, and a way to sign with SHA-256. */
export interface Signer {
  /** The public key, SubjectPublicKeyInfo DER. */
  readonly spkiDer: Uint8Array;
  /** How it signs (ecdsa-with-SHA256 or sha256WithRSAEncryption). */
  readonly signatureAlgorithm: SignatureAlgorithm;
  /** Signs `data` with SHA-256; an ECDSA signature comes DER-encoded, as X.509 wants. */
  sign(data: Uint8Array): Uint8Array;
}

/** True for a {@link Signer}, false for a KeyObject. */
export function isSigner(key: KeyObject | Signer): key is Signer {
  return typeof (key as Signer).sign === "function" && (key as Signer).spkiDer instanceof Uint8Array;
}

/** A {@link Signer} over an in-process private key (P-256 or RSA >= 2048; InvalidArgument naming `field` otherwise). */
export function keyObjectSigner(privateKey: KeyObject, field = "private_key"): Signer {
  const signatureAlgorithm = signatureAlgorithmFor(privateKey, field);
  return { spkiDer: exportPublicKeySpkiDer(privateKey), signatureAlgorithm, sign: (data) => signWithKey(privateKey, data) };
}

/** A Signer whatever the caller holds. */
export function toSigner(key: KeyObject | Signer, field = "private_key"): Signer {
  return isSigner(key) ? key : keyObjectSigner(key, field);
}

/**
 * The DER ECDSA-Sig-Value (RFC 3279: SEQUENCE { r INTEGER, s INTEGER }) of a raw `r || s`
 * signature, as PKCS#11's CKM_ECDSA returns it.
 */
export function ecdsaRawToDer(raw: Uint8Array): Uint8Array {
  if (raw.length === 0 || raw.length % 2 !== 0) throw new InvalidArgument(`signature: ${raw.length} bytes is not r || s`);
  const half = raw.length / 2;
  return sequence(unsignedInteger(raw.subarray(0, half)), unsignedInteger(raw.subarray(half)));
}
