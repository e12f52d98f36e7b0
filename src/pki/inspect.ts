/**
 * What a certificate says, as plain values: names, validity, fingerprints, CA constraints,
 * alternative names, key identifiers and usages. Used by the Certificate menu's download and
 * history, by upload checks and by chain verification.
 */
import { createHash } from "node:crypto";
import { InvalidArgument } from "../common/errors.js";
import { children, contentBytes, decodeOid, DerError, expectTlv, Tag, toHex } from "./der.js";
import { KEY_USAGE_NAMES, type KeyUsageName } from "./extensions.js";
import { describePublicKey } from "./keys.js";
import { commonNameOf, formatName } from "./name.js";
import { Oid } from "./oids.js";
import { decodeCertificate, type DecodedCertificate } from "./parse.js";
import { formatIpAddress } from "./san.js";
import { signatureAlgorithmName } from "./signature.js";

/** A certificate's contents as plain values. */
export interface CertificateInfo {
  /** Subject as an RFC 4514 string (`CN=...,O=...`), `""` when empty. */
  readonly subject: string;
  /** Issuer as an RFC 4514 string. */
  readonly issuer: string;
  /** The subject's CN, if any. */
  readonly commonName: string | undefined;
  /** Serial number as lowercase hex (a DER sign byte 00 removed). */
  readonly serialHex: string;
  /** Start of validity. */
  readonly notBefore: Date;
  /** End of validity. */
  readonly notAfter: Date;
  /** SHA-256 of the DER as uppercase hex pairs joined by `:` (as `openssl x509 -fingerprint -sha256` prints). */
  readonly sha256Fingerprint: string;
  /** basicConstraints cA. */
  readonly isCa: boolean;
  /** basicConstraints pathLenConstraint, -1 when absent. */
  readonly pathLenConstraint: number;
  /** dNSName SANs. */
  readonly dnsNames: readonly string[];
  /** iPAddress SANs as text. */
  readonly ipAddresses: readonly string[];
  /** uniformResourceIdentifier SANs (kmi identities: `kmi://service/<name>`, `kmi://machine/<id>`). */
  readonly uris: readonly string[];
  /** The public key's algorithm label, e.g. `ecdsa-p256`, `rsa-2048` (see describePublicKey). */
  readonly keyAlgorithm: string;
  /** subjectKeyIdentifier as lowercase hex, null when absent. */
  readonly subjectKeyIdHex: string | null;
  /** authorityKeyIdentifier keyIdentifier as lowercase hex, null when absent. */
  readonly authorityKeyIdHex: string | null;
  /** keyUsage bits set; null when the extension is absent (no restriction). */
  readonly keyUsage: readonly KeyUsageName[] | null;
  /** extKeyUsage purpose OIDs; null when the extension is absent (no restriction). */
  readonly extKeyUsage: readonly string[] | null;
  /** Signature algorithm name (OpenSSL's spelling) or dotted OID. */
  readonly signatureAlgorithm: string;
  /** True when subject and issuer are the same name (a root or a self-issued certificate). */
  readonly selfIssued: boolean;
  /** OIDs of the extensions marked critical. */
  readonly criticalExtensions: readonly string[];
  /** SubjectPublicKeyInfo DER. */
  readonly spkiDer: Uint8Array;
  /** The certificate DER. */
  readonly der: Uint8Array;
}

/** Formats a digest as uppercase hex pairs joined by `:`. */
export function colonHex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("hex").toUpperCase().match(/../g)!.join(":");
}

/** The SHA-256 fingerprint of a DER certificate, uppercase hex pairs joined by `:`. */
export function sha256Fingerprint(der: Uint8Array): string {
  return colonHex(createHash("sha256").update(der).digest());
}

interface DecodedExtensions {
  isCa: boolean;
  pathLen: number;
  dnsNames: string[];
  ipAddresses: string[];
  uris: string[];
  ski: string | null;
  aki: string | null;
  keyUsage: KeyUsageName[] | null;
  extKeyUsage: string[] | null;
}

/** Decodes a keyUsage BIT STRING value into the names of the bits set. */
export function decodeKeyUsage(value: Uint8Array): KeyUsageName[] {
  const t = expectTlv(value, 0, Tag.bitString);
  const bytes = contentBytes(value, t);
  if (bytes.length < 1 || bytes[0]! > 7) throw new DerError("bad bit string");
  const bits = bytes.subarray(1);
  return KEY_USAGE_NAMES.filter((_, i) => ((bits[i >> 3] ?? 0) & (0x80 >> (i & 7))) !== 0);
}

