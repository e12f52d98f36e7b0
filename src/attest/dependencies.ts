/**
 * The packages a program can load from a `node_modules` tree: the closure of its package.json's
 * `dependencies`, `optionalDependencies` and `peerDependencies`, each name resolved the way
 * Node resolves a bare import (`node_modules/<name>` in the requiring package's directory,
 * then in each parent directory). Development tools (typescript, vitest, buf…) that the
 * program never loads are left out: measuring them would cost seconds for nothing.
 */
import { readFile, realpath, stat } from "node:fs/promises";
import { dirname, join, relative, sep } from "node:path";
import { InvalidArgument } from "../common/errors.js";

/** One package of the closure: its directory, and its path relative to the program's directory. */
export interface DependencyDir {
  /** Absolute path of the package's directory. */
  readonly path: string;
  /** '/'-separated path below the program's directory, e.g. `node_modules/@grpc/grpc-js`. */
  readonly label: string;
}

interface Manifest {
  dependencies?: Record<string, string>;
  optionalDependencies?: Record<string, string>;
  peerDependencies?: Record<string, string>;
  peerDependenciesMeta?: Record<string, { optional?: boolean }>;
}

/**
 * The package directories reachable from `programDir`'s package.json, sorted by label.
 * Throws InvalidArgument (naming `what`) when package.json is missing or unreadable, or a
 * required dependency cannot be found.
 */
export async function dependencyClosure(what: string, programDir: string): Promise<DependencyDir[]> {
  const found = new Map<string, DependencyDir>();
  const queue = [programDir];
  while (queue.length > 0) {
    const dir = queue.shift()!;
    const manifest = await readManifest(what, dir);
    for (const [name, optional] of wanted(manifest)) {
      const pkg = await resolvePackage(dir, name);
      if (pkg === undefined) {
        if (optional) continue;
        throw new InvalidArgument(`measurement ${what}: dependency ${name} of ${join(dir, "package.json")} is not installed; run npm ci`);
      }
      const real = await realpath(pkg);
      if (found.has(real)) continue;
      found.set(real, { path: pkg, label: relative(programDir, pkg).split(sep).join("/") });
      queue.push(pkg);
    }
  }
  return [...found.values()].sort((a, b) => Buffer.compare(Buffer.from(a.label), Buffer.from(b.label)));
}

function wanted(m: Manifest): [string, boolean][] {
  const out = new Map<string, boolean>();
  for (const name of Object.keys(m.peerDependencies ?? {})) out.set(name, m.peerDependenciesMeta?.[name]?.optional === true);
  for (const name of Object.keys(m.optionalDependencies ?? {})) out.set(name, true);
  for (const name of Object.keys(m.dependencies ?? {})) if (!out.has(name)) out.set(name, false);
  return [...out];
}

async function readManifest(what: string, dir: string): Promise<Manifest> {
  const file = join(dir, "package.json");
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (err) {
    throw new InvalidArgument(`measurement ${what}: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? "error"}); a node_modules tree is measured as the dependencies of the package beside it`);
  }
  try {
    return JSON.parse(text) as Manifest;
  } catch {
    throw new InvalidArgument(`measurement ${what}: ${file} is not JSON`);
  }
}

/** Node's lookup of a bare package name from a package directory: nearest node_modules upwards. */
async function resolvePackage(fromDir: string, name: string): Promise<string | undefined> {
  for (let dir = fromDir; ; dir = dirname(dir)) {
    const candidate = join(dir, "node_modules", name);
    const st = await stat(candidate).catch(() => undefined);
    if (st?.isDirectory()) return candidate;
    if (dirname(dir) === dir) return undefined;
  }
}

/**
 * The `node_modules` directory a program installed at `codeDir` loads its packages from: the
 * one beside the nearest package.json at or above `codeDir` (dist/ has none; the package root
 * above it does). Undefined when there is no package.json above, or no node_modules beside it
 * (a bundled install loads nothing from there).
 */
export async function dependenciesDirOf(codeDir: string): Promise<string | undefined> {
  for (let dir = codeDir; ; dir = dirname(dir)) {
    const st = await stat(join(dir, "package.json")).catch(() => undefined);
    if (st?.isFile()) return (await stat(join(dir, "node_modules")).catch(() => undefined))?.isDirectory() ? join(dir, "node_modules") : undefined;
    if (dirname(dir) === dir) return undefined;
  }
}
