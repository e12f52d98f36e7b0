/**
 * Subject alternative names: validating hostnames and IP addresses against kmi's leaf policy,
 * encoding them as GeneralNames, and formatting IP address bytes back to text.
 */
import { InvalidArgument } from "../common/errors.js";
import { contextPrimitive, sequence } from "./der.js";
import { unusableAddress, wildcardPublicSuffix } from "./name-policy.js";

/** Most names (DNS + IP) that one certificate may carry. */
export const MAX_SAN_NAMES = 100;

/** Longest hostname (RFC 1035, without the trailing dot). */
export const MAX_DNS_NAME_LENGTH = 253;

const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;
const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

/** Shortens user input for an error message. */
function shown(value: string): string {
  const s = JSON.stringify(value.length > 80 ? `${value.slice(0, 77)}...` : value);
  return s;
}

/**
 * Checks a hostname for a certificate and returns it lowercased. Policy: LDH labels of 1..63
 * characters (no leading or trailing hyphen), at most 253 characters in all, no trailing dot,
 * ASCII only (IDNs in their xn-- form), and a wildcard only as the whole leftmost label of a
 * name with at least two more labels (`*.example.com`), never on a public suffix (`*.co.uk`; see
 * ./name-policy.ts). Throws InvalidArgument naming `field`.
 */
export function normalizeDnsName(name: string, field: string): string {
  if (typeof name !== "string" || name.length === 0) throw new InvalidArgument(`${field}: empty hostname; give a name like www.example.com`);
  const lower = name.toLowerCase();
  const bad = (why: string): never => {
    throw new InvalidArgument(`${field}: ${shown(name)} is not a valid hostname (${why})`);
  };
  if (lower.length > MAX_DNS_NAME_LENGTH) bad(`longer than ${MAX_DNS_NAME_LENGTH} characters`);
  if (/[^\x21-\x7e]/.test(lower)) bad("non-ASCII or whitespace; write IDNs in their xn-- form");
  if (lower.endsWith(".")) bad("trailing dot; drop it");
  if (IPV4.test(lower)) bad("it is an IP address; pass it as an IP address, not a hostname");
  const labels = lower.split(".");
  labels.forEach((label, i) => {
    if (label === "*") {
      if (i !== 0) bad("a wildcard may only be the whole leftmost label");
      if (labels.length < 3) bad("a wildcard needs at least two labels after it, as in *.example.com");
      const suffix = wildcardPublicSuffix(lower);
      if (suffix !== undefined) bad(`a wildcard on the public suffix ${shown(suffix)} would cover every domain under it; name the host or *.<its domain>`);
      return;
    }
    if (label.includes("*")) bad("a wildcard must be the whole leftmost label, as in *.example.com");
    if (label.length === 0) bad("empty label");
    if (label.length > 63) bad("a label is longer than 63 characters");
    if (!LABEL.test(label)) bad(`label ${shown(label)} must be letters, digits and inner hyphens`);
  });
  return lower;
}

/**
 * Parses an IPv4 (dotted quad) or IPv6 address into its 4 or 16 bytes; zone IDs are refused.
 * Throws InvalidArgument naming `field`.
 */
export function encodeIpAddress(ip: string, field: string): Uint8Array {
  const bad = (why: string): never => {
    throw new InvalidArgument(`${field}: ${shown(String(ip))} is not a valid IP address (${why})`);
  };
  if (typeof ip !== "string" || ip.length === 0) bad("empty");
  if (IPV4.test(ip)) return Uint8Array.from(ip.split(".").map(Number));
  if (!ip.includes(":")) bad("use a dotted quad like 192.0.2.1 or an IPv6 address");
  if (ip.includes("%")) bad("zone IDs have no place in a certificate; drop the %zone");
  let text = ip;
  const lastColon = text.lastIndexOf(":");
  const maybeV4 = text.slice(lastColon + 1);
  if (maybeV4.includes(".")) {
    // An embedded IPv4 tail (::ffff:192.0.2.1) becomes two hex groups.
    if (!IPV4.test(maybeV4)) bad("bad embedded IPv4 part");
    const v4 = maybeV4.split(".").map(Number);
    const hi = ((v4[0]! << 8) | v4[1]!).toString(16);
    const lo = ((v4[2]! << 8) | v4[3]!).toString(16);
    text = `${text.slice(0, lastColon + 1)}${hi}:${lo}`;
  }
  const halves = text.split("::");
  if (halves.length > 2) bad('"::" may appear only once');
  const parse = (s: string): number[] =>
    s === ""
      ? []
      : s.split(":").map((g) => {
          if (!/^[0-9a-fA-F]{1,4}$/.test(g)) bad(`bad group ${shown(g)}`);
          return parseInt(g, 16);
        });
  const head = parse(halves[0]!);
  const back = halves.length === 2 ? parse(halves[1]!) : [];
  const groupsWanted = 8;
  let groups: number[];
  if (halves.length === 2) {
    const missing = groupsWanted - head.length - back.length;
    if (missing < 1) bad('"::" must stand for at least one zero group');
    groups = [...head, ...new Array<number>(missing).fill(0), ...back];
  } else {
    groups = [...head, ...back];
    if (groups.length !== groupsWanted) bad("an IPv6 address has 8 groups");
  }
  const out = new Uint8Array(16);
  groups.forEach((g, i) => {
    out[2 * i] = g >> 8;
    out[2 * i + 1] = g & 0xff;
  });
  return out;
}

