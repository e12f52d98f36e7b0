/**
 * Decoding an X.509 certificate from DER into exact byte slices (for signature checks and
 * name chaining, which need the bytes as signed, never a re-encoding) and plain values.
 *
 * The skeleton is read with the strict DER reader in ./der.ts; pkijs then parses the whole
 * structure once more as a schema check, so a certificate is accepted only when both agree.
 */
import "./engine.js";
import * as asn1js from "asn1js";
import * as pkijs from "pkijs";
import { InvalidArgument } from "../common/errors.js";
import {
  bytesEqual,
  children,
  contentBytes,
  decodeOid,
  DerError,
  expectTlv,
  Tag,
  tlvBytes,
  type Tlv,
} from "./der.js";

/** One extension as it appears in the certificate. */
export interface RawExtension {
  /** Dotted extension OID. */
  readonly oid: string;
  /** The critical flag (DEFAULT FALSE). */
  readonly critical: boolean;
  /** The extnValue OCTET STRING's content: the DER of the extension's value. */
  readonly value: Uint8Array;
}

/** A certificate split into the exact bytes that were signed and its plain fields. */
export interface DecodedCertificate {
  /** The whole certificate DER (a copy owned by this object). */
  readonly der: Uint8Array;
  /** The TBSCertificate TLV exactly as signed. */
  readonly tbsDer: Uint8Array;
  /** The outer signatureAlgorithm AlgorithmIdentifier TLV. */
  readonly signatureAlgorithmDer: Uint8Array;
  /** The signature BIT STRING's bytes (after the unused-bits octet). */
  readonly signatureValue: Uint8Array;
  /** X.509 version number: 1, 2 or 3. */
  readonly version: number;
  /** Serial number content octets (two's complement, as encoded). */
  readonly serialBytes: Uint8Array;
  /** Issuer Name TLV. */
  readonly issuerNameDer: Uint8Array;
  /** Subject Name TLV. */
  readonly subjectNameDer: Uint8Array;
  /** Start of validity. */
  readonly notBefore: Date;
  /** End of validity. */
  readonly notAfter: Date;
  /** SubjectPublicKeyInfo TLV. */
  readonly spkiDer: Uint8Array;
  /** Extensions in order (empty for v1/v2 certificates). */
  readonly extensions: readonly RawExtension[];
}

