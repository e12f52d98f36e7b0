/**
 * KeyedMutex runs async sections one after the other per key, different keys in parallel.
 * The KDC uses it for ORDER inside this process only: the watch hub fans out one tenant's
 * changes in commit order, and the quarantine registry applies its feed's updates in order.
 * It guards no store invariant: every read-check-write on the store is a conditional batch
 * (see ./operations.ts), which holds across replicas where no in-process lock could.
 */
export class KeyedMutex {
  private readonly tails = new Map<string, Promise<void>>();

  /** Runs `fn` once every earlier holder of `key` has finished. */
  async run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.tails.set(key, tail);
    await prev;
    try {
      return await fn();
    } finally {
      release();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    }
  }

  /** Number of keys with a holder or waiters (for tests and metrics). */
  get size(): number {
    return this.tails.size;
  }
}
