/**
 * Master-key rotation of a server's store (`kmi kdc rekey`, `kmi audit rekey`), in stages:
 *
 * 1. `pin`: the audit log's keys are pinned in the store (./log-keys.ts), still under the old key.
 * 2. `nextKey`: the new key is made as `<key file>.next` (0600), or the one a stopped rekey left
 *    is taken up again: a rerun resumes where a `kill -9` stopped it. `prepareOnly` (`--prepare`)
 *    stops here, so that the file can be copied to replicas on other hosts first.
 * 3. `rewrap`: passes over every table whose records hold a `SealedBlob`; each record with a
 *    blob under another key is opened and sealed again under the new key, in batches of at most
 *    `batchSize` records, each batch conditional on the mod revision of every record it read
 *    (a concurrent write wins; the batch is read again and retried). Passes repeat until one
 *    finds nothing to rewrap and opens every blob with the new key: the verified full pass.
 * 4. `retire`: an audit entry, then `<key file>.next` is renamed over the key file: the old
 *    key is gone from the disk.
 *
 * A store stopped anywhere in between holds records under either key; both key files are still
 * there, and the keyring (./keyring.ts) opens both.
 */
import { constants } from "node:fs";
import { open as openFile, rename } from "node:fs/promises";
import { dirname } from "node:path";
import { clone, toBinary, type DescMessage, type Message } from "@bufbuild/protobuf";
import { FailedPrecondition, InvalidArgument } from "../common/errors.js";
import { pathExists } from "../common/fs.js";
import { SealedBlobSchema, type SealedBlob } from "../gen/kmi/store/v1/envelope_pb.js";
import type { AuditLog } from "./audit-log.js";
import { MasterKeyring, nextKeyFile } from "./keyring.js";
import { LOG_KEYS_TABLE, pinLogKeys } from "./log-keys.js";
import { createMasterKeyFile, readMasterKeyFile, wrappedKeyOf } from "./master-key.js";
import type { MasterKeyWrap } from "./wrapped-key.js";
import { retryOnConflict } from "./retry.js";
import { MAX_TXN_OPS, type BatchOp, type Compare, type Store, type Table } from "./store.js";

/** Default records per rewrap batch. */
export const DEFAULT_REKEY_BATCH = 64;
/** Most passes before a rekey gives up on records still being sealed under the old key. */
export const MAX_REKEY_PASSES = 8;
// Below MAX_TXN_BYTES with room for the compares and framing.
const BATCH_BYTES = 1_000_000;

/** Options of `rekeyStore`. */
export interface RekeyOptions {
  /** The server's store. */
  store: Store;
  /** Every table of the server; those whose records hold no `SealedBlob` are skipped. */
  tables: readonly Table[];
  /** The master key file (`master.key` or `--master-key-file`); the next key goes beside it. */
  keyFile: string;
  /** The server's audit log, for the entries of the rotation. */
  audit: AuditLog;
  /** Who rekeys, for the audit entries (e.g. "system:kmi kdc rekey"). */
  actor: string;
  /** Records per conditional batch, 1 to MAX_TXN_OPS (default 64). */
  batchSize?: number;
  /**
   * The token that opens a wrapped key file. The next key is wrapped by `wrap.keyLabel` when
   * given, else by the key file's own token key when the key file is wrapped (a rotation never
   * writes a wrapped key out in the clear), else not at all.
   */
  wrap?: MasterKeyWrap | undefined;
  /** Stop after stage 2: the next key is made (to copy to other hosts' replicas first), nothing rewrapped. */
  prepareOnly?: boolean;
  /** Progress of a pass: `done` of `total` records rewrapped (pass is 1-based). */
  onProgress?: (done: number, total: number, pass: number) => void;
  now?: () => Date;
}

/** What a rekey did. */
export interface RekeyResult {
  /** The retired key's id. */
  oldKeyId: string;
  /** The new key's id (now in the key file). */
  newKeyId: string;
  /** True when a stopped (or `--prepare`d) rekey's next key was taken up. */
  resumed: boolean;
  /** True when only the next key was made (`prepareOnly`): the old key is not retired. */
  prepared: boolean;
  /** Passes over the store, the last one the verified pass. */
  passes: number;
  /** Records rewrapped by this run. */
  rewrapped: number;
  /** Records holding a sealed blob, all now under the new key. */
  sealedRecords: number;
}

