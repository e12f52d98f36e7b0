/**
 * The cache of minted leaves, as ready TLS contexts: keyed by tenant and origin certificate,
 * bounded (least recently used goes first), expiry-aware (a leaf near its end is minted
 * again), single-flight (however many clients ask for the same new host at once, one
 * issuance runs and all of them wait for it), cleared per tenant when the tenant's CA
 * rotates or a key is revoked, and trimmed of leaves nobody used lately (each holds an OpenSSL
 * context of ~40 KB: when the load falls, the memory goes back).
 */
import type { SecureContext } from "node:tls";

/** A minted leaf, ready to serve. */
export interface LeafEntry {
  /** Tenant whose intermediate signed it. */
  readonly tenant: string;
  /** The TLS context: leaf + chain and the leaf's in-memory key. */
  readonly context: SecureContext;
  /** End of the leaf's validity (ms since epoch). */
  readonly notAfter: number;
  /** Start of the leaf's validity (ms since epoch). */
  readonly notBefore: number;
  /** Key id of the intermediate that signed it. */
  readonly issuerKeyId: string;
  /** Version of that intermediate. */
  readonly intermediateVersion: number;
  /** Leaf serial, hex (for logs). */
  readonly serialHex: string;
}

/** What the cache needs of an entry: its tenant, validity and issuer (a {@link LeafEntry}, or the primary's leaf material). */
export interface CachedLeaf {
  readonly tenant: string;
  readonly notAfter: number;
  readonly notBefore: number;
  readonly issuerKeyId: string;
}

/** Thrown by {@link LeafCache.obtain} when `admit` refuses a new issuance. */
export class IssuanceRefused extends Error {
  override name = "IssuanceRefused";
}

/** How {@link LeafCache.obtain} got the entry. */
export type LeafSource = "cache" | "issued" | "joined";

/** Options of {@link LeafCache}. */
export interface LeafCacheOptions {
  /** Most entries kept; default 10,000. */
  readonly maxEntries?: number;
  /** Clock (ms). */
  readonly now?: () => number;
}

/** Cache key of a leaf: tenant, then origin certificate fingerprint (and more when needed). */
export function leafCacheKey(tenant: string, originFingerprint: string, extra = ""): string {
  return extra === "" ? `${tenant}\u0000${originFingerprint}` : `${tenant}\u0000${originFingerprint}\u0000${extra}`;
}

/** The cache. */
export class LeafCache<E extends CachedLeaf = LeafEntry> {
  private readonly entries = new Map<string, E>();
  /** When each entry was last served (ms); the entries map's order is the same (least recent first). */
  private readonly usedAt = new Map<string, number>();
  private readonly inflight = new Map<string, Promise<E>>();
  private readonly generations = new Map<string, number>();
  private epoch = 0;
  private readonly maxEntries: number;
  private readonly now: () => number;
  /** Issuances started (for metrics and tests). */
  issued = 0;
  /** Issuances whose result was not cached because the tenant's keys changed meanwhile. */
  discarded = 0;

  constructor(options: LeafCacheOptions = {}) {
    this.maxEntries = Math.max(1, options.maxEntries ?? 10_000);
    this.now = options.now ?? Date.now;
  }

  /** Entries held. */
  get size(): number {
    return this.entries.size;
  }

  /**
   * A leaf is served until a tenth of its lifetime (at most an hour) is left, so that a
   * client never receives a certificate that expires during its connection.
   */
  private fresh(e: E, now: number): boolean {
    const margin = Math.min(3_600_000, (e.notAfter - e.notBefore) / 10);
    return now < e.notAfter - margin;
  }

  /** The cached entry, if present and fresh; marks it most recently used. */
  get(key: string): E | undefined {
    const e = this.entries.get(key);
    if (e === undefined) return undefined;
    const now = this.now();
    if (!this.fresh(e, now)) {
      this.drop(key);
      return undefined;
    }
    // Map iteration order is insertion order: re-inserting makes this entry the newest.
    this.entries.delete(key);
    this.entries.set(key, e);
    this.usedAt.delete(key);
    this.usedAt.set(key, now);
    return e;
  }

