/**
 * Entry point of `kmi kdc` (serve), `kmi kdc init`, and `kmi kdc backup` / `kmi kdc restore`
 * (./backup/cli.ts).
 */
import { ConfigError, formatHelp, loadConfig } from "../common/config.js";
import { isKmiError } from "../common/errors.js";
import { runUntilSignal } from "../common/lifecycle.js";
import { createLogger, parseLogLevel } from "../common/logger.js";
import { backupMain, restoreMain } from "./backup/cli.js";
import { rekeyMain } from "../storage/rekey-command.js";
import { kdcRekeyTarget } from "./rekey.js";
import { storeBackendFrom } from "../storage/backend.js";
import { KDC_ETCD_PREFIX, initProgram, masterKeyWrapLabel, parseElectionTtl, parseLease, parsePendingTtl, parseSchedulerInterval, pkcs11Settings, serveProgram } from "./config.js";
import { dataPaths, initKdc } from "./init.js";
import { KdcServer } from "./server.js";
import { hostIp, hostName } from "./validate.js";
import { writeFileAtomicSync } from "../common/fs.js";
import { usePrivateUmask } from "../common/data-dir.js";

function splitList(value: string | undefined): string[] {
  return (value ?? "").split(",").map((s) => s.trim()).filter((s) => s !== "");
}

/** The environment as config sees it; KMI_MASTER_KEY is accepted as a shorter name of KMI_KDC_MASTER_KEY. */
function environment(): Record<string, string | undefined> {
  const env = { ...process.env };
  if ((env["KMI_KDC_MASTER_KEY"] ?? "") === "" && (env["KMI_MASTER_KEY"] ?? "") !== "") env["KMI_KDC_MASTER_KEY"] = env["KMI_MASTER_KEY"];
  return env;
}

function tlsNames(dnsName: string | undefined, ip: string | undefined) {
  return {
    dnsNames: splitList(dnsName).map((n) => hostName("--dns-name", n)),
    ipAddresses: splitList(ip).map((a) => hostIp("--ip", a)),
  };
}

/** init's line about the master key: where it is and what to keep. */
function masterKeyLine(r: { masterKeyFile: string | undefined; masterKeyWrappedBy: string | undefined }, token: string | undefined): string {
  if (r.masterKeyFile === undefined) return "  master key:          from the environment (nothing written)";
  if (r.masterKeyWrappedBy !== undefined) {
    return `  master key:          ${r.masterKeyFile} (0600), wrapped by key ${r.masterKeyWrappedBy} in PKCS#11 token "${token}": back up the file and the token; start the KDC with the same --pkcs11-* settings`;
  }
  return `  master key:          ${r.masterKeyFile} (0600; back it up apart from the data: without it nothing opens)`;
}

async function init(argv: string[]): Promise<number> {
  const loaded = await loadConfig(initProgram, argv, { env: environment() });
  if (loaded.help) {
    process.stdout.write(formatHelp(initProgram) + "\n");
    return 0;
  }
  const v = loaded.values;
  const r = await initKdc({
    dataDir: v.dataDir,
    masterKey: v.masterKey,
    masterKeyFile: v.masterKeyFile,
    tls: tlsNames(v.dnsName, v.ip),
    store: storeBackendFrom(v, KDC_ETCD_PREFIX),
    pkcs11: pkcs11Settings(v),
    masterKeyWrapLabel: masterKeyWrapLabel(v),
  });
  if (v.tokenFile !== undefined) {
    writeFileAtomicSync(v.tokenFile, r.operatorToken + "\n", 0o600);
  }
  const paths = dataPaths(v.dataDir, v.masterKeyFile);
  process.stdout.write(
    [
      `initialized the KDC in ${v.dataDir} (kdc id ${r.kdcId})`,
      masterKeyLine(r, v.pkcs11Token),
      `  KMI root CA:         ${paths.kmiRootPem} (what devices trust)`,
      r.rootKeys === "pkcs11" ? `  root keys:           in PKCS#11 token "${v.pkcs11Token}" (non-extractable); start the KDC with the same --pkcs11-* settings` : "  root keys:           sealed in the store under the master key",
      `  infrastructure CA:   ${paths.infraCaPem} (kmi ctl --ca-file, services)`,
      "",
      // With --token-file the token goes only to that file: stdout often ends up in a log
      // (kmi up, systemd, CI), and a bearer token must not.
      ...(v.tokenFile !== undefined
        ? [`first operator token: written to ${v.tokenFile} (mode 0600; it is stored hashed, and shown nowhere else)`]
        : ["first operator token (shown only now; it is stored hashed):", `  ${r.operatorToken}`]),
      "",
      "next:",
      `  kmi kdc --data-dir ${v.dataDir}`,
      `  export KMI_CTL_CA_FILE=${paths.infraCaPem} KMI_CTL_TOKEN_FILE=<file with the token>`,
      "  kmi ctl tenant create acme --bootstrap",
      "",
    ].join("\n"),
  );
  return 0;
}

