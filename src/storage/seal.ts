/**
 * Envelope encryption of secrets at rest (`SealedBlob`): each record gets a fresh random
 * 256-bit data key; the payload is encrypted with AES-256-GCM under the data key, and the data
 * key is encrypted with AES-256-GCM under the master key (the KDC's) or a sealing key (the key
 * agent's local cache). The record's AAD, e.g. "tenant/acme/version/3/key", is bound to both.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { InvalidArgument } from "../common/errors.js";
import { SealedBlobSchema, type SealedBlob } from "../gen/kmi/store/v1/envelope_pb.js";

/** Length of a master or sealing key, in bytes (AES-256). */
export const KEY_BYTES = 32;
/** `SealedBlob.format` written by this version. */
export const SEAL_FORMAT = 1;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const MAX_AAD_BYTES = 1024;

/** Why a `SealedBlob` did not open. */
export type SealErrorReason = "wrong_key" | "aad_mismatch" | "tampered" | "malformed" | "unreadable";

/**
 * A sealed blob that does not open. Deliberately not a domain error: it means the server's
 * own data or key is wrong, so it reaches a remote caller as an opaque INTERNAL while the
 * message (which names key ids and record AADs, never key material) goes to the log.
 */
export class SealError extends Error {
  constructor(
    /** What is wrong, for code that reacts to it (e.g. the agent drops a stale cache). */
    readonly reason: SealErrorReason,
    message: string,
  ) {
    super(message);
    this.name = "SealError";
  }
}

/**
 * The id of a master or sealing key: the first 16 hex characters of its SHA-256. Why this is
 * safe to store and print: the key is 256 random bits, so its hash reveals nothing usable,
 * and 64 bits are plenty to tell keys apart.
 */
export function masterKeyId(key: Uint8Array): string {
  return createHash("sha256").update(key).digest("hex").slice(0, 16);
}

function checkKeyLength(key: Uint8Array): void {
  if (!(key instanceof Uint8Array) || key.length !== KEY_BYTES) {
    throw new InvalidArgument(`master key: must be ${KEY_BYTES} bytes`);
  }
}

function checkAad(aad: string): void {
  if (typeof aad !== "string" || aad.length === 0 || Buffer.byteLength(aad, "utf8") > MAX_AAD_BYTES) {
    throw new InvalidArgument(`aad: must be a non-empty string of at most ${MAX_AAD_BYTES} bytes naming the record`);
  }
}

// Domain-separated AADs. Why: the same AAD string then cannot make a wrap ciphertext pass as a
// payload ciphertext (or the reverse), and the wrap is bound to the key id and format as well.
function lp(parts: readonly (string | number)[]): Buffer {
  const chunks: Buffer[] = [];
  for (const part of parts) {
    const bytes = typeof part === "number" ? Buffer.from(part.toString(10)) : Buffer.from(part, "utf8");
    const len = Buffer.alloc(4);
    len.writeUInt32BE(bytes.length);
    chunks.push(len, bytes);
  }
  return Buffer.concat(chunks);
}
function wrapAad(format: number, keyId: string, aad: string): Buffer {
  return lp(["kmi seal wrap", format, keyId, aad]);
}
function payloadAad(format: number, aad: string): Buffer {
  return lp(["kmi seal data", format, aad]);
}

