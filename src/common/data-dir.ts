/**
 * The modes of a program's data folder: the process umask that makes every new file private,
 * and the check each server runs on its data folder at start.
 */
import { chmod, lstat, readdir } from "node:fs/promises";
import { join } from "node:path";
import { FailedPrecondition } from "./errors.js";

/**
 * Sets the process umask to 077, so every file and folder this process creates from now on is
 * at most 0600 / 0700. Why a umask and not a chmod after opening the store: LevelDB (native
 * code, its own threads) keeps creating files for the store's whole life — a new table file
 * on every compaction, a new log and MANIFEST on every open — so a chmod at open would leave
 * each later one 0644; the umask covers them all, and everything else the program writes.
 * Files meant for other users (a socket, its folder) are chmod'ed to their mode explicitly.
 * Returns the previous umask.
 */
export function usePrivateUmask(): number {
  return process.umask(0o077);
}

/** Most entries the start check looks at (a LevelDB store holds a few hundred files at most). */
const MAX_ENTRIES = 100_000;

function octal(mode: number): string {
  return (mode & 0o777).toString(8).padStart(4, "0");
}

/**
 * Checks a data folder at start. The rule:
 *
 * - the folder itself must be a folder (not a symlink) owned by this process's user, with no
 *   group or other permission bits; otherwise FailedPrecondition with the command to run.
 *   Why refuse instead of fixing: while it was open, other users may have read the secrets in
 *   it; the operator must find out why it was open and whether to rotate.
 * - anything inside with group or other bits (e.g. LevelDB files that kmi versions before
 *   the private umask created 0644) is tightened to 0600 (files) or 0700 (folders) and
 *   returned, for the caller to log a warning. Why fix these: inside a 0700 folder no other
 *   user could ever reach them. Symlinks are neither followed nor changed.
 *
 * A folder that does not exist is left to the caller ("not initialized"): returns [].
 */
export async function checkDataDirModes(path: string, what = "data dir"): Promise<string[]> {
  let st;
  try {
    st = await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
  if (!st.isDirectory()) throw new FailedPrecondition(`${what} ${path}: not a folder (a symlink or a file); give the real folder`);
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw new FailedPrecondition(`${what} ${path}: owned by uid ${st.uid}, not by this process's user (uid ${uid}); run kmi as the folder's owner`);
  }
  if ((st.mode & 0o077) !== 0) {
    throw new FailedPrecondition(
      `${what} ${path}: mode ${octal(st.mode)} lets other users in, and it holds secrets; check who read it, then run: chmod 700 ${path}`,
    );
  }
  const fixed: string[] = [];
  let seen = 0;
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      if (++seen > MAX_ENTRIES) return;
      const p = join(dir, entry.name);
      if (entry.isSymbolicLink()) continue;
      const s = await lstat(p);
      if (entry.isDirectory()) {
        if ((s.mode & 0o077) !== 0) {
          await chmod(p, 0o700);
          fixed.push(`${p} (was ${octal(s.mode)}, now 0700)`);
        }
        await walk(p);
      } else if (entry.isFile() && (s.mode & 0o077) !== 0) {
        await chmod(p, 0o600);
        fixed.push(`${p} (was ${octal(s.mode)}, now 0600)`);
      }
    }
  };
  await walk(path);
  return fixed;
}