/** Rotates the master key of `opts.store` (see the module comment). */
export async function rekeyStore(opts: RekeyOptions): Promise<RekeyResult> {
  const batchSize = opts.batchSize ?? DEFAULT_REKEY_BATCH;
  if (!Number.isSafeInteger(batchSize) || batchSize < 1 || batchSize > MAX_TXN_OPS) {
    throw new InvalidArgument(`batch size: ${batchSize} is out of range; use 1 to ${MAX_TXN_OPS}`);
  }
  const now = opts.now ?? (() => new Date());
  const primary = await readMasterKeyFile(opts.keyFile, opts.wrap);
  let keyring: MasterKeyring | undefined;
  try {
    await pin(opts.store, primary, now());
    const { next, resumed } = await nextKey(opts.keyFile, await nextKeyWrap(opts.keyFile, opts.wrap));
    keyring = new MasterKeyring(primary, next, opts.keyFile, opts.wrap);
    next.fill(0);
    const ids = { oldKeyId: keyring.primaryId, newKeyId: keyring.sealingId };
    if (ids.oldKeyId === ids.newKeyId) throw new FailedPrecondition(`${nextKeyFile(opts.keyFile)} holds the same key as ${opts.keyFile}; remove ${nextKeyFile(opts.keyFile)} and run rekey again`);
    await opts.audit.append({ actor: opts.actor, action: "master_key.rekey", target: `master-key/${ids.newKeyId}`, outcome: "ok", details: { replaces: ids.oldKeyId, resumed: String(resumed), prepare_only: String(opts.prepareOnly === true) } });
    if (opts.prepareOnly === true) return { ...ids, resumed, prepared: true, passes: 0, rewrapped: 0, sealedRecords: 0 };
    const rewrap = await rewrapStore(opts.store, sealedTables(opts.tables), keyring, batchSize, opts.onProgress);
    await opts.audit.append({
      actor: opts.actor,
      action: "master_key.retire",
      target: `master-key/${ids.oldKeyId}`,
      outcome: "ok",
      details: { replaced_by: ids.newKeyId, sealed_records: String(rewrap.sealedRecords), passes: String(rewrap.passes) },
    });
    await retire(opts.keyFile);
    // A replica may have sealed a record under the old key after the verified pass and before
    // it saw the renamed key file (servers look at it before each seal): one more sweep.
    const sweep = await rewrapStore(opts.store, sealedTables(opts.tables), keyring, batchSize, opts.onProgress);
    return { ...ids, resumed, prepared: false, passes: rewrap.passes + sweep.passes, rewrapped: rewrap.rewrapped + sweep.rewrapped, sealedRecords: sweep.sealedRecords };
  } finally {
    primary.fill(0);
    keyring?.wipe();
  }
}

/** Stage 1: the log keys pinned under the primary key (a no-op when they are). */
async function pin(store: Store, primary: Uint8Array, now: Date): Promise<void> {
  const alone = new MasterKeyring(primary);
  try {
    await pinLogKeys(store, alone, now);
  } finally {
    alone.wipe();
  }
}

/** Stage 2: the next key file, made now (wrapped like the key file, when it is) or left by a stopped rekey. */
async function nextKey(keyFile: string, wrap: MasterKeyWrap | undefined): Promise<{ next: Buffer; resumed: boolean }> {
  const file = nextKeyFile(keyFile);
  if (await pathExists(file)) return { next: await readMasterKeyFile(file, wrap), resumed: true };
  return { next: (await createMasterKeyFile(file, wrap)).key, resumed: false };
}

/** How the next key file is wrapped (see `RekeyOptions.wrap`). */
async function nextKeyWrap(keyFile: string, wrap: MasterKeyWrap | undefined): Promise<MasterKeyWrap | undefined> {
  if (wrap === undefined || wrap.keyLabel !== undefined) return wrap;
  return { token: wrap.token, keyLabel: (await wrappedKeyOf(keyFile))?.keyLabel };
}

/** Stage 4: the next key file becomes the key file; the old key's file is gone. */
async function retire(keyFile: string): Promise<void> {
  await rename(nextKeyFile(keyFile), keyFile);
  const dir = await openFile(dirname(keyFile), constants.O_RDONLY).catch(() => undefined);
  if (dir === undefined) return;
  await dir.sync().catch(() => {});
  await dir.close();
}

/** The tables among `tables` whose message holds a `SealedBlob` somewhere (and the log keys). */
export function sealedTables(tables: readonly Table[]): Table[] {
  const all = [...tables, LOG_KEYS_TABLE as unknown as Table];
  const seen = new Set<string>();
  return all.filter((t) => !seen.has(t.name) && seen.add(t.name) && holdsBlob(t.schema, new Set()));
}

function holdsBlob(schema: DescMessage, visiting: Set<string>): boolean {
  if (schema.typeName === SealedBlobSchema.typeName) return true;
  if (visiting.has(schema.typeName)) return false;
  visiting.add(schema.typeName);
  return schema.fields.some((f) => {
    const inner = f.fieldKind === "message" ? f.message : (f.fieldKind === "list" && f.listKind === "message") || (f.fieldKind === "map" && f.mapKind === "message") ? f.message : undefined;
    return inner !== undefined && holdsBlob(inner, visiting);
  });
}

