/**
 * Measuring what a machine runs: SHA-256 digests of files and directories, as the agent
 * sends them in its evidence and as an operator computes them to approve (`kmi ctl group
 * approve-measurements --measure name=path`).
 *
 * The digest of one measurement, reproducible with coreutils:
 *   - one regular file: the SHA-256 of its bytes, i.e. `sha256sum FILE`;
 *   - anything else (a directory, or several paths): the SHA-256 of a manifest with one line
 *     `<sha256 hex>  <path>\n` per regular file, sorted by the path's UTF-8 bytes, where the
 *     path is the file's path below the given path's parent, '/'-separated. For one directory
 *     that is `(cd PARENT && find -L DIR -type f | LC_ALL=C sort | xargs sha256sum) | sha256sum`.
 * Symbolic links are followed (a link loop is an error); files other than regular files and
 * directories (sockets, devices) are an error, as is a path that appears twice or a path with
 * a line break (CR or LF) in it, which would make the manifest ambiguous.
 *
 * A directory named `node_modules` is measured as the dependencies of the package beside it
 * (see dependencies.ts): the manifest lists every regular file of every package in the closure
 * of that package's package.json, labelled `node_modules/<package>/<file>`; a package's own
 * nested `node_modules` is not walked as part of it (its packages come in as their own entries).
 * What a program never loads (dev tools, stray packages) does not count.
 *
 * A {@link FileDigestCache} lets a long-running measurer (the agent, at every attestation)
 * skip re-reading files whose device, inode, size, mtime and ctime are unchanged. The ctime
 * cannot be set back by a file's owner (only by changing the system clock), so an edit that
 * restores the mtime is still seen.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { readdir, realpath, stat } from "node:fs/promises";
import type { Stats } from "node:fs";
import { basename, dirname, join } from "node:path";
import { InvalidArgument } from "../common/errors.js";
import { dependencyClosure } from "./dependencies.js";
import { sha256Hex } from "./encoding.js";
import { checkMeasurementName, MAX_MEASUREMENTS, type MeasurementValue } from "./measurement.js";

/** What to measure: measurement name → one path or several. */
export type MeasurementSources = Readonly<Record<string, string | readonly string[]>>;

/**
 * File digests remembered by path, valid while the file's device, inode, size, mtime and ctime
 * stay the same. Memory only: a restarted measurer reads every file again.
 */
export class FileDigestCache {
  private readonly entries = new Map<string, { stamp: string; digest: string }>();

  /** The remembered digest of `path` if `st` still matches. */
  get(path: string, st: Stats): string | undefined {
    const e = this.entries.get(path);
    return e !== undefined && e.stamp === stamp(st) ? e.digest : undefined;
  }

  /** Remembers `digest` for `path` as of `st`. */
  set(path: string, st: Stats, digest: string): void {
    this.entries.set(path, { stamp: stamp(st), digest });
  }

  /** How many files are remembered. */
  get size(): number {
    return this.entries.size;
  }
}

