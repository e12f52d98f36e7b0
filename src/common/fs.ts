/** Small file-system helpers shared by the programs. */
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
