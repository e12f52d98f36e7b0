/**
 * ECIES wrap and unwrap of a private key to a machine's P-256 key, exactly as
 * distribution.proto's WrappedKey comment says:
 *
 *   shared = ECDH(P-256)(ephemeral private, machine public)          (32 bytes, the x coordinate)
 *   key    = HKDF-SHA256(ikm = shared, salt = ephemeral public point (65 bytes, uncompressed SEC1),
 *                        info = "kmi wrap v1" || UTF-8(aad), length = 32)
 *   ciphertext, tag = AES-256-GCM(key, nonce (12 random bytes), PKCS#8 DER of the private key)
 *
 * The GCM call itself has no additional data: the aad is bound through the HKDF info, so a
 * wrapped key presented with another aad (another machine, tenant, key or version) derives
 * another key and fails its tag check. A fresh ephemeral key per wrap means no key is
 * derived twice. The KDC calls `wrapKeyForMachine`; the agent calls `unwrapKey`.
 */
import {
  createCipheriv,
  createDecipheriv,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  hkdfSync,
  KeyObject,
  randomBytes,
  X509Certificate,
} from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { InvalidArgument } from "../common/errors.js";
import { WrappedKeySchema, type WrappedKey } from "../gen/kmi/kdc/v1/distribution_pb.js";

/** The fixed prefix of the HKDF info; the aad follows it. */
export const WRAP_INFO_PREFIX = "kmi wrap v1";

/** DER of SubjectPublicKeyInfo for a P-256 key up to the BIT STRING's content (65-byte point follows). */
const P256_SPKI_PREFIX = Buffer.from("3059301306072a8648ce3d020106082a8648ce3d030107034200", "hex");
const POINT_LENGTH = 65;
const NONCE_LENGTH = 12;
const TAG_LENGTH = 16;
/** A PKCS#8 RSA-4096 key is about 2.4 KB; anything far beyond is not a key kmi wraps. */
const MAX_CIPHERTEXT_LENGTH = 16 * 1024;

/** The fields of a WrappedKey; a `WrappedKey` message fits, and so does a plain object. */
export interface WrappedKeyFields {
  ephemeralPublicKey: Uint8Array;
  nonce: Uint8Array;
  ciphertext: Uint8Array;
  tag: Uint8Array;
  aad: string;
}

/** A machine's public key: a KeyObject, a parsed certificate, or PEM (a certificate or a SubjectPublicKeyInfo). */
export type MachinePublicKeyInput = KeyObject | X509Certificate | string;

/** Options of `wrapKeyForMachine`. */
export interface WrapKeyOptions {
  /** The receiving machine's ECDSA P-256 public key, usually its machine certificate. */
  machinePublicKey: MachinePublicKeyInput;
  /** The private key to wrap: a private KeyObject, or its PKCS#8 DER. */
  privateKey: KeyObject | Uint8Array;
  /** "<machine_id>|<tenant_id>|<key_id>|<version>" (see `formatWrapAad`). */
  aad: string;
}

/** Options of `unwrapKey`. */
export interface UnwrapKeyOptions {
  /**
   * The aad the receiver expects (its own machine id, the secret's tenant, key id and
   * version). When given, a wrapped key carrying another aad is refused before any crypto.
   */
  expectedAad?: string;
}

/**
 * Wraps a private key to a machine's P-256 public key: what the KDC puts in
 * ReleasedSecret.wrapped_key. Throws InvalidArgument when the machine key is not P-256
 * or the private key is not a private key.
 */
export function wrapKeyForMachine(options: WrapKeyOptions): WrappedKey {
  const machinePublic = toMachinePublicKey(options.machinePublicKey);
  const pkcs8 = toPkcs8(options.privateKey);
  const ephemeral = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const point = pointOf(ephemeral.publicKey);
  const shared = diffieHellman({ privateKey: ephemeral.privateKey, publicKey: machinePublic });
  const key = deriveKey(shared, point, options.aad);
  try {
    const nonce = randomBytes(NONCE_LENGTH);
    const cipher = createCipheriv("aes-256-gcm", key, nonce, { authTagLength: TAG_LENGTH });
    const ciphertext = Buffer.concat([cipher.update(pkcs8), cipher.final()]);
    return create(WrappedKeySchema, {
      ephemeralPublicKey: point,
      nonce,
      ciphertext,
      tag: cipher.getAuthTag(),
      aad: options.aad,
    });
  } finally {
    // Best effort: JavaScript cannot promise that no copy survives, but these buffers are ours.
    shared.fill(0);
    key.fill(0);
    if (!(options.privateKey instanceof Uint8Array)) pkcs8.fill(0);
  }
}

/**
 * Opens a wrapped key with the machine's private key and returns the private key as a
 * KeyObject (the PKCS#8 bytes are wiped after parsing). Throws InvalidArgument naming the
 * field when the wrapped key is malformed, carries another aad than expected, or does not
 * open (wrong machine key, or tampered).
 */
