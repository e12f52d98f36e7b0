/**
 * The one home for retry pacing: exponential backoff with jitter, small random spreads, and an abortable sleep.
 * Used by every reconnect loop (the agent's KDC link, the KDC's Auditserver feeds, `kmi up`).
 */

/**
 * Exponential backoff with jitter, the first retry too: a random delay in [cap/2, cap] where
 * cap = min(maxMs, initialMs·2^(failures-1)) ("equal jitter": never zero, never the same for a
 * whole fleet, so clients that failed together do not come back together).
 */
export function backoffMs(failures: number, initialMs: number, maxMs: number, random: () => number = Math.random): number {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(30, Math.max(0, failures - 1)));
  return Math.round(cap / 2 + random() * (cap / 2));
}

/**
 * A small random pause in [0, spreadMs]: before reopening a stream the server ended cleanly (a
 * restart or a token expiry reaches a whole fleet at once) and anywhere else many clients would
 * otherwise act at the same instant.
 */
export function spreadMs(spreadMs: number, random: () => number = Math.random): number {
  return Math.round(random() * Math.max(0, spreadMs));
}

/** `ms` moved by up to ±`fraction` of itself, at random: a fixed delay (a server's retry hint, a restart) made fleet-safe. */
export function jittered(ms: number, fraction = 0.2, random: () => number = Math.random): number {
  const f = Math.min(1, Math.max(0, fraction));
  return Math.max(0, Math.round(ms * (1 - f + 2 * f * random())));
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
