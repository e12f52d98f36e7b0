/**
 * Which addresses the proxy may connect to on a client's behalf. A forward proxy on a machine
 * reaches what that machine reaches: its own loopback services, the cloud metadata endpoint
 * (169.254.169.254), the private network behind it. So private and special-use addresses are
 * refused unless an operator allows a range of them, and the check runs on the addresses a
 * name resolves to (not on the name), in the lookup the connection itself uses: a name that
 * resolves to a public address when checked and a private one when connecting (DNS
 * rebinding) cannot slip through, because there is only one resolution. The machine's own
 * interface addresses are refused too, public ones included: the KDC, the Auditserver or a
 * metrics endpoint bound to 0.0.0.0 is reachable on them.
 */
import { lookup as dnsLookup, type LookupAddress, type LookupAllOptions, type LookupOneOptions } from "node:dns";
import { BlockList, isIP, type LookupFunction } from "node:net";
import { networkInterfaces } from "node:os";
import { expandIpv6 } from "../common/ip.js";
import { parseCidr } from "./tenants.js";

/** Special-use ranges (IANA IPv4/IPv6 special-purpose registries) and what to call them in a message. */
const SPECIAL: readonly (readonly [string, string])[] = [
  ["0.0.0.0/8", "\"this network\" address"],
  ["10.0.0.0/8", "private address"],
  ["100.64.0.0/10", "shared (carrier-grade NAT) address"],
  ["127.0.0.0/8", "loopback address"],
  ["169.254.0.0/16", "link-local address (cloud metadata lives here)"],
  ["172.16.0.0/12", "private address"],
  ["192.0.0.0/24", "IETF protocol assignment"],
  ["192.168.0.0/16", "private address"],
  ["198.18.0.0/15", "benchmarking address"],
  ["224.0.0.0/4", "multicast address"],
  ["240.0.0.0/4", "reserved address"],
  ["::/128", "unspecified address"],
  ["::1/128", "loopback address"],
  ["100::/64", "discard-only address"],
  ["fc00::/7", "unique-local (private) address"],
  ["fe80::/10", "link-local address"],
  ["fec0::/10", "site-local (private) address"],
  ["ff00::/8", "multicast address"],
];

/** The error a refused destination surfaces as (through connect, lookup or a request). */
export class DestinationDenied extends Error {
  /** A code in the style of socket errors, so that error paths can tell it apart. */
  readonly code = "EKMIDESTINATION";
  constructor(
    /** The refused address. */
    readonly address: string,
    /** Why, e.g. "loopback address". */
    readonly kind: string,
    host: string,
  ) {
    super(
      `${host === address ? address : `${host} (${address})`} is a ${kind}; the proxy does not connect to private or special-use ` +
        `addresses unless the operator allows the range (kmi proxy --allow-private)`,
    );
    this.name = "DestinationDenied";
  }
}

/** True for the error {@link DestinationGuard} raises. */
export function isDestinationDenied(err: unknown): err is DestinationDenied {
  return err instanceof DestinationDenied || (err as { code?: string } | undefined)?.code === "EKMIDESTINATION";
}

/** The check, and a `lookup` for net/tls/http connections that applies it. */
export class DestinationGuard {
  private readonly special: { list: BlockList; kind: string }[];
  private readonly allowed = new BlockList();
  private readonly allowedRanges: readonly string[];
  private own = new Set<string>();

  /**
   * @param allowPrivate ranges (CIDR or single addresses) of private or special-use addresses the
   *   proxy may connect to, e.g. `127.0.0.0/8` for a local test origin; throws naming the entry.
   * @param ownAddresses this machine's addresses (default: its network interfaces', see
   *   {@link refreshOwnAddresses}); refused unless an allowed range holds them.
   */
  constructor(allowPrivate: readonly string[] = [], ownAddresses?: readonly string[]) {
    this.special = SPECIAL.map(([cidr, kind]) => {
      const r = parseCidr(cidr, "special range");
      const list = new BlockList();
      list.addSubnet(r.addr, r.prefix, r.type);
      return { list, kind };
    });
    allowPrivate.forEach((c, i) => {
      const r = parseCidr(c, `allowPrivate[${i}]`);
      this.allowed.addSubnet(r.addr, r.prefix, r.type);
    });
    this.allowedRanges = [...allowPrivate];
    this.refreshOwnAddresses(ownAddresses);
  }

