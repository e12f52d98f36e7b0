/**
 * Bypass decisions the proxy learns at run time, each with an expiry:
 * - origins that demand a client certificate (the proxy cannot present the client's, so it
 *   tunnels them; on TLS 1.3 the demand shows only after the handshake, so the first
 *   connection may fail and the next ones are tunnelled);
 * - opt-in: hosts whose clients keep rejecting the minted certificate (pinned apps).
 */

/** Options of {@link LearnedBypass}. */
export interface LearnedBypassOptions {
  /** How long a learned client-certificate bypass lasts; default 1 hour. */
  readonly clientCertTtlMs?: number;
  /** Most entries of each kind; default 10,000. */
  readonly maxEntries?: number;
  /** Clock (ms). */
  readonly now?: () => number;
}

/** Settings of the pinned-app detection (from the policy, so they can change on reload). */
export interface RejectionSettings {
  readonly enabled: boolean;
  readonly threshold: number;
  readonly windowSeconds: number;
  readonly ttlSeconds: number;
}

function setBounded<V>(map: Map<string, V>, key: string, value: V, max: number): void {
  map.delete(key);
  if (map.size >= max) map.delete(map.keys().next().value as string);
  map.set(key, value);
}

/** The learned decisions. */
export class LearnedBypass {
  private readonly clientCert = new Map<string, number>();
  private readonly pinned = new Map<string, number>();
  private readonly rejections = new Map<string, number[]>();
  private readonly ttl: number;
  private readonly max: number;
  private readonly now: () => number;

  constructor(options: LearnedBypassOptions = {}) {
    this.ttl = options.clientCertTtlMs ?? 3_600_000;
    this.max = options.maxEntries ?? 10_000;
    this.now = options.now ?? Date.now;
  }

  /** Remembers that `origin` (host:port) demands a client certificate. */
  markClientCert(origin: string): void {
    setBounded(this.clientCert, origin, this.now() + this.ttl, this.max);
  }

  /** True while `origin` is known to demand a client certificate. */
  demandsClientCert(origin: string): boolean {
    return this.live(this.clientCert, origin);
  }

  /**
   * Counts a client's rejection of the minted certificate for `host` (per tenant); returns
   * true when this rejection turned on the bypass.
   */
  recordRejection(tenant: string, host: string, s: RejectionSettings): boolean {
    if (!s.enabled) return false;
    const key = `${tenant}\u0000${host}`;
    const t = this.now();
    const since = t - s.windowSeconds * 1000;
    const list = (this.rejections.get(key) ?? []).filter((x) => x > since);
    list.push(t);
    if (list.length >= s.threshold) {
      this.rejections.delete(key);
      setBounded(this.pinned, key, t + s.ttlSeconds * 1000, this.max);
      return true;
    }
    setBounded(this.rejections, key, list, this.max);
    return false;
  }

  /** True while `host` is auto-bypassed for `tenant`. */
  pinnedBypass(tenant: string, host: string): boolean {
    return this.live(this.pinned, `${tenant}\u0000${host}`);
  }

  private live(map: Map<string, number>, key: string): boolean {
    const until = map.get(key);
    if (until === undefined) return false;
    if (until > this.now()) return true;
    map.delete(key);
    return false;
  }
}
