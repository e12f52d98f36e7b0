/**
 * Signature algorithms: which one kmi signs with for a given key, signing TBS bytes with
 * node:crypto, and verifying a certificate's or CSR's signature made by anyone's CA.
 */
import { constants, createPublicKey, sign, verify, type KeyObject } from "node:crypto";
import { InvalidArgument } from "../common/errors.js";
import {
  bitString,
  children,
  contentBytes,
  decodeOid,
  DerError,
  expectTlv,
  NULL,
  oid,
  readTlv,
  sequence,
  Tag,
} from "./der.js";
import { Oid } from "./oids.js";

/** How kmi signs: ECDSA P-256 keys with ecdsa-with-SHA256, RSA keys with sha256WithRSAEncryption (PKCS#1 v1.5). */
export interface SignatureAlgorithm {
  /** The algorithm's name as OpenSSL prints it. */
  readonly name: "ecdsa-with-SHA256" | "sha256WithRSAEncryption";
  /** Dotted OID. */
  readonly oid: string;
  /** The AlgorithmIdentifier DER that goes into certificates and CSRs. */
  readonly algorithmIdentifierDer: Uint8Array;
}

/** ecdsa-with-SHA256, for P-256 keys. */
export const ECDSA_SHA256: SignatureAlgorithm = {
  name: "ecdsa-with-SHA256",
  oid: Oid.ecdsaWithSha256,
  algorithmIdentifierDer: sequence(oid(Oid.ecdsaWithSha256)), // parameters absent (RFC 5758)
};
const RSA_SHA256: SignatureAlgorithm = {
  name: "sha256WithRSAEncryption",
  oid: Oid.sha256WithRsa,
  algorithmIdentifierDer: sequence(oid(Oid.sha256WithRsa), NULL), // parameters NULL (RFC 4055)
};

/**
 * The signature algorithm for a signing key: P-256 → ecdsa-with-SHA256, RSA >= 2048 bits →
 * sha256WithRSAEncryption. Other keys are refused with InvalidArgument naming `field`.
 */
export function signatureAlgorithmFor(privateKey: KeyObject, field = "private_key"): SignatureAlgorithm {
  const details = privateKey.asymmetricKeyDetails ?? {};
  if (privateKey.type !== "private") throw new InvalidArgument(`${field}: not a private key`);
  if (privateKey.asymmetricKeyType === "ec" && details.namedCurve === "prime256v1") return ECDSA_SHA256;
  if (privateKey.asymmetricKeyType === "rsa" && (details.modulusLength ?? 0) >= 2048) return RSA_SHA256;
  throw new InvalidArgument(`${field}: cannot sign with this key; use an ECDSA P-256 or RSA (>= 2048 bits) key`);
}

/** Signs `data` (TBS bytes) with SHA-256 and the key's algorithm; ECDSA signatures come DER-encoded, as X.509 wants. */
export function signWithKey(privateKey: KeyObject, data: Uint8Array): Uint8Array {
  return new Uint8Array(sign("sha256", data, privateKey));
}

/** Assembles a signed structure (Certificate or CertificationRequest): SEQUENCE { tbs, algorithm, BIT STRING signature }. */
export function assembleSigned(tbsDer: Uint8Array, algorithmIdentifierDer: Uint8Array, signature: Uint8Array): Uint8Array {
  return sequence(tbsDer, algorithmIdentifierDer, bitString(signature));
}

/** Result of checking a signature: ok, or why not (for chain errors a person reads). */
export type SignatureCheck = { readonly ok: true } | { readonly ok: false; readonly reason: string };

const NAMES: Record<string, string> = {
  [Oid.ecdsaWithSha256]: "ecdsa-with-SHA256",
  [Oid.ecdsaWithSha384]: "ecdsa-with-SHA384",
  [Oid.ecdsaWithSha512]: "ecdsa-with-SHA512",
  [Oid.sha256WithRsa]: "sha256WithRSAEncryption",
  [Oid.sha384WithRsa]: "sha384WithRSAEncryption",
  [Oid.sha512WithRsa]: "sha512WithRSAEncryption",
  [Oid.rsassaPss]: "rsassaPss",
  [Oid.ed25519]: "ED25519",
  [Oid.ed448]: "ED448",
  [Oid.sha1WithRsa]: "sha1WithRSAEncryption",
  [Oid.md5WithRsa]: "md5WithRSAEncryption",
  [Oid.ecdsaWithSha1]: "ecdsa-with-SHA1",
};

const HASHES: Record<string, string> = { [Oid.sha256]: "sha256", [Oid.sha384]: "sha384", [Oid.sha512]: "sha512" };

/** The dotted OID of an AlgorithmIdentifier DER. */
export function algorithmOid(algorithmIdentifierDer: Uint8Array): string {
  const seq = expectTlv(algorithmIdentifierDer, 0, Tag.sequence);
  const [id] = children(algorithmIdentifierDer, seq);
  if (!id || id.tag !== Tag.oid) throw new DerError("bad algorithm identifier");
  return decodeOid(contentBytes(algorithmIdentifierDer, id));
}

