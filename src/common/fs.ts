/** Small file-system helpers shared by the programs. */
import { randomBytes } from "node:crypto";
import { closeSync, fchmodSync, fsyncSync, openSync, renameSync, unlinkSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { stat } from "node:fs/promises";

/**
 * True when `path` exists (following symlinks), false when it does not (ENOENT). Any other
 * error (EACCES, ENOTDIR, ...) is thrown: "cannot tell" must not read as "absent", or an init
 * could overwrite what it merely could not see.
 */
export async function pathExists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") return false;
      throw err;
    },
  );
}

/**
 * Writes `data` to `path` with `mode` set before any byte is written: a fresh temp file in the
 * same directory (created exclusively, so never another's file and never through a symlink),
 * fsynced, then renamed over `path`. Why: `writeFile(path, secret, { mode })` keeps an existing
 * file's wider mode while the secret is in it, and follows a symlink planted at `path`; a
 * rename replaces the link itself.
 */
export function writeFileAtomicSync(path: string, data: string | Uint8Array, mode: number): void {
  const tmp = join(dirname(path), `.${basename(path)}.${randomBytes(6).toString("hex")}.tmp`);
  const fd = openSync(tmp, "wx", mode);
  try {
    fchmodSync(fd, mode); // the umask may have narrowed it; make it exactly `mode`
    const bytes = typeof data === "string" ? Buffer.from(data) : data;
    let off = 0;
    while (off < bytes.length) off += writeSync(fd, bytes, off, bytes.length - off);
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    unlinkSync(tmp);
    throw err;
  }
  closeSync(fd);
  try {
    renameSync(tmp, path);
  } catch (err) {
    unlinkSync(tmp);
    throw err;
  }
}
