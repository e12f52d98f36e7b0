/**
 * The KDC backup file, and reading it back record by record.
 *
 * File format (version 1), all integers big-endian:
 *
 * | part    | bytes                       | what |
 * |---------|-----------------------------|------|
 * | magic   | 8                           | `KMIBKUP\n` |
 * | header  | u32 length + UTF-8 JSON     | `{"format":1,"program":"kdc","kmi_version","created_at","kdc_id","schema_version","master_key_id"}` |
 * | records | (u32 length + bytes) each   | `kmi.store.v1.StoreRecord`, the store's `_meta` record first |
 * | footer  | 48                          | `KMIEND\n\0`, u64 record count, SHA-256 of every byte before the footer |
 */
import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import { fromBinary } from "@bufbuild/protobuf";
import { VERSION } from "../../common/version.js";
import { StoreRecordSchema, type StoreRecord } from "../../gen/kmi/store/v1/store_pb.js";
import { BadBackup } from "./errors.js";

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

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

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

export function parseHeader(file: string, raw: Buffer): BackupHeader {
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
export interface OpenedBackup {
  handle: FileHandle;
  header: BackupHeader;
  /** The reader, positioned at the first record. */
  reader: ChunkReader;
  records: number;
  sha256: Buffer;
  size: number;
}

/** Opens a backup and reads its magic, header and footer (the records are read by the caller). */
export async function openBackup(file: string): Promise<OpenedBackup> {
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
export async function* backupRecords(file: string, b: OpenedBackup): AsyncGenerator<StoreRecord> {
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
