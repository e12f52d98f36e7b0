import { createHash, createPublicKey, generateKeyPairSync, randomBytes, sign, type KeyObject } from "node:crypto";
import { describe, expect, it } from "vitest";
import {
  ALL_TENANTS,
  AttestationTokenError,
  attestationKeyId,
  base64url,
  decodeAttestationTokenUnverified,
  publicKeyPem,
  signAttestationToken,
  tenClaimServes,
  verifyAttestationToken,
  type AttestationTokenProblem,
} from "../../../src/attest/index.js";
import { InvalidArgument } from "../../../src/common/errors.js";

const auditKey = generateKeyPairSync("ec", { namedCurve: "P-256" });
const otherKey = generateKeyPairSync("ec", { namedCurve: "P-256" });
const certA = createHash("sha256").update("certificate of machine a").digest();
const certB = createHash("sha256").update("certificate of machine b").digest();
const T0 = new Date("2030-01-01T00:00:00Z");
const at = (seconds: number) => new Date(T0.getTime() + seconds * 1000);

function issue(overrides: Partial<Parameters<typeof signAttestationToken>[0]> = {}, key: KeyObject = auditKey.privateKey) {
  return signAttestationToken(
    {
      machineId: "m-00000000000000aa",
      group: "edge",
      tenantIds: ["acme"],
      allTenants: false,
      certificateSha256: certA,
      issuedAt: T0,
      expiresAt: at(300),
      ...overrides,
    },
    { privateKey: key },
  );
}

const expectations = { now: at(10), expectedMachineId: "m-00000000000000aa", expectedCertSha256: certA };

/** Re-signs arbitrary header and claims with `key`, to forge tokens a buggy signer could make. */
function forge(header: object, claims: object, key: KeyObject = auditKey.privateKey): string {
  const input = `${base64url(Buffer.from(JSON.stringify(header)))}.${base64url(Buffer.from(JSON.stringify(claims)))}`;
  return `${input}.${base64url(sign("sha256", Buffer.from(input), { key, dsaEncoding: "ieee-p1363" }))}`;
}

function problemOf(fn: () => unknown): AttestationTokenProblem | string {
  try {
    fn();
  } catch (err) {
    if (err instanceof AttestationTokenError) return err.problem;
    return `not an AttestationTokenError: ${String(err)}`;
  }
  return "accepted";
}

