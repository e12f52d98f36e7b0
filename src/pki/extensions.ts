/**
 * X.509 v3 extensions that kmi writes, each encoded once here as DER, so that the pkijs-built
 * CA certificates, the CSRs and the fast leaf builder all emit the same bytes for the same thing.
 */
import { InvalidArgument } from "../common/errors.js";
import { boolean, contextPrimitive, oid, octetString, sequence, smallInteger, tlv, Tag } from "./der.js";
import { Oid } from "./oids.js";
import { encodeGeneralNames } from "./san.js";

/** keyUsage bits, in bit order (RFC 5280 4.2.1.3). */
export const KEY_USAGE_NAMES = [
  "digitalSignature",
  "nonRepudiation",
  "keyEncipherment",
  "dataEncipherment",
  "keyAgreement",
  "keyCertSign",
  "cRLSign",
  "encipherOnly",
  "decipherOnly",
] as const;

/** One keyUsage bit's name. */
export type KeyUsageName = (typeof KEY_USAGE_NAMES)[number];

/** One extension to write: OID, critical flag and the DER of its value (what goes inside extnValue). */
export interface ExtensionSpec {
  /** Dotted extension OID. */
  readonly oid: string;
  /** Critical flag. */
  readonly critical: boolean;
  /** DER of the extension's value. */
  readonly value: Uint8Array;
}

/** The Extension DER: SEQUENCE { extnID, critical (only when TRUE, as DER wants), extnValue }. */
export function encodeExtension(ext: ExtensionSpec): Uint8Array {
  return ext.critical
    ? sequence(oid(ext.oid), boolean(true), octetString(ext.value))
    : sequence(oid(ext.oid), octetString(ext.value));
}

/** basicConstraints, always critical: cA, and pathLenConstraint (CA certificates only). */
export function basicConstraintsExtension(ca: boolean, pathLenConstraint?: number): ExtensionSpec {
  if (pathLenConstraint !== undefined && (!ca || !Number.isInteger(pathLenConstraint) || pathLenConstraint < 0)) {
    throw new InvalidArgument("path_len_constraint: must be a non-negative integer, and only on a CA");
  }
  const parts: Uint8Array[] = [];
  if (ca) parts.push(boolean(true)); // cA DEFAULT FALSE is omitted when false
  if (pathLenConstraint !== undefined) parts.push(smallInteger(pathLenConstraint));
  return { oid: Oid.basicConstraints, critical: true, value: sequence(...parts) };
}

/** The keyUsage BIT STRING DER for a set of usages (named-bit list: trailing zero bits dropped). */
export function encodeKeyUsage(usages: readonly KeyUsageName[]): Uint8Array {
  const bits = usages.map((u) => KEY_USAGE_NAMES.indexOf(u));
  if (bits.length === 0 || bits.some((b) => b < 0)) throw new InvalidArgument("key_usage: give at least one known usage");
  const highest = Math.max(...bits);
  const bytes = new Uint8Array((highest >> 3) + 1);
  for (const b of bits) bytes[b >> 3]! |= 0x80 >> (b & 7);
  return tlv(Tag.bitString, Uint8Array.of(7 - (highest & 7)), bytes);
}

/** keyUsage, always critical. */
export function keyUsageExtension(usages: readonly KeyUsageName[]): ExtensionSpec {
  return { oid: Oid.keyUsage, critical: true, value: encodeKeyUsage(usages) };
}

/** extKeyUsage (non-critical, as the CA/Browser Forum profiles write it) with purpose OIDs. */
export function extKeyUsageExtension(purposes: readonly string[]): ExtensionSpec {
  return { oid: Oid.extKeyUsage, critical: false, value: sequence(...purposes.map((p) => oid(p))) };
}

/**
 * subjectAltName from already-checked names. Critical exactly when the subject is empty, as
 * RFC 5280 4.2.1.6 requires.
 */
export function subjectAltNameExtension(
  names: { readonly dnsNames?: readonly string[]; readonly uris?: readonly string[]; readonly ipBytes?: readonly Uint8Array[] },
  subjectIsEmpty: boolean,
): ExtensionSpec {
  return { oid: Oid.subjectAltName, critical: subjectIsEmpty, value: encodeGeneralNames(names) };
}

/** subjectKeyIdentifier (non-critical). */
export function subjectKeyIdentifierExtension(keyIdentifier: Uint8Array): ExtensionSpec {
  return { oid: Oid.subjectKeyIdentifier, critical: false, value: octetString(keyIdentifier) };
}

/** authorityKeyIdentifier with keyIdentifier only (non-critical). */
export function authorityKeyIdentifierExtension(keyIdentifier: Uint8Array): ExtensionSpec {
  return { oid: Oid.authorityKeyIdentifier, critical: false, value: sequence(contextPrimitive(0, keyIdentifier)) };
}
