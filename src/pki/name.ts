/**
 * Distinguished names: building the DER of a Name from plain fields, and formatting any Name
 * as an RFC 4514 string (`CN=kmi root,O=Example,C=DE`: most specific RDN first).
 */
import { InvalidArgument } from "../common/errors.js";
import {
  children,
  contentBytes,
  decodeOid,
  DerError,
  expectTlv,
  oid,
  printableString,
  sequence,
  set,
  Tag,
  tlvBytes,
  toHex,
  utf8String,
} from "./der.js";
import { Oid } from "./oids.js";
import { hasControlChars } from "../common/control-chars.js";

/** The fields kmi puts into subjects. Empty strings are refused; absent fields are left out. */
export interface DistinguishedName {
  /** CN, at most 64 characters. */
  readonly commonName?: string;
  /** O, at most 64 characters. */
  readonly organization?: string;
  /** OU, at most 64 characters (kmi puts a machine's group here). */
  readonly organizationalUnit?: string;
  /** C, two uppercase letters (ISO 3166). */
  readonly country?: string;
}

/** X.520 upper bounds (ub-common-name etc.). */
const MAX_ATTRIBUTE_LENGTH = 64;

function checkValue(value: string, field: string): void {
  if (value.length === 0) throw new InvalidArgument(`${field}: empty; give a value or leave the field out`);
  if ([...value].length > MAX_ATTRIBUTE_LENGTH) {
    throw new InvalidArgument(`${field}: longer than ${MAX_ATTRIBUTE_LENGTH} characters; shorten it`);
  }
  if (hasControlChars(value)) throw new InvalidArgument(`${field}: contains control characters; remove them`);
}

/**
 * The DER of a Name with the given fields, in the customary order C, O, OU, CN (each its own
 * RDN; strings as UTF8String, the country as PrintableString). No fields gives the empty Name.
 * Throws InvalidArgument naming `field.<attribute>` for a bad value.
 */
export function encodeName(dn: DistinguishedName, field = "subject"): Uint8Array {
  const rdns: Uint8Array[] = [];
  if (dn.country !== undefined) {
    if (!/^[A-Z]{2}$/.test(dn.country)) throw new InvalidArgument(`${field}.country: must be two uppercase letters, e.g. DE`);
    rdns.push(set(sequence(oid(Oid.countryName), printableString(dn.country))));
  }
  const utf8: [string | undefined, string, string][] = [
    [dn.organization, Oid.organizationName, "organization"],
    [dn.organizationalUnit, Oid.organizationalUnitName, "organizational_unit"],
    [dn.commonName, Oid.commonName, "common_name"],
  ];
  for (const [value, type, name] of utf8) {
    if (value === undefined) continue;
    checkValue(value, `${field}.${name}`);
    rdns.push(set(sequence(oid(type), utf8String(value))));
  }
  return sequence(...rdns);
}

/** RFC 4514 short names; any other type is written as its dotted OID with a `#hex` value. */
const SHORT_NAMES: Record<string, string> = {
  [Oid.commonName]: "CN",
  [Oid.localityName]: "L",
  [Oid.stateOrProvinceName]: "ST",
  [Oid.organizationName]: "O",
  [Oid.organizationalUnitName]: "OU",
  [Oid.countryName]: "C",
  [Oid.streetAddress]: "STREET",
  [Oid.domainComponent]: "DC",
  [Oid.userId]: "UID",
};

/** One attribute of a Name. */
export interface NameAttribute {
  /** Dotted OID of the attribute type. */
  readonly oid: string;
  /** The decoded string value, or undefined when the value is not a string type. */
  readonly value: string | undefined;
  /** The value's whole DER (for `#hex` output). */
  readonly valueDer: Uint8Array;
}

function decodeString(tag: number, content: Uint8Array): string | undefined {
  const buf = Buffer.from(content);
  switch (tag) {
    case Tag.utf8String:
      return new TextDecoder("utf-8", { fatal: true }).decode(content);
    case Tag.printableString:
    case Tag.ia5String:
    case 0x1a: // VisibleString
      return buf.toString("ascii");
    case Tag.teletexString:
      return buf.toString("latin1");
    case Tag.bmpString:
      return new TextDecoder("utf-16be", { fatal: true }).decode(content);
    case Tag.universalString: {
      let out = "";
      for (let i = 0; i + 3 < content.length; i += 4) out += String.fromCodePoint(buf.readUInt32BE(i));
      return out;
    }
    default:
      return undefined;
  }
}

/** The RDNs of a Name DER, each a list of attributes, in encoded order (least specific first). */
export function nameAttributes(nameDer: Uint8Array): NameAttribute[][] {
  const seq = expectTlv(nameDer, 0, Tag.sequence);
  if (seq.end !== nameDer.length) throw new DerError("trailing bytes after the name");
  return children(nameDer, seq).map((rdn) => {
    if (rdn.tag !== Tag.set) throw new DerError("bad RDN");
    return children(nameDer, rdn).map((atv) => {
      const [type, value, ...rest] = atv.tag === Tag.sequence ? children(nameDer, atv) : [];
      if (!type || !value || rest.length || type.tag !== Tag.oid) throw new DerError("bad attribute");
      return {
        oid: decodeOid(contentBytes(nameDer, type)),
        value: decodeString(value.tag, contentBytes(nameDer, value)),
        valueDer: tlvBytes(nameDer, value),
      };
    });
  });
}

/** Escapes an attribute value per RFC 4514 section 2.4. */
function escapeValue(value: string): string {
  let out = value.replace(/[\\"+,;<>]/g, (c) => `\\${c}`).replace(/\u0000/g, "\\00");
  if (out.startsWith("#") || out.startsWith(" ")) out = `\\${out}`;
  if (out.endsWith(" ") && out.length > 1) out = `${out.slice(0, -1)}\\ `;
  return out;
}

/**
 * Formats a Name DER as an RFC 4514 string: RDNs most specific first, joined by `,`;
 * multi-valued RDNs joined by `+` (in reverse encoded order, like `openssl -nameopt RFC2253`).
 * Returns `""` for the empty Name.
 */
export function formatName(nameDer: Uint8Array): string {
  return nameAttributes(nameDer)
    .reverse()
    .map((rdn) =>
      [...rdn]
        .reverse() // within a multi-valued RDN, too, as OpenSSL's RFC2253 output does
        .map((a) => {
          const short = SHORT_NAMES[a.oid];
          if (short && a.value !== undefined) return `${short}=${escapeValue(a.value)}`;
          return `${a.oid}=#${toHex(a.valueDer)}`;
        })
        .join("+"),
    )
    .join(",");
}

/** The last (most specific) CN of a Name DER, or undefined. */
export function commonNameOf(nameDer: Uint8Array): string | undefined {
  let cn: string | undefined;
  for (const rdn of nameAttributes(nameDer)) for (const a of rdn) if (a.oid === Oid.commonName) cn = a.value;
  return cn;
}
