/**
 * The fast leaf builder: the agent's `IssueLeafCertificate`, on the proxy's hot path (one call
 * per new origin host).
 *
 * Why not pkijs here: building asn1js object trees for a TBSCertificate costs ~0.9 ms, the
 * ECDSA P-256 signature ~25 us. So everything that does not change between leaves (the issuer
 * Name, the AKI, the signature AlgorithmIdentifier, the fixed extensions) is encoded once in
 * {@link createLeafIssuer}, and each leaf is assembled as bytes with ./der.ts. The output is
 * checked against pkijs and `openssl x509` in the tests.
 *
 * Policy, enforced here so no caller can skip it: at least one name; valid hostnames and IPs;
 * at most 100 names; CN (if any) one of the names; an EC P-256 or RSA 2048..4096 key that is
 * not the issuer's; basicConstraints cA false (critical); keyUsage digitalSignature
 * (+keyEncipherment for RSA) critical; extKeyUsage serverAuth; SKI; AKI = the issuer's key id;
 * a CSPRNG serial; validity inside the issuer's (notAfter clamped to the issuer's notAfter).
 */
import { randomFillSync, type KeyObject } from "node:crypto";
import { FailedPrecondition, InvalidArgument } from "../common/errors.js";
import type { Signer } from "./signer.js";
import {
  bytesEqual,
  children,
  contentBytes,
  contextConstructed,
  decodeOid,
  DerError,
  expectTlv,
  oid,
  readTlv,
  sequence,
  set,
  Tag,
  toHex,
  unsignedInteger,
  utf8String,
  x509Time,
} from "./der.js";
import {
  authorityKeyIdentifierExtension,
  basicConstraintsExtension,
  encodeExtension,
  extKeyUsageExtension,
  keyUsageExtension,
  subjectAltNameExtension,
  subjectKeyIdentifierExtension,
} from "./extensions.js";
import { loadIssuer } from "./issuer.js";
import { subjectKeyIdentifier } from "./keys.js";
import { Oid } from "./oids.js";
import { checkNames, encodeIpAddress, formatIpAddress } from "./san.js";
import { SERIAL_BYTES } from "./serial.js";
import { assembleSigned } from "./signature.js";
import { checkDate, wholeSeconds } from "./validity.js";

/** Longest CN (X.520 ub-common-name). */
export const MAX_COMMON_NAME_LENGTH = 64;

/** What {@link createLeafIssuer} needs: the intermediate CA and its key. */
export interface LeafIssuerOptions {
  /** The issuing (intermediate) CA certificate, DER. */
  readonly certificateDer: Uint8Array;
  /** Its private key (ECDSA P-256 or RSA >= 2048), in this process or behind a Signer (a token). */
  readonly privateKey: KeyObject | Signer;
  /** If set, a request whose validity (notAfter - notBefore) is longer is refused. */
  readonly maxValiditySeconds?: number;
}

/** One leaf to issue. */
export interface IssueLeafRequest {
  /** The leaf's public key, SPKI DER: EC P-256 or RSA 2048..4096. */
  readonly publicKeySpkiDer: Uint8Array;
  /** Hostnames (dNSName SANs); wildcards only as `*.example.com`. */
  readonly dnsNames?: readonly string[];
  /** IP addresses (iPAddress SANs), IPv4 or IPv6. */
  readonly ipAddresses?: readonly string[];
  /**
   * The subject CN: one of the names (compared case-insensitively; IPs in any notation), at
   * most 64 characters. Undefined or `""` (proto3's unset string): the first name (hostnames
   * first) when shorter than 64 characters, else none. `null`: no CN (the subject is then empty
   * and the SAN extension critical).
   */
  readonly commonName?: string | null;
  /** Start of validity (whole seconds; the caller backdates). Raised to the issuer's notBefore if earlier. */
  readonly notBefore: Date;
  /** End of validity; clamped to the issuer's notAfter. */
  readonly notAfter: Date;
}

