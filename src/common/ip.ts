/**
 * Small IP address helpers shared by the proxy's destination check and the per-address
 * budgets (the proxy's password-failure budget, the audit logs' refusal budget).
 */
import { isIP } from "node:net";

/** The eight 16-bit words of an IPv6 address (with an optional dotted IPv4 tail); undefined when it is not one. */
export function expandIpv6(v6: string): number[] | undefined {
  let s = v6.toLowerCase();
  const tail = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (tail !== null) {
    const p = tail[1]!.split(".").map(Number);
    s = `${s.slice(0, -tail[1]!.length)}${((p[0]! << 8) | p[1]!).toString(16)}:${((p[2]! << 8) | p[3]!).toString(16)}`;
  }
  const [head = "", rest] = s.split("::");
  const a = head === "" ? [] : head.split(":");
  const b = rest === undefined || rest === "" ? [] : rest.split(":");
  const fill = rest === undefined ? 0 : 8 - a.length - b.length;
  const words = [...a, ...Array<string>(Math.max(fill, 0)).fill("0"), ...b].map((w) => parseInt(w, 16));
  return words.length === 8 && words.every((w) => Number.isInteger(w) && w >= 0 && w <= 0xffff) ? words : undefined;
}

/**
 * The key a per-address budget keeps an address under: an IPv6 address's /64 (one host
 * commonly holds a whole /64, so per-address budgets there would be no budget at all), as
 * `2001:db8:1:2::/64`; anything else (IPv4, "unix") as it is. A zone (`%eth0`) is dropped.
 */
export function budgetSource(address: string): string {
  const a = address.split("%")[0] ?? "";
  if (isIP(a) !== 6) return address;
  const words = expandIpv6(a);
  return words === undefined ? a : `${words.slice(0, 4).map((w) => w.toString(16)).join(":")}::/64`;
}
