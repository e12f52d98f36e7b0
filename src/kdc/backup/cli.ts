/** `kmi kdc backup` and `kmi kdc restore`: flags, help, exit codes and output. */
import { ConfigError, defineProgram, formatHelp, loadConfig } from "../../common/config.js";
import { AlreadyExists, isKmiError } from "../../common/errors.js";
import { backupKdc } from "./backup.js";
import { BadBackup, DestinationRefused, StoreInUse } from "./errors.js";
import type { BackupIo } from "./progress.js";
import { restoreKdc } from "./restore.js";

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

const dataDir = { type: "string", description: "the KDC's data directory", default: "data/kdc", valueName: "dir" } as const;
const json = { type: "boolean", description: "print the result as one JSON document on stdout (no progress lines)", noEnv: true } as const;
const progressOption = { type: "boolean", description: "show progress with an estimate on stderr also when it is not a terminal (it is shown on a terminal anyway)", noEnv: true } as const;

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
    progress: progressOption,
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
    progress: progressOption,
  },
});

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
    const r = await backupKdc({ dataDir: v.dataDir, out: v.out, progress: v.progress === true, ...(v.json === true ? {} : { io }) });
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
    const r = await restoreKdc({ dataDir: v.dataDir, file: v.in, masterKey: v.masterKey, masterKeyFile: v.masterKeyFile, check: v.check === true, progress: v.progress === true, ...(v.json === true ? {} : { io }) });
    if (v.json === true) {
      io.stdout.write(
        JSON.stringify(
          { data_dir: r.dataDir, check_only: r.checkOnly, records: r.records, tables: r.tables, sha256: r.sha256, backup: r.header, master_key_checked: r.masterKeyChecked, wrapped_key_id: r.wrappedKeyId ?? null, files: r.files },
          null,
          2,
        ) + "\n",
      );
      return BackupExit.ok;
    }
    const h = r.header;
    const key = !r.masterKeyChecked
      ? `master key not checked (give --master-key-file to check it); it needs master key ${h.master_key_id}`
      : r.wrappedKeyId !== undefined
        ? `the wrapped master key file given names master key ${r.wrappedKeyId}, the one its keys are sealed under (the token unwraps it when the KDC starts)`
        : "the master key given opens it";
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
            `  kmi kdc --data-dir ${v.dataDir}${v.masterKeyFile !== undefined ? ` --master-key-file ${v.masterKeyFile}` : " --master-key-file <the master key>"}${r.wrappedKeyId !== undefined ? " --pkcs11-module … --pkcs11-token … --pkcs11-pin-file …" : ""}`,
            "  kmi ctl audit verify && kmi ctl tenant list",
          ]
      ).join("\n") + "\n",
    );
    return BackupExit.ok;
  });
}