const stamp = (st: Stats) => `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;

/** How to measure. */
export interface MeasureOptions {
  /** Skip re-reading unchanged files (see {@link FileDigestCache}). */
  readonly cache?: FileDigestCache;
}

/**
 * Measures files and directories: one measurement per name, sorted by name. Throws
 * InvalidArgument naming the measurement and path when a path cannot be read.
 */
export async function measureFiles(sources: MeasurementSources, opts: MeasureOptions = {}): Promise<MeasurementValue[]> {
  const names = Object.keys(sources).sort();
  if (names.length > MAX_MEASUREMENTS) throw new InvalidArgument(`measurements: ${names.length}, at most ${MAX_MEASUREMENTS}`);
  const out: MeasurementValue[] = [];
  for (const name of names) {
    checkMeasurementName(name, "measurement");
    const given = sources[name]!;
    const paths = typeof given === "string" ? [given] : [...given];
    if (paths.length === 0) throw new InvalidArgument(`measurement ${name}: no path given`);
    out.push({ name, sha256: await measurePaths({ name, cache: opts.cache }, paths) });
  }
  return out;
}

/** The measurement of a value that is not a file, e.g. `software.version`: SHA-256 of its UTF-8 bytes. */
export function measureValue(name: string, value: string): MeasurementValue {
  checkMeasurementName(name, "measurement");
  return { name, sha256: sha256Hex(value) };
}

/** The measurement being made, for error messages, and the cache it may use. */
interface Job {
  readonly name: string;
  readonly cache: FileDigestCache | undefined;
}

async function measurePaths(job: Job, paths: string[]): Promise<string> {
  if (paths.length === 1) {
    const st = await statOrThrow(job, paths[0]!);
    if (st.isFile()) return hashFile(job, paths[0]!, st);
  }
  const lines = new Map<string, string>();
  for (const path of paths) {
    const st = await statOrThrow(job, path);
    const label = basename(path);
    if (st.isFile()) await addFile(job, lines, path, label, st);
    else if (st.isDirectory() && label === "node_modules") await addDependencies(job, lines, path);
    else if (st.isDirectory()) await walk(job, lines, path, label, new Set([await realpath(path)]), false);
    else throw new InvalidArgument(`measurement ${job.name}: ${path} is neither a regular file nor a directory`);
  }
  const sorted = [...lines.keys()].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  const hash = createHash("sha256");
  for (const p of sorted) hash.update(`${lines.get(p)!}  ${p}\n`);
  return hash.digest("hex");
}

async function addDependencies(job: Job, lines: Map<string, string>, nodeModules: string): Promise<void> {
  for (const dep of await dependencyClosure(job.name, dirname(nodeModules))) {
    await walk(job, lines, dep.path, dep.label, new Set([await realpath(dep.path)]), true);
  }
}

async function walk(job: Job, lines: Map<string, string>, dir: string, label: string, ancestors: Set<string>, isPackage: boolean): Promise<void> {
  const entries = await readdir(dir);
  for (const entry of entries) {
    // A package's nested node_modules holds other packages, measured as their own entries.
    if (isPackage && entry === "node_modules") continue;
    const path = join(dir, entry);
    const rel = `${label}/${entry}`;
    const st = await statOrThrow(job, path);
    if (st.isFile()) await addFile(job, lines, path, rel, st);
    else if (st.isDirectory()) {
      const real = await realpath(path);
      if (ancestors.has(real)) throw new InvalidArgument(`measurement ${job.name}: ${path} links back to a parent directory`);
      await walk(job, lines, path, rel, new Set([...ancestors, real]), false);
    } else throw new InvalidArgument(`measurement ${job.name}: ${path} is neither a regular file nor a directory`);
  }
}

async function addFile(job: Job, lines: Map<string, string>, path: string, label: string, st: Stats): Promise<void> {
  // Why: the manifest is one line per file; a line break in a path (a file's or a folder's
  // name) would let a tree forge the lines of files it does not have, so that two different
  // trees give one measurement (coreutils escapes such names; no installed program has one).
  if (/[\n\r]/.test(label)) throw new InvalidArgument(`measurement ${job.name}: ${JSON.stringify(path)} has a line break in its path; rename it`);
  if (lines.has(label)) throw new InvalidArgument(`measurement ${job.name}: ${label} appears twice; give paths with distinct names`);
  lines.set(label, await hashFile(job, path, st));
}

async function statOrThrow(job: Job, path: string): Promise<Stats> {
  try {
    return await stat(path);
  } catch (err) {
    throw new InvalidArgument(`measurement ${job.name}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"})`);
  }
}

async function hashFile(job: Job, path: string, st: Stats): Promise<string> {
  const cached = job.cache?.get(path, st);
  if (cached !== undefined) return cached;
  const digest = await readDigest(job, path);
  job.cache?.set(path, st, digest);
  return digest;
}

function readDigest(job: Job, path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash("sha256");
    createReadStream(path)
      .on("data", (chunk) => hash.update(chunk))
      .on("error", (err: NodeJS.ErrnoException) => reject(new InvalidArgument(`measurement ${job.name}: cannot read ${path} (${err.code ?? "error"})`)))
      .on("end", () => resolve(hash.digest("hex")));
  });
}
