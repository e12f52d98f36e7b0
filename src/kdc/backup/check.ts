/** Checking a whole backup file (and a master key against it) before anything is written. */
import { createHash } from "node:crypto";
import { fromBinary } from "@bufbuild/protobuf";
import { CredentialRecordSchema } from "../../gen/kmi/store/v1/kdc_pb.js";
import { StoreInfoSchema, type StoreRecord } from "../../gen/kmi/store/v1/store_pb.js";
import { META_TABLE, STORE_INFO_KEY } from "../../storage/level-store.js";
import { CREDENTIAL, credentialAad, KDC_SCHEMA_VERSION, T } from "../kdc-store.js";
import { createSealer } from "../sealer.js";
import { BadBackup, DestinationRefused } from "./errors.js";
import { backupRecords, FOOTER_BYTES, openBackup, type BackupHeader } from "./format.js";

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
export function checkMasterKey(key: Buffer, rootCredential: Uint8Array, tlsCredential: Uint8Array | undefined): void {
  const root = sealedCredential(rootCredential, tlsCredential);
  const sealer = createSealer(key);
  try {
    sealer.open(root.privateKey!, credentialAad(root.name)).fill(0);
  } catch (err) {
    throw wrongKey(root, { cause: err });
  }
}

/** Checks a master key known only by its id (a key file wrapped in a token: the token opens it at start). */
export function checkMasterKeyId(keyId: string, rootCredential: Uint8Array, tlsCredential: Uint8Array | undefined): void {
  const root = sealedCredential(rootCredential, tlsCredential);
  if (root.privateKey?.masterKeyId !== keyId) throw wrongKey(root);
}

// With the roots in a PKCS#11 token the root has no sealed key: the KDC TLS key's blob proves the master key.
function sealedCredential(rootCredential: Uint8Array, tlsCredential: Uint8Array | undefined) {
  const sealedRoot = fromBinary(CredentialRecordSchema, rootCredential);
  return sealedRoot.privateKey === undefined && tlsCredential !== undefined ? fromBinary(CredentialRecordSchema, tlsCredential) : sealedRoot;
}

function wrongKey(root: { privateKey?: { masterKeyId: string } | undefined }, options?: { cause: unknown }): DestinationRefused {
  return new DestinationRefused(
    `the master key given does not open this backup (its keys are sealed under master key ${root.privateKey?.masterKeyId || "?"}); give the master key the backed-up KDC used (--master-key-file or KMI_KDC_MASTER_KEY)`,
    options,
  );
}
