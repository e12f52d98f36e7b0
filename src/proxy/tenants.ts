/**
 * Which tenant a client belongs to: from its proxy credentials (`Proxy-Authorization:
 * Basic`), else from its address (CIDR ranges, first tenant in config order that matches),
 * else the default tenant.
 *
 * Proxy users' passwords are stored as `passwordHash`, a salted scrypt hash
 * (`scrypt$N$r$p$salt$hash`, made by `kmi proxy hash-password`), so a leaked tenants file does
 * not give the passwords away to an offline guesser. Checking one costs ~50 ms of CPU, so it
 * runs on the libuv thread pool (resolution is then a promise), a success is remembered under
 * an HMAC of the credentials (repeated CONNECTs cost one HMAC), and each client address gets a
 * small budget of failed checks before it is answered 407 without hashing. The older
 * `passwordSha256` (unsalted) is still accepted, with a warning at start.
 */
import { createHash, createHmac, randomBytes, scrypt, timingSafeEqual } from "node:crypto";
import { BlockList, isIP } from "node:net";
import { InvalidArgument } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { budgetSource } from "../common/ip.js";

/** One proxy user as configured: `passwordHash` (preferred) or `passwordSha256`, never both. */
export interface TenantUserConfig {
  /** User name (the part of the Basic credentials before the first ":"). */
  readonly name: string;
  /** `scrypt$N$r$p$salt$hash` (base64 salt and hash), from `kmi proxy hash-password`. */
  readonly passwordHash?: string;
  /** Deprecated: the unsalted SHA-256 (hex) of the password; accepted with a warning. */
  readonly passwordSha256?: string;
}

/** One tenant as configured. */
export interface TenantConfig {
  /** Tenant id, as the agent knows it. */
  readonly id: string;
  /** Client address ranges, e.g. `10.1.0.0/16`, `fd00::/8`, or single addresses. */
  readonly cidrs?: readonly string[];
  /** Proxy users of this tenant. */
  readonly users?: readonly TenantUserConfig[];
  /** The tenant's own inspection policy (see ./policy.ts); without one, the global policy applies. */
  readonly policy?: unknown;
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
  /**
   * Matches a client by address (as the socket reports it) and its Proxy-Authorization header.
   * A promise only when a scrypt hash has to be checked; every other answer (addresses,
   * passwordSha256 users, remembered successes, an exhausted failure budget) is synchronous.
   * The promise never rejects.
   */
  resolve(remoteAddress: string | undefined, proxyAuthorization: string | undefined): TenantMatch | Promise<TenantMatch>;
  /** Every configured tenant id (and the default). */
  readonly tenantIds: readonly string[];
}

/** scrypt cost parameters (RFC 7914): CPU/memory cost N, block size r, parallelism p. */
export interface ScryptParams {
  readonly N: number;
  readonly r: number;
  readonly p: number;
}

/** A parsed `passwordHash`. */
export interface PasswordHash {
  readonly params: ScryptParams;
  readonly salt: Buffer;
  readonly hash: Buffer;
}

/** Derives `keylen` bytes from a password with scrypt; injectable so tests can count calls. */
export type ScryptFunction = (password: Buffer, salt: Buffer, keylen: number, params: ScryptParams) => Promise<Buffer>;

/** What `kmi proxy hash-password` uses: ~16 MiB and ~50 ms per check. */
export const DEFAULT_SCRYPT_PARAMS: ScryptParams = { N: 16_384, r: 8, p: 1 };
const SALT_BYTES = 16;
const HASH_BYTES = 32;
/**
 * Bounds a passwordHash must keep. Below N = 2^14 the hash is too cheap to guess at; above
 * them one check would cost the proxy seconds or hundreds of MiB (a lever for a client).
 */
const BOUNDS = { minN: 2 ** 14, maxN: 2 ** 20, maxR: 32, maxP: 16, maxMemBytes: 256 * 1024 * 1024, minSalt: 16, maxSalt: 64, minHash: 32, maxHash: 64 };

/** Node's scrypt on the thread pool, with room for the parameters' memory. */
export const nodeScrypt: ScryptFunction = (password, salt, keylen, { N, r, p }) =>
  new Promise((resolve, reject) => {
    // OpenSSL needs 128·r·(N+2) bytes for V plus 128·r·p for B; Node's default cap is 32 MiB.
    const maxmem = 128 * r * (N + 2 + p) + 1024 * 1024;
    scrypt(password, salt, keylen, { N, r, p, maxmem }, (err, key) => (err === null ? resolve(key) : reject(err)));
  });

