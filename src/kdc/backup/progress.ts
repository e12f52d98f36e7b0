/** Where the backup commands write, and their progress lines. */
import { readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { ProgressMeter, progressWanted } from "../../common/progress-meter.js";

/** Where the commands write: results on stdout, progress on stderr. */
export interface BackupIo {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown; isTTY?: boolean };
}

/**
 * Progress of a backup or restore on stderr (src/common/progress-meter.ts): with an estimate, on
 * a terminal or with --progress; the closing line always (never for scripts: no io with --json).
 */
export function progressMeter(io: BackupIo | undefined, asked: boolean, label: string, unit: string, format?: (n: number) => string): ProgressMeter {
  return new ProgressMeter({ out: io?.stderr ?? { write: () => undefined }, label, unit, enabled: io !== undefined && progressWanted(io.stderr, asked), ...(format ? { format } : {}) });
}

/** The bytes of the files in `dir` (a LevelDB store is one flat folder); 0 when it cannot be read. */
export async function directorySize(dir: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(dir).catch(() => [] as string[])) total += (await stat(join(dir, name)).catch(() => undefined))?.size ?? 0;
  return total;
}