/** A leaf with what went into it, for the caller's cache and log line. */
export interface IssuedLeaf {
  /** The certificate, DER. */
  readonly der: Uint8Array;
  /** Serial as lowercase hex. */
  readonly serialHex: string;
  /** Effective start of validity. */
  readonly notBefore: Date;
  /** Effective end of validity (after clamping). */
  readonly notAfter: Date;
  /** The CN written, if any. */
  readonly commonName: string | undefined;
  /** Hostnames written (lowercased, deduplicated). */
  readonly dnsNames: readonly string[];
  /** IP addresses written (canonical text). */
  readonly ipAddresses: readonly string[];
}

/** An intermediate CA ready to sign leaves fast. */
export interface LeafIssuer {
  /** The issuing CA certificate, DER (the chain's second element). */
  readonly issuerCertificateDer: Uint8Array;
  /** The issuing CA's notAfter: no leaf outlives it. */
  readonly issuerNotAfter: Date;
  /** The issuer's key identifier (the leaves' AKI), lowercase hex. */
  readonly issuerKeyIdHex: string;
  /** Issues one leaf and returns its DER; InvalidArgument on a policy violation, FailedPrecondition when the issuer's validity leaves no room. */
  issueLeaf(request: IssueLeafRequest): Uint8Array;
  /** As {@link LeafIssuer.issueLeaf}, also returning what was written. */
  issueLeafDetailed(request: IssueLeafRequest): IssuedLeaf;
}

// --- public key policy (structural, no OpenSSL decoder: createPublicKey costs ~130 us) ---

/** SPKI prefix of every uncompressed P-256 key: SEQ { SEQ { ecPublicKey, prime256v1 }, BIT STRING 00 04 ... }. */
const P256_SPKI_PREFIX = Buffer.from("3059301306072a8648ce3d020106082a8648ce3d03010703420004", "hex");
const P256_P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffffn;
const P256_B = 0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604bn;
const RSA_ALGORITHM = sequence(oid(Oid.rsaEncryption), Uint8Array.of(Tag.null, 0));

function bigintOf(bytes: Uint8Array): bigint {
  return bytes.length === 0 ? 0n : BigInt(`0x${toHex(bytes)}`);
}

/** True when (x, y) is on P-256: y^2 = x^3 - 3x + b (mod p), with x, y < p. */
function onP256(point: Uint8Array): boolean {
  const x = bigintOf(point.subarray(0, 32));
  const y = bigintOf(point.subarray(32, 64));
  if (x >= P256_P || y >= P256_P) return false;
  return (((y * y - (x * x * x - 3n * x + P256_B)) % P256_P) + P256_P) % P256_P === 0n;
}

function badKey(why: string): never {
  throw new InvalidArgument(`public_key: ${why}; send an ECDSA P-256 or RSA 2048-4096 SubjectPublicKeyInfo (DER)`);
}

/** Classifies and checks a leaf public key; returns whether it is RSA (for keyUsage). */
function checkLeafKey(spki: Uint8Array): { rsa: boolean } {
  if (!(spki instanceof Uint8Array) || spki.length < 64 || spki.length > 1024) badKey("missing or wrong size");
  if (spki.length === 91 && Buffer.from(spki.buffer, spki.byteOffset, 27).equals(P256_SPKI_PREFIX)) {
    if (!onP256(spki.subarray(27))) badKey("the EC point is not on the P-256 curve");
    return { rsa: false };
  }
  try {
    const outer = expectTlv(spki, 0, Tag.sequence);
    if (outer.end !== spki.length) throw new DerError("trailing bytes");
    const [alg, bits, ...rest] = children(spki, outer);
    if (!alg || !bits || rest.length || bits.tag !== Tag.bitString) throw new DerError("bad spki");
    if (!bytesEqual(spki.subarray(alg.start, alg.end), RSA_ALGORITHM)) {
      const [algOid] = children(spki, alg);
      const isEc = algOid?.tag === Tag.oid && decodeOid(contentBytes(spki, algOid)) === Oid.ecPublicKey;
      badKey(isEc ? "EC keys must be on P-256, with the point uncompressed" : "unsupported key type");
    }
    if (spki[bits.contentStart] !== 0) throw new DerError("bad bit string");
    const key = readTlv(spki, bits.contentStart + 1, bits.end);
    if (key.tag !== Tag.sequence || key.end !== bits.end) throw new DerError("bad RSAPublicKey");
    const [n, e, ...more] = children(spki, key);
    if (!n || !e || more.length || n.tag !== Tag.integer || e.tag !== Tag.integer) throw new DerError("bad RSAPublicKey");
    let modulus = contentBytes(spki, n);
    if ((modulus[0]! & 0x80) !== 0) throw new DerError("negative modulus");
    if (modulus[0] === 0) modulus = modulus.subarray(1);
    const bitLength = modulus.length * 8 - Math.clz32(modulus[0]!) + 24;
    if (bitLength < 2048 || bitLength > 4096) badKey(`RSA modulus of ${bitLength} bits`);
    const exponent = contentBytes(spki, e);
    if (exponent.length > 8 || (exponent[0]! & 0x80) !== 0 || (exponent[exponent.length - 1]! & 1) === 0 || bigintOf(exponent) < 3n) {
      badKey("bad RSA public exponent");
    }
    if ((modulus[modulus.length - 1]! & 1) === 0) badKey("even RSA modulus");
    return { rsa: true };
  } catch (err) {
    if (err instanceof InvalidArgument) throw err;
    return badKey("does not parse");
  }
}