/** Every `SealedBlob` inside `msg` (references into it, so they can be replaced in place). */
export function blobsOf(schema: DescMessage, msg: Message): SealedBlob[] {
  if (schema.typeName === SealedBlobSchema.typeName) return [msg as SealedBlob];
  const out: SealedBlob[] = [];
  const fields = msg as unknown as Record<string, unknown>;
  for (const f of schema.fields) {
    const value = f.oneof !== undefined ? oneofValue(fields[f.oneof.localName], f.localName) : fields[f.localName];
    if (value === undefined || value === null) continue;
    if (f.fieldKind === "message") out.push(...blobsOf(f.message, value as Message));
    else if (f.fieldKind === "list" && f.listKind === "message") for (const m of value as Message[]) out.push(...blobsOf(f.message, m));
    else if (f.fieldKind === "map" && f.mapKind === "message") for (const m of Object.values(value as Record<string, Message>)) out.push(...blobsOf(f.message, m));
  }
  return out;
}

function oneofValue(group: unknown, name: string): unknown {
  const g = group as { case?: string; value?: unknown } | undefined;
  return g?.case === name ? g.value : undefined;
}

interface Stale {
  table: Table;
  key: string;
  bytes: number;
  /** The record as listed, and its mod revision: the first attempt's input. */
  listed: { value: Message; modRevision: bigint };
}

/** Stage 3: passes until a verified one; see the module comment. */
async function rewrapStore(
  store: Store,
  tables: readonly Table[],
  keyring: MasterKeyring,
  batchSize: number,
  onProgress: RekeyOptions["onProgress"],
): Promise<{ passes: number; rewrapped: number; sealedRecords: number }> {
  let rewrapped = 0;
  for (let pass = 1; pass <= MAX_REKEY_PASSES; pass++) {
    const { stale, sealedRecords } = await findStale(store, tables, keyring);
    if (stale.length === 0) return { passes: pass, rewrapped, sealedRecords };
    let done = 0;
    onProgress?.(0, stale.length, pass);
    for (const batch of batches(stale, batchSize)) {
      await retryOnConflict((attempt) => rewrapBatch(store, keyring, batch, attempt > 1));
      done += batch.length;
      onProgress?.(done, stale.length, pass);
    }
    rewrapped += stale.length;
  }
  throw new FailedPrecondition(
    `rekey: records were still being sealed under the old master key after ${MAX_REKEY_PASSES} passes; a server that does not hold ${nextKeyFile("<key file>")} is writing: copy the next key file to every replica (or stop them) and run rekey again`,
  );
}

/**
 * The records with a blob under another key than the sealing one. Every blob already under the
 * sealing key is opened (the verification that retiring the old key loses nothing).
 */
async function findStale(store: Store, tables: readonly Table[], keyring: MasterKeyring): Promise<{ stale: Stale[]; sealedRecords: number }> {
  const stale: Stale[] = [];
  let sealedRecords = 0;
  for (const table of tables) {
    const { records } = await store.list(table);
    for (const r of records) {
      const blobs = blobsOf(table.schema, r.value as Message);
      if (blobs.length === 0) continue;
      sealedRecords++;
      if (blobs.some((b) => b.masterKeyId !== keyring.sealingId)) stale.push({ table, key: r.key, bytes: toBinary(table.schema, r.value as Message).length, listed: { value: r.value as Message, modRevision: r.modRevision } });
      else for (const b of blobs) keyring.open(b, b.aad).fill(0);
    }
  }
  return { stale, sealedRecords };
}

function* batches(stale: readonly Stale[], batchSize: number): Generator<Stale[]> {
  let batch: Stale[] = [];
  let bytes = 0;
  for (const s of stale) {
    if (batch.length > 0 && (batch.length >= batchSize || bytes + s.bytes > BATCH_BYTES)) {
      yield batch;
      batch = [];
      bytes = 0;
    }
    batch.push(s);
    bytes += s.bytes;
  }
  if (batch.length > 0) yield batch;
}

/**
 * One conditional batch: each record as listed (after a conflict: read again), its stale blobs
 * rewrapped, committed only if no record changed since.
 */
async function rewrapBatch(store: Store, keyring: MasterKeyring, batch: readonly Stale[], reread: boolean): Promise<void> {
  const ops: BatchOp[] = [];
  const compares: Compare[] = [];
  for (const { table, key, listed } of batch) {
    const read = reread ? await store.read(table, key) : listed;
    if (read.value === undefined) continue; // deleted meanwhile: nothing to rewrap
    const value = clone(table.schema, read.value as Message);
    let changed = false;
    for (const blob of blobsOf(table.schema, value)) {
      if (blob.masterKeyId === keyring.sealingId) continue;
      const plaintext = keyring.open(blob, blob.aad);
      try {
        Object.assign(blob, keyring.seal(plaintext, blob.aad));
      } finally {
        plaintext.fill(0);
      }
      changed = true;
    }
    if (!changed) continue; // rewritten meanwhile under the new key
    ops.push({ type: "put", table, key, value });
    compares.push({ table, key, modRevision: read.modRevision });
  }
  if (ops.length > 0) await store.commit({ compares, ops });
}
