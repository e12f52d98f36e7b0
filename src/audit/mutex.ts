/**
 * KeyedMutex serializes async critical sections per key ("token/<id>", "machine/<id>",
 * "group/<name>"), so that a read-check-write (consume a join token, consume a nonce, change a
 * machine's status) never interleaves with another one on the same object, while different
 * objects proceed in parallel. One process owns the store (LevelDB's lock), so an in-process
 * lock is enough.
 */
export class KeyedMutex {
  readonly #tails = new Map<string, Promise<void>>();

  /** Runs `fn` once every earlier holder of `key` has finished. */
  async run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.#tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.#tails.set(key, tail);
    await prev;
    try {
      return await fn();
    } finally {
      release();
      if (this.#tails.get(key) === tail) this.#tails.delete(key);
    }
  }

  /** Number of keys held or waited for. */
  get size(): number {
    return this.#tails.size;
  }
}