const VERSION_V3 = Uint8Array.of(0xa0, 0x03, 0x02, 0x01, 0x02);
const EMPTY_NAME = Uint8Array.of(0x30, 0x00);
const BASIC_CONSTRAINTS = encodeExtension(basicConstraintsExtension(false));
const KEY_USAGE_EC = encodeExtension(keyUsageExtension(["digitalSignature"]));
const KEY_USAGE_RSA = encodeExtension(keyUsageExtension(["digitalSignature", "keyEncipherment"]));
const EXT_KEY_USAGE = encodeExtension(extKeyUsageExtension([Oid.serverAuth]));
const CN_OID = oid(Oid.commonName);

/** Refills serials in batches: one CSPRNG call per 256 leaves instead of one per leaf. */
function serialSource(): () => Uint8Array {
  const pool = new Uint8Array(SERIAL_BYTES * 256);
  let at = pool.length;
  return () => {
    if (at === pool.length) {
      randomFillSync(pool);
      at = 0;
    }
    const serial = pool.slice(at, at + SERIAL_BYTES);
    at += SERIAL_BYTES;
    serial[0] = (serial[0]! & 0x7f) | 0x40; // positive, always 16 bytes (see serial.ts)
    return serial;
  };
}

function pickCommonName(
  requested: string | null | undefined,
  dnsNames: readonly string[],
  ipAddresses: readonly string[],
): string | undefined {
  if (requested === null) return undefined;
  if (requested === undefined || requested === "") {
    const first = dnsNames[0] ?? ipAddresses[0];
    return first !== undefined && first.length < MAX_COMMON_NAME_LENGTH ? first : undefined;
  }
  if (typeof requested !== "string" || requested.length > MAX_COMMON_NAME_LENGTH) {
    throw new InvalidArgument(`common_name: longer than ${MAX_COMMON_NAME_LENGTH} characters; pick a shorter name or leave common_name empty`);
  }
  const lower = requested.toLowerCase();
  if (dnsNames.includes(lower)) return lower;
  if (requested.includes(":") || /^[\d.]+$/.test(requested)) {
    let canonical: string | undefined;
    try {
      canonical = formatIpAddress(encodeIpAddress(requested, "common_name"));
    } catch {
      canonical = undefined;
    }
    if (canonical !== undefined && ipAddresses.includes(canonical)) return canonical;
  }
  throw new InvalidArgument("common_name: must be one of the certificate's dns_names or ip_addresses; add it there or leave common_name out");
}

/**
 * Prepares an intermediate CA for fast leaf issuance: checks it once (a CA with keyCertSign,
 * the key is its own: FailedPrecondition otherwise) and precomputes the issuer Name, AKI,
 * signature algorithm and notAfter.
 */
