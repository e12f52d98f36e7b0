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
 * directories (sockets, devices) are an error, as is a path that appears twice.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { readdir, realpath, stat } from "node:fs/promises";
import { basename, join } from "node:path";
import { InvalidArgument } from "../common/errors.js";
import { sha256Hex } from "./encoding.js";
import { checkMeasurementName, MAX_MEASUREMENTS, type MeasurementValue } from "./measurement.js";

/** What to measure: measurement name → one path or several. */
export type MeasurementSources = Readonly<Record<string, string | readonly string[]>>;

/**
 * Measures files and directories: one measurement per name, sorted by name. Throws
 * InvalidArgument naming the measurement and path when a path cannot be read.
 */
export async function measureFiles(sources: MeasurementSources): Promise<MeasurementValue[]> {
  const names = Object.keys(sources).sort();
  if (names.length > MAX_MEASUREMENTS) throw new InvalidArgument(`measurements: ${names.length}, at most ${MAX_MEASUREMENTS}`);
  const out: MeasurementValue[] = [];
  for (const name of names) {
    checkMeasurementName(name, "measurement");
    const given = sources[name]!;
    const paths = typeof given === "string" ? [given] : [...given];
    if (paths.length === 0) throw new InvalidArgument(`measurement ${name}: no path given`);
    out.push({ name, sha256: await measurePaths(name, paths) });
  }
  return out;
}

/** The measurement of a value that is not a file, e.g. `software.version`: SHA-256 of its UTF-8 bytes. */
export function measureValue(name: string, value: string): MeasurementValue {
  checkMeasurementName(name, "measurement");
  return { name, sha256: sha256Hex(value) };
}

async function measurePaths(name: string, paths: string[]): Promise<string> {
  if (paths.length === 1) {
    const st = await statOrThrow(name, paths[0]!);
    if (st.isFile()) return hashFile(name, paths[0]!);
  }
  const lines = new Map<string, string>();
  for (const path of paths) {
    const st = await statOrThrow(name, path);
    const label = basename(path);
    if (st.isFile()) await addFile(name, lines, path, label);
    else if (st.isDirectory()) await walk(name, lines, path, label, new Set([await realpath(path)]));
    else throw new InvalidArgument(`measurement ${name}: ${path} is neither a regular file nor a directory`);
  }
  const sorted = [...lines.keys()].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  const hash = createHash("sha256");
  for (const p of sorted) hash.update(`${lines.get(p)!}  ${p}\n`);
  return hash.digest("hex");
}

async function walk(name: string, lines: Map<string, string>, dir: string, label: string, ancestors: Set<string>): Promise<void> {
  const entries = await readdir(dir);
  for (const entry of entries) {
    const path = join(dir, entry);
    const rel = `${label}/${entry}`;
    const st = await statOrThrow(name, path);
    if (st.isFile()) await addFile(name, lines, path, rel);
    else if (st.isDirectory()) {
      const real = await realpath(path);
      if (ancestors.has(real)) throw new InvalidArgument(`measurement ${name}: ${path} links back to a parent directory`);
      await walk(name, lines, path, rel, new Set([...ancestors, real]));
    } else throw new InvalidArgument(`measurement ${name}: ${path} is neither a regular file nor a directory`);
  }
}

async function addFile(name: string, lines: Map<string, string>, path: string, label: string): Promise<void> {
  if (lines.has(label)) throw new InvalidArgument(`measurement ${name}: ${label} appears twice; give paths with distinct names`);
  lines.set(label, await hashFile(name, path));
}

async function statOrThrow(name: string, path: string): ReturnType<typeof stat> {
  try {
    return await stat(path);
  } catch (err) {
    throw new InvalidArgument(`measurement ${name}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"})`);
  }
}

function hashFile(name: string, path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash("sha256");
    createReadStream(path)
      .on("data", (chunk) => hash.update(chunk))
      .on("error", (err: NodeJS.ErrnoException) => reject(new InvalidArgument(`measurement ${name}: cannot read ${path} (${err.code ?? "error"})`)))
      .on("end", () => resolve(hash.digest("hex")));
  });
}