const HASH_FORMAT = "scrypt$<N>$<r>$<p>$<salt base64>$<hash base64>";

function base64Field(text: string, what: string, min: number, max: number, field: string): Buffer {
  const b = Buffer.from(text, "base64");
  if (text === "" || b.toString("base64") !== text) {
    throw new InvalidArgument(`${field}: the ${what} is not padded base64; copy the whole output of \`kmi proxy hash-password\``);
  }
  if (b.length < min || b.length > max) throw new InvalidArgument(`${field}: the ${what} must be ${min} to ${max} bytes, not ${b.length}`);
  return b;
}

/** Parses and bounds-checks a `passwordHash`; throws InvalidArgument naming `field`. */
export function parsePasswordHash(value: unknown, field: string): PasswordHash {
  const parts = typeof value === "string" ? value.split("$") : [];
  if (parts.length !== 6 || parts[0] !== "scrypt") {
    throw new InvalidArgument(`${field}: must be ${HASH_FORMAT}; make one with \`kmi proxy hash-password\``);
  }
  const [, nText, rText, pText, saltText, hashText] = parts as [string, string, string, string, string, string];
  const int = (text: string, name: string): number => {
    if (!/^[1-9]\d{0,9}$/.test(text)) throw new InvalidArgument(`${field}: ${name} "${text}" is not a positive integer`);
    return Number(text);
  };
  const N = int(nText, "N");
  const r = int(rText, "r");
  const p = int(pText, "p");
  if (N < BOUNDS.minN || N > BOUNDS.maxN || (N & (N - 1)) !== 0) {
    throw new InvalidArgument(`${field}: N must be a power of two from ${BOUNDS.minN} to ${BOUNDS.maxN}, not ${N}`);
  }
  if (r > BOUNDS.maxR) throw new InvalidArgument(`${field}: r must be 1 to ${BOUNDS.maxR}, not ${r}`);
  if (p > BOUNDS.maxP) throw new InvalidArgument(`${field}: p must be 1 to ${BOUNDS.maxP}, not ${p}`);
  if (128 * N * r > BOUNDS.maxMemBytes) {
    throw new InvalidArgument(`${field}: N and r need ${(128 * N * r) / 2 ** 20} MiB per check; at most ${BOUNDS.maxMemBytes / 2 ** 20} MiB (lower N or r)`);
  }
  const salt = base64Field(saltText, "salt", BOUNDS.minSalt, BOUNDS.maxSalt, field);
  const hash = base64Field(hashText, "hash", BOUNDS.minHash, BOUNDS.maxHash, field);
  return { params: { N, r, p }, salt, hash };
}

/** The `passwordHash` string of a parsed hash. */
export function formatPasswordHash(h: PasswordHash): string {
  return `scrypt$${h.params.N}$${h.params.r}$${h.params.p}$${h.salt.toString("base64")}$${h.hash.toString("base64")}`;
}

/** Hashes a password for the tenants file (what `kmi proxy hash-password` prints): fresh salt, default parameters. */
export async function hashPassword(password: string, hasher: ScryptFunction = nodeScrypt, params: ScryptParams = DEFAULT_SCRYPT_PARAMS): Promise<string> {
  const salt = randomBytes(SALT_BYTES);
  const hash = await hasher(Buffer.from(password, "utf8"), salt, HASH_BYTES, params);
  return formatPasswordHash({ params, salt, hash });
}

/** True when `password` matches `stored` (constant-time comparison). */
export async function verifyPassword(password: string, stored: PasswordHash, hasher: ScryptFunction = nodeScrypt): Promise<boolean> {
  const derived = await hasher(Buffer.from(password, "utf8"), stored.salt, stored.hash.length, stored.params);
  return derived.length === stored.hash.length && timingSafeEqual(derived, stored.hash);
}

