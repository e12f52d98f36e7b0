import { lstat, mkdtemp, readFile, readdir, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { pathExists, writeFileAtomicSync } from "../../../src/common/fs.js";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-fs-"));
});
afterAll(() => rm(dir, { recursive: true, force: true }));

describe("writeFileAtomicSync", () => {
  it("replaces an existing world-readable file with a 0600 one holding the new bytes", async () => {
    const path = join(dir, "token");
    await writeFile(path, "old\n", { mode: 0o644 });
    writeFileAtomicSync(path, "secret\n", 0o600);
    expect(await readFile(path, "utf8")).toBe("secret\n");
    expect((await stat(path)).mode & 0o777).toBe(0o600);
  });

  it("replaces a symlink planted at the path instead of writing through it", async () => {
    const target = join(dir, "victim");
    await writeFile(target, "untouched\n", { mode: 0o644 });
    const path = join(dir, "link");
    await symlink(target, path);
    writeFileAtomicSync(path, "secret\n", 0o600);
    expect(await readFile(target, "utf8")).toBe("untouched\n");
    const st = await lstat(path);
    expect(st.isSymbolicLink()).toBe(false);
    expect(st.mode & 0o777).toBe(0o600);
    expect(await readFile(path, "utf8")).toBe("secret\n");
  });

  it("writes the exact mode asked for, and leaves no temp file behind", async () => {
    const path = join(dir, "cert.pem");
    writeFileAtomicSync(path, new Uint8Array([1, 2, 3]), 0o644);
    expect((await stat(path)).mode & 0o777).toBe(0o644);
    expect((await readdir(dir)).filter((n) => n.endsWith(".tmp"))).toEqual([]);
  });

  it("fails without leaving a temp file when the directory does not exist", async () => {
    expect(() => writeFileAtomicSync(join(dir, "missing", "f"), "x", 0o600)).toThrow(/ENOENT/);
    expect((await readdir(dir)).filter((n) => n.endsWith(".tmp"))).toEqual([]);
  });
});

describe("pathExists", () => {
  it("is true for a file, false for a missing path, and throws when it cannot tell", async () => {
    expect(await pathExists(join(dir, "token"))).toBe(true);
    expect(await pathExists(join(dir, "nope"))).toBe(false);
    await expect(pathExists(join(dir, "token", "below-a-file"))).rejects.toThrow(/ENOTDIR/);
  });
});
