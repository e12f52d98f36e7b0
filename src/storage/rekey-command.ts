/**
 * The command shared by `kmi kdc rekey` and `kmi audit rekey`: flags, the checks before any
 * change, progress on stderr and the result (text or `--json`). The rotation itself is
 * ./rekey.ts; each program gives its tables and how it opens its store.
 */
import { ConfigError, defineProgram, formatHelp, loadConfig, storeOptions, type OptionSpec } from "../common/config.js";
import { FailedPrecondition, isKmiError } from "../common/errors.js";
import { ProgressMeter, progressWanted } from "../common/progress-meter.js";
import { AuditLog } from "./audit-log.js";
import { storeBackendFrom, type StoreBackend } from "./backend.js";
import { nextKeyFile } from "./keyring.js";
import { DEFAULT_REKEY_BATCH, rekeyStore, type RekeyResult } from "./rekey.js";
import { SealError } from "./seal.js";
import type { MasterKeyWrap } from "./wrapped-key.js";
import { MAX_TXN_OPS, type Store, type Table } from "./store.js";
import { join } from "node:path";

/** Where the command writes: the result on stdout, progress and errors on stderr. */
export interface RekeyIo {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown; isTTY?: boolean };
}

/** What a program gives the command. */
export interface RekeyTarget {
  /** "kdc" or "audit". */
  program: string;
  /** Environment variable of the master key, e.g. KMI_KDC_MASTER_KEY. */
  envName: string;
  /** Default data dir, e.g. "data/kdc". */
  defaultDataDir: string;
  /** Default etcd prefix. */
  etcdPrefix: string;
  /** Every table of the program's store. */
  tables: readonly Table[];
  /** Opens the program's initialized store (LevelDB in the data dir, or etcd). */
  openStore(dataDir: string, backend: StoreBackend): Promise<Store>;
  /** The program's own options for a wrapped key file (the KDC's --pkcs11-* and --master-key-wrap). */
  wrapOptions?: Record<string, OptionSpec>;
  /** The token that opens (and wraps) key files, from the values of `wrapOptions`; `close` releases it. */
  openWrap?(values: Record<string, unknown>): Promise<{ wrap: MasterKeyWrap | undefined; close(): void }>;
}

/** The `--help` program of `kmi <program> rekey`. */
export function rekeyProgram(t: RekeyTarget) {
  return defineProgram({
    program: t.program,
    usage: `kmi ${t.program} rekey --data-dir DIR [--master-key-file F] [--store etcd ...] [--prepare] [--json]`,
    summary:
      `Rotates the master key: makes a new one (<key file>.next, 0600), rewraps every sealed record of the store to it in conditional ` +
      `batches, checks in a full pass that every record opens with the new key, writes an audit entry, then renames the new key file ` +
      `over the old one (the old key is gone). On LevelDB the ${t.program} must be stopped (one process per store); on etcd the replicas ` +
      `may run: one that meets a record under the new key loads <key file>.next from beside its key file (on several hosts: ` +
      `rekey --prepare, copy that file to every replica host, then rekey). Stopped partway (even by kill -9), the store opens with either key, and running rekey again finishes the rotation. ` +
      `The audit log's keyed hashes and checkpoint key do not change. A key given in ${t.envName} cannot be rotated: move it to a file.`,
    options: {
      dataDir: { type: "string", description: "the data directory", default: t.defaultDataDir, valueName: "dir" },
      masterKeyFile: { type: "string", description: "master key file, mode 0600 (default <data-dir>/master.key)", valueName: "file" },
      masterKey: { type: "string", description: `refused: a key from ${t.envName} cannot be rotated in place`, secret: true, valueName: "base64" },
      ...storeOptions(t.etcdPrefix),
      prepare: { type: "boolean", description: "only make <key file>.next (and pin the log keys), rewrap nothing: copy that file to every other replica host, then run rekey without --prepare", noEnv: true },
      batchSize: { type: "integer", description: `records per conditional batch, 1 to ${MAX_TXN_OPS}`, default: DEFAULT_REKEY_BATCH, noEnv: true },
      json: { type: "boolean", description: "print the result as one JSON document on stdout (no progress lines)", noEnv: true },
      progress: { type: "boolean", description: "show progress on stderr also when it is not a terminal (it is shown on a terminal anyway)", noEnv: true },
      ...t.wrapOptions,
    },
  });
}

