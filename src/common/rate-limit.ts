/**
 * Per-client token buckets: the proxy's new-host leaf issuance per client address (a client
 * that opens tunnels to many new hosts cannot make the agent sign without bound; a cached leaf
 * costs nothing), and the KDC's leaves signed through its token per machine (SignLeaf).
 */

/** Options of {@link ClientRateLimiter}. */
export interface RateLimitOptions {
  /** Tokens added per second; 0 disables the limit. */
  readonly perSecond: number;
  /** Bucket size (the burst allowed). */
  readonly burst: number;
  /** Most clients tracked; the least recently seen are forgotten first. Default 10,000. */
  readonly maxClients?: number;
  /** Clock (ms). */
  readonly now?: () => number;
}

/** A limit as configured: tokens per second and the burst. */
export type RateLimit = Pick<RateLimitOptions, "perSecond" | "burst">;

interface Bucket {
  tokens: number;
  at: number;
}

/** Token buckets keyed by client address. */
export class ClientRateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  private readonly maxClients: number;
  private readonly now: () => number;

  constructor(private readonly options: RateLimitOptions) {
    this.maxClients = options.maxClients ?? 10_000;
    this.now = options.now ?? Date.now;
  }

  /** True when `client`'s bucket has no whole token now (the next new host would be refused); takes nothing. */
  exhausted(client: string): boolean {
    return this.options.perSecond > 0 && this.tokens(client) < 1;
  }

  /** The tokens (whole and partial) `client`'s bucket holds now: the burst for a client not seen; takes nothing. */
  tokens(client: string): number {
    const { perSecond, burst } = this.options;
    const b = this.buckets.get(client);
    if (perSecond <= 0 || b === undefined) return burst;
    return Math.min(burst, b.tokens + ((this.now() - b.at) / 1000) * perSecond);
  }

  /**
   * Sets `client`'s bucket to `tokens` now. With `--workers`, a worker's view of the primary's
   * bucket (which holds the one limit per machine), so that its CONNECT check refuses before
   * the 200 as one process does.
   */
  assume(client: string, tokens: number): void {
    if (this.options.perSecond <= 0) return;
    this.buckets.delete(client);
    if (this.buckets.size >= this.maxClients) this.buckets.delete(this.buckets.keys().next().value as string);
    this.buckets.set(client, { tokens: Math.max(0, Math.min(this.options.burst, tokens)), at: this.now() });
  }

  /** Takes one token for `client`; false when its bucket is empty. */
  take(client: string): boolean {
    const { perSecond, burst } = this.options;
    if (perSecond <= 0) return true;
    const t = this.now();
    let b = this.buckets.get(client);
    if (b === undefined) {
      b = { tokens: burst, at: t };
      if (this.buckets.size >= this.maxClients) this.buckets.delete(this.buckets.keys().next().value as string);
    } else {
      this.buckets.delete(client);
      b.tokens = Math.min(burst, b.tokens + ((t - b.at) / 1000) * perSecond);
      b.at = t;
    }
    this.buckets.set(client, b);
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }
}