/** Options of {@link createTenantResolver} beyond the configuration itself. */
export interface TenantResolverOptions {
  /** Gets the start-up warnings (one per passwordSha256 user) and verification errors. */
  readonly logger?: Pick<Logger, "warn" | "error">;
  /** The scrypt implementation; default {@link nodeScrypt}. */
  readonly scrypt?: ScryptFunction;
  /** Clock (ms) of the failure budget. */
  readonly now?: () => number;
  /** Successful scrypt verifications remembered (least recently used go first); default 1,000. */
  readonly cacheSize?: number;
  /** Failed (or running) scrypt checks allowed per client address within `failureWindowMs`; default 5. */
  readonly failureBudget?: number;
  /** Window of the failure budget, ms; default 10,000. */
  readonly failureWindowMs?: number;
  /** scrypt checks running at once, whoever asks; default 2, so DNS and file I/O keep thread-pool room. */
  readonly maxConcurrentHashes?: number;
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

/**
 * The key a client's failure budget is kept under: its IPv4 address, or its IPv6 /64 (one
 * host commonly holds a whole /64, so per-address budgets there would be no budget at all).
 */
export function budgetKey(address: string): string {
  return budgetSource(normalizeClientAddress(address));
}

type User = { readonly tenant: string } & ({ readonly kind: "sha256"; readonly hash: Buffer } | { readonly kind: "scrypt"; readonly hash: PasswordHash });

/** Failed and running scrypt checks per client, within a sliding window. */
class FailureBudget {
  private readonly clients = new Map<string, { failures: number[]; running: number }>();
  private static readonly MAX_CLIENTS = 10_000;

  constructor(
    private readonly limit: number,
    private readonly windowMs: number,
    private readonly now: () => number,
  ) {}

  /** Reserves one check for `client`; false when its budget is spent. */
  take(client: string): boolean {
    const t = this.now();
    let c = this.clients.get(client);
    if (c === undefined) {
      if (this.clients.size >= FailureBudget.MAX_CLIENTS) this.clients.delete(this.clients.keys().next().value as string);
      c = { failures: [], running: 0 };
      this.clients.set(client, c);
    }
    while (c.failures.length > 0 && c.failures[0]! <= t - this.windowMs) c.failures.shift();
    if (c.failures.length + c.running >= this.limit) return false;
    c.running++;
    return true;
  }

  /** Ends a check reserved by {@link take}. */
  settle(client: string, ok: boolean): void {
    const c = this.clients.get(client);
    if (c === undefined) return;
    c.running = Math.max(0, c.running - 1);
    if (!ok) c.failures.push(this.now());
    if (c.failures.length === 0 && c.running === 0) this.clients.delete(client);
  }
}

/** Runs at most `max` tasks at once; the rest wait in order. */
function createLimiter(max: number): <T>(task: () => Promise<T>) => Promise<T> {
  let running = 0;
  const waiting: (() => void)[] = [];
  return async (task) => {
    if (running >= max) await new Promise<void>((r) => waiting.push(r));
    else running++;
    try {
      return await task();
    } finally {
      // Hand the slot straight to the next waiter so that nobody slips in between.
      const next = waiting.shift();
      if (next !== undefined) next();
      else running--;
    }
  };
}

const WRONG: TenantMatch = { kind: "auth-required", reason: "unknown proxy user or wrong password" };
const OVER_BUDGET: TenantMatch = { kind: "auth-required", reason: "too many failed proxy logins from this address; wait a few seconds" };

/** Builds the resolver; throws InvalidArgument naming the bad field. */
export function createTenantResolver(
  tenants: readonly TenantConfig[],
  defaultTenant: string | undefined,
  requireAuth = false,
  options: TenantResolverOptions = {},
): TenantResolver {
  const ranges: { tenant: string; list: BlockList }[] = [];
  const users = new Map<string, User>();
  const ids = new Set<string>();
  const unsalted: { tenant: string; user: string }[] = [];
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
      if (u.passwordHash !== undefined && u.passwordSha256 !== undefined) {
        throw new InvalidArgument(`${uf}: has both passwordHash and passwordSha256; keep only passwordHash`);
      }
      let user: User;
      if (u.passwordHash !== undefined) {
        user = { tenant: t.id, kind: "scrypt", hash: parsePasswordHash(u.passwordHash, `${uf}.passwordHash`) };
      } else if (u.passwordSha256 !== undefined) {
        if (typeof u.passwordSha256 !== "string" || !/^[0-9a-f]{64}$/i.test(u.passwordSha256)) {
          throw new InvalidArgument(`${uf}.passwordSha256: must be 64 hex digits; better, replace it with a passwordHash from \`kmi proxy hash-password\``);
        }
        user = { tenant: t.id, kind: "sha256", hash: Buffer.from(u.passwordSha256, "hex") };
        unsalted.push({ tenant: t.id, user: u.name });
      } else {
        throw new InvalidArgument(`${uf}.passwordHash: missing; make one with \`kmi proxy hash-password\``);
      }
      if (users.has(u.name)) throw new InvalidArgument(`${uf}.name: user "${u.name}" is configured twice`);
      users.set(u.name, user);
    });
  });
  if (defaultTenant !== undefined && !TENANT_ID.test(defaultTenant)) {
    throw new InvalidArgument(`defaultTenant: "${defaultTenant}" is not a tenant id`);
  }
  if (defaultTenant !== undefined) ids.add(defaultTenant);
  const tenantIds = [...ids];
  for (const u of unsalted) {
    options.logger?.warn("proxy user with an unsalted passwordSha256: a leaked tenants file lets weak passwords be guessed offline; replace it with the output of `kmi proxy hash-password`", u);
  }
  const verify = createScryptVerifier(users, options);

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
        if (user?.kind === "scrypt" || (user === undefined && verify !== undefined)) {
          return verify!(name, password, user, remoteAddress);
        }
        const digest = createHash("sha256").update(password).digest();
        // Compare even for an unknown user so that timing does not reveal which names exist.
        const ok = timingSafeEqual(digest, user?.hash ?? Buffer.alloc(32)) && user !== undefined;
        if (!ok) return WRONG;
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