export function createLeafIssuer(options: LeafIssuerOptions): LeafIssuer {
  const issuer = loadIssuer({ certificateDer: options.certificateDer, privateKey: options.privateKey });
  const maxValidityMs = options.maxValiditySeconds === undefined ? undefined : options.maxValiditySeconds * 1000;
  if (maxValidityMs !== undefined && !(maxValidityMs > 0)) {
    throw new InvalidArgument("max_validity_seconds: must be a positive number of seconds");
  }
  const issuerName = issuer.decoded.subjectNameDer.slice();
  const issuerSpki = issuer.decoded.spkiDer.slice();
  const algorithm = issuer.signatureAlgorithm.algorithmIdentifierDer;
  const aki = encodeExtension(authorityKeyIdentifierExtension(issuer.keyIdentifier));
  const issuerNotBeforeMs = issuer.info.notBefore.getTime();
  const issuerNotAfterMs = issuer.info.notAfter.getTime();
  const signer = issuer.signer;
  const nextSerial = serialSource();

  const issueLeafDetailed = (request: IssueLeafRequest): IssuedLeaf => {
    if (request === null || typeof request !== "object") throw new InvalidArgument("request: missing");
    const names = checkNames(request.dnsNames, request.ipAddresses, { requireOne: true });
    const commonName = pickCommonName(request.commonName, names.dnsNames, names.ipAddresses);
    const spki = request.publicKeySpkiDer;
    const { rsa } = checkLeafKey(spki);
    if (bytesEqual(spki, issuerSpki)) throw new InvalidArgument("public_key: is the issuing CA's own key; generate a fresh key for the leaf");

    checkDate(request.notBefore, "not_before");
    checkDate(request.notAfter, "not_after");
    if (request.notAfter.getTime() <= request.notBefore.getTime()) {
      throw new InvalidArgument("not_after: must be after not_before");
    }
    if (maxValidityMs !== undefined && request.notAfter.getTime() - request.notBefore.getTime() > maxValidityMs) {
      throw new InvalidArgument(`not_after: validity longer than the ${maxValidityMs / 1000} s cap; ask for a shorter one`);
    }
    const notBefore = wholeSeconds(new Date(Math.max(request.notBefore.getTime(), issuerNotBeforeMs)));
    const notAfter = wholeSeconds(new Date(Math.min(request.notAfter.getTime(), issuerNotAfterMs)));
    if (notAfter.getTime() <= notBefore.getTime() && request.notAfter.getTime() <= issuerNotBeforeMs) {
      throw new InvalidArgument(
        `not_after: ${request.notAfter.toISOString()} is before the issuing CA's notBefore ${new Date(issuerNotBeforeMs).toISOString()}; ask for a later validity`,
      );
    }
    if (notAfter.getTime() <= notBefore.getTime()) {
      throw new FailedPrecondition(
        `issuer: valid only until ${new Date(issuerNotAfterMs).toISOString()}, which leaves no validity for this leaf; rotate or renew the intermediate`,
      );
    }

    const serial = nextSerial();
    const subject = commonName === undefined ? EMPTY_NAME : sequence(set(sequence(CN_OID, utf8String(commonName))));
    const san = encodeExtension(
      subjectAltNameExtension({ dnsNames: names.dnsNames, ipBytes: names.ipBytes }, commonName === undefined),
    );
    const ski = encodeExtension(subjectKeyIdentifierExtension(subjectKeyIdentifier(spki)));
    const tbs = sequence(
      VERSION_V3,
      unsignedInteger(serial),
      algorithm,
      issuerName,
      sequence(x509Time(notBefore), x509Time(notAfter)),
      subject,
      spki,
      contextConstructed(3, sequence(BASIC_CONSTRAINTS, rsa ? KEY_USAGE_RSA : KEY_USAGE_EC, EXT_KEY_USAGE, san, ski, aki)),
    );
    return {
      der: assembleSigned(tbs, algorithm, signer.sign(tbs)),
      serialHex: toHex(serial),
      notBefore,
      notAfter,
      commonName,
      dnsNames: names.dnsNames,
      ipAddresses: names.ipAddresses,
    };
  };

  return {
    issuerCertificateDer: issuer.decoded.der,
    issuerNotAfter: issuer.info.notAfter,
    issuerKeyIdHex: toHex(issuer.keyIdentifier),
    issueLeaf: (request) => issueLeafDetailed(request).der,
    issueLeafDetailed,
  };
}
