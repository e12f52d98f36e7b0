/**
 * Entry point of `kmi audit` (serve) and `kmi audit init`.
 */
import { readFile, writeFile } from "node:fs/promises";
import { ConfigError, describeConfig, formatHelp, loadConfig } from "../common/config.js";
import { isKmiError, InvalidArgument } from "../common/errors.js";
import { runUntilSignal } from "../common/lifecycle.js";
import { createLogger, parseLogLevel } from "../common/logger.js";
import { storeBackendFrom } from "../storage/backend.js";
import { AUDIT_ETCD_PREFIX, initProgram, serveProgram } from "./config.js";
import { rekeyMain } from "../storage/rekey-command.js";
import { auditRekeyTarget } from "./rekey.js";
import { dataPaths, initAudit, readPemFile } from "./init.js";
import { AuditServer } from "./server.js";
import { usePrivateUmask } from "../common/data-dir.js";

function splitList(value: string | undefined): string[] {
  return (value ?? "").split(",").map((s) => s.trim()).filter((s) => s !== "");
}

async function operatorToken(token: string | undefined, tokenFile: string | undefined): Promise<string> {
  if (token !== undefined && token !== "") return token.trim();
  if (tokenFile === undefined) throw new InvalidArgument("an operator token is needed to have the KDC issue the Auditserver's certificate; give --token-file (or KMI_AUDIT_TOKEN)");
  try {
    return (await readFile(tokenFile, "utf8")).trim();
  } catch (err) {
    throw new InvalidArgument(`--token-file: cannot read ${tokenFile} (${(err as NodeJS.ErrnoException).code ?? "error"}); check the path`);
  }
}

async function init(argv: string[]): Promise<number> {
  const loaded = await loadConfig(initProgram, argv);
  if (loaded.help) {
    process.stdout.write(formatHelp(initProgram) + "\n");
    return 0;
  }
  const v = loaded.values;
  const r = await initAudit({
    dataDir: v.dataDir,
    store: storeBackendFrom(v, AUDIT_ETCD_PREFIX),
    masterKey: v.masterKey,
    masterKeyFile: v.masterKeyFile,
    kdcUrl: v.kdc,
    kdcCaPem: await readPemFile(v.kdcCaFile, "--kdc-ca-file"),
    token: await operatorToken(v.token, v.tokenFile),
    tls: { dnsNames: splitList(v.dnsName), ipAddresses: splitList(v.ip) },
    validityDays: v.validityDays,
    reissueCertificate: v.reissueCertificate,
  });
  const paths = dataPaths(v.dataDir, v.masterKeyFile);
  process.stdout.write(
    [
      r.reissued ? `re-issued the Auditserver's TLS certificate in ${v.dataDir}` : `initialized the Auditserver in ${v.dataDir} (audit id ${r.auditId})`,
      ...(r.reissued
        ? []
        : [r.masterKeyFile !== undefined ? `  master key:        ${r.masterKeyFile} (0600; back it up apart from the data: without it nothing opens)` : "  master key:        from the environment (nothing written)"]),
      `  TLS certificate:   kmi://service/audit, sha256 ${r.certificateSha256}, valid until ${r.certificateNotAfter.toISOString()}`,
      `  infrastructure CA: ${paths.infraCaPem} (what machines and kmi ctl trust)`,
      `  attestation key:   ${paths.attestationKeyPem} (kid ${r.attestationKeyId}; the KDC verifies tokens with it, or fetches it with GetAttestationKey)`,
      "",
      "next:",
      `  kmi audit --data-dir ${v.dataDir}`,
      `  export KMI_CTL_AUDIT=https://127.0.0.1:7444 KMI_CTL_CA_FILE=${paths.infraCaPem} KMI_CTL_TOKEN_FILE=${v.tokenFile ?? "<file with the token>"}`,
      "  # a group serves the tenants it names (--tenant, repeatable), or every tenant with --all-tenants",
      "  kmi ctl group create edge --tenant acme",
      "",
    ].join("\n"),
  );
  return 0;
}

async function serve(argv: string[]): Promise<number> {
  const loaded = await loadConfig(serveProgram, argv);
  if (loaded.help) {
    process.stdout.write(formatHelp(serveProgram) + "\n\ncommands:\n  kmi audit init --help   set up a data directory first\n  kmi audit rekey --help  rotate the master key (rewraps every sealed record)\n");
    return 0;
  }
  const v = loaded.values;
  const logger = createLogger({ level: parseLogLevel(v.logLevel), fields: { program: "audit" } });
  logger.info("configuration", describeConfig(serveProgram, loaded));
  const offsetMs = v.clockOffsetSeconds * 1000;
  if (offsetMs !== 0) logger.warn("clock offset set: token and nonce expiry use a shifted clock; for tests only", { clock_offset_seconds: v.clockOffsetSeconds });
  const server = await AuditServer.create({
    dataDir: v.dataDir,
    store: storeBackendFrom(v, AUDIT_ETCD_PREFIX),
    listen: v.listen,
    kdcUrl: v.kdc,
    masterKey: v.masterKey,
    masterKeyFile: v.masterKeyFile,
    logger,
    clock: { now: () => new Date(Date.now() + offsetMs) },
    metricsListen: v.metricsListen,
    shutdownTimeoutMs: v.shutdownTimeoutMs,
  });
  return runUntilSignal(server, {
    logger,
    exit: (code) => void (process.exitCode = code),
    onStarted: async (bound) => {
      if (v.readyFile !== undefined && bound.tcp !== undefined) await writeFile(v.readyFile, bound.tcp + "\n");
    },
  });
}

/** Entry point of `kmi audit` (called by cmd/kmi.ts). */
export async function main(argv: string[]): Promise<number> {
  usePrivateUmask(); // every file under the data dir 0600 (see data-dir.ts for why a umask)
  try {
    if (argv[0] === "init") return await init(argv.slice(1));
    if (argv[0] === "rekey") return await rekeyMain(auditRekeyTarget, argv.slice(1), process.env);
    return await serve(argv);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`kmi audit: ${err.message}\n`);
      return 2;
    }
    if (isKmiError(err)) {
      process.stderr.write(`kmi audit: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}
