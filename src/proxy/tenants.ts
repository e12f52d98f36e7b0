/**
 * Which tenant a client belongs to: from its proxy credentials (`Proxy-Authorization:
 * Basic`), else from its address (CIDR ranges, first tenant in config order that matches),
 * else the default tenant.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { BlockList, isIP } from "node:net";
import { InvalidArgument } from "../common/errors.js";

/** One tenant as configured. */
export interface TenantConfig {
  /** Tenant id, as the agent knows it. */
  readonly id: string;
  /** Client address ranges, e.g. `10.1.0.0/16`, `fd00::/8`, or single addresses. */
  readonly cidrs?: readonly string[];
  /**
   * Proxy users: name and the SHA-256 (hex) of the password. Why SHA-256 and not a slow hash:
   * the check runs on every CONNECT; proxy passwords are meant to be random tokens (at least
   * 128 bits), for which a fast hash is not guessable.
   */
  readonly users?: readonly { readonly name: string; readonly passwordSha256: string }[];
}

/** How a client was matched to its tenant. */
export type TenantMatch =
  | { readonly kind: "tenant"; readonly tenant: string; readonly via: "credentials" | "address" | "default"; readonly user?: string }
  /** Credentials were given but are wrong, or required and absent: answer 407. */
  | { readonly kind: "auth-required"; readonly reason: string }
  /** No rule matched and there is no default tenant: answer 403. */
  | { readonly kind: "no-tenant" };

/** Resolves tenants; built once from config. */
export interface TenantResolver {
  /** Matches a client by address (as the socket reports it) and its Proxy-Authorization header. */
  resolve(remoteAddress: string | undefined, proxyAuthorization: string | undefined): TenantMatch;
  /** Every configured tenant id (and the default). */
  readonly tenantIds: readonly string[];
}

const TENANT_ID = /^[a-z0-9][a-z0-9._-]{0,62}$/i;

export function parseCidr(value: string, field: string): { addr: string; prefix: number; type: "ipv4" | "ipv6" } {
  const [addr = "", prefixText] = value.split("/");
  const v = isIP(addr);
  if (v === 0) throw new InvalidArgument(`${field}: "${value}" is not an address range; use e.g. 10.0.0.0/8 or fd00::/8`);
  const max = v === 4 ? 32 : 128;
  const prefix = prefixText === undefined ? max : Number(prefixText);
  if (!Number.isInteger(prefix) || prefix < 0 || prefix > max || (prefixText !== undefined && !/^\d+$/.test(prefixText))) {
    throw new InvalidArgument(`${field}: prefix length in "${value}" must be 0 to ${max}`);
  }
  return { addr, prefix, type: v === 4 ? "ipv4" : "ipv6" };
}

/** Strips the IPv4-mapped IPv6 prefix a dual-stack listener reports (`::ffff:10.0.0.1`). */
export function normalizeClientAddress(address: string | undefined): string {
  if (address === undefined) return "";
  return address.startsWith("::ffff:") && isIP(address.slice(7)) === 4 ? address.slice(7) : address;
}

/** Builds the resolver; throws InvalidArgument naming the bad field. */
export function createTenantResolver(
  tenants: readonly TenantConfig[],
  defaultTenant: string | undefined,
  requireAuth = false,
): TenantResolver {
  const ranges: { tenant: string; list: BlockList }[] = [];
  const users = new Map<string, { tenant: string; hash: Buffer }>();
  const ids = new Set<string>();
  tenants.forEach((t, i) => {
    const f = `tenants[${i}]`;
    if (typeof t.id !== "string" || !TENANT_ID.test(t.id)) {
      throw new InvalidArgument(`${f}.id: "${String(t.id)}" is not a tenant id (letters, digits, ".", "_", "-", at most 63)`);
    }
    if (ids.has(t.id)) throw new InvalidArgument(`${f}.id: tenant "${t.id}" is configured twice; merge the entries`);
    ids.add(t.id);
    if (t.cidrs !== undefined && t.cidrs.length > 0) {
      const list = new BlockList();
      t.cidrs.forEach((c, j) => {
        const r = parseCidr(String(c), `${f}.cidrs[${j}]`);
        list.addSubnet(r.addr, r.prefix, r.type);
      });
      ranges.push({ tenant: t.id, list });
    }
    (t.users ?? []).forEach((u, j) => {
      const uf = `${f}.users[${j}]`;
      if (typeof u.name !== "string" || u.name === "" || u.name.includes(":")) {
        throw new InvalidArgument(`${uf}.name: must be a non-empty user name without ":"`);
      }
      if (typeof u.passwordSha256 !== "string" || !/^[0-9a-f]{64}$/i.test(u.passwordSha256)) {
        throw new InvalidArgument(`${uf}.passwordSha256: must be 64 hex digits (printf %s PASSWORD | sha256sum)`);
      }
      if (users.has(u.name)) throw new InvalidArgument(`${uf}.name: user "${u.name}" is configured twice`);
      users.set(u.name, { tenant: t.id, hash: Buffer.from(u.passwordSha256, "hex") });
    });
  });
  if (defaultTenant !== undefined && !TENANT_ID.test(defaultTenant)) {
    throw new InvalidArgument(`defaultTenant: "${defaultTenant}" is not a tenant id`);
  }
  if (defaultTenant !== undefined) ids.add(defaultTenant);
  const tenantIds = [...ids];

  return {
    tenantIds,
    resolve(remoteAddress, proxyAuthorization) {
      if (proxyAuthorization !== undefined) {
        const m = /^basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(proxyAuthorization);
        if (m === null) return { kind: "auth-required", reason: "proxy-authorization is not Basic credentials" };
        const decoded = Buffer.from(m[1]!, "base64").toString("utf8");
        const colon = decoded.indexOf(":");
        const name = colon < 0 ? decoded : decoded.slice(0, colon);
        const password = colon < 0 ? "" : decoded.slice(colon + 1);
        const user = users.get(name);
        const digest = createHash("sha256").update(password).digest();
        // Compare even for an unknown user so that timing does not reveal which names exist.
        const ok = timingSafeEqual(digest, user?.hash ?? Buffer.alloc(32)) && user !== undefined;
        if (!ok) return { kind: "auth-required", reason: "unknown proxy user or wrong password" };
        return { kind: "tenant", tenant: user.tenant, via: "credentials", user: name };
      }
      if (requireAuth) return { kind: "auth-required", reason: "proxy credentials required" };
      const addr = normalizeClientAddress(remoteAddress);
      const v = isIP(addr);
      if (v !== 0) {
        const type = v === 4 ? "ipv4" : "ipv6";
        for (const r of ranges) if (r.list.check(addr, type)) return { kind: "tenant", tenant: r.tenant, via: "address" };
      }
      if (defaultTenant !== undefined) return { kind: "tenant", tenant: defaultTenant, via: "default" };
      return { kind: "no-tenant" };
    },
  };
}