async function serve(argv: string[]): Promise<number> {
  const loaded = await loadConfig(serveProgram, argv, { env: environment() });
  if (loaded.help) {
    process.stdout.write(formatHelp(serveProgram) + "\n\ncommands:\n  kmi kdc init --help      set up a data directory first\n  kmi kdc backup --help    a consistent snapshot of a stopped KDC's store (keys stay sealed; no master key)\n  kmi kdc restore --help   a backup into an empty data directory\n  kmi kdc rekey --help     rotate the master key (rewraps every sealed record)\n");
    return 0;
  }
  const v = loaded.values;
  const logger = createLogger({ level: parseLogLevel(v.logLevel), fields: { program: "kdc" } });
  const server = await KdcServer.create({
    dataDir: v.dataDir,
    store: storeBackendFrom(v, KDC_ETCD_PREFIX),
    listen: v.listen,
    masterKey: v.masterKey,
    masterKeyFile: v.masterKeyFile,
    tls: tlsNames(v.dnsName, v.ip),
    logger,
    metricsListen: v.metricsListen,
    shutdownTimeoutMs: v.shutdownTimeoutMs,
    auditUrl: v.auditUrl,
    attestationKeyFile: v.attestationKeyFile,
    portalDir: v.portalDir,
    leaseMs: parseLease(v.lease),
    pendingTtlMs: parsePendingTtl(v.pendingTtl),
    signLeafRate: { perSecond: v.signLeafRate, burst: v.signLeafBurst },
    watch: { maxStreams: v.maxWatchStreams, maxOpening: v.maxConcurrentOpens },
    scheduler: { intervalMs: parseSchedulerInterval(v.schedulerInterval), electionTtlSeconds: parseElectionTtl(v.electionTtl) },
    pkcs11: pkcs11Settings(v),
  });
  // A clean stop lets the event loop drain (log lines flushed); a forced or failed one exits now.
  return runUntilSignal(server, { logger, exit: (code) => (code === 0 ? void (process.exitCode = 0) : process.exit(code)) });
}

/** Entry point of `kmi kdc` (called by cmd/kmi.ts). */
export async function main(argv: string[]): Promise<number> {
  usePrivateUmask(); // every file under the data dir 0600 (see data-dir.ts for why a umask)
  try {
    if (argv[0] === "init") return await init(argv.slice(1));
    if (argv[0] === "backup") return await backupMain(argv.slice(1), environment());
    if (argv[0] === "restore") return await restoreMain(argv.slice(1), environment());
    if (argv[0] === "rekey") return await rekeyMain(kdcRekeyTarget, argv.slice(1), environment());
    return await serve(argv);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`kmi kdc: ${err.message}\n`);
      return 2;
    }
    if (isKmiError(err)) {
      process.stderr.write(`kmi kdc: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}