/** Formats 4 or 16 address bytes as text (IPv6 in RFC 5952 form, IPv4-mapped as ::ffff:a.b.c.d). */
export function formatIpAddress(bytes: Uint8Array): string {
  if (bytes.length === 4) return Array.from(bytes).join(".");
  if (bytes.length !== 16) return `invalid(${Buffer.from(bytes).toString("hex")})`;
  if (bytes.subarray(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff) {
    return `::ffff:${Array.from(bytes.subarray(12)).join(".")}`;
  }
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((bytes[i]! << 8) | bytes[i + 1]!);
  let bestStart = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (bestStart < 0) return hex.join(":");
  return `${hex.slice(0, bestStart).join(":")}::${hex.slice(bestStart + bestLen).join(":")}`;
}

/** Names for a certificate after policy checks: deduplicated, hostnames lowercased, IPs as bytes. */
export interface CheckedNames {
  /** Hostnames, lowercased, first occurrence order. */
  readonly dnsNames: readonly string[];
  /** IP addresses in canonical text form. */
  readonly ipAddresses: readonly string[];
  /** The matching 4- or 16-byte encodings. */
  readonly ipBytes: readonly Uint8Array[];
}

/**
 * Validates and deduplicates the DNS and IP names of a certificate. Refuses (InvalidArgument)
 * an invalid name (naming `dns_names[i]` / `ip_addresses[i]`), a wildcard on a public suffix,
 * an unspecified, broadcast or multicast address, more than `max` names in all, and, when
 * `requireOne`, no name at all.
 */
export function checkNames(
  dnsNames: readonly string[] | undefined,
  ipAddresses: readonly string[] | undefined,
  options: { readonly requireOne: boolean; readonly max?: number },
): CheckedNames {
  const dns = dnsNames ?? [];
  const ips = ipAddresses ?? [];
  const max = options.max ?? MAX_SAN_NAMES;
  if (dns.length + ips.length > max) {
    throw new InvalidArgument(`dns_names: ${dns.length + ips.length} names in all; at most ${max} fit one certificate`);
  }
  if (options.requireOne && dns.length + ips.length === 0) {
    throw new InvalidArgument("dns_names: no names; give at least one hostname or IP address");
  }
  const outDns: string[] = [];
  const seen = new Set<string>();
  dns.forEach((name, i) => {
    const n = normalizeDnsName(name, `dns_names[${i}]`);
    if (!seen.has(n)) outDns.push(n);
    seen.add(n);
  });
  const outIps: string[] = [];
  const outBytes: Uint8Array[] = [];
  ips.forEach((ip, i) => {
    const b = encodeIpAddress(ip, `ip_addresses[${i}]`);
    const text = formatIpAddress(b);
    const unusable = unusableAddress(b);
    if (unusable !== undefined) {
      throw new InvalidArgument(`ip_addresses[${i}]: ${shown(ip)} is ${unusable}, which names no server; give the server's own address`);
    }
    if (!seen.has(text)) {
      outIps.push(text);
      outBytes.push(b);
    }
    seen.add(text);
  });
  return { dnsNames: outDns, ipAddresses: outIps, ipBytes: outBytes };
}

/**
 * GeneralNames DER (the subjectAltName extension's value): dNSName [2], then uniformResourceIdentifier [6],
 * then iPAddress [7]. Callers pass names already checked.
 */
export function encodeGeneralNames(names: {
  readonly dnsNames?: readonly string[];
  readonly uris?: readonly string[];
  readonly ipBytes?: readonly Uint8Array[];
}): Uint8Array {
  const enc = new TextEncoder();
  return sequence(
    ...(names.dnsNames ?? []).map((d) => contextPrimitive(2, enc.encode(d))),
    ...(names.uris ?? []).map((u) => contextPrimitive(6, enc.encode(u))),
    ...(names.ipBytes ?? []).map((b) => contextPrimitive(7, b)),
  );
}
