/**
 * `kmi kdc backup` and `kmi kdc restore`: a consistent snapshot of a stopped KDC's store in one
 * file, and its restore into an empty data directory.
 *
 * The backup is the store as it is on disk, record by record, from ONE LevelDB snapshot
 * (`LevelStore.exportSnapshot`): every private key in it stays sealed under the master key, and
 * the master key is NOT in it. Keep the master key apart from the backups: the backup without it
 * opens nothing, and the backup with it is every key.
 *
 * Why a stopped KDC only: LevelDB lets one process open a store, and copying its files while the
 * KDC writes is not a consistent snapshot. A store locked by a running KDC is refused (exit 3)
 * with what to do instead: stop the KDC for the seconds a backup takes, or back up a filesystem
 * snapshot (LVM, ZFS, btrfs) of the whole data directory.
 */
import { createHash, randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { link, open, unlink, type FileHandle } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { toBinary } from "@bufbuild/protobuf";
import { FailedPrecondition } from "../../common/errors.js";
import { pathExists } from "../../common/fs.js";
import { VERSION } from "../../common/version.js";
import { StoreRecordSchema } from "../../gen/kmi/store/v1/store_pb.js";
import { dataPaths, openKdcStore } from "../init.js";
import { CREDENTIAL, KdcStore } from "../kdc-store.js";
import { DestinationRefused, StoreInUse } from "./errors.js";
import { BACKUP_FORMAT, BACKUP_MAGIC, FOOTER_BYTES, FOOTER_MAGIC, u32, type BackupHeader } from "./format.js";
import { formatBytes } from "../../common/progress-meter.js";
import { directorySize, progressMeter, type BackupIo } from "./progress.js";

/** True when `err` (or a cause of it) is LevelDB's "locked by another process". */
function isLocked(err: unknown): boolean {
  for (let e = err as { code?: unknown; cause?: unknown } | undefined, i = 0; e !== undefined && e !== null && i < 6; e = e.cause as typeof e, i++) {
    if (e.code === "LEVEL_LOCKED") return true;
  }
  return false;
}


async function syncDir(dir: string): Promise<void> {
  const h = await open(dir, constants.O_RDONLY).catch(() => undefined);
  if (h === undefined) return;
  await h.sync().catch(() => {});
  await h.close();
}

/** What a backup wrote. */
export interface BackupResult {
  file: string;
  bytes: number;
  sha256: string;
  records: number;
  tables: Record<string, number>;
  header: BackupHeader;
}

/** Opens a stopped KDC's store for reading; a running KDC's is refused with what to do. */
async function openForBackup(dir: string) {
  if (!(await pathExists(dataPaths(dir).store))) {
    throw new FailedPrecondition(`data dir ${dir} holds no KDC store; point --data-dir at the KDC's data directory (the one \`kmi kdc init\` made)`);
  }
  try {
    return await openKdcStore(dir, false);
  } catch (err) {
    if (isLocked(err)) {
      throw new StoreInUse(
        `data dir ${dir} is in use by a running KDC (LevelDB lets one process open it, and copying its files while it writes is not a consistent snapshot); ` +
          `stop the KDC (e.g. \`systemctl stop kmi-kdc\`), run the backup, start it again, or back up a filesystem snapshot (LVM, ZFS, btrfs) of the whole data dir`,
        { cause: err },
      );
    }
    throw err;
  }
}

/**
 * Writes a backup of the KDC store in `dir` to `out` (mode 0600; never overwrites: it is
 * written to a temporary file next to `out` and hard-linked into place).
 */
export async function backupKdc(opts: { dataDir: string; out: string; io?: BackupIo; now?: Date; progress?: boolean }): Promise<BackupResult> {
  const out = resolve(opts.out);
  if (await pathExists(out)) throw new DestinationRefused(`--out ${opts.out} exists already; a backup never overwrites one: choose a new name (e.g. with the date) or move the old one`);
  if (!(await pathExists(dirname(out)))) throw new DestinationRefused(`--out ${opts.out}: directory ${dirname(out)} does not exist; create it first`);
  const store = await openForBackup(opts.dataDir);
  const tmp = join(dirname(out), `.${basename(out)}.${randomBytes(6).toString("hex")}.tmp`);
  let handle: FileHandle | undefined;
  try {
    const kdc = new KdcStore(store);
    const meta = await kdc.getMeta();
    if (meta === undefined) throw new FailedPrecondition(`data dir ${opts.dataDir} holds no initialized KDC (an init did not finish); there is nothing to back up`);
    const root = await kdc.getCredential(CREDENTIAL.kmiRoot);
    const header: BackupHeader = {
      format: BACKUP_FORMAT,
      program: "kdc",
      kmi_version: VERSION,
      created_at: (opts.now ?? new Date()).toISOString(),
      kdc_id: meta.kdcId,
      schema_version: store.schemaVersion,
      master_key_id: root?.privateKey?.masterKeyId ?? "",
    };
    // Why O_EXCL and 0600: the file holds every sealed key and the token hashes; nobody else reads it, ever.
    handle = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
    await handle.chmod(0o600);
    const hash = createHash("sha256");
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    let bytes = 0;
    const write = async (b: Buffer, force = false) => {
      hash.update(b);
      pending.push(b);
      pendingBytes += b.length;
      if (pendingBytes >= 1 << 20 || force) {
        const chunk = Buffer.concat(pending);
        pending = [];
        pendingBytes = 0;
        await handle!.write(chunk, 0, chunk.length);
        bytes += chunk.length;
      }
    };
    const headerBytes = Buffer.from(JSON.stringify(header), "utf8");
    await write(BACKUP_MAGIC);
    await write(u32(headerBytes.length));
    await write(headerBytes);
    // The store's size on disk estimates the backup's (sealed keys do not compress).
    const progress = progressMeter(opts.io, opts.progress === true, "kmi kdc backup", "written (estimated from the store's size)", formatBytes);
    const estimate = await directorySize(dataPaths(opts.dataDir).store);
    const tables: Record<string, number> = {};
    let records = 0;
    for await (const r of store.exportSnapshot()) {
      const enc = Buffer.from(toBinary(StoreRecordSchema, r));
      await write(u32(enc.length));
      await write(enc);
      records++;
      tables[r.table] = (tables[r.table] ?? 0) + 1;
      progress.update(bytes + pendingBytes, Math.max(estimate, bytes + pendingBytes + 1));
    }
    await write(Buffer.alloc(0), true);
    const sha256 = hash.digest();
    const footer = Buffer.alloc(FOOTER_BYTES);
    FOOTER_MAGIC.copy(footer, 0);
    footer.writeBigUInt64BE(BigInt(records), 8);
    sha256.copy(footer, 16);
    await handle.write(footer, 0, footer.length);
    bytes += footer.length;
    await handle.sync();
    await handle.close();
    handle = undefined;
    try {
      await link(tmp, out);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "EEXIST") throw new DestinationRefused(`--out ${opts.out} appeared while the backup ran; it was left alone`);
      throw err;
    }
    await syncDir(dirname(out));
    progress.finish(`${records} records written to ${opts.out}`);
    return { file: out, bytes, sha256: sha256.toString("hex"), records, tables, header };
  } finally {
    await handle?.close().catch(() => {});
    await unlink(tmp).catch(() => {});
    await store.close();
  }
}
