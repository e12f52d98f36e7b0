/**
 * The memory allocator of `kmi proxy`'s workers (`--allocator`). glibc's malloc keeps the memory
 * that closed connections freed (their OpenSSL and nghttp2 state is interleaved with longer-lived
 * blocks, and glibc returns only the top of its heap on its own), so a proxy whose load fell
 * holds its peak RSS. jemalloc returns freed pages to the system after a short decay, from a
 * background thread, and costs a little less per idle connection, but measurably more CPU per
 * large body; so it is a choice, not the default (docs/proxy.md, "The allocator", has the
 * figures). The primary forks each worker with the environment that preloads it (a fork is a
 * fresh exec). One process (`--workers 0`) cannot change its own allocator: there the unit or
 * the shell sets LD_PRELOAD.
 */
import { existsSync } from "node:fs";

/** `--allocator`: auto (jemalloc when installed), jemalloc (required), system (the C library's). */
export type AllocatorChoice = "auto" | "jemalloc" | "system";

/** Where Debian, Ubuntu and Fedora/RHEL install jemalloc's shared library (package libjemalloc2 / jemalloc). */
export const JEMALLOC_PATHS: readonly string[] = [
  "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
  "/usr/lib64/libjemalloc.so.2",
  "/usr/lib/libjemalloc.so.2",
];

/**
 * jemalloc's settings for the workers: a background thread purges freed pages (without it, an
 * idle process never purges), dirty pages go back after 1 s, and nothing lingers as "muzzy".
 */
export const JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0";

/** What the workers run with. */
export interface WorkerAllocator {
  /** "jemalloc" (preloaded from `library`) or "system". */
  readonly name: "jemalloc" | "system";
  readonly library?: string;
  /** Variables to add to the workers' environment. */
  readonly env: Readonly<Record<string, string>>;
}

/**
 * The workers' allocator for `choice`. `inherited` is the primary's environment: an LD_PRELOAD
 * already set there is the operator's and is left alone. Throws when jemalloc is required and
 * not installed.
 */
export function workerAllocator(choice: AllocatorChoice, inherited: Readonly<Record<string, string | undefined>>, paths: readonly string[] = JEMALLOC_PATHS): WorkerAllocator {
  const system: WorkerAllocator = { name: "system", env: {} };
  if (choice === "system") return system;
  const preload = inherited["LD_PRELOAD"];
  if (preload !== undefined && preload !== "") {
    return preload.includes("jemalloc") ? { name: "jemalloc", library: preload, env: {} } : system;
  }
  const library = paths.find((p) => existsSync(p));
  if (library === undefined) {
    if (choice === "jemalloc") throw new Error(`allocator: jemalloc is not installed (looked for ${paths.join(", ")}); install libjemalloc2, or give --allocator auto or system`);
    return system;
  }
  return { name: "jemalloc", library, env: { LD_PRELOAD: library, MALLOC_CONF: inherited["MALLOC_CONF"] ?? JEMALLOC_CONF } };
}
