/**
 * What /proc says about a process and its descendants (a proxy with workers is several
 * processes): CPU time (utime + stime of /proc/<pid>/stat, every thread), resident memory and
 * open file descriptors. Linux only; undefined where /proc is missing.
 */
import { execFileSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";

let ticksPerSecond: number | undefined;

/** Clock ticks per second of /proc/<pid>/stat's times (`getconf CLK_TCK`, 100 nearly everywhere). */
function clockTicks(): number {
  if (ticksPerSecond === undefined) {
    try {
      ticksPerSecond = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
    } catch {
      ticksPerSecond = 100;
    }
  }
  return ticksPerSecond;
}

/** The fields of /proc/<pid>/stat after the command name (field 3 onwards), or undefined. */
function statFields(pid: number): string[] | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command name (field 2) is in parentheses and may hold spaces: split after its end.
    return text.slice(text.lastIndexOf(")") + 2).split(" ");
  } catch {
    return undefined;
  }
}

/** `pid` and its living descendants. */
export function processTree(pid: number): number[] {
  const children = new Map<number, number[]>();
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return [pid];
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    const f = statFields(Number(e));
    if (f === undefined) continue;
    const ppid = Number(f[1]);
    children.set(ppid, [...(children.get(ppid) ?? []), Number(e)]);
  }
  const out: number[] = [];
  const walk = (p: number): void => {
    out.push(p);
    for (const c of children.get(p) ?? []) walk(c);
  };
  walk(pid);
  return out;
}

/** CPU seconds (user + system, every thread) used so far by `pid` and its living descendants; undefined without /proc. */
export function cpuSeconds(pid: number): number | undefined {
  let ticks = 0;
  let seen = false;
  for (const p of processTree(pid)) {
    const f = statFields(p);
    if (f === undefined) continue;
    // Fields 14 and 15 of the line (utime, stime): indexes 11 and 12 after the name.
    ticks += Number(f[11]) + Number(f[12]);
    seen = true;
  }
  return seen ? ticks / clockTicks() : undefined;
}

function statusKb(pid: number, field: string): number | undefined {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+)\\s+kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** Resident set of `pid` now (VmRSS), bytes. */
export function rssBytes(pid: number): number | undefined {
  return statusKb(pid, "VmRSS");
}

/** Open file descriptors of `pid` now. */
export function fdCount(pid: number): number | undefined {
  try {
    return readdirSync(`/proc/${pid}/fd`).length;
  } catch {
    return undefined;
  }
}
