/**
 * Tenant + CONNECT target (`host:port`) pairs that got a leaf lately, bounded (the least
 * recently used forgotten first). The new-host limit's check on the CONNECT spares them: a
 * client past its limit keeps reaching the hosts it already has leaves for, which cost nothing.
 */

/** Pairs remembered by default. */
const MAX_LEAF_HOSTS = 10_000;

/** The remembered pairs. */
export class LeafHosts {
  private readonly pairs = new Map<string, true>();

  constructor(private readonly max = MAX_LEAF_HOSTS) {}

  /** True when `tenant` got a leaf for `target` lately. */
  has(tenant: string, target: string): boolean {
    return this.pairs.has(`${tenant}\u0000${target}`);
  }

  /** Remembers that `tenant` got a leaf for `target` (as the most recent). */
  remember(tenant: string, target: string): void {
    const k = `${tenant}\u0000${target}`;
    this.pairs.delete(k);
    this.pairs.set(k, true);
    if (this.pairs.size > this.max) this.pairs.delete(this.pairs.keys().next().value as string);
  }
}