/** Decodes an X.509 Time TLV (UTCTime or GeneralizedTime, the RFC 5280 `...Z` forms). */
export function decodeTime(buf: Uint8Array, t: Tlv): Date {
  const text = Buffer.from(contentBytes(buf, t)).toString("latin1");
  let m: RegExpExecArray | null;
  let year: number;
  if (t.tag === Tag.utcTime) {
    m = /^(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(text);
    if (!m) throw new DerError("bad UTCTime");
    const yy = Number(m[1]);
    year = yy < 50 ? 2000 + yy : 1900 + yy;
  } else if (t.tag === Tag.generalizedTime) {
    m = /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(text);
    if (!m) throw new DerError("bad GeneralizedTime");
    year = Number(m[1]);
  } else {
    throw new DerError("expected a time");
  }
  const [mo, d, h, mi, s] = [m[2], m[3], m[4], m[5], m[6]].map(Number) as [number, number, number, number, number];
  const date = new Date(Date.UTC(year, mo - 1, d, h, mi, s));
  if (date.getUTCMonth() !== mo - 1 || date.getUTCDate() !== d || h > 23 || mi > 59 || s > 59) {
    throw new DerError("bad date");
  }
  return date;
}

function decodeExtensions(buf: Uint8Array, explicit: Tlv): RawExtension[] {
  const [list, ...extra] = children(buf, explicit);
  if (!list || extra.length || list.tag !== Tag.sequence) throw new DerError("bad extensions");
  const seen = new Set<string>();
  return children(buf, list).map((ext) => {
    if (ext.tag !== Tag.sequence) throw new DerError("bad extension");
    const parts = children(buf, ext);
    const idTlv = parts[0];
    if (!idTlv || idTlv.tag !== Tag.oid) throw new DerError("bad extension id");
    const id = decodeOid(contentBytes(buf, idTlv));
    let i = 1;
    let critical = false;
    if (parts[i]?.tag === Tag.boolean) {
      const b = contentBytes(buf, parts[i]!);
      if (b.length !== 1) throw new DerError("bad boolean");
      critical = b[0] !== 0;
      i++;
    }
    const valueTlv = parts[i];
    if (!valueTlv || valueTlv.tag !== Tag.octetString || parts.length !== i + 1) throw new DerError("bad extension value");
    if (seen.has(id)) throw new DerError(`duplicate extension ${id}`);
    seen.add(id);
    return { oid: id, critical, value: contentBytes(buf, valueTlv) };
  });
}

/** Decodes the skeleton of a certificate; throws DerError when it is not one. */
function decodeSkeleton(der: Uint8Array): DecodedCertificate {
  const outer = expectTlv(der, 0, Tag.sequence);
  if (outer.end !== der.length) throw new DerError("trailing bytes after the certificate");
  const top = children(der, outer);
  if (top.length !== 3) throw new DerError("not a certificate");
  const [tbs, sigAlg, sig] = top as [Tlv, Tlv, Tlv];
  if (tbs.tag !== Tag.sequence || sigAlg.tag !== Tag.sequence || sig.tag !== Tag.bitString) {
    throw new DerError("not a certificate");
  }
  const sigContent = contentBytes(der, sig);
  if (sigContent.length < 1 || sigContent[0] !== 0) throw new DerError("bad signature bit string");

  const f = children(der, tbs);
  let i = 0;
  let version = 1;
  if (f[i]?.tag === 0xa0) {
    const [v, ...rest] = children(der, f[i]!);
    if (!v || rest.length || v.tag !== Tag.integer || v.end - v.contentStart !== 1) throw new DerError("bad version");
    version = der[v.contentStart]! + 1;
    if (version < 1 || version > 3) throw new DerError("bad version");
    i++;
  }
  const serial = f[i++];
  const innerAlg = f[i++];
  const issuer = f[i++];
  const validity = f[i++];
  const subject = f[i++];
  const spki = f[i++];
  if (
    serial?.tag !== Tag.integer ||
    innerAlg?.tag !== Tag.sequence ||
    issuer?.tag !== Tag.sequence ||
    validity?.tag !== Tag.sequence ||
    subject?.tag !== Tag.sequence ||
    spki?.tag !== Tag.sequence
  ) {
    throw new DerError("bad tbsCertificate");
  }
  if (serial.end === serial.contentStart) throw new DerError("empty serial");
  if (!bytesEqual(tlvBytes(der, innerAlg), tlvBytes(der, sigAlg))) {
    throw new DerError("inner and outer signature algorithms differ");
  }
  const times = children(der, validity);
  if (times.length !== 2) throw new DerError("bad validity");
  let extensions: RawExtension[] = [];
  for (; i < f.length; i++) {
    const t = f[i]!;
    if (t.tag === 0x81 || t.tag === 0x82) continue; // issuer/subject unique IDs
    if (t.tag === 0xa3 && i === f.length - 1) {
      extensions = decodeExtensions(der, t);
      continue;
    }
    throw new DerError("bad tbsCertificate");
  }
  if (extensions.length && version !== 3) throw new DerError("extensions in a certificate that is not v3");
  return {
    der,
    tbsDer: tlvBytes(der, tbs),
    signatureAlgorithmDer: tlvBytes(der, sigAlg),
    signatureValue: sigContent.subarray(1),
    version,
    serialBytes: contentBytes(der, serial),
    issuerNameDer: tlvBytes(der, issuer),
    subjectNameDer: tlvBytes(der, subject),
    notBefore: decodeTime(der, times[0]!),
    notAfter: decodeTime(der, times[1]!),
    spkiDer: tlvBytes(der, spki),
    extensions,
  };
}

/**
 * Decodes a DER certificate, or throws InvalidArgument naming `field`.
 *
 * Accepted only when the strict DER skeleton reads cleanly and pkijs parses the same bytes as
 * a Certificate; the inner and outer signature algorithms must agree (RFC 5280 4.1.1.2).
 */
export function decodeCertificate(input: Uint8Array, field: string): DecodedCertificate {
  const der = new Uint8Array(input); // own the bytes: callers may reuse their buffer
  let decoded: DecodedCertificate;
  try {
    decoded = decodeSkeleton(der);
    const asn1 = asn1js.fromBER(der);
    if (asn1.offset === -1) throw new DerError("asn.1 does not parse");
    new pkijs.Certificate({ schema: asn1.result });
  } catch (err) {
    const reason = err instanceof DerError ? err.message : "does not match the X.509 schema";
    throw new InvalidArgument(`${field}: not a valid X.509 certificate (${reason}); upload the whole certificate file`, {
      cause: err,
    });
  }
  return decoded;
}
