/**
 * A tiny async mutex: callers of `runExclusive` run one at a time, in call order.
 *
 * Used where a read-then-write must not interleave with another one in the same process
 * (the audit log's seq and prev_hash). It does not lock across processes: LevelDB's own
 * directory lock already keeps a second process out of the store.
 */
export class Mutex {
  #tail: Promise<void> = Promise.resolve();
  #pending = 0;

  /**
   * Runs `fn` once every earlier `runExclusive` call has settled, and returns its result.
   * A rejection of `fn` is passed to this caller only; the next caller still runs.
   */
  async runExclusive<T>(fn: () => Promise<T> | T): Promise<T> {
    const previous = this.#tail;
    let release!: () => void;
    this.#tail = new Promise<void>((resolve) => {
      release = resolve;
    });
    this.#pending++;
    try {
      await previous;
      return await fn();
    } finally {
      this.#pending--;
      release();
    }
  }

  /** True while a call holds the mutex or waits for it. */
  get locked(): boolean {
    return this.#pending > 0;
  }
}