describe("attestation token", () => {
  it("carries the machine's encryption key as enc (base64url DER SPKI) when given, and none otherwise", () => {
    const enc = generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ format: "der", type: "spki" });
    const withEnc = verifyAttestationToken(issue({ encryptionPublicKey: enc }).token, auditKey.publicKey, expectations);
    expect(withEnc.enc).toBe(base64url(enc));
    expect(verifyAttestationToken(issue().token, auditKey.publicKey, expectations).enc).toBeUndefined();
    expect(() => issue({ encryptionPublicKey: Buffer.from("not a key") })).toThrow(/encryption_public_key: not a DER SubjectPublicKeyInfo/);
  });

  it("round-trips: the verifier gets the claims the Auditserver signed", () => {
    const { token, claims, keyId } = issue({ jti: "fixed-jti" });
    expect(keyId).toBe(attestationKeyId(auditKey.publicKey));
    const verified = verifyAttestationToken(token, publicKeyPem(auditKey.publicKey), expectations);
    expect(verified).toEqual(claims);
    expect(verified).toEqual({
      iss: "kmi-audit",
      sub: "m-00000000000000aa",
      grp: "edge",
      ten: ["acme"],
      iat: Math.floor(T0.getTime() / 1000),
      exp: Math.floor(T0.getTime() / 1000) + 300,
      jti: "fixed-jti",
      cnf: { "x5t#S256": base64url(certA) },
    });
  });

  it('writes every tenant as ten ["*"] and no tenant as ten [], and the verifier keeps both apart', () => {
    const all = issue({ tenantIds: [], allTenants: true });
    expect(all.claims.ten).toEqual(["*"]);
    expect(verifyAttestationToken(all.token, auditKey.publicKey, expectations).ten).toEqual([ALL_TENANTS]);
    const none = issue({ tenantIds: [], allTenants: false });
    expect(none.claims.ten).toEqual([]);
    expect(verifyAttestationToken(none.token, auditKey.publicKey, expectations).ten).toEqual([]);
  });

  it.each<[string, string[], string, boolean]>([
    ['["*"] serves any tenant', ["*"], "acme", true],
    ["[] serves no tenant", [], "acme", false],
    ["a list serves its tenants", ["acme", "globex"], "globex", true],
    ["a list serves no other tenant", ["acme"], "globex", false],
  ])("tenClaimServes: %s", (_name, ten, tenant, want) => {
    expect(tenClaimServes(ten, tenant)).toBe(want);
  });

  it("is a compact JWS with an explicit ES256 header and a 64-byte signature", () => {
    const { token, keyId } = issue();
    const [h, , s] = token.split(".");
    expect(JSON.parse(Buffer.from(h!, "base64url").toString())).toEqual({ alg: "ES256", typ: "kmi-attestation+jwt", kid: keyId });
    expect(Buffer.from(s!, "base64url").byteLength).toBe(64);
    expect(token).not.toMatch(/[=+/]/);
  });

  it("computes the RFC 7638 thumbprint as the key id", () => {
    // The JWK of a copy of the key (not of the generated one: see p256Coordinates in src/attest/keys.ts).
    const jwk = createPublicKey(auditKey.publicKey.export({ type: "spki", format: "pem" })).export({ format: "jwk" });
    const expected = createHash("sha256").update(`{"crv":"P-256","kty":"EC","x":"${jwk.x}","y":"${jwk.y}"}`).digest("base64url");
    expect(attestationKeyId(auditKey.publicKey)).toBe(expected);
    expect(attestationKeyId(auditKey.privateKey)).toBe(expected);
  });

  it("accepts the expected certificate digest as bytes, lowercase hex, openssl-style hex or base64url", () => {
    const { token } = issue();
    const forms = [
      certA,
      certA.toString("hex"),
      certA.toString("hex").toUpperCase().match(/../g)!.join(":"),
      certA.toString("base64url"),
    ];
    for (const form of forms) {
      expect(verifyAttestationToken(token, auditKey.publicKey, { ...expectations, expectedCertSha256: form }).sub).toBe("m-00000000000000aa");
    }
  });

  it("accepts a token up to the second before exp and an iat within the clock skew", () => {
    const { token } = issue();
    expect(() => verifyAttestationToken(token, auditKey.publicKey, { ...expectations, now: at(299.999) })).not.toThrow();
    expect(() => verifyAttestationToken(token, auditKey.publicKey, { ...expectations, now: at(-30) })).not.toThrow();
  });

  const good = () => issue().token;
  const claimsOf = (token: string) => JSON.parse(Buffer.from(token.split(".")[1]!, "base64url").toString());
  const header = () => ({ alg: "ES256", typ: "kmi-attestation+jwt", kid: attestationKeyId(auditKey.publicKey) });

  it.each<[string, () => string, Partial<typeof expectations>, AttestationTokenProblem, RegExp]>([
    ["expired (now = exp)", good, { now: at(300) }, "expired", /expired at 2030-01-01T00:05:00\.000Z.*attest again/],
    ["expired (an hour later)", good, { now: at(3600) }, "expired", /expired/],
    ["issued in the future beyond the skew", good, { now: at(-31) }, "not_yet_valid", /check the clocks/],
    ["another machine's token", good, { expectedMachineId: "m-00000000000000bb" }, "wrong_machine", /issued to machine m-00000000000000aa, not to m-00000000000000bb/],
    ["bound to another certificate", good, { expectedCertSha256: certB }, "wrong_certificate", /another certificate/],
    ["signed by another key", () => issue({}, otherKey.privateKey).token, {}, "unknown_key", /not the Auditserver's key/],
    [
      "signed by another key under the right kid",
      () => forge(header(), claimsOf(good()), otherKey.privateKey),
      {},
      "bad_signature",
      /signature does not verify/,
    ],
    [
      "claims changed after signing",
      () => {
        const [h, , s] = good().split(".");
        const claims = { ...claimsOf(good()), sub: "m-00000000000000bb" };
        return `${h}.${base64url(Buffer.from(JSON.stringify(claims)))}.${s}`;
      },
      { expectedMachineId: "m-00000000000000bb" },
      "bad_signature",
      /signature does not verify/,
    ],
    ["alg none", () => forge({ ...header(), alg: "none" }, claimsOf(good())), {}, "malformed", /alg "none", want "ES256"/],
    ["alg HS256", () => forge({ ...header(), alg: "HS256" }, claimsOf(good())), {}, "malformed", /alg "HS256"/],
    ["a plain JWT typ", () => forge({ ...header(), typ: "JWT" }, claimsOf(good())), {}, "malformed", /typ "JWT"/],
    ["a crit header", () => forge({ ...header(), crit: ["exp"] }, claimsOf(good())), {}, "malformed", /crit/],
    ["wrong issuer", () => forge(header(), { ...claimsOf(good()), iss: "someone" }), {}, "wrong_issuer", /issuer "someone"/],
    ["exp as a string", () => forge(header(), { ...claimsOf(good()), exp: "9999999999" }), {}, "malformed", /claim exp/],
    ["no cnf", () => forge(header(), { ...claimsOf(good()), cnf: undefined }), {}, "malformed", /cnf/],
    ["ten not a list", () => forge(header(), { ...claimsOf(good()), ten: "acme" }), {}, "malformed", /claim ten/],
    ["enc not base64url", () => forge(header(), { ...claimsOf(good()), enc: "a+b/" }), {}, "malformed", /claim enc is not base64url/],
    ["enc not a P-256 key", () => forge(header(), { ...claimsOf(good()), enc: base64url(generateKeyPairSync("ed25519").publicKey.export({ format: "der", type: "spki" })) }), {}, "malformed", /claim enc is not a P-256/],
    ['ten mixing "*" with a tenant', () => forge(header(), { ...claimsOf(good()), ten: ["*", "acme"] }), {}, "malformed", /claim ten mixes "\*" with tenant ids/],
    ["two parts", () => good().split(".").slice(0, 2).join("."), {}, "malformed", /3 dot-separated parts, got 2/],
    ["empty", () => "", {}, "malformed", /empty/],
    ["padded base64", () => good().replace(/\.([^.]+)$/, ".$1=="), {}, "malformed", /signature/],
    ["too long", () => "a".repeat(9000), {}, "malformed", /longer than 8192/],
    ["garbage header", () => `!!!.${good().split(".")[1]}.${good().split(".")[2]}`, {}, "malformed", /header/],
    ["DER signature instead of raw r||s", () => {
      const [h, c] = good().split(".");
      const der = sign("sha256", Buffer.from(`${h}.${c}`), { key: auditKey.privateKey, dsaEncoding: "der" });
      return `${h}.${c}.${base64url(der)}`;
    }, {}, "malformed", /64 bytes/],
  ])("refuses %s", (_name, make, opts, problem, message) => {
    const token = make();
    const run = () => verifyAttestationToken(token, auditKey.publicKey, { ...expectations, ...opts });
    expect(problemOf(run)).toBe(problem);
    expect(run).toThrow(message);
  });

  it("maps every refusal to UNAUTHENTICATED", () => {
    try {
      verifyAttestationToken(good(), auditKey.publicKey, { ...expectations, now: at(301) });
      expect.unreachable();
    } catch (err) {
      expect((err as AttestationTokenError).code).toBe("unauthenticated");
    }
  });

  it("refuses unusable verifier options as the caller's bug, not as a bad token", () => {
    expect(() => verifyAttestationToken(good(), auditKey.publicKey, { ...expectations, expectedCertSha256: "abc" })).toThrow(InvalidArgument);
    expect(() => verifyAttestationToken(good(), auditKey.publicKey, { ...expectations, expectedMachineId: "" })).toThrow(InvalidArgument);
    const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
    expect(() => verifyAttestationToken(good(), rsa.publicKey, expectations)).toThrow(/must be an ECDSA P-256 key, not rsa/);
    const p384 = generateKeyPairSync("ec", { namedCurve: "P-384" });
    expect(() => verifyAttestationToken(good(), p384.publicKey, expectations)).toThrow(/not EC secp384r1/);
  });

  it("refuses to sign a token that would be invalid", () => {
    expect(() => issue({ expiresAt: T0 })).toThrow(/expires_at/);
    expect(() => issue({ certificateSha256: randomBytes(20) })).toThrow(/certificate_sha256/);
    expect(() => issue({ machineId: "" })).toThrow(/machine_id/);
    expect(() => signAttestationToken({ machineId: "m-1", group: "g", tenantIds: [], allTenants: false, certificateSha256: certA, issuedAt: T0, expiresAt: at(60) }, { privateKey: auditKey.publicKey })).toThrow(/not a private key/);
    expect(() => issue({ tenantIds: ["acme"], allTenants: true })).toThrow(/^tenant_ids: give either tenant ids or all tenants, not both$/);
    expect(() => issue({ tenantIds: ["*"] })).toThrow(/^tenant_ids: "\*" is not a tenant id; set allTenants to serve every tenant$/);
  });

  it("gives a fresh jti to every token", () => {
    const ids = new Set(Array.from({ length: 50 }, () => issue().claims.jti));
    expect(ids.size).toBe(50);
  });

  it("decodes without verifying, for display only", () => {
    const decoded = decodeAttestationTokenUnverified(good());
    expect(decoded?.claims["sub"]).toBe("m-00000000000000aa");
    expect(decodeAttestationTokenUnverified("x.y")).toBeUndefined();
  });
});
