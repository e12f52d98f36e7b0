/**
 * `<run>/up.json`: which `kmi up` runs on this data directory, and the pid, address and log of
 * each part. Written atomically (temporary file, rename) on every change and removed on a clean
 * exit. It is how `kmi up status` finds the mesh, how a second `kmi up` refuses to start
 * beside a running one, and how a `kmi up` that was killed (SIGKILL: no chance to stop its
 * parts) has its leftover parts stopped by the next one.
 */
import { readFileSync, readlinkSync } from "node:fs";
import { resolve } from "node:path";
import { readFile, rename, rm, writeFile } from "node:fs/promises";
import { programOf, type PartId } from "./layout.js";

/** One part in the run-state file. */
export interface RunStatePart {
  readonly pid: number | null;
  readonly state: string;
  readonly restarts: number;
  readonly log: string;
  readonly version?: string;
}

/** The run-state file's content. */
export interface RunState {
  /** Pid of `kmi up`. */
  readonly pid: number;
  /** The kmi script `kmi up` runs its parts with (to recognize them among processes). */
  readonly kmi_script: string;
  readonly version: string;
  readonly started_at: string;
  readonly ready: boolean;
  readonly data_dir: string;
  readonly run_dir: string;
  readonly tenant: string;
  readonly urls: { readonly kdc: string; readonly audit: string; readonly proxy: string };
  /** With `--ha`: every replica's URL (the first is `urls.kdc` / `urls.audit`) and the etcd members. */
  readonly ha?: RunStateHa;
  readonly parts: Partial<Record<PartId, RunStatePart>>;
}

/** What `kmi up --ha` adds to the run-state file. */
export interface RunStateHa {
  /** URLs of the KDC replicas, replica 1 first. */
  readonly kdc: readonly string[];
  /** URLs of the Auditserver replicas, replica 1 first. */
  readonly audit: readonly string[];
  /** The etcd members: name (= part id) and client URL. */
  readonly etcd: readonly { readonly name: string; readonly url: string }[];
}

/** Writes the file atomically, mode 0600. */
export async function writeRunState(path: string, state: RunState): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, JSON.stringify(state, null, 2) + "\n", { mode: 0o600 });
  await rename(tmp, path);
}

/** Reads the file; undefined when absent or unreadable. */
export async function readRunState(path: string): Promise<RunState | undefined> {
  try {
    return JSON.parse(await readFile(path, "utf8")) as RunState;
  } catch {
    return undefined;
  }
}

/** Removes the file. */
export async function removeRunState(path: string): Promise<void> {
  await rm(path, { force: true });
}

/** True when a process with this pid exists. */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * The command line of a process (Linux /proc), or undefined. Used so that a pid recorded by an
 * earlier run is acted on only if it is still that program (pids are reused).
 */
export function commandLine(pid: number): string[] | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter((s) => s !== "");
  } catch {
    return undefined;
  }
}

/** True when `pid` runs etcd member `name` (its `--name` argument) with `etcd` as the program. */
export function isEtcdMember(pid: number, name: string): boolean {
  const argv = commandLine(pid);
  if (argv === undefined || !/(^|\/)etcd$/.test(argv[0] ?? "")) return false;
  const i = argv.indexOf("--name");
  return i >= 0 && argv[i + 1] === name;
}

/** True when `pid` still runs part `id` of the `kmi up` that recorded it (pids are reused). */
export function isPartProcess(pid: number, kmiScript: string, id: PartId): boolean {
  const program = programOf(id);
  return program === "etcd" ? isEtcdMember(pid, id) : isKmiProcess(pid, kmiScript, program);
}

/** True when `pid` runs `<kmiScript> <program>` (a part, or `up` itself). */
export function isKmiProcess(pid: number, kmiScript: string, program: string): boolean {
  const argv = commandLine(pid);
  if (argv === undefined) return false;
  // npm starts `node dist/cmd/kmi.js up`: a path relative to the process's own directory.
  let cwd: string | undefined;
  try {
    cwd = readlinkSync(`/proc/${pid}/cwd`);
  } catch {
    cwd = undefined;
  }
  for (let i = 0; i < argv.length - 1; i++) {
    const a = argv[i]!;
    const same = a === kmiScript || (cwd !== undefined && resolve(cwd, a) === kmiScript);
    if (same && argv[i + 1] === program) return true;
  }
  return false;
}
