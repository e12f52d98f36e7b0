/**
 * The attestation token: a compact JWS (RFC 7515), ES256, signed by the Auditserver and
 * bound to one machine and one machine certificate.
 *
 *   header  {"alg":"ES256","typ":"kmi-attestation+jwt","kid":"<JWK thumbprint>"}
 *   claims  {"iss":"kmi-audit","sub":"<machine id>","grp":"<group>","ten":["<tenant>",…],
 *            "iat":<s>,"exp":<s>,"jti":"<128-bit base64url>","cnf":{"x5t#S256":"<base64url SHA-256 of the cert DER>"},
 *            "enc":"<base64url DER SPKI of the machine's encryption key>"}
 *
 * `enc` is the machine's encryption key as the Auditserver recorded it at enrollment
 * (src/attest/encryption-key.ts): the KDC wraps released secrets to it. It is absent for a
 * machine enrolled before encryption keys existed; the KDC then wraps to the machine key
 * (the legacy path, docs/security.md).
 *
 * `ten` lists the tenants whose secrets the machine may receive. `["*"]` (ALL_TENANTS alone) means
 * every tenant, and is only written for a group made with `all_tenants`; `[]` means NO tenant
 * (why: serving every tenant must be asked for, so a group made without tenants, or stored
 * before `all_tenants` existed, fails closed). "*" is never a tenant id, and never appears
 * beside one: the verifier refuses `["*", "acme"]` as malformed.
 *
 * `cnf.x5t#S256` is the certificate confirmation of RFC 8705: a verifier compares it with the
 * client certificate of the mutual-TLS connection the token arrived on, so a token copied off
 * one machine is useless on another connection.
 *
 * Verification is strict and names what is wrong (see AttestationTokenError): the header
 * must be exactly ES256 with the explicit `typ` (RFC 8725 §3.11, so no other JWT signed by
 * the same key can pass), the signature must verify, then issuer, time, machine and
 * certificate are checked, in that order.
 *
 * Why not `jose` (considered for #12): the JWS here is two node:crypto calls (ES256 with the
 * raw r||s form) over one fixed header, and what jose would guard against (alg "none" or
 * HS256 confusion, `crit`) is refused explicitly and tested (test/unit/attest/token.test.ts).
 * jose would make verification asynchronous on the KDC's per-call path and still leave to this
 * module the `kid` match, the `iat` skew rule (jose's tolerance also stretches `exp`, which
 * has none here), the `cnf` binding and the precise refusal kinds: a dependency in the trust
 * path without less code to review.
 */
import { randomBytes, sign, verify, type KeyObject } from "node:crypto";
import { InvalidArgument } from "../common/errors.js";
import { base64url, fromBase64url, parseSha256Fingerprint } from "./encoding.js";
import { AttestationTokenError } from "./errors.js";
import { parseEncryptionPublicKey } from "./encryption-key.js";
import { assertP256, attestationKeyId, toP256PublicKey, type PublicKeyInput } from "./keys.js";

/** The `iss` of every attestation token. */
export const ATTESTATION_TOKEN_ISSUER = "kmi-audit";
/** The JWS `typ` header of every attestation token. */
export const ATTESTATION_TOKEN_TYPE = "kmi-attestation+jwt";
/** Tokens longer than this are refused unparsed (a real one is well under 1 KiB). */
export const MAX_ATTESTATION_TOKEN_LENGTH = 8192;
/** Default tolerance for an `iat` in the verifier's future (clocks of two servers differ). */
export const DEFAULT_CLOCK_SKEW_SECONDS = 30;
/** The one `ten` entry that means every tenant: `"ten": ["*"]`. Never a tenant id. */
export const ALL_TENANTS = "*";

/** True when a `ten` claim serves the tenant: it names it, or it is `["*"]`. `[]` serves none. */
export function tenClaimServes(ten: readonly string[], tenantId: string): boolean {
  return ten.includes(ALL_TENANTS) || ten.includes(tenantId);
}

/** The claims of an attestation token. */
export interface AttestationClaims {
  /** Always "kmi-audit". */
  iss: string;
  /** Machine id ("m-" and 16 hex characters). */
  sub: string;
  /** Machine group. */
  grp: string;
  /** Tenants whose secrets the machine may receive; `["*"]` means every tenant, `[]` none. */
  ten: string[];
  /** Issued at, seconds since the epoch. */
  iat: number;
  /** Expires at, seconds since the epoch (the token is refused from this second on). */
  exp: number;
  /** Unique token id, for the audit logs of both servers. */
  jti: string;
  /** Confirmation: base64url SHA-256 of the DER machine certificate (RFC 8705). */
  cnf: { "x5t#S256": string };
  /** The machine's encryption key, base64url DER SPKI (P-256); absent for a machine enrolled without one. */
  enc?: string;
}

