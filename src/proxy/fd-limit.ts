/**
 * What the open-file limit (RLIMIT_NOFILE) allows the proxy: each connection it holds is one
 * descriptor per side (an intercepted connection in use: the client's and the origin's; an idle
 * HTTP/2 one: the client's alone, see --origin-idle-timeout-ms), so the limit bounds the
 * connections a process can hold. Node raises the soft limit to the hard one as it starts (where
 * the kernel allows), so the hard limit (systemd's LimitNOFILE) is what an operator sets; the
 * proxy says at start what it got.
 */
import { readFileSync } from "node:fs";
import type { Logger } from "../common/logger.js";

/** The open-file limit; `Infinity` for "unlimited". */
export interface FdLimit {
  readonly soft: number;
  readonly hard: number;
}

/** Descriptors the process keeps for itself (listeners, the agent's socket, logs, ICAP, DNS). */
const RESERVED_FDS = 64;

/** Below this soft limit the start line is a warning (fewer than ~5,000 busy intercepted connections). */
export const LOW_FD_LIMIT = 10_000;

/** Parses the "Max open files" line of a /proc/<pid>/limits text; undefined when absent. */
export function parseFdLimit(limitsText: string): FdLimit | undefined {
  const m = /^Max open files\s+(\S+)\s+(\S+)/m.exec(limitsText);
  if (m === null) return undefined;
  const num = (s: string): number => (s === "unlimited" ? Infinity : Number(s));
  const soft = num(m[1]!);
  const hard = num(m[2]!);
  return Number.isNaN(soft) || Number.isNaN(hard) ? undefined : { soft, hard };
}

/** This process's open-file limit (/proc/self/limits); undefined where /proc is missing. */
export function readFdLimit(): FdLimit | undefined {
  try {
    return parseFdLimit(readFileSync("/proc/self/limits", "utf8"));
  } catch {
    return undefined;
  }
}

/** What the limit allows: the log line's fields, and whether it is low. */
export function describeFdLimit(limit: FdLimit): { fields: Record<string, number | string>; low: boolean } {
  const usable = Math.max(0, limit.soft - RESERVED_FDS);
  const text = (n: number): number | string => (Number.isFinite(n) ? n : "unlimited");
  return {
    fields: {
      soft: text(limit.soft),
      hard: text(limit.hard),
      busyConnections: text(Math.floor(usable / 2)),
      idleH2Connections: text(usable),
    },
    low: limit.soft < LOW_FD_LIMIT,
  };
}

/** Logs at start what the limit allows (a warning when it is low, or when the soft limit stayed below the hard one). */
export function logFdLimit(logger: Logger, limit: FdLimit | undefined = readFdLimit()): void {
  if (limit === undefined) return;
  const { fields, low } = describeFdLimit(limit);
  if (low) {
    logger.warn("open files limit is low: it caps the connections this process can hold; raise the hard limit (systemd LimitNOFILE=, see docs/proxy.md)", fields);
  } else if (limit.soft < limit.hard) {
    logger.warn("open files: the soft limit stayed below the hard limit (the kernel's fs.nr_open?)", fields);
  } else {
    logger.info("open files limit", fields);
  }
}