/** A readable name for a signature AlgorithmIdentifier (OpenSSL's spelling), or its dotted OID. */
export function signatureAlgorithmName(algorithmIdentifierDer: Uint8Array): string {
  try {
    const id = algorithmOid(algorithmIdentifierDer);
    return NAMES[id] ?? id;
  } catch {
    return "malformed";
  }
}

interface PssParams {
  hash: string;
  saltLength: number;
}

/** RSASSA-PSS-params; SHA-1 defaults are refused, and MGF1 must use the same hash. */
function pssParams(alg: Uint8Array): PssParams | string {
  const seq = expectTlv(alg, 0, Tag.sequence);
  const [, params] = children(alg, seq);
  if (!params || params.tag !== Tag.sequence) return "rsassaPss without parameters (SHA-1 defaults) is not accepted";
  let hash: string | undefined;
  let mgfHash: string | undefined;
  let saltLength = 20;
  for (const p of children(alg, params)) {
    const [inner] = children(alg, p);
    if (!inner) return "malformed rsassaPss parameters";
    if (p.tag === 0xa0) hash = HASHES[algorithmOid(alg.subarray(inner.start, inner.end))];
    else if (p.tag === 0xa1) {
      const mgf = children(alg, inner);
      if (mgf[0] && decodeOid(contentBytes(alg, mgf[0])) !== Oid.mgf1) return "rsassaPss with an unknown mask generation function";
      if (mgf[1]) mgfHash = HASHES[algorithmOid(alg.subarray(mgf[1].start, mgf[1].end))];
    } else if (p.tag === 0xa2) {
      saltLength = 0;
      for (const b of contentBytes(alg, inner)) saltLength = saltLength * 256 + b;
    }
  }
  if (!hash || !mgfHash || hash !== mgfHash) return "rsassaPss must use SHA-256/384/512 for both hash and MGF1";
  return { hash, saltLength };
}

/**
 * Verifies `signature` over `data` with the public key in `spkiDer`, under the signature
 * AlgorithmIdentifier `algorithmIdentifierDer`. Accepts ECDSA and RSA (PKCS#1 v1.5 or PSS) with
 * SHA-256/384/512, and Ed25519/Ed448; SHA-1 and MD5 are refused as weak.
 */
export function verifySignature(
  algorithmIdentifierDer: Uint8Array,
  data: Uint8Array,
  signature: Uint8Array,
  spkiDer: Uint8Array,
): SignatureCheck {
  let key: KeyObject;
  let id: string;
  try {
    readTlv(algorithmIdentifierDer);
    id = algorithmOid(algorithmIdentifierDer);
    key = createPublicKey({ key: Buffer.from(spkiDer), format: "der", type: "spki" });
  } catch {
    return { ok: false, reason: "malformed signature algorithm or issuer public key" };
  }
  const name = NAMES[id] ?? id;
  const type = key.asymmetricKeyType;
  try {
    let ok: boolean;
    switch (id) {
      case Oid.ecdsaWithSha256:
      case Oid.ecdsaWithSha384:
      case Oid.ecdsaWithSha512:
        if (type !== "ec") return { ok: false, reason: `${name} signature but the issuer key is ${type}` };
        ok = verify(`sha${name.slice(-3)}`, data, { key, dsaEncoding: "der" }, signature);
        break;
      case Oid.sha256WithRsa:
      case Oid.sha384WithRsa:
      case Oid.sha512WithRsa:
        if (type !== "rsa") return { ok: false, reason: `${name} signature but the issuer key is ${type}` };
        ok = verify(`sha${name.slice(3, 6)}`, data, { key, padding: constants.RSA_PKCS1_PADDING }, signature);
        break;
      case Oid.rsassaPss: {
        if (type !== "rsa" && type !== "rsa-pss") return { ok: false, reason: `rsassaPss signature but the issuer key is ${type}` };
        const p = pssParams(algorithmIdentifierDer);
        if (typeof p === "string") return { ok: false, reason: p };
        ok = verify(p.hash, data, { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: p.saltLength }, signature);
        break;
      }
      case Oid.ed25519:
      case Oid.ed448:
        ok = verify(null, data, key, signature);
        break;
      case Oid.sha1WithRsa:
      case Oid.md5WithRsa:
      case Oid.ecdsaWithSha1:
        return { ok: false, reason: `weak signature algorithm ${name}; have it signed with SHA-256` };
      default:
        return { ok: false, reason: `unsupported signature algorithm ${name}` };
    }
    return ok ? { ok: true } : { ok: false, reason: "signature does not verify with the issuer's public key" };
  } catch {
    return { ok: false, reason: "signature does not verify with the issuer's public key" };
  }
}