/** What the Auditserver puts in a token. */
export interface AttestationTokenInput {
  /** Machine id. */
  machineId: string;
  /** Machine group. */
  group: string;
  /** Tenants served; must be empty when `allTenants`. Empty without `allTenants`: no tenant. */
  tenantIds: readonly string[];
  /** Serve every tenant: written as `ten: ["*"]`. */
  allTenants: boolean;
  /** SHA-256 of the machine certificate the token is bound to (32 bytes, hex or base64url). */
  certificateSha256: string | Uint8Array;
  /** Issue time. */
  issuedAt: Date;
  /** Expiry; after issuedAt. Seconds are whole (rounded down). */
  expiresAt: Date;
  /** Token id; default 16 random bytes, base64url. */
  jti?: string;
  /** The machine's encryption public key (DER SPKI, P-256), when it enrolled with one. */
  encryptionPublicKey?: Uint8Array;
}

/** The signing key: the private key and (optionally, else computed) its key id. */
export interface AttestationSigningKey {
  /** ECDSA P-256 private key. */
  privateKey: KeyObject;
  /** Its JWK thumbprint; computed when absent. */
  keyId?: string;
}

/** A signed token and the claims in it. */
export interface SignedAttestationToken {
  /** The compact JWS. */
  token: string;
  /** Its claims. */
  claims: AttestationClaims;
  /** The `kid` it was signed under. */
  keyId: string;
}

/**
 * Signs an attestation token. Throws InvalidArgument on an input that could not make a
 * valid token (so the Auditserver never hands out one the KDC would refuse as malformed).
 */
export function signAttestationToken(input: AttestationTokenInput, key: AttestationSigningKey): SignedAttestationToken {
  if (key.privateKey.type !== "private") throw new InvalidArgument("attestation key: not a private key");
  assertP256(key.privateKey, "attestation key");
  const keyId = key.keyId ?? attestationKeyId(key.privateKey);
  const certSha256 = parseSha256Fingerprint(input.certificateSha256);
  if (certSha256 === undefined) throw new InvalidArgument("certificate_sha256: want 32 bytes of SHA-256 (hex or base64url)");
  const iat = Math.floor(input.issuedAt.getTime() / 1000);
  const exp = Math.floor(input.expiresAt.getTime() / 1000);
  if (!Number.isSafeInteger(iat) || !Number.isSafeInteger(exp) || exp <= iat) {
    throw new InvalidArgument("expires_at: must be at least one second after issued_at");
  }
  if (input.machineId.length === 0) throw new InvalidArgument("machine_id: required");
  if (input.group.length === 0) throw new InvalidArgument("group: required");
  if (input.allTenants && input.tenantIds.length > 0) throw new InvalidArgument("tenant_ids: give either tenant ids or all tenants, not both");
  if (input.tenantIds.includes(ALL_TENANTS)) throw new InvalidArgument(`tenant_ids: "${ALL_TENANTS}" is not a tenant id; set allTenants to serve every tenant`);
  const claims: AttestationClaims = {
    iss: ATTESTATION_TOKEN_ISSUER,
    sub: input.machineId,
    grp: input.group,
    ten: input.allTenants ? [ALL_TENANTS] : [...input.tenantIds],
    iat,
    exp,
    jti: input.jti ?? base64url(randomBytes(16)),
    cnf: { "x5t#S256": base64url(certSha256) },
  };
  if (input.encryptionPublicKey !== undefined && input.encryptionPublicKey.length > 0) {
    parseEncryptionPublicKey(input.encryptionPublicKey, "encryption_public_key");
    claims.enc = base64url(input.encryptionPublicKey);
  }
  const header = { alg: "ES256", typ: ATTESTATION_TOKEN_TYPE, kid: keyId };
  const signingInput = `${base64url(Buffer.from(JSON.stringify(header)))}.${base64url(Buffer.from(JSON.stringify(claims)))}`;
  // JWS ES256 carries the raw 64-byte r||s form (RFC 7518 §3.4), not DER.
  const signature = sign("sha256", Buffer.from(signingInput), { key: key.privateKey, dsaEncoding: "ieee-p1363" });
  return { token: `${signingInput}.${base64url(signature)}`, claims, keyId };
}