  /** Rereads this machine's interface addresses (or takes `addresses`); the proxy does so on SIGHUP. */
  refreshOwnAddresses(addresses?: readonly string[]): void {
    const list = addresses ?? Object.values(networkInterfaces()).flatMap((ifs) => (ifs ?? []).map((i) => i.address));
    this.own = new Set(list.map((a) => normalizeAddress(a)));
  }

  /** The ranges allowed despite being private, as configured. */
  get allowPrivate(): readonly string[] {
    return this.allowedRanges;
  }

  /**
   * Why `address` (an IP literal) is refused, or undefined when the proxy may connect to it.
   * IPv4-mapped and IPv4-compatible IPv6 forms are judged as the IPv4 address they carry.
   */
  refusal(address: string): string | undefined {
    const a = normalizeAddress(address);
    const v = isIP(a);
    if (v === 0) return "not an IP address";
    const type = v === 4 ? "ipv4" : "ipv6";
    if (this.allowed.check(a, type)) return undefined;
    for (const s of this.special) if (s.list.check(a, type)) return s.kind;
    if (this.own.has(a)) return "address of this machine";
    return undefined;
  }

  /** Throws {@link DestinationDenied} when `host` is an IP literal the proxy refuses; names are checked in {@link lookup}. */
  checkLiteral(host: string): void {
    const h = host.replace(/^\[|\]$/g, "");
    if (isIP(h.split("%")[0]!) === 0) return;
    const why = this.refusal(h);
    if (why !== undefined) throw new DestinationDenied(h, why, h);
  }

  /**
   * A `lookup` for `net.connect`, `tls.connect` and `http.Agent`: resolves with the system
   * resolver and keeps only the addresses the proxy may connect to; when none is left, fails
   * with {@link DestinationDenied} naming the first refused one.
   */
  readonly lookup: LookupFunction = (hostname: string, options: LookupOneOptions | LookupAllOptions, callback: (...args: never[]) => void): void => {
    const cb = callback as unknown as (err: Error | null, address?: string | LookupAddress[], family?: number) => void;
    dnsLookup(hostname, { ...options, all: true }, (err, addresses) => {
      if (err !== null) return cb(err);
      const ok: LookupAddress[] = [];
      let first: DestinationDenied | undefined;
      for (const a of addresses) {
        const why = this.refusal(a.address);
        if (why === undefined) ok.push(a);
        else first ??= new DestinationDenied(a.address, why, hostname);
      }
      if (ok.length === 0) return cb(first ?? Object.assign(new Error(`${hostname}: no address`), { code: "ENOTFOUND" }));
      if ((options as LookupAllOptions).all === true) return cb(null, ok);
      return cb(null, ok[0]!.address, ok[0]!.family);
    });
  };
}

/**
 * An address as the checks compare it: no brackets, no zone, and an IPv6 address that carries
 * an IPv4 one as that IPv4 address (lowercase otherwise).
 */
function normalizeAddress(address: string): string {
  let a = address.replace(/^\[|\]$/g, "");
  const zone = a.indexOf("%");
  if (zone >= 0) a = a.slice(0, zone);
  if (isIP(a) !== 6) return a;
  return embeddedIpv4(a) ?? a.toLowerCase();
}

/**
 * The IPv4 address an IPv6 address carries, in any spelling: `::ffff:a.b.c.d` (mapped),
 * `::ffff:0:a.b.c.d` (translated), `::a.b.c.d` (compatible), `64:ff9b::a.b.c.d` and
 * `64:ff9b:1::/48` (NAT64, RFC 6052 and 8215), and `2002:aabb:ccdd::` (6to4).
 */
function embeddedIpv4(v6: string): string | undefined {
  const words = expandIpv6(v6);
  if (words === undefined) return undefined;
  const v4 = (hi: number, lo: number): string => [hi >> 8, hi & 0xff, lo >> 8, lo & 0xff].join(".");
  const zero = (from: number, to: number): boolean => words.slice(from, to).every((w) => w === 0);
  if (words[0] === 0x2002) return v4(words[1]!, words[2]!);
  const mapped = zero(0, 5) && words[5] === 0xffff;
  const translated = zero(0, 4) && words[4] === 0xffff && words[5] === 0;
  const compatible = zero(0, 6) && (words[6]! !== 0 || words[7]! > 1);
  const nat64 = words[0] === 0x64 && words[1] === 0xff9b && (zero(2, 6) || words[2] === 1);
  return mapped || translated || compatible || nat64 ? v4(words[6]!, words[7]!) : undefined;
}
