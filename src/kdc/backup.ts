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
 *
 * File format (version 1), all integers big-endian:
 *
 * | part    | bytes                       | what |
 * |---------|-----------------------------|------|
 * | magic   | 8                           | `KMIBKUP\n` |
 * | header  | u32 length + UTF-8 JSON     | `{"format":1,"program":"kdc","kmi_version","created_at","kdc_id","schema_version","master_key_id"}` |
 * | records | (u32 length + bytes) each   | `kmi.store.v1.StoreRecord`, the store's `_meta` record first |
 * | footer  | 48                          | `KMIEND\n\0`, u64 record count, SHA-256 of every byte before the footer |
 *
 * Restore reads the file twice: first to check it (magic, format, the footer's checksum and
 * count, every record decodes, the store's schema, and the master key when one is given) before
 * anything is written, then to import it (checksumming again, so a file changed in between is
 * caught; the half-written store is then removed). The checksum catches truncation and damage,
 * not a forger: the backup is as sensitive as the store and is kept as such (mode 0600).
 */
import { createHash, randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { chmod, link, mkdir, open, readdir, rm, unlink, writeFile, type FileHandle } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { ConfigError, defineProgram, formatHelp, loadConfig } from "../common/config.js";
import { AlreadyExists, FailedPrecondition, InvalidArgument, isKmiError } from "../common/errors.js";
import { VERSION } from "../common/version.js";
import { CredentialRecordSchema } from "../gen/kmi/store/v1/kdc_pb.js";
import { StoreInfoSchema, StoreRecordSchema, type StoreRecord } from "../gen/kmi/store/v1/store_pb.js";
import { META_TABLE, STORE_INFO_KEY } from "../storage/level-store.js";
import { dataPaths, loadKdcMasterKey, openKdcStore } from "./init.js";
import { CREDENTIAL, credentialAad, KDC_SCHEMA_VERSION, KdcStore, T } from "./kdc-store.js";
import { createPkiAdapter } from "./pki-adapter.js";
import { createSealer } from "./sealer.js";
import { pathExists } from "../common/fs.js";

/** The first 8 bytes of every backup file. */
export const BACKUP_MAGIC = Buffer.from("KMIBKUP\n", "latin1");
/** The first 8 bytes of the footer. */
export const FOOTER_MAGIC = Buffer.from("KMIEND\n\0", "latin1");
/** The backup file format this kmi writes and the newest it reads. */
export const BACKUP_FORMAT = 1;
/** Footer size: magic, u64 record count, SHA-256. */
export const FOOTER_BYTES = 8 + 8 + 32;
/** Largest header accepted. */
const MAX_HEADER_BYTES = 64 * 1024;
/** Largest record accepted (a store value is a few KB; the audit log's entries too). */
const MAX_RECORD_BYTES = 64 * 1024 * 1024;

/** Exit codes of `kmi kdc backup` and `kmi kdc restore`, in their `--help`. */
export const BackupExit = {
  ok: 0,
  /** Anything else (I/O, a data dir that is not an initialized KDC). */
  failure: 1,
  /** A flag is wrong or missing. */
  usage: 2,
  /** backup: the store is locked by a running KDC. */
  storeInUse: 3,
  /** restore: the backup file is refused (truncated, edited, damaged, a newer format, not a KDC backup). */
  badBackup: 4,
  /** The destination is refused (backup: --out exists; restore: the data dir is not empty), or the master key does not open the backup. */
  refused: 5,
} as const;

const EXIT_HELP = [
  "exit codes:",
  "  0  ok",
  "  1  anything else (I/O error, the data dir is not an initialized KDC)",
  "  2  usage: a flag is wrong or missing",
  "  3  backup: the store is in use by a running KDC (stop it first)",
  "  4  restore: the backup file is refused (truncated, edited, damaged, a newer format, not a KDC backup)",
  "  5  the destination is refused (--out exists; the data dir is not empty), or the master key does not open the backup",
].join("\n");

/** The data dir is locked by another process (a running KDC). */
export class StoreInUse extends FailedPrecondition {}
/** The backup file is not one restore accepts. */
export class BadBackup extends InvalidArgument {}
/** The destination (the --out file, the restore data dir) or the given master key is refused. */
export class DestinationRefused extends FailedPrecondition {}

/** The backup's header. */
export interface BackupHeader {
  format: number;
  program: string;
  kmi_version: string;
  created_at: string;
  kdc_id: string;
  schema_version: number;
  /** Id of the master key the store's keys are sealed under (a hash prefix, not the key). */
  master_key_id: string;
}

// ── flags ───────────────────────────────────────────────────────────────────────────────────

const dataDir = { type: "string", description: "the KDC's data directory", default: "data/kdc", valueName: "dir" } as const;
const json = { type: "boolean", description: "print the result as one JSON document on stdout (no progress lines)", noEnv: true } as const;

/** `kmi kdc backup`. */
export const backupProgram = defineProgram({
  program: "kdc",
  usage: "kmi kdc backup --data-dir DIR --out FILE [--json]",
  summary:
    "Writes a consistent snapshot of a STOPPED KDC's whole store (tenants, versions, tokens, audit log, everything) to FILE, mode 0600, " +
    "with a checksum that restore verifies. Every private key in it stays sealed; the master key is NOT in the backup: keep the " +
    "master key separately (without it the backup opens nothing; with it, it is every key). A store in use by a running KDC is " +
    "refused (LevelDB allows one process): stop the KDC for the backup, or back up a filesystem snapshot of the data directory. " +
    "Progress goes to stderr. Refuses to overwrite FILE.\n\n" +
    EXIT_HELP,
  options: {
    dataDir,
    out: { type: "string", description: "the backup file to write (must not exist)", required: true, valueName: "file", noEnv: true },
    json,
  },
});

/** `kmi kdc restore`. */
export const restoreProgram = defineProgram({
  program: "kdc",
  usage: "kmi kdc restore --data-dir EMPTY_DIR --in FILE [--master-key-file F] [--check] [--json]",
  summary:
    "Restores a `kmi kdc backup` file into an empty (or new) data directory: checks the whole file first (format, checksum, every " +
    "record), then imports it and writes kmi-root.pem and infra-ca.pem. The backup holds no master key: start the restored KDC " +
    "with the master key the backed-up KDC used. Give it here too (--master-key-file, or KMI_KDC_MASTER_KEY) to check that it " +
    "opens the backup before anything is written. The data dir may hold only master.key. --check verifies the file (and the key) " +
    "and writes nothing.\n\n" +
    EXIT_HELP,
  options: {
    dataDir,
    in: { type: "string", description: "the backup file", required: true, valueName: "file", noEnv: true },
    masterKeyFile: { type: "string", description: "master key file to check against the backup (default <data-dir>/master.key when present)", valueName: "file" },
    masterKey: { type: "string", description: "master key as base64 to check against the backup (prefer the environment; KMI_MASTER_KEY works too)", secret: true, valueName: "base64" },
    check: { type: "boolean", description: "only check the backup file (and the master key when given); write nothing", noEnv: true },
    json,
  },
});

// ── writing ─────────────────────────────────────────────────────────────────────────────────

/** Where the commands write: results on stdout, progress on stderr. */
export interface BackupIo {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown };
}

/** Reports a count on stderr at most once a second (and not at all for scripts). */
class Progress {
  #last = Date.now();
  constructor(
    private readonly io: BackupIo | undefined,
    private readonly what: string,
  ) {}
  tick(n: number): void {
    if (this.io === undefined || n % 1000 !== 0 || Date.now() - this.#last < 1000) return;
    this.#last = Date.now();
    this.io.stderr.write(`${this.what}: ${n} records…\n`);
  }
  done(line: string): void {
    this.io?.stderr.write(`${this.what}: ${line}\n`);
  }
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

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
export async function backupKdc(opts: { dataDir: string; out: string; io?: BackupIo; now?: Date }): Promise<BackupResult> {
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
    const progress = new Progress(opts.io, "kmi kdc backup");
    const tables: Record<string, number> = {};
    let records = 0;
    for await (const r of store.exportSnapshot()) {
      const enc = Buffer.from(toBinary(StoreRecordSchema, r));
      await write(u32(enc.length));
      await write(enc);
      records++;
      tables[r.table] = (tables[r.table] ?? 0) + 1;
      progress.tick(records);
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
    progress.done(`${records} records written to ${opts.out}`);
    return { file: out, bytes, sha256: sha256.toString("hex"), records, tables, header };
  } finally {
    await handle?.close().catch(() => {});
    await unlink(tmp).catch(() => {});
    await store.close();
  }
}

// ── reading ─────────────────────────────────────────────────────────────────────────────────

/** Reads a file front to back in chunks, hashing what it hands out. */
class ChunkReader {
  #buf: Buffer = Buffer.alloc(0);
  #pos = 0;
  readonly hash = createHash("sha256");
  /** Bytes handed out so far. */
  offset = 0;

  constructor(
    private readonly handle: FileHandle,
    /** Where reading stops (the footer's offset). */
    private readonly end: number,
    private readonly file: string,
  ) {}

  async #fill(n: number): Promise<void> {
    while (this.#buf.length < n && this.#pos < this.end) {
      const chunk = Buffer.allocUnsafe(Math.min(1 << 20, this.end - this.#pos));
      const { bytesRead } = await this.handle.read(chunk, 0, chunk.length, this.#pos);
      if (bytesRead === 0) break;
      this.#pos += bytesRead;
      this.#buf = this.#buf.length === 0 ? chunk.subarray(0, bytesRead) : Buffer.concat([this.#buf, chunk.subarray(0, bytesRead)]);
    }
  }

  /** Exactly `n` bytes, or BadBackup naming `what`. */
  async take(n: number, what: string): Promise<Buffer> {
    await this.#fill(n);
    if (this.#buf.length < n) throw new BadBackup(`backup file ${this.file} is damaged: it ends inside ${what} (byte ${this.offset + this.#buf.length}); use another copy`);
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    this.hash.update(out);
    this.offset += n;
    return out;
  }

  /** True when every byte up to the footer was handed out. */
  get done(): boolean {
    return this.offset >= this.end;
  }
}

/** What checking a backup found. */
export interface BackupCheck {
  header: BackupHeader;
  records: number;
  tables: Record<string, number>;
  sha256: string;
  bytes: number;
  /** The store's KMI root credential as stored (sealed), for the master key check. */
  rootCredential: Uint8Array | undefined;
  /** The KDC's TLS credential (sealed): the master key check when the roots are in a PKCS#11 token. */
  tlsCredential: Uint8Array | undefined;
}

function parseHeader(file: string, raw: Buffer): BackupHeader {
  let h: unknown;
  try {
    h = JSON.parse(raw.toString("utf8"));
  } catch {
    throw new BadBackup(`backup file ${file} is damaged: its header is not JSON; use another copy`);
  }
  const o = h as Partial<BackupHeader> | null;
  if (o === null || typeof o !== "object" || typeof o.format !== "number" || !Number.isSafeInteger(o.format) || o.format < 1) {
    throw new BadBackup(`backup file ${file} is damaged: its header has no format version; use another copy`);
  }
  if (o.format > BACKUP_FORMAT) {
    const by = typeof o.kmi_version === "string" && o.kmi_version !== "" ? o.kmi_version : undefined;
    throw new BadBackup(
      `backup file ${file} is format ${o.format}${by !== undefined ? ` (written by kmi ${by})` : ""}, newer than format ${BACKUP_FORMAT} that this kmi (${VERSION}) reads; ` +
        `restore it with ${by !== undefined ? `kmi ${by} or newer` : "a newer kmi"}`,
    );
  }
  if (o.program !== "kdc") throw new BadBackup(`backup file ${file} is a backup of kmi ${String(o.program)}, not of a KDC; restore it with \`kmi ${String(o.program)}\``);
  return {
    format: o.format,
    program: "kdc",
    kmi_version: String(o.kmi_version ?? ""),
    created_at: String(o.created_at ?? ""),
    kdc_id: String(o.kdc_id ?? ""),
    schema_version: Number(o.schema_version ?? 0),
    master_key_id: String(o.master_key_id ?? ""),
  };
}

/** An opened backup file: its header, where its records end, and what the footer says. */
interface OpenedBackup {
  handle: FileHandle;
  header: BackupHeader;
  /** The reader, positioned at the first record. */
  reader: ChunkReader;
  records: number;
  sha256: Buffer;
  size: number;
}

/** Opens a backup and reads its magic, header and footer (the records are read by the caller). */
async function openBackup(file: string): Promise<OpenedBackup> {
  let handle: FileHandle;
  try {
    handle = await open(file, constants.O_RDONLY);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new BadBackup(`backup file ${file} does not exist; check --in`);
    throw new BadBackup(`backup file ${file} cannot be opened (${code ?? String(err)})`);
  }
  try {
    const size = (await handle.stat()).size;
    const head = new ChunkReader(handle, size, file);
    if (size < BACKUP_MAGIC.length || !(await head.take(BACKUP_MAGIC.length, "the magic")).equals(BACKUP_MAGIC)) {
      throw new BadBackup(`${file} is not a kmi backup (it does not start with KMIBKUP); give a file made by \`kmi kdc backup\``);
    }
    const headerLength = (await head.take(4, "the header length")).readUInt32BE();
    if (headerLength > MAX_HEADER_BYTES) throw new BadBackup(`backup file ${file} is damaged: header length ${headerLength} is over ${MAX_HEADER_BYTES}; use another copy`);
    // The format is checked before the footer: a newer format may lay out its end differently.
    const header = parseHeader(file, await head.take(headerLength, "the header"));
    const footerAt = size - FOOTER_BYTES;
    const footer = Buffer.alloc(FOOTER_BYTES);
    if (footerAt < head.offset || (await handle.read(footer, 0, FOOTER_BYTES, footerAt)).bytesRead !== FOOTER_BYTES || !footer.subarray(0, 8).equals(FOOTER_MAGIC)) {
      throw new BadBackup(`backup file ${file} is truncated: it does not end with the backup's end marker (${size} bytes); the copy is incomplete, copy it again or use another one`);
    }
    const records = footer.readBigUInt64BE(8);
    // The reader starts again from byte 0, so that the checksum covers magic and header too.
    const reader = new ChunkReader(handle, footerAt, file);
    await reader.take(head.offset, "the header");
    return { handle, header, reader, records: Number(records), sha256: footer.subarray(16), size };
  } catch (err) {
    await handle.close();
    throw err;
  }
}

/**
 * The records of an opened backup, each checked; at the end the record count and the
 * checksum are compared with the footer (BadBackup when they differ).
 */
async function* backupRecords(file: string, b: OpenedBackup): AsyncGenerator<StoreRecord> {
  let n = 0;
  while (!b.reader.done) {
    const len = (await b.reader.take(4, `the length of record ${n + 1}`)).readUInt32BE();
    if (len === 0 || len > MAX_RECORD_BYTES) throw new BadBackup(`backup file ${file} is damaged: record ${n + 1} has length ${len}; use another copy`);
    const raw = await b.reader.take(len, `record ${n + 1}`);
    let record: StoreRecord;
    try {
      record = fromBinary(StoreRecordSchema, raw);
    } catch {
      throw new BadBackup(`backup file ${file} is damaged: record ${n + 1} does not decode; use another copy`);
    }
    n++;
    yield record;
  }
  const sum = b.reader.hash.digest();
  if (!sum.equals(b.sha256)) {
    throw new BadBackup(
      `backup file ${file} does not match its checksum (SHA-256 ${sum.toString("hex").slice(0, 16)}…, the file says ${b.sha256.toString("hex").slice(0, 16)}…): it was edited or damaged after it was written; use another copy`,
    );
  }
  if (n !== b.records) throw new BadBackup(`backup file ${file} holds ${n} records but says ${b.records}; it is damaged, use another copy`);
}

/**
 * Checks a whole backup file without writing anything: magic, format, checksum, record count,
 * every record, and that it is a KDC store this kmi can restore.
 */
export async function checkBackup(file: string): Promise<BackupCheck> {
  const b = await openBackup(file);
  try {
    // The checksum first, over the raw bytes: an edit anywhere is reported as an edit.
    const hash = createHash("sha256");
    const chunk = Buffer.allocUnsafe(1 << 20);
    const end = b.size - FOOTER_BYTES;
    for (let pos = 0; pos < end; ) {
      const { bytesRead } = await b.handle.read(chunk, 0, Math.min(chunk.length, end - pos), pos);
      if (bytesRead === 0) break;
      hash.update(chunk.subarray(0, bytesRead));
      pos += bytesRead;
    }
    const sum = hash.digest();
    if (!sum.equals(b.sha256)) {
      throw new BadBackup(
        `backup file ${file} does not match its checksum (SHA-256 ${sum.toString("hex").slice(0, 16)}…, the file says ${b.sha256.toString("hex").slice(0, 16)}…): it was edited or damaged after it was written; use another copy`,
      );
    }
    const tables: Record<string, number> = {};
    let records = 0;
    let rootCredential: Uint8Array | undefined;
    let tlsCredential: Uint8Array | undefined;
    for await (const r of backupRecords(file, b)) {
      if (records === 0) checkStoreInfo(file, r);
      records++;
      tables[r.table] = (tables[r.table] ?? 0) + 1;
      if (r.table === T.credentials.name && r.key === CREDENTIAL.kmiRoot) rootCredential = r.value;
      if (r.table === T.credentials.name && r.key === CREDENTIAL.kdcTls) tlsCredential = r.value;
    }
    if (rootCredential === undefined) throw new BadBackup(`backup file ${file} holds no KMI root credential; it is not a backup of an initialized KDC`);
    return { header: b.header, records, tables, sha256: sum.toString("hex"), bytes: b.size, rootCredential, tlsCredential };
  } finally {
    await b.handle.close();
  }
}

function checkStoreInfo(file: string, r: StoreRecord): void {
  if (r.table !== META_TABLE || r.key !== STORE_INFO_KEY) throw new BadBackup(`backup file ${file} does not start with the store's meta record; it is not a kmi store export`);
  let info;
  try {
    info = fromBinary(StoreInfoSchema, r.value);
  } catch {
    throw new BadBackup(`backup file ${file}: the store's meta record does not decode; use another copy`);
  }
  if (info.owner !== "" && info.owner !== "kdc") throw new BadBackup(`backup file ${file} holds a kmi ${info.owner} store, not a KDC's`);
  if (info.schemaVersion > KDC_SCHEMA_VERSION) {
    throw new BadBackup(`backup file ${file} holds a store of schema v${info.schemaVersion}, newer than v${KDC_SCHEMA_VERSION} that this kmi knows; restore it with the newer kmi`);
  }
}

/** Checks that `key` opens the backup's sealed KMI root key (wipes what it unsealed). */
function checkMasterKey(key: Buffer, rootCredential: Uint8Array, tlsCredential: Uint8Array | undefined): void {
  // With the roots in a PKCS#11 token the root has no sealed key: the KDC TLS key's blob proves the master key.
  const sealedRoot = fromBinary(CredentialRecordSchema, rootCredential);
  const root = sealedRoot.privateKey === undefined && tlsCredential !== undefined ? fromBinary(CredentialRecordSchema, tlsCredential) : sealedRoot;
  const sealer = createSealer(key);
  try {
    sealer.open(root.privateKey!, credentialAad(root.name)).fill(0);
  } catch (err) {
    throw new DestinationRefused(
      `the master key given does not open this backup (its keys are sealed under master key ${root.privateKey?.masterKeyId || "?"}); give the master key the backed-up KDC used (--master-key-file or KMI_KDC_MASTER_KEY)`,
      { cause: err },
    );
  }
}

// ── restoring ───────────────────────────────────────────────────────────────────────────────

/** What a restore did. */
export interface RestoreResult {
  dataDir: string;
  records: number;
  tables: Record<string, number>;
  header: BackupHeader;
  sha256: string;
  /** True when a master key was given (or found in the data dir) and opens the backup. */
  masterKeyChecked: boolean;
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
  if (keyGiven) {
    const key = await loadKdcMasterKey(opts.dataDir, { masterKey: opts.masterKey, masterKeyFile: opts.masterKeyFile });
    try {
      checkMasterKey(key, checked.rootCredential!, checked.tlsCredential);
    } finally {
      key.fill(0);
    }
  }
  const result: RestoreResult = {
    dataDir: opts.dataDir,
    records: checked.records,
    tables: checked.tables,
    header: checked.header,
    sha256: checked.sha256,
    masterKeyChecked: keyGiven,
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
      const progress = new Progress(opts.io, "kmi kdc restore");
      try {
        let n = 0;
        const counted = async function* () {
          for await (const r of backupRecords(opts.file, b)) {
            progress.tick(++n);
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
      progress.done(`${checked.records} records restored into ${opts.dataDir}`);
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

// ── the commands ────────────────────────────────────────────────────────────────────────────

function exitCode(err: unknown): number | undefined {
  if (err instanceof ConfigError) return BackupExit.usage;
  if (err instanceof StoreInUse) return BackupExit.storeInUse;
  if (err instanceof BadBackup) return BackupExit.badBackup;
  if (err instanceof DestinationRefused || err instanceof AlreadyExists) return BackupExit.refused;
  if (isKmiError(err)) return BackupExit.failure;
  return undefined;
}

async function guarded(name: string, io: BackupIo, json: boolean, body: () => Promise<number>): Promise<number> {
  try {
    return await body();
  } catch (err) {
    const code = exitCode(err);
    if (code === undefined) throw err;
    const message = (err as Error).message;
    io.stderr.write(json ? JSON.stringify({ error: { code: (err as { code?: string }).code ?? "usage", message } }) + "\n" : `kmi kdc ${name}: ${message}\n`);
    return code;
  }
}

function tableList(tables: Record<string, number>): string {
  return Object.entries(tables)
    .map(([t, n]) => `${t} ${n}`)
    .join(", ");
}

/** `kmi kdc backup` (argv after "backup"); resolves with the exit code. */
export async function backupMain(argv: string[], env: Record<string, string | undefined>, io: BackupIo = process): Promise<number> {
  const json = argv.includes("--json");
  return guarded("backup", io, json, async () => {
    const loaded = await loadConfig(backupProgram, argv, { env });
    if (loaded.help) {
      io.stdout.write(formatHelp(backupProgram) + "\n");
      return BackupExit.ok;
    }
    const v = loaded.values;
    const r = await backupKdc({ dataDir: v.dataDir, out: v.out, ...(v.json === true ? {} : { io }) });
    if (v.json === true) {
      io.stdout.write(
        JSON.stringify({ file: r.file, bytes: r.bytes, sha256: r.sha256, records: r.records, tables: r.tables, ...r.header, master_key_included: false }, null, 2) + "\n",
      );
    } else {
      io.stdout.write(
        [
          `backed up the KDC in ${v.dataDir} (kdc id ${r.header.kdc_id}) to ${v.out}`,
          `  ${r.records} records (${tableList(r.tables)}), ${r.bytes} bytes, mode 0600`,
          `  sha256 ${r.sha256}`,
          `  keys stay sealed under master key ${r.header.master_key_id}, which is NOT in the backup: keep the master key separately`,
          `  restore: kmi kdc restore --data-dir NEW_DIR --in ${v.out} --master-key-file <the master key>`,
          "",
        ].join("\n"),
      );
    }
    return BackupExit.ok;
  });
}

/** `kmi kdc restore` (argv after "restore"); resolves with the exit code. */
export async function restoreMain(argv: string[], env: Record<string, string | undefined>, io: BackupIo = process): Promise<number> {
  const json = argv.includes("--json");
  return guarded("restore", io, json, async () => {
    const loaded = await loadConfig(restoreProgram, argv, { env });
    if (loaded.help) {
      io.stdout.write(formatHelp(restoreProgram) + "\n");
      return BackupExit.ok;
    }
    const v = loaded.values;
    const r = await restoreKdc({ dataDir: v.dataDir, file: v.in, masterKey: v.masterKey, masterKeyFile: v.masterKeyFile, check: v.check === true, ...(v.json === true ? {} : { io }) });
    if (v.json === true) {
      io.stdout.write(
        JSON.stringify(
          { data_dir: r.dataDir, check_only: r.checkOnly, records: r.records, tables: r.tables, sha256: r.sha256, backup: r.header, master_key_checked: r.masterKeyChecked, files: r.files },
          null,
          2,
        ) + "\n",
      );
      return BackupExit.ok;
    }
    const h = r.header;
    const key = r.masterKeyChecked ? "the master key given opens it" : `master key not checked (give --master-key-file to check it); it needs master key ${h.master_key_id}`;
    io.stdout.write(
      (r.checkOnly
        ? [`backup ${v.in} is whole: ${r.records} records (${tableList(r.tables)}), kdc id ${h.kdc_id}, made ${h.created_at} by kmi ${h.kmi_version}`, `  ${key}`]
        : [
            `restored ${v.in} into ${v.dataDir}: ${r.records} records (${tableList(r.tables)})`,
            `  kdc id ${h.kdc_id}, backup made ${h.created_at} by kmi ${h.kmi_version}`,
            `  ${key}`,
            `  wrote ${r.files.join(", ")}`,
            "",
            "next: start it with the master key the backed-up KDC used, then check it:",
            `  kmi kdc --data-dir ${v.dataDir}${v.masterKeyFile !== undefined ? ` --master-key-file ${v.masterKeyFile}` : " --master-key-file <the master key>"}`,
            "  kmi ctl audit verify && kmi ctl tenant list",
          ]
      ).join("\n") + "\n",
    );
    return BackupExit.ok;
  });
}