/** What the verifier expects of a token. */
export interface VerifyAttestationTokenOptions {
  /** The verifier's clock. */
  now: Date | number;
  /** The machine id of the mutual-TLS peer presenting the token. */
  expectedMachineId: string;
  /**
   * SHA-256 of the mutual-TLS peer's certificate: 32 bytes, hex (either case, ':' allowed)
   * or base64url.
   */
  expectedCertSha256: string | Uint8Array;
  /** Tolerance for an `iat` in the future, seconds; default 30. `exp` has no tolerance. */
  clockSkewSeconds?: number;
}

/**
 * Verifies an attestation token and returns its claims. Throws AttestationTokenError
 * (UNAUTHENTICATED) saying precisely what is wrong: malformed, unknown_key, bad_signature,
 * wrong_issuer, expired, not_yet_valid, wrong_machine or wrong_certificate. Throws
 * InvalidArgument when the options themselves are unusable (the caller's bug).
 */
export function verifyAttestationToken(token: string, publicKey: PublicKeyInput, options: VerifyAttestationTokenOptions): AttestationClaims {
  const key = toP256PublicKey(publicKey, "attestation public key");
  const expectedCert = parseSha256Fingerprint(options.expectedCertSha256);
  if (expectedCert === undefined) throw new InvalidArgument("expectedCertSha256: want 32 bytes of SHA-256 (hex or base64url)");
  if (options.expectedMachineId.length === 0) throw new InvalidArgument("expectedMachineId: required");
  const nowMs = typeof options.now === "number" ? options.now : options.now.getTime();
  if (!Number.isFinite(nowMs)) throw new InvalidArgument("now: not a valid time");
  const skew = options.clockSkewSeconds ?? DEFAULT_CLOCK_SKEW_SECONDS;

  const malformed = (what: string): AttestationTokenError =>
    new AttestationTokenError("malformed", `attestation token: malformed (${what}); present the token from AuditService.Attest unchanged`);

  if (typeof token !== "string" || token.length === 0) throw malformed("empty");
  if (token.length > MAX_ATTESTATION_TOKEN_LENGTH) throw malformed(`longer than ${MAX_ATTESTATION_TOKEN_LENGTH} characters`);
  const parts = token.split(".");
  if (parts.length !== 3) throw malformed(`want 3 dot-separated parts, got ${parts.length}`);
  const [headerB64, claimsB64, signatureB64] = parts as [string, string, string];

  const header = parseJsonObject(fromBase64url(headerB64));
  if (header === undefined) throw malformed("header is not base64url JSON");
  if (header["alg"] !== "ES256") throw malformed(`alg ${truncate(JSON.stringify(header["alg"]) ?? "missing")}, want "ES256"`);
  if (header["typ"] !== ATTESTATION_TOKEN_TYPE) throw malformed(`typ ${truncate(JSON.stringify(header["typ"]) ?? "missing")}, want "${ATTESTATION_TOKEN_TYPE}"`);
  if (typeof header["kid"] !== "string") throw malformed("kid missing");
  if ("crit" in header) throw malformed("crit header is not supported");
  const keyId = attestationKeyId(key);
  if (header["kid"] !== keyId) {
    throw new AttestationTokenError(
      "unknown_key",
      `attestation token: signed by key ${truncate(header["kid"])}, not the Auditserver's key ${keyId}; fetch the key again with AuditService.GetAttestationKey`,
    );
  }

  const signature = fromBase64url(signatureB64);
  if (signature === undefined || signature.byteLength !== 64) throw malformed("signature is not 64 bytes of base64url");
  const ok = verify("sha256", Buffer.from(`${headerB64}.${claimsB64}`), { key, dsaEncoding: "ieee-p1363" }, signature);
  if (!ok) throw new AttestationTokenError("bad_signature", `attestation token: signature does not verify with the Auditserver's key ${keyId}`);

  const raw = parseJsonObject(fromBase64url(claimsB64));
  if (raw === undefined) throw malformed("claims are not base64url JSON");
  const claims = readClaims(raw, malformed);

  if (claims.iss !== ATTESTATION_TOKEN_ISSUER) {
    throw new AttestationTokenError("wrong_issuer", `attestation token: issuer "${truncate(claims.iss)}", want "${ATTESTATION_TOKEN_ISSUER}"`);
  }
  const nowS = nowMs / 1000;
  if (nowS >= claims.exp) {
    throw new AttestationTokenError(
      "expired",
      `attestation token: expired at ${isoSeconds(claims.exp)} (now ${new Date(nowMs).toISOString()}); attest again`,
    );
  }
  if (claims.iat > nowS + skew) {
    throw new AttestationTokenError(
      "not_yet_valid",
      `attestation token: issued at ${isoSeconds(claims.iat)}, after now (${new Date(nowMs).toISOString()}) plus ${skew} s of clock skew; check the clocks`,
    );
  }
  if (claims.sub !== options.expectedMachineId) {
    throw new AttestationTokenError(
      "wrong_machine",
      `attestation token: issued to machine ${truncate(claims.sub)}, not to ${truncate(options.expectedMachineId)}; each machine presents its own token`,
    );
  }
  const bound = fromBase64url(claims.cnf["x5t#S256"]);
  if (bound === undefined || bound.byteLength !== 32 || !bound.equals(expectedCert)) {
    throw new AttestationTokenError(
      "wrong_certificate",
      "attestation token: bound to another certificate (cnf x5t#S256 differs from the client certificate); attest again over the current certificate",
    );
  }
  return claims;
}

