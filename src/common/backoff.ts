/**
 * The one home for retry pacing: exponential backoff with full jitter, and an abortable sleep.
 * Used by every reconnect loop (the agent's KDC link, the KDC's Auditserver feeds, `kmi up`).
 */

/** Exponential backoff with full jitter: a random delay in [initialMs, min(maxMs, initialMs·2^(failures-1))]. */
export function backoffMs(failures: number, initialMs: number, maxMs: number, random: () => number = Math.random): number {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(30, Math.max(0, failures - 1)));
  return Math.round(initialMs + random() * (cap - initialMs));
}

/**
 * Waits `ms`, or less: resolves early (without error) as soon as `signal` aborts. A caller that
 * must stop on abort follows it with `signal.throwIfAborted()`.
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}
