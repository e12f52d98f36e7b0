/**
 * What the proxy copies from an origin's certificate into the leaf it mints: its DNS and IP
 * names (subjectAltName, or the subject CN of a legacy certificate without DNS names), its
 * end of validity, and its SHA-256 fingerprint (the leaf cache key).
 */
import { isIP } from "node:net";
import type { X509Certificate } from "node:crypto";
import { parseSubjectAltNames } from "../common/tls.js";

/** At most this many names go into a leaf (the agent's limit per list). */
export const MAX_LEAF_NAMES = 100;

/** The origin certificate's facts the leaf is made from. */
export interface OriginCertificate {
  /** SHA-256 fingerprint, uppercase hex with colons (as Node prints it). */
  readonly fingerprint: string;
  /** DNS names in the certificate's order, lowercase, wildcards kept (`*.example.com`). */
  readonly dnsNames: readonly string[];
  /** IP addresses in text form. */
  readonly ipAddresses: readonly string[];
  /** End of validity. */
  readonly notAfter: Date;
}

const DNS_NAME = /^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$/;

/** True for a name the agent accepts in a dNSName: a hostname, or `*.` and a hostname. */
export function isLeafDnsName(name: string): boolean {
  return name.length <= 253 && DNS_NAME.test(name);
}

function commonNameOf(subject: string): string | undefined {
  for (const line of subject.split("\n")) {
    if (line.startsWith("CN=")) return line.slice(3);
  }
  return undefined;
}

/** The shortest text form of an IPv6 address (RFC 5952): `0:0:0:0:0:0:0:1` → `::1`. */
export function compressIpv6(addr: string): string {
  if (isIP(addr) !== 6 || addr.includes(".")) return addr.toLowerCase();
  const halves = addr.toLowerCase().split("::");
  const head = halves[0] === "" ? [] : halves[0]!.split(":");
  const tail = halves.length > 1 && halves[1] !== "" ? halves[1]!.split(":") : [];
  const groups = [...head, ...Array<string>(8 - head.length - tail.length).fill("0"), ...tail].map((g) => g.replace(/^0+(?=.)/, ""));
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== "0") {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === "0") j++;
    if (j - i > bestLen) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  if (best < 0) return groups.join(":");
  return `${groups.slice(0, best).join(":")}::${groups.slice(best + bestLen).join(":")}`;
}

/** Reads the facts the leaf copies; names that no leaf could carry are dropped. */
export function describeOriginCertificate(cert: X509Certificate): OriginCertificate {
  const dnsNames: string[] = [];
  const ipAddresses: string[] = [];
  for (const { type, value } of parseSubjectAltNames(cert.subjectAltName)) {
    if (type === "DNS") {
      const v = value.toLowerCase();
      if (isLeafDnsName(v) && !dnsNames.includes(v)) dnsNames.push(v);
    } else if (type === "IP Address") {
      const ip = compressIpv6(value);
      if (isIP(ip) !== 0 && !ipAddresses.includes(ip)) ipAddresses.push(ip);
    }
  }
  if (dnsNames.length === 0 && ipAddresses.length === 0) {
    // A legacy certificate that names its host only in the subject CN (Node's identity check
    // accepts it): the leaf carries that name as a SAN.
    const cn = commonNameOf(cert.subject)?.toLowerCase();
    if (cn !== undefined) {
      if (isIP(cn) !== 0) ipAddresses.push(cn);
      else if (isLeafDnsName(cn)) dnsNames.push(cn);
    }
  }
  return { fingerprint: cert.fingerprint256, dnsNames, ipAddresses, notAfter: new Date(cert.validTo) };
}

function matchesHost(name: string, host: string): boolean {
  if (name === host) return true;
  if (!name.startsWith("*.")) return false;
  const dot = host.indexOf(".");
  return dot > 0 && host.slice(dot) === name.slice(1);
}

/**
 * The names for the leaf: the origin's, in its order, at most {@link MAX_LEAF_NAMES} in all.
 * When the origin has more, the names that match `host` (the name the client asked for) are
 * kept first so the leaf always covers the request; `truncated` says the list was cut (the
 * leaf then depends on the host, which must be part of its cache key).
 */
export function leafNames(origin: OriginCertificate, host: string): { dnsNames: string[]; ipAddresses: string[]; truncated: boolean } {
  const total = origin.dnsNames.length + origin.ipAddresses.length;
  if (total <= MAX_LEAF_NAMES) return { dnsNames: [...origin.dnsNames], ipAddresses: [...origin.ipAddresses], truncated: false };
  const h = host.toLowerCase();
  const ipHost = isIP(h) !== 0;
  const dns = ipHost ? [] : origin.dnsNames.filter((n) => matchesHost(n, h));
  const ips = ipHost ? origin.ipAddresses.filter((a) => a === h) : [];
  for (const n of origin.dnsNames) if (dns.length + ips.length < MAX_LEAF_NAMES && !dns.includes(n)) dns.push(n);
  for (const a of origin.ipAddresses) if (dns.length + ips.length < MAX_LEAF_NAMES && !ips.includes(a)) ips.push(a);
  return { dnsNames: dns, ipAddresses: ips, truncated: true };
}
