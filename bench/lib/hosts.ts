/** Names of the bench origin's certificates. */

/** The names the origin has certificates for: h0, h1, … (each a distinct certificate). */
export function hostName(i: number): string {
  return `h${i}.bench.kmi.test`;
}

/** The name of the origin's default certificate (also for 127.0.0.1 and localhost). */
export const DEFAULT_HOST = "origin.bench.kmi.test";
