/**
 * Bearer tokens: `kmi_<token_id>_<secret>`, where token_id is 16 lowercase hex characters
 * (the lookup key, not secret) and secret is 32 random bytes in base64url. The KDC stores
 * only SHA-256 of the secret: a stolen store does not yield a working token, and since the
 * secret has 256 bits of entropy a fast hash is enough (no password stretching needed).
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";

const TOKEN_RE = /^kmi_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$/;

/** A freshly minted token: its id, the full bearer string (shown once) and the stored hash. */
export interface MintedToken {
  tokenId: string;
  bearer: string;
  secretSha256: Uint8Array;
}

/** Makes a new random token. */
export function mintToken(): MintedToken {
  const tokenId = randomBytes(8).toString("hex");
  const secret = randomBytes(32).toString("base64url");
  return { tokenId, bearer: `kmi_${tokenId}_${secret}`, secretSha256: sha256(secret) };
}

/** Splits a bearer string into id and secret; undefined when it is not shaped like a kmi token. */
export function parseToken(bearer: string): { tokenId: string; secret: string } | undefined {
  const m = TOKEN_RE.exec(bearer.trim());
  return m === null ? undefined : { tokenId: m[1]!, secret: m[2]! };
}

/** True when `secret` hashes to `storedSha256`, compared in constant time. */
export function secretMatches(secret: string, storedSha256: Uint8Array): boolean {
  const h = sha256(secret);
  return storedSha256.length === h.length && timingSafeEqual(h, storedSha256);
}

/** Extracts the token from an `authorization: Bearer <token>` header value. */
export function bearerFromHeader(header: string | null | undefined): string | undefined {
  if (header == null) return undefined;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
  return m === null ? undefined : m[1];
}

function sha256(s: string): Uint8Array {
  return new Uint8Array(createHash("sha256").update(s, "utf8").digest());
}
