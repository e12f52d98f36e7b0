/**
 * Small encodings of the attestation formats: base64url without padding (JWS), lowercase hex,
 * and the forms a certificate's SHA-256 fingerprint is written in.
 */
import { createHash } from "node:crypto";

/** Encodes bytes as base64url without padding (RFC 7515 §2). */
export function base64url(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64url");
}

const BASE64URL = /^[A-Za-z0-9_-]*$/;

/**
 * Decodes strict base64url without padding; returns undefined for anything else (padding,
 * '+', '/', whitespace, or a length no encoder produces), so that one token has one spelling.
 */
export function fromBase64url(text: string): Buffer | undefined {
  if (!BASE64URL.test(text) || text.length % 4 === 1) return undefined;
  const bytes = Buffer.from(text, "base64url");
  return base64url(bytes) === text ? bytes : undefined;
}

/** SHA-256 of `data`. */
export function sha256(data: Uint8Array | string): Buffer {
  return createHash("sha256").update(data).digest();
}

/** Lowercase hex SHA-256 of `data`. */
export function sha256Hex(data: Uint8Array | string): string {
  return createHash("sha256").update(data).digest("hex");
}

const HEX64 = /^[0-9a-f]{64}$/;

/** True for a lowercase hex SHA-256 digest (64 characters). */
export function isSha256Hex(value: string): boolean {
  return HEX64.test(value);
}

/**
 * Parses a certificate's SHA-256 fingerprint written in any of the forms kmi meets: raw 32
 * bytes, hex in either case with or without ':' separators (as `openssl x509 -fingerprint`
 * prints), or base64url (as the `x5t#S256` confirmation claim carries it). Returns the 32
 * bytes, or undefined when the value is none of these.
 */
export function parseSha256Fingerprint(value: string | Uint8Array): Buffer | undefined {
  if (typeof value !== "string") return value.byteLength === 32 ? Buffer.from(value) : undefined;
  const hex = value.replaceAll(":", "").toLowerCase();
  if (HEX64.test(hex) && (value.length === 64 || value.length === 95)) return Buffer.from(hex, "hex");
  const raw = fromBase64url(value);
  return raw !== undefined && raw.byteLength === 32 ? raw : undefined;
}