export function unwrapKey(wrapped: WrappedKeyFields, machinePrivateKey: KeyObject, options: UnwrapKeyOptions = {}): KeyObject {
  checkLength("wrapped_key.ephemeral_public_key", wrapped.ephemeralPublicKey, POINT_LENGTH);
  if (wrapped.ephemeralPublicKey[0] !== 0x04) {
    throw new InvalidArgument("wrapped_key.ephemeral_public_key: want an uncompressed SEC1 point (first byte 0x04)");
  }
  checkLength("wrapped_key.nonce", wrapped.nonce, NONCE_LENGTH);
  checkLength("wrapped_key.tag", wrapped.tag, TAG_LENGTH);
  if (wrapped.ciphertext.length === 0 || wrapped.ciphertext.length > MAX_CIPHERTEXT_LENGTH) {
    throw new InvalidArgument(`wrapped_key.ciphertext: want 1 to ${MAX_CIPHERTEXT_LENGTH} bytes`);
  }
  if (options.expectedAad !== undefined && wrapped.aad !== options.expectedAad) {
    throw new InvalidArgument(`wrapped_key.aad: is "${wrapped.aad}", want "${options.expectedAad}" (wrapped for another machine, key or version)`);
  }
  requireP256(machinePrivateKey, "machine private key", "private");
  let ephemeralPublic: KeyObject;
  try {
    ephemeralPublic = createPublicKey({
      key: Buffer.concat([P256_SPKI_PREFIX, wrapped.ephemeralPublicKey]),
      format: "der",
      type: "spki",
    });
  } catch (err) {
    throw new InvalidArgument("wrapped_key.ephemeral_public_key: not a point on P-256", { cause: err });
  }
  const shared = diffieHellman({ privateKey: machinePrivateKey, publicKey: ephemeralPublic });
  const key = deriveKey(shared, wrapped.ephemeralPublicKey, wrapped.aad);
  let pkcs8: Buffer | undefined;
  try {
    const decipher = createDecipheriv("aes-256-gcm", key, wrapped.nonce, { authTagLength: TAG_LENGTH });
    decipher.setAuthTag(wrapped.tag);
    try {
      pkcs8 = Buffer.concat([decipher.update(wrapped.ciphertext), decipher.final()]);
    } catch (err) {
      // Generic on purpose: which of key, aad or ciphertext is wrong cannot be told apart.
      throw new InvalidArgument("wrapped_key: does not open with this machine's key (wrapped for another machine or aad, or tampered)", { cause: err });
    }
    try {
      return createPrivateKey({ key: pkcs8, format: "der", type: "pkcs8" });
    } catch (err) {
      throw new InvalidArgument("wrapped_key.ciphertext: opened, but the plaintext is not a PKCS#8 private key", { cause: err });
    }
  } finally {
    shared.fill(0);
    key.fill(0);
    pkcs8?.fill(0);
  }
}

/** The machine public key of a certificate (PEM or parsed); throws InvalidArgument unless it is P-256. */
export function machinePublicKeyFromCertificate(certificate: X509Certificate | string | Uint8Array): KeyObject {
  let cert: X509Certificate;
  try {
    cert = certificate instanceof X509Certificate ? certificate : new X509Certificate(certificate);
  } catch (err) {
    throw new InvalidArgument("machine certificate: does not parse as X.509", { cause: err });
  }
  return requireP256(cert.publicKey, "machine certificate", "public");
}

function toMachinePublicKey(input: MachinePublicKeyInput): KeyObject {
  if (input instanceof KeyObject) return requireP256(input, "machine public key", "public");
  if (input instanceof X509Certificate) return machinePublicKeyFromCertificate(input);
  if (input.includes("-----BEGIN CERTIFICATE-----")) return machinePublicKeyFromCertificate(input);
  let key: KeyObject;
  try {
    key = createPublicKey(input);
  } catch (err) {
    throw new InvalidArgument("machine public key: does not parse as a PEM public key or certificate", { cause: err });
  }
  return requireP256(key, "machine public key", "public");
}

function toPkcs8(input: KeyObject | Uint8Array): Buffer {
  if (input instanceof KeyObject) {
    if (input.type !== "private") throw new InvalidArgument("private key: want a private key, got a " + input.type + " key");
    return input.export({ format: "der", type: "pkcs8" });
  }
  try {
    // Parse only to refuse garbage early; the caller's bytes are what gets wrapped.
    createPrivateKey({ key: Buffer.from(input.buffer, input.byteOffset, input.byteLength), format: "der", type: "pkcs8" });
  } catch (err) {
    throw new InvalidArgument("private key: not PKCS#8 DER", { cause: err });
  }
  return Buffer.from(input.buffer, input.byteOffset, input.byteLength);
}

function requireP256(key: KeyObject, what: string, type: "public" | "private"): KeyObject {
  if (key.type !== type) throw new InvalidArgument(`${what}: want a ${type} key, got a ${key.type} key`);
  if (key.asymmetricKeyType !== "ec" || key.asymmetricKeyDetails?.namedCurve !== "prime256v1") {
    throw new InvalidArgument(`${what}: want ECDSA P-256 (machine keys are P-256), got ${key.asymmetricKeyType ?? "?"} ${key.asymmetricKeyDetails?.namedCurve ?? ""}`.trimEnd());
  }
  return key;
}

function pointOf(publicKey: KeyObject): Buffer {
  const der = publicKey.export({ format: "der", type: "spki" });
  if (der.length !== P256_SPKI_PREFIX.length + POINT_LENGTH || !der.subarray(0, P256_SPKI_PREFIX.length).equals(P256_SPKI_PREFIX)) {
    throw new Error("keywrap: unexpected P-256 SubjectPublicKeyInfo encoding");
  }
  return der.subarray(P256_SPKI_PREFIX.length);
}

function deriveKey(shared: Buffer, ephemeralPoint: Uint8Array, aad: string): Buffer {
  const info = Buffer.concat([Buffer.from(WRAP_INFO_PREFIX, "utf8"), Buffer.from(aad, "utf8")]);
  return Buffer.from(hkdfSync("sha256", shared, ephemeralPoint, info, 32));
}

function checkLength(field: string, value: Uint8Array, want: number): void {
  if (value.length !== want) throw new InvalidArgument(`${field}: want ${want} bytes, got ${value.length}`);
}