/** `kmi <program> rekey` (argv after "rekey"); resolves with the exit code (0 ok, 1 failed, 2 usage). */
export async function rekeyMain(t: RekeyTarget, argv: string[], env: Record<string, string | undefined>, io: RekeyIo = process): Promise<number> {
  const json = argv.includes("--json");
  const program = rekeyProgram(t);
  try {
    const loaded = await loadConfig(program, argv, { env });
    if (loaded.help) {
      io.stdout.write(formatHelp(program) + "\n");
      return 0;
    }
    const v = loaded.values;
    if ((v.masterKey ?? "") !== "") {
      throw new FailedPrecondition(`the master key comes from ${t.envName} (or --master-key): rekey rotates a key file; write the key to a 0600 file, run the ${t.program} with --master-key-file, then rekey`);
    }
    if (v.batchSize < 1 || v.batchSize > MAX_TXN_OPS) throw new ConfigError(`--batch-size: ${v.batchSize} is out of range; use 1 to ${MAX_TXN_OPS}`);
    const keyFile = v.masterKeyFile ?? join(v.dataDir, "master.key");
    const token = await t.openWrap?.(v);
    let result: RekeyResult;
    try {
      result = await rekeyWithProgress(t, { dataDir: v.dataDir, backend: storeBackendFrom(v, t.etcdPrefix), keyFile, batchSize: v.batchSize, prepare: v.prepare === true, progress: v.progress === true, json: v.json === true, wrap: token?.wrap }, io);
    } finally {
      token?.close();
    }
    io.stdout.write(v.json === true ? JSON.stringify(resultJson(result, keyFile), null, 2) + "\n" : resultText(t, result, keyFile));
    return 0;
  } catch (err) {
    const usage = err instanceof ConfigError;
    // A record that does not open (SealError: names key ids and the record, never key bytes) stops the rekey before anything is retired.
    if (!usage && !isKmiError(err) && !(err instanceof SealError)) throw err;
    const message = (err as Error).message;
    io.stderr.write(json ? JSON.stringify({ error: { code: usage ? "usage" : ((err as { code?: string }).code ?? "internal"), message } }) + "\n" : `kmi ${t.program} rekey: ${message}\n`);
    return usage ? 2 : 1;
  }
}

interface RekeyRun {
  dataDir: string;
  backend: StoreBackend;
  keyFile: string;
  batchSize: number;
  prepare: boolean;
  progress: boolean;
  json: boolean;
  wrap: MasterKeyWrap | undefined;
}

async function rekeyWithProgress(t: RekeyTarget, run: RekeyRun, io: RekeyIo): Promise<RekeyResult> {
  const store = await t.openStore(run.dataDir, run.backend);
  const label = `kmi ${t.program} rekey`;
  const shown = progressWanted(io.stderr, run.progress, run.json);
  let meter: ProgressMeter | undefined;
  try {
    return await rekeyStore({
      store,
      tables: t.tables,
      keyFile: run.keyFile,
      wrap: run.wrap,
      audit: new AuditLog(store),
      actor: `system:${label}`,
      batchSize: run.batchSize,
      prepareOnly: run.prepare,
      onProgress: (done, total, pass) => {
        if (done === 0) meter = new ProgressMeter({ out: io.stderr, label, unit: `records rewrapped (pass ${pass})`, enabled: shown, stepFraction: 0.05 });
        meter?.update(done, total);
        if (done === total) meter?.finish(shown ? `pass ${pass}: ${total} records rewrapped` : undefined);
      },
    });
  } finally {
    meter?.finish();
    await store.close();
  }
}

function resultJson(r: RekeyResult, keyFile: string) {
  return {
    old_key_id: r.oldKeyId,
    new_key_id: r.newKeyId,
    resumed: r.resumed,
    prepared: r.prepared,
    passes: r.passes,
    rewrapped: r.rewrapped,
    sealed_records: r.sealedRecords,
    key_file: keyFile,
    old_key_retired: !r.prepared,
  };
}

function resultText(t: RekeyTarget, r: RekeyResult, keyFile: string): string {
  if (r.prepared) {
    return [
      `prepared the rotation of the ${t.program === "kdc" ? "KDC" : "Auditserver"}'s master key ${r.oldKeyId} -> ${r.newKeyId}; nothing is rewrapped yet`,
      `  next key: ${nextKeyFile(keyFile)} (0600): copy it beside the key file of every replica on another host`,
      `  then: kmi ${t.program} rekey (without --prepare) finishes the rotation`,
      "",
    ].join("\n");
  }
  return [
    `rotated the ${t.program === "kdc" ? "KDC" : "Auditserver"}'s master key ${r.oldKeyId} -> ${r.newKeyId}${r.resumed ? " (resumed a stopped rekey)" : ""}`,
    `  ${r.rewrapped} records rewrapped; all ${r.sealedRecords} sealed records open with the new key (${r.passes} passes, the last one verifying)`,
    `  ${keyFile} now holds the new key (0600); the old key is retired (audit entry master_key.retire)`,
    `  replicas on other hosts: move their ${nextKeyFile("master.key")} over their master.key (or copy this key file) before they restart`,
    "",
  ].join("\n");
}