type ScryptVerifier = (name: string, password: string, user: (User & { kind: "scrypt" }) | undefined, remoteAddress: string | undefined) => TenantMatch | Promise<TenantMatch>;

/**
 * Checks Basic credentials of scrypt users (and of unknown names, once any scrypt user exists);
 * undefined when there is no scrypt user. Its memory (successes, budgets) lives as long as the
 * resolver: a reloaded configuration starts afresh.
 */
function createScryptVerifier(users: ReadonlyMap<string, User>, o: TenantResolverOptions): ScryptVerifier | undefined {
  const scryptUsers = [...users.values()].filter((u): u is User & { kind: "scrypt" } => u.kind === "scrypt");
  if (scryptUsers.length === 0) return undefined;
  const hasher = o.scrypt ?? nodeScrypt;
  const cacheSize = o.cacheSize ?? 1_000;
  const budget = new FailureBudget(o.failureBudget ?? 5, o.failureWindowMs ?? 10_000, o.now ?? Date.now);
  const limit = createLimiter(o.maxConcurrentHashes ?? 2);
  // An unknown name is checked against this, with the parameters real users have, so that it
  // costs the same time (and budget) as a known name with a wrong password.
  const dummy: PasswordHash = { params: scryptUsers[0]!.hash.params, salt: randomBytes(SALT_BYTES), hash: randomBytes(HASH_BYTES) };
  // Remembered successes are keyed by an HMAC under a key that never leaves this process: the
  // cache holds no password, and its keys cannot be guessed at offline without the key.
  const cacheKey = randomBytes(32);
  const verified = new Map<string, User & { kind: "scrypt" }>();
  // Checks running now, by credentials: a client's parallel CONNECTs share one scrypt.
  const running = new Map<string, Promise<boolean>>();

  return (name, password, user, remoteAddress) => {
    const key = createHmac("sha256", cacheKey).update(`${name}:${password}`).digest("base64");
    const match = (ok: boolean): TenantMatch => (ok && user !== undefined ? { kind: "tenant", tenant: user.tenant, via: "credentials", user: name } : WRONG);
    const hit = verified.get(key);
    if (hit !== undefined && hit === user) {
      verified.delete(key);
      verified.set(key, hit);
      return match(true);
    }
    const pending = running.get(key);
    if (pending !== undefined) return pending.then(match);
    const client = budgetKey(remoteAddress ?? "");
    if (!budget.take(client)) return OVER_BUDGET;
    const check = limit(() => verifyPassword(password, user?.hash ?? dummy, hasher))
      .then(
        (ok) => ok && user !== undefined,
        (err: unknown) => {
          o.logger?.error("proxy password check failed", { user: name, error: err as Error });
          return false;
        },
      )
      .then((ok) => {
        running.delete(key);
        budget.settle(client, ok);
        if (ok && user !== undefined) {
          verified.set(key, user);
          if (verified.size > cacheSize) verified.delete(verified.keys().next().value as string);
        }
        return ok;
      });
    running.set(key, check);
    return check.then(match);
  };
}
