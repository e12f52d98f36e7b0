/**
 * Restoring a KDC backup into an empty data directory.
 *
 * Restore reads the file twice: first to check it (magic, format, the footer's checksum and
 * count, every record decodes, the store's schema, and the master key when one is given) before
 * anything is written, then to import it (checksumming again, so a file changed in between is
 * caught; the half-written store is then removed). The checksum catches truncation and damage,
 * not a forger: the backup is as sensitive as the store and is kept as such (mode 0600).
 */
import { chmod, mkdir, readdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { pathExists } from "../../common/fs.js";
import { dataPaths, loadKdcMasterKey, openKdcStore } from "../init.js";
import { CREDENTIAL, KdcStore } from "../kdc-store.js";
import { createPkiAdapter } from "../pki-adapter.js";
import { checkBackup, checkMasterKey, checkMasterKeyId } from "./check.js";
import { wrappedKeyOf } from "../../storage/master-key.js";
import { BadBackup, DestinationRefused } from "./errors.js";
import { backupRecords, openBackup, type BackupHeader } from "./format.js";
import { progressMeter, type BackupIo } from "./progress.js";

/** What a restore did. */
export interface RestoreResult {
  dataDir: string;
  records: number;
  tables: Record<string, number>;
  header: BackupHeader;
  sha256: string;
  /** True when a master key was given (or found in the data dir) and opens the backup. */
  masterKeyChecked: boolean;
  /** When the key file given is wrapped in a PKCS#11 token: the key id it names, checked against the backup (the token opens it at start). */
  wrappedKeyId: string | undefined;
  /** The files written besides the store. */
  files: string[];
  /** True with `check`: nothing was written. */
  checkOnly: boolean;
}

/** The data dir's entries, or undefined when it does not exist; refuses anything but a directory. */
async function entries(dir: string): Promise<string[] | undefined> {
  try {
    return await readdir(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return undefined;
    if (code === "ENOTDIR") throw new DestinationRefused(`data dir ${dir} is a file; restore into an empty or new directory`);
    throw err;
  }
}

/**
 * Restores a backup into `dataDir`, which must not exist, be empty, or hold only master.key.
 * Checks the whole file (and the master key, when one is given or the data dir holds one)
 * before anything is written; removes what it wrote when the import fails.
 */
export async function restoreKdc(opts: {
  dataDir: string;
  file: string;
  masterKey?: string | undefined;
  masterKeyFile?: string | undefined;
  check?: boolean;
  io?: BackupIo;
  /** Show progress on stderr also when it is not a terminal. */
  progress?: boolean;
}): Promise<RestoreResult> {
  const checked = await checkBackup(opts.file);
  const before = opts.check === true ? undefined : await entries(opts.dataDir);
  const masterKeyFileInDir = join(opts.dataDir, "master.key");
  if (before !== undefined) {
    const others = before.filter((e) => e !== "master.key");
    if (others.length > 0) {
      throw new DestinationRefused(
        `data dir ${opts.dataDir} is not empty (it holds ${others.slice(0, 3).join(", ")}${others.length > 3 ? ", …" : ""}); restore into an empty or new directory, never over a store`,
      );
    }
  }
  const keyGiven = (opts.masterKey ?? "") !== "" || opts.masterKeyFile !== undefined || (await pathExists(masterKeyFileInDir));
  const wrappedKeyId = keyGiven ? await checkGivenKey(opts, masterKeyFileInDir, checked) : undefined;
  const result: RestoreResult = {
    dataDir: opts.dataDir,
    records: checked.records,
    tables: checked.tables,
    header: checked.header,
    sha256: checked.sha256,
    masterKeyChecked: keyGiven,
    wrappedKeyId,
    files: [],
    checkOnly: opts.check === true,
  };
  if (opts.check === true) return result;

  // Why 0700: the data dir holds the store and, usually, the master key file.
  await mkdir(opts.dataDir, { recursive: true, mode: 0o700 });
  await chmod(opts.dataDir, 0o700);
  const paths = dataPaths(opts.dataDir);
  const written: string[] = [];
  let ok = false;
  try {
    written.push(paths.store);
    const store = await openKdcStore(opts.dataDir, true);
    try {
      const b = await openBackup(opts.file);
      if (b.sha256.toString("hex") !== checked.sha256) {
        await b.handle.close();
        throw new BadBackup(`backup file ${opts.file} changed while it was being restored; make sure nothing writes it, and restore again`);
      }
      const progress = progressMeter(opts.io, opts.progress === true, "kmi kdc restore", "records");
      try {
        let n = 0;
        const counted = async function* () {
          for await (const r of backupRecords(opts.file, b)) {
            progress.update(++n, checked.records);
            yield r;
          }
        };
        await store.importSnapshot(counted());
      } finally {
        await b.handle.close();
      }
      const kdc = new KdcStore(store);
      const meta = await kdc.getMeta();
      if (meta === undefined || meta.kdcId !== checked.header.kdc_id) {
        throw new BadBackup(`backup file ${opts.file}: the restored store's kdc id is not the header's; the file is not a whole KDC backup`);
      }
      const pki = createPkiAdapter();
      for (const [name, path] of [
        [CREDENTIAL.kmiRoot, paths.kmiRootPem],
        [CREDENTIAL.infraCa, paths.infraCaPem],
      ] as const) {
        const c = await kdc.getCredential(name);
        if (c === undefined) throw new BadBackup(`backup file ${opts.file} holds no ${name} credential; it is not a whole KDC backup`);
        written.push(path);
        await writeFile(path, pki.certificatePem(c.certificateDer), { mode: 0o600, flag: "wx" });
        result.files.push(path);
      }
      progress.finish(`${checked.records} records restored into ${opts.dataDir}`);
    } finally {
      await store.close();
    }
    ok = true;
    return result;
  } finally {
    // A failed restore leaves the data dir as it found it: what it wrote is removed.
    if (!ok) {
      for (const p of written) await rm(p, { recursive: true, force: true }).catch(() => {});
      if (before === undefined) await rm(opts.dataDir, { recursive: true, force: true }).catch(() => {});
    }
  }
}

/** The master key given (value or file) against the backup: opened, or by id for a key file wrapped in a token (then that id). */
async function checkGivenKey(opts: { dataDir: string; masterKey?: string | undefined; masterKeyFile?: string | undefined }, fileInDir: string, checked: Awaited<ReturnType<typeof checkBackup>>): Promise<string | undefined> {
  const file = (opts.masterKey ?? "") !== "" ? undefined : (opts.masterKeyFile ?? fileInDir);
  const wrapped = file !== undefined ? await wrappedKeyOf(file) : undefined;
  if (wrapped !== undefined) {
    checkMasterKeyId(wrapped.keyId, checked.rootCredential!, checked.tlsCredential);
    return wrapped.keyId;
  }
  const key = await loadKdcMasterKey(opts.dataDir, { masterKey: opts.masterKey, masterKeyFile: opts.masterKeyFile });
  try {
    checkMasterKey(key, checked.rootCredential!, checked.tlsCredential);
  } finally {
    key.fill(0);
  }
  return undefined;
}
