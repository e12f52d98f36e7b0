import { chmodSync, mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Level } from "level";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FailedPrecondition } from "../../../src/common/errors.js";
import { checkDataDirModes, usePrivateUmask } from "../../../src/common/data-dir.js";

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "kmi-datadir-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function folder(name: string, mode: number): string {
  const p = join(dir, name);
  mkdirSync(p);
  chmodSync(p, mode);
  return p;
}

async function modesUnder(root: string): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const e of await readdir(root, { recursive: true, withFileTypes: true })) {
    const p = join(e.parentPath, e.name);
    out.set(p.slice(root.length + 1), (await stat(p)).mode & 0o777);
  }
  return out;
}

describe("checkDataDirModes", () => {
  it.each([
    ["world-readable", 0o755],
    ["group-readable", 0o750],
    ["world-writable", 0o777],
    ["group-writable", 0o730],
  ])("refuses a %s folder (%o) with the chmod to run, and changes nothing", async (name, mode) => {
    const p = folder(`loose-${name}`, mode);
    writeFileSync(join(p, "master.key"), "k", { mode: 0o644 });
    chmodSync(join(p, "master.key"), 0o644);
    const err = await checkDataDirModes(p).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FailedPrecondition);
    expect((err as Error).message).toBe(
      `data dir ${p}: mode 0${mode.toString(8)} lets other users in, and it holds secrets; check who read it, then run: chmod 700 ${p}`,
    );
    expect(statSync(p).mode & 0o777).toBe(mode);
    expect(statSync(join(p, "master.key")).mode & 0o777).toBe(0o644);
  });

  it("refuses a symlink in place of the folder and a file", async () => {
    const real = folder("real", 0o700);
    symlinkSync(real, join(dir, "link"));
    await expect(checkDataDirModes(join(dir, "link"))).rejects.toThrow(/not a folder \(a symlink or a file\)/);
    writeFileSync(join(dir, "plain"), "x");
    await expect(checkDataDirModes(join(dir, "plain"))).rejects.toThrow(/not a folder/);
  });

  it("tightens loose files and folders inside a private folder, names each, and leaves symlinks and tight files alone", async () => {
    const p = folder("tighten", 0o700);
    const store = join(p, "store");
    mkdirSync(store);
    chmodSync(store, 0o755);
    writeFileSync(join(store, "000005.ldb"), "x");
    chmodSync(join(store, "000005.ldb"), 0o644);
    writeFileSync(join(p, "ok.key"), "x", { mode: 0o600 });
    writeFileSync(join(dir, "outside"), "x");
    chmodSync(join(dir, "outside"), 0o644);
    symlinkSync(join(dir, "outside"), join(p, "link"));
    const fixed = await checkDataDirModes(p);
    expect(fixed.sort()).toEqual([`${store} (was 0755, now 0700)`, `${join(store, "000005.ldb")} (was 0644, now 0600)`]);
    expect(Object.fromEntries(await modesUnder(p))).toEqual({ store: 0o700, "store/000005.ldb": 0o600, "ok.key": 0o600, link: 0o644 });
    expect(statSync(join(dir, "outside")).mode & 0o777).toBe(0o644); // not followed
    expect(await checkDataDirModes(p)).toEqual([]);
  });

  it("returns nothing for a folder that does not exist (the caller says how to init it)", async () => {
    expect(await checkDataDirModes(join(dir, "absent"))).toEqual([]);
  });
});

describe("usePrivateUmask", () => {
  it("makes every file LevelDB creates 0600 and its folders 0700, through reopen and compaction (0644 under umask 022)", async () => {
    const run = async (name: string): Promise<Map<string, number>> => {
      const path = join(dir, name);
      for (let round = 0; round < 2; round++) {
        const db = new Level<string, string>(path);
        await db.open();
        for (let i = 0; i < 200; i++) await db.put(`k${round}-${i}`, "v".repeat(2000));
        // classic-level (what `level` is on Node) has compactRange; level's own types leave it out.
        await (db as unknown as { compactRange(start: string, end: string): Promise<void> }).compactRange("k", "l");
        await db.close();
      }
      return modesUnder(path);
    };
    const previous = process.umask(0o022);
    try {
      const loose = await run("umask-022");
      expect([...loose.values()]).toContain(0o644); // what LevelDB does on its own
      usePrivateUmask();
      const tight = await run("umask-077");
      expect(tight.size).toBeGreaterThan(3);
      for (const [file, mode] of tight) expect([file, mode]).toEqual([file, 0o600]);
    } finally {
      process.umask(previous);
    }
  });
});
