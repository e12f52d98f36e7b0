/**
 * Names no kmi certificate may carry, whoever asks: a wildcard on a public suffix, and IP
 * addresses that name no single host. Used by ./san.ts (every certificate kmi builds) and by
 * the agent's request validation (to name the field).
 */
import { getPublicSuffix } from "tldts";

/**
 * For `*.<rest>`: the public suffix `rest` is, when it is one in the ICANN section of the
 * Public Suffix List (`co.uk`, `com`, `ck` under the `*.ck` rule), else undefined. Why ICANN
 * only: a wildcard there would cover every registrant under it, and no public CA may issue
 * one, so no origin presents one. The list's private section (`github.io`, `s3.amazonaws.com`)
 * is left out on purpose: those operators hold real `*.github.io` certificates, which the
 * proxy must mimic to inspect them. The list ships inside the pinned `tldts` package.
 */
export function wildcardPublicSuffix(name: string): string | undefined {
  if (!name.startsWith("*.")) return undefined;
  const rest = name.slice(2);
  return getPublicSuffix(rest, { allowPrivateDomains: false }) === rest ? rest : undefined;
}

/**
 * Why an IP address (4 or 16 bytes; an IPv4-mapped IPv6 address is judged as its IPv4) can
 * name no server, or undefined when it can: unspecified (0.0.0.0, ::), the IPv4 limited
 * broadcast (255.255.255.255), multicast (224.0.0.0/4, ff00::/8).
 */
export function unusableAddress(bytes: Uint8Array): string | undefined {
  let v4: Uint8Array | undefined = bytes.length === 4 ? bytes : undefined;
  if (bytes.length === 16 && bytes.subarray(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff) {
    v4 = bytes.subarray(12);
  }
  if (v4 !== undefined) {
    if (v4.every((b) => b === 0)) return "the unspecified address";
    if (v4.every((b) => b === 255)) return "the broadcast address";
    if ((v4[0]! & 0xf0) === 0xe0) return "a multicast address";
    return undefined;
  }
  if (bytes.length !== 16) return undefined;
  if (bytes.every((b) => b === 0)) return "the unspecified address";
  if (bytes[0] === 0xff) return "a multicast address";
  return undefined;
}