  /**
   * The entry for `key`: from the cache, from an issuance already running for it, or from a
   * new issuance (`issue`). `admit` is asked only before a new issuance (the per-client rate
   * limit); when it returns false, {@link IssuanceRefused} is thrown.
   */
  async obtain(
    tenant: string,
    key: string,
    issue: () => Promise<E>,
    admit: () => boolean = () => true,
  ): Promise<{ entry: E; source: LeafSource }> {
    const hit = this.get(key);
    if (hit !== undefined) return { entry: hit, source: "cache" };
    const running = this.inflight.get(key);
    if (running !== undefined) return { entry: await running, source: "joined" };
    if (!admit()) throw new IssuanceRefused("new-host issuance rate limit reached for this client");
    const gen = this.generation(tenant);
    this.issued++;
    const p = issue().then(
      (entry) => {
        this.inflight.delete(key);
        // A rotation or revoke while this issuance ran: serve it once, but do not cache it.
        if (this.generation(tenant) === gen) this.put(key, entry);
        else this.discarded++;
        return entry;
      },
      (err: unknown) => {
        this.inflight.delete(key);
        throw err;
      },
    );
    this.inflight.set(key, p);
    return { entry: await p, source: "issued" };
  }

  /** Changes whenever the tenant's leaves are dropped (or all leaves are). */
  private generation(tenant: string): string {
    return `${this.epoch}:${this.generations.get(tenant) ?? 0}`;
  }

  private put(key: string, entry: E): void {
    this.drop(key);
    this.entries.set(key, entry);
    this.usedAt.set(key, this.now());
    while (this.entries.size > this.maxEntries) {
      this.drop(this.entries.keys().next().value as string);
    }
  }

  /** The cached entries of `tenant`. */
  entriesOf(tenant: string): E[] {
    return [...this.entries.values()].filter((e) => e.tenant === tenant);
  }

  /** Tenants with cached entries. */
  tenants(): Set<string> {
    return new Set([...this.entries.values()].map((e) => e.tenant));
  }

  private drop(key: string): void {
    this.entries.delete(key);
    this.usedAt.delete(key);
  }

  /** Drops the leaves not served for `idleMs` (they are minted again if asked for). Returns how many. */
  trimIdle(idleMs: number): number {
    const cutoff = this.now() - idleMs;
    let n = 0;
    // Least recently used first: stop at the first one used since the cutoff.
    for (const [k, t] of this.usedAt) {
      if (t > cutoff) break;
      this.drop(k);
      n++;
    }
    return n;
  }

  /** Drops every leaf of a tenant (its CA rotated, or a key was revoked). Returns how many. */
  clearTenant(tenant: string): number {
    this.generations.set(tenant, (this.generations.get(tenant) ?? 0) + 1);
    let n = 0;
    for (const [k, e] of this.entries) {
      if (e.tenant === tenant) {
        this.drop(k);
        n++;
      }
    }
    return n;
  }

  /** Drops every leaf (quarantine). Returns how many. */
  clear(): number {
    this.epoch++;
    const n = this.entries.size;
    this.entries.clear();
    this.usedAt.clear();
    return n;
  }

  /**
   * Keeps only leaves signed by each tenant's active intermediate (`activeKeyIds`: tenant id
   * to key id), as a watch SNAPSHOT reports after a reconnect, which covers whatever happened
   * while the stream was down. Returns how many were dropped.
   */
  retainActive(activeKeyIds: ReadonlyMap<string, string>): number {
    let n = 0;
    const tenants = new Set<string>();
    for (const [k, e] of this.entries) {
      if (activeKeyIds.get(e.tenant) !== e.issuerKeyId) {
        this.drop(k);
        tenants.add(e.tenant);
        n++;
      }
    }
    for (const t of tenants) this.generations.set(t, (this.generations.get(t) ?? 0) + 1);
    return n;
  }
}