function gcmEncrypt(key: Uint8Array, plaintext: Uint8Array, aad: Buffer): { nonce: Buffer; ciphertext: Buffer; tag: Buffer } {
  // Why a random 96-bit nonce: the data key is used for exactly one message, and the master
  // key wraps one data key per record, far below the 2^32 messages GCM allows per key.
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv("aes-256-gcm", key, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(aad);
  const ciphertext = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return { nonce, ciphertext, tag: cipher.getAuthTag() };
}

function gcmDecrypt(key: Uint8Array, nonce: Uint8Array, ciphertext: Uint8Array, tag: Uint8Array, aad: Buffer): Buffer | undefined {
  const decipher = createDecipheriv("aes-256-gcm", key, nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(aad);
  decipher.setAuthTag(tag);
  const out = decipher.update(ciphertext);
  try {
    decipher.final();
  } catch {
    out.fill(0);
    return undefined;
  }
  return out;
}

/**
 * Seals `plaintext` under `masterKey` (32 bytes) for the record named by `aad`. Every call
 * uses a fresh data key and nonces, so sealing the same secret twice gives unrelated blobs.
 */
export function seal(masterKey: Uint8Array, plaintext: Uint8Array, aad: string): SealedBlob {
  checkKeyLength(masterKey);
  checkAad(aad);
  const keyId = masterKeyId(masterKey);
  const dataKey = randomBytes(KEY_BYTES);
  try {
    const payload = gcmEncrypt(dataKey, plaintext, payloadAad(SEAL_FORMAT, aad));
    const wrap = gcmEncrypt(masterKey, dataKey, wrapAad(SEAL_FORMAT, keyId, aad));
    return create(SealedBlobSchema, {
      format: SEAL_FORMAT,
      masterKeyId: keyId,
      wrapNonce: wrap.nonce,
      wrappedDataKey: wrap.ciphertext,
      wrapTag: wrap.tag,
      nonce: payload.nonce,
      ciphertext: payload.ciphertext,
      tag: payload.tag,
      aad,
    });
  } finally {
    // Why: the data key should not outlive the call in our heap. (OpenSSL's own copy inside
    // the cipher context is freed with it; that is as far as Node lets us go.)
    dataKey.fill(0);
  }
}

/**
 * Opens a blob made by `seal` with the same key and AAD, returning the plaintext (which the
 * caller should zero once used). Throws `SealError`: "wrong_key" naming both key ids when
 * `masterKey` is not the one that sealed it, "aad_mismatch" when the blob belongs to another
 * record, "tampered" when either authentication tag fails, "malformed" for a broken record.
 */
export function open(masterKey: Uint8Array, blob: SealedBlob, aad: string): Uint8Array {
  checkKeyLength(masterKey);
  checkAad(aad);
  if (blob.format !== SEAL_FORMAT) {
    throw new SealError("malformed", `sealed blob ${aad}: format ${blob.format} is not ${SEAL_FORMAT}; is it from a newer kmi?`);
  }
  if (
    blob.wrapNonce.length !== NONCE_BYTES ||
    blob.nonce.length !== NONCE_BYTES ||
    blob.wrapTag.length !== TAG_BYTES ||
    blob.tag.length !== TAG_BYTES ||
    blob.wrappedDataKey.length !== KEY_BYTES
  ) {
    throw new SealError("malformed", `sealed blob ${aad}: field lengths are wrong; the record is corrupt`);
  }
  const keyId = masterKeyId(masterKey);
  if (blob.masterKeyId !== keyId) {
    throw new SealError(
      "wrong_key",
      `sealed blob ${aad}: sealed under master key ${blob.masterKeyId || "(none)"}, but the loaded key is ${keyId}; load the master key this store was made with`,
    );
  }
  // The stored aad is checked for a clear message; the GCM tags below are what enforce it.
  if (blob.aad !== aad) {
    throw new SealError("aad_mismatch", `sealed blob for "${aad}" is labelled "${blob.aad}"; it was moved from another record`);
  }
  const dataKey = gcmDecrypt(masterKey, blob.wrapNonce, blob.wrappedDataKey, blob.wrapTag, wrapAad(blob.format, keyId, aad));
  if (dataKey === undefined) {
    throw new SealError("tampered", `sealed blob ${aad}: the data key does not authenticate; the record was altered or is corrupt`);
  }
  try {
    const plaintext = gcmDecrypt(dataKey, blob.nonce, blob.ciphertext, blob.tag, payloadAad(blob.format, aad));
    if (plaintext === undefined) {
      throw new SealError("tampered", `sealed blob ${aad}: the payload does not authenticate; the record was altered or is corrupt`);
    }
    return plaintext;
  } finally {
    dataKey.fill(0);
  }
}

/** True when `a` and `b` hold the same bytes, compared in constant time. */
export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
