/**
 * File modes under the KDC's and the Auditserver's data dirs, through the real programs: every
 * file 0600 and every folder 0700 (LevelDB's own files included), a data dir that other users
 * can enter refused at start with the chmod to run, and a loose file inside a private data dir
 * tightened with a warning.
 */
import { execFile } from "node:child_process";
import { chmod, readdir, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KMI, cleanEnv, startMesh, type Mesh } from "./harness.js";

const run = promisify(execFile);
let mesh: Mesh;

beforeAll(async () => {
  mesh = await startMesh();
});
afterAll(async () => mesh?.close());

/** Every entry under `root` (recursively) with its permission bits, as octal text. */
async function modes(root: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const e of await readdir(root, { recursive: true, withFileTypes: true })) {
    const p = join(e.parentPath, e.name);
    out[p.slice(root.length + 1)] = ((await stat(p)).mode & 0o777).toString(8);
  }
  return out;
}

/** Runs `kmi <program> --data-dir D ...` expecting it to exit before serving. */
async function refusedStart(args: string[]): Promise<{ code: number; stderr: string }> {
  const r = await run(process.execPath, [KMI, ...args, "--listen", "127.0.0.1:0"], { env: cleanEnv(), encoding: "utf8", timeout: 30_000 }).then(
    (ok) => ({ code: 0, stderr: ok.stderr }),
    (err: { code?: number; stderr?: string }) => ({ code: err.code ?? -1, stderr: err.stderr ?? "" }),
  );
  return r;
}

describe("data dir modes", () => {
  it("after init and serving, every file under both data dirs is 0600 and every folder 0700", async () => {
    await mesh.stopAudit();
    await mesh.kdc.stop();
    for (const dir of [mesh.kdcDataDir, mesh.auditDataDir]) {
      expect((await stat(dir)).mode & 0o777).toBe(0o700);
      const m = await modes(dir);
      expect(Object.keys(m).filter((k) => /\.(ldb|log)$|^.*MANIFEST-|CURRENT/.test(k)).length, dir).toBeGreaterThan(2);
      const loose = Object.entries(m).filter(([, mode]) => mode !== "600" && mode !== "700");
      expect(loose, dir).toEqual([]);
    }
  });

  it.each([
    ["kdc", "0755", 0o755],
    ["audit", "0750", 0o750],
  ] as const)("kmi %s refuses a data dir other users can enter (%s), naming the chmod to run", async (program, _shown, mode) => {
    const dir = program === "kdc" ? mesh.kdcDataDir : mesh.auditDataDir;
    await chmod(dir, mode);
    try {
      const extra = program === "audit" ? ["--kdc", "https://127.0.0.1:1"] : [];
      const r = await refusedStart([program, "--data-dir", dir, ...extra]);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`data dir ${dir}: mode 0${mode.toString(8)} lets other users in, and it holds secrets; check who read it, then run: chmod 700 ${dir}`);
      expect((await stat(dir)).mode & 0o777).toBe(mode);
    } finally {
      await chmod(dir, 0o700);
    }
  });

  it("a loose file inside a private data dir is tightened to 0600, with a warning naming it", async () => {
    const stray = join(mesh.kdcDataDir, "store", "stray.txt");
    await writeFile(stray, "x");
    await chmod(stray, 0o644);
    await chmod(join(mesh.kdcDataDir, "store"), 0o755);
    const { startKdc } = await import("../kdc/harness.js");
    const kdc = await startKdc(mesh.kdcDataDir);
    try {
      expect((await stat(stray)).mode & 0o777).toBe(0o600);
      expect((await stat(join(mesh.kdcDataDir, "store"))).mode & 0o777).toBe(0o700);
      const warn = kdc.stderr().split("\n").find((l) => l.includes("tightened files under the data dir"));
      expect(warn).toBeDefined();
      expect(JSON.parse(warn!)).toMatchObject({ level: "warn", count: 2, files: expect.arrayContaining([`${stray} (was 0644, now 0600)`]) });
    } finally {
      await kdc.stop();
    }
  });
});