function decodeExtensionValues(decoded: DecodedCertificate): DecodedExtensions {
  const out: DecodedExtensions = {
    isCa: false,
    pathLen: -1,
    dnsNames: [],
    ipAddresses: [],
    uris: [],
    ski: null,
    aki: null,
    keyUsage: null,
    extKeyUsage: null,
  };
  const latin1 = (b: Uint8Array): string => Buffer.from(b).toString("latin1");
  for (const ext of decoded.extensions) {
    const v = ext.value;
    switch (ext.oid) {
      case Oid.basicConstraints: {
        const seq = expectTlv(v, 0, Tag.sequence);
        if (seq.end !== v.length) throw new DerError("trailing bytes");
        for (const c of children(v, seq)) {
          if (c.tag === Tag.boolean) out.isCa = v[c.contentStart] !== 0;
          else if (c.tag === Tag.integer) {
            const n = contentBytes(v, c);
            if (n.length > 4 || (n[0]! & 0x80) !== 0) throw new DerError("bad pathLenConstraint");
            out.pathLen = n.reduce((acc, b) => acc * 256 + b, 0);
          } else throw new DerError("bad basicConstraints");
        }
        break;
      }
      case Oid.keyUsage:
        out.keyUsage = decodeKeyUsage(v);
        break;
      case Oid.extKeyUsage: {
        const seq = expectTlv(v, 0, Tag.sequence);
        out.extKeyUsage = children(v, seq).map((c) => {
          if (c.tag !== Tag.oid) throw new DerError("bad extKeyUsage");
          return decodeOid(contentBytes(v, c));
        });
        break;
      }
      case Oid.subjectAltName: {
        const seq = expectTlv(v, 0, Tag.sequence);
        for (const c of children(v, seq)) {
          const body = contentBytes(v, c);
          if (c.tag === 0x82) out.dnsNames.push(latin1(body));
          else if (c.tag === 0x86) out.uris.push(latin1(body));
          else if (c.tag === 0x87) out.ipAddresses.push(formatIpAddress(body));
        }
        break;
      }
      case Oid.subjectKeyIdentifier: {
        const t = expectTlv(v, 0, Tag.octetString);
        out.ski = toHex(contentBytes(v, t));
        break;
      }
      case Oid.authorityKeyIdentifier: {
        const seq = expectTlv(v, 0, Tag.sequence);
        for (const c of children(v, seq)) if (c.tag === 0x80) out.aki = toHex(contentBytes(v, c));
        break;
      }
      default:
        break;
    }
  }
  return out;
}

/** Serial content octets as lowercase hex, without a DER sign byte. */
function serialToHex(serial: Uint8Array): string {
  const s = serial.length > 1 && serial[0] === 0 ? serial.subarray(1) : serial;
  return toHex(s);
}

/** Builds the plain view of an already decoded certificate; InvalidArgument naming `field` for a malformed extension. */
export function infoFromDecoded(decoded: DecodedCertificate, field = "certificate"): CertificateInfo {
  let ext: DecodedExtensions;
  let subject: string;
  let issuer: string;
  let commonName: string | undefined;
  try {
    ext = decodeExtensionValues(decoded);
    subject = formatName(decoded.subjectNameDer);
    issuer = formatName(decoded.issuerNameDer);
    commonName = commonNameOf(decoded.subjectNameDer);
  } catch (err) {
    throw new InvalidArgument(`${field}: malformed name or extension (${err instanceof Error ? err.message : "?"}); ask the CA to reissue it`, {
      cause: err,
    });
  }
  return {
    subject,
    issuer,
    commonName,
    serialHex: serialToHex(decoded.serialBytes),
    notBefore: decoded.notBefore,
    notAfter: decoded.notAfter,
    sha256Fingerprint: sha256Fingerprint(decoded.der),
    isCa: ext.isCa,
    pathLenConstraint: ext.pathLen,
    dnsNames: ext.dnsNames,
    ipAddresses: ext.ipAddresses,
    uris: ext.uris,
    keyAlgorithm: describePublicKey(decoded.spkiDer),
    subjectKeyIdHex: ext.ski,
    authorityKeyIdHex: ext.aki,
    keyUsage: ext.keyUsage,
    extKeyUsage: ext.extKeyUsage,
    signatureAlgorithm: signatureAlgorithmName(decoded.signatureAlgorithmDer),
    selfIssued: Buffer.from(decoded.subjectNameDer).equals(decoded.issuerNameDer),
    criticalExtensions: decoded.extensions.filter((e) => e.critical).map((e) => e.oid),
    spkiDer: decoded.spkiDer,
    der: decoded.der,
  };
}

/** Everything a DER certificate says, as plain values; InvalidArgument naming `field` when it does not parse. */
export function certificateInfo(der: Uint8Array, field = "certificate"): CertificateInfo {
  return infoFromDecoded(decodeCertificate(der, field), field);
}