/**
 * Reads a token's claims WITHOUT verifying anything, for display and logs (`kmi ctl`,
 * debugging). Never base a decision on it. Returns undefined when the token does not parse.
 */
export function decodeAttestationTokenUnverified(token: string): { header: Record<string, unknown>; claims: Record<string, unknown> } | undefined {
  const parts = token.split(".");
  if (parts.length !== 3) return undefined;
  const header = parseJsonObject(fromBase64url(parts[0]!));
  const claims = parseJsonObject(fromBase64url(parts[1]!));
  return header !== undefined && claims !== undefined ? { header, claims } : undefined;
}

function parseJsonObject(bytes: Buffer | undefined): Record<string, unknown> | undefined {
  if (bytes === undefined) return undefined;
  try {
    const value: unknown = JSON.parse(bytes.toString("utf8"));
    return typeof value === "object" && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

function readClaims(raw: Record<string, unknown>, malformed: (what: string) => AttestationTokenError): AttestationClaims {
  const str = (name: string): string => {
    const v = raw[name];
    if (typeof v !== "string" || v.length === 0) throw malformed(`claim ${name} is not a non-empty string`);
    return v;
  };
  const seconds = (name: string): number => {
    const v = raw[name];
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) throw malformed(`claim ${name} is not a whole number of seconds`);
    return v;
  };
  const ten = raw["ten"];
  if (!Array.isArray(ten) || !ten.every((t): t is string => typeof t === "string")) throw malformed("claim ten is not a list of tenant ids");
  // Why: a claim like ["*", "acme"] has no one reading; refuse it rather than guess.
  if (ten.includes(ALL_TENANTS) && ten.length > 1) throw malformed(`claim ten mixes "${ALL_TENANTS}" with tenant ids`);
  const cnf = raw["cnf"];
  if (typeof cnf !== "object" || cnf === null || typeof (cnf as Record<string, unknown>)["x5t#S256"] !== "string") {
    throw malformed("claim cnf.x5t#S256 is missing");
  }
  const enc = raw["enc"];
  if (enc !== undefined) {
    const der = typeof enc === "string" ? fromBase64url(enc) : undefined;
    if (der === undefined) throw malformed("claim enc is not base64url");
    try {
      parseEncryptionPublicKey(der, "enc");
    } catch {
      throw malformed("claim enc is not a P-256 SubjectPublicKeyInfo");
    }
  }
  return {
    ...(typeof enc === "string" ? { enc } : {}),
    iss: str("iss"),
    sub: str("sub"),
    grp: str("grp"),
    ten,
    iat: seconds("iat"),
    exp: seconds("exp"),
    jti: str("jti"),
    cnf: { "x5t#S256": (cnf as Record<string, string>)["x5t#S256"]! },
  };
}

function isoSeconds(s: number): string {
  const d = new Date(s * 1000);
  return Number.isNaN(d.getTime()) ? String(s) : d.toISOString();
}

/** Claims come from a caller; keep what is echoed into messages short. */
function truncate(value: string): string {
  return value.length > 64 ? `${value.slice(0, 64)}…` : value;
}
