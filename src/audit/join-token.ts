/**
 * Join tokens: `kmij_<token_id>_<secret>`, token_id 16 lowercase hex characters (the lookup
 * key, not secret), secret 32 random bytes in base64url (43 characters). Only SHA-256 of the
 * secret is stored: a copy of the store does not enroll a machine, and a 256-bit random
 * secret needs no password stretching.
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";

const JOIN_TOKEN = /^kmij_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$/;

/** A freshly made join token. */
export interface MintedJoinToken {
  /** The id, first part of the secret. */
  tokenId: string;
  /** The whole secret, shown once. */
  secret: string;
  /** SHA-256 of the secret part, stored. */
  secretSha256: Uint8Array;
}

/** Makes a new random join token. */
export function mintJoinToken(): MintedJoinToken {
  const tokenId = randomBytes(8).toString("hex");
  const secret = randomBytes(32).toString("base64url");
  return { tokenId, secret: `kmij_${tokenId}_${secret}`, secretSha256: sha256(secret) };
}

/** Splits a join token into id and secret part; undefined when it is not shaped like one. */
export function parseJoinToken(token: string): { tokenId: string; secretPart: string } | undefined {
  const m = JOIN_TOKEN.exec(token);
  return m === null ? undefined : { tokenId: m[1]!, secretPart: m[2]! };
}

/** True when `secretPart` hashes to `stored`, compared in constant time. */
export function joinSecretMatches(secretPart: string, stored: Uint8Array): boolean {
  const h = sha256(secretPart);
  return stored.byteLength === h.byteLength && timingSafeEqual(h, stored);
}

function sha256(s: string): Uint8Array {
  return new Uint8Array(createHash("sha256").update(s, "utf8").digest());
}
