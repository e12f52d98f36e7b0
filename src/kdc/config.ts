/**
 * The options of `kmi kdc` and `kmi kdc init` (flags, KMI_KDC_* environment, JSON config file).
 */
import { ConfigError, defineProgram, storeOptions } from "../common/config.js";
import type { Pkcs11Settings } from "./root-keys.js";
import { LOG_LEVELS } from "../common/logger.js";
import { httpsUrl, httpsUrlList } from "../common/urls.js";

/** Default etcd key prefix of the KDC's tables. */
export const KDC_ETCD_PREFIX = "kmi/kdc";

/** The token of the roots' keys and of a wrapped master key: `--pkcs11-module`, `--pkcs11-token`, `--pkcs11-pin-file`. */
export const pkcs11Flags = {
  pkcs11Module: {
    type: "string",
    description: "PKCS#11 library holding the roots' keys (init makes them there, non-extractable), e.g. /usr/lib/softhsm/libsofthsm2.so; with --pkcs11-token and --pkcs11-pin-file",
    valueName: "file",
  },
  pkcs11Token: { type: "string", description: "label of the PKCS#11 token that holds the roots' keys (and the key that wraps the master key, with --master-key-wrap pkcs11)", valueName: "label" },
  pkcs11PinFile: { type: "string", description: "file holding the token's user PIN (mode 0600)", valueName: "file" },
} as const;

const common = {
  dataDir: { type: "string", description: "data directory: LevelDB store, master key file, public CA files", default: "data/kdc", valueName: "dir" },
  masterKeyFile: { type: "string", description: "master key file, mode 0600 (default <data-dir>/master.key)", valueName: "file" },
  masterKey: {
    type: "string",
    description: "master key as base64 instead of a file (prefer the environment: argv is visible to other users; KMI_MASTER_KEY works too)",
    secret: true,
    valueName: "base64",
  },
  dnsName: { type: "string", description: "extra DNS names for the KDC's TLS certificate, comma-separated (localhost is always in)", valueName: "names" },
  ip: { type: "string", description: "extra IP addresses for the KDC's TLS certificate, comma-separated (127.0.0.1 and ::1 are always in)", valueName: "addrs" },
  logLevel: { type: "string", description: "log level", default: "info", choices: LOG_LEVELS },
  ...storeOptions(KDC_ETCD_PREFIX),
  ...pkcs11Flags,
} as const;

/** `--master-key-wrap` and its label: init and rekey (a running KDC reads the label from the key file). */
export const masterKeyWrapOptions = {
  masterKeyWrap: {
    type: "string",
    description:
      "pkcs11: the master key file holds the key wrapped by an AES key inside the --pkcs11-* token (made there, not extractable), so the key is in the clear only in the memory of a process logged in to the token; none: init writes the key itself, rekey keeps the key file's way (a wrapped key's successor is wrapped by the same token key)",
    default: "none",
    choices: ["none", "pkcs11"],
  },
  masterKeyWrapLabel: { type: "string", description: "label of the token's AES key that wraps the master key (made when missing)", default: "kmi/master-key-wrap", valueName: "label" },
} as const;

/** The label to wrap new master key files with (undefined: not wrapped). */
export function masterKeyWrapLabel(v: { masterKeyWrap: string; masterKeyWrapLabel: string }): string | undefined {
  return v.masterKeyWrap === "pkcs11" ? v.masterKeyWrapLabel : undefined;
}

/** The PKCS#11 settings from the three --pkcs11-* options: all three or none (ConfigError otherwise). */
export function pkcs11Settings(v: { pkcs11Module?: string | undefined; pkcs11Token?: string | undefined; pkcs11PinFile?: string | undefined }): Pkcs11Settings | undefined {
  const given = [v.pkcs11Module, v.pkcs11Token, v.pkcs11PinFile].filter((x) => x !== undefined && x !== "").length;
  if (given === 0) return undefined;
  if (given !== 3) throw new ConfigError("--pkcs11-module, --pkcs11-token and --pkcs11-pin-file go together; give all three (or none for keys sealed in the store)");
  return { module: v.pkcs11Module!, token: v.pkcs11Token!, pinFile: v.pkcs11PinFile! };
}

/** `kmi kdc`: serve. */
export const serveProgram = defineProgram({
  program: "kdc",
  usage: "kmi kdc [flags]   (first: kmi kdc init)",
  summary:
    "Runs the KDC: the tenant-facing certificate API (KdcService), the operator API (KdcAdminService), the peer API for kmi services, " +
    "the machine-facing DistributionService, health and reflection, over TLS on TCP (gRPC, gRPC-Web and Connect). Client certificates from the " +
    "infrastructure CA are verified when sent (mutual TLS mode optional); operator and tenant calls use bearer tokens, machines their certificate " +
    "and an attestation token verified with the Auditserver's key. SIGTERM ends watch streams, drains in-flight calls and closes the store.",
  options: {
    ...common,
    listen: { type: "string", description: "TCP address to serve on (port 0 picks a free port)", default: "127.0.0.1:7443", valueName: "host:port" },
    metricsListen: { type: "string", description: "address of the Prometheus /metrics endpoint: host:port, or unix:PATH for a Unix socket (off when unset)", valueName: "address" },
    shutdownTimeoutMs: { type: "integer", description: "how long in-flight calls get on shutdown, ms", default: 10000 },
    auditUrl: {
      type: "string",
      description:
        "the Auditserver (https://host:port, its certificate from the infrastructure CA; its replicas comma-separated): the KDC fetches the attestation key from it (unless --attestation-key-file) and follows its machine status stream for quarantines",
      valueName: "url[,...]",
      validate: httpsUrlList,
    },
    attestationKeyFile: {
      type: "string",
      description: "the Auditserver's attestation public key, PEM (its attestation-key.pem); instead of fetching it from --audit-url",
      valueName: "file",
    },
    portalDir: {
      type: "string",
      description: "folder of the web portal's bundle, served on the KDC's origin (default: the dist/web built by `npm run build:web`)",
      valueName: "dir",
    },
    lease: {
      type: "string",
      description: "how long an agent may use a released secret without hearing from the KDC again (e.g. 90m, 24h, 7d; 1m to 30d)",
      default: "24h",
      valueName: "duration",
      validate: (v: string) => void parseLease(v),
    },
    maxWatchStreams: {
      type: "integer",
      description: "watch streams this replica holds before it sheds new ones with UNAVAILABLE and a retry-after-ms hint (the agents go to another replica)",
      default: 20_000,
      validate: atLeastOne,
    },
    signLeafRate: {
      type: "integer",
      description: "leaves one machine may have the KDC sign per second with a token-held intermediate (SignLeaf); past it, RESOURCE_EXHAUSTED",
      default: 50,
      validate: atLeastOne,
    },
    signLeafBurst: {
      type: "integer",
      description: "leaves one machine may have signed in a burst above --sign-leaf-rate (a proxy meeting many new hosts at once)",
      default: 500,
      validate: atLeastOne,
    },
    maxConcurrentOpens: {
      type: "integer",
      description: "stream opens and fetches in progress at once before new ones are shed with UNAVAILABLE and a retry-after-ms hint",
      default: 512,
      validate: atLeastOne,
    },
    schedulerInterval: {
      type: "string",
      description:
        "how often the elected replica's rotation scheduler runs (e.g. 60s, 5m; 1s to 1h; values under 1s, e.g. 200ms, are for tests only)",
      default: "60s",
      valueName: "duration",
      validate: (v: string) => void parseSchedulerInterval(v),
    },
    electionTtl: {
      type: "string",
      description: "lease of the scheduler's election on etcd: how long a dead or paused leader holds up scheduled work (2s to 5m)",
      default: "10s",
      valueName: "duration",
      validate: (v: string) => void parseElectionTtl(v),
    },
    pendingTtl: {
      type: "string",
      description: "how long a pending version (a CSR from `kmi ctl ca csr`) waits for its signed certificate before an upload is refused (e.g. 30d; 1s to 365d)",
      default: "30d",
      valueName: "duration",
      validate: (v: string) => void parsePendingTtl(v),
    },
  },
});

function atLeastOne(value: number): void {
  if (!Number.isSafeInteger(value) || value < 1) throw new Error("must be a whole number of 1 or more");
}

/** Parses a lease duration: a number with s, m, h or d (seconds without a unit), 1 minute to 30 days; returns ms. */
export function parseLease(text: string): number {
  const m = /^(\d{1,9})([smhd]?)$/.exec(text.trim());
  if (m === null) throw new Error(`"${text}" is not a duration; use e.g. 90m, 24h or 7d`);
  const seconds = Number(m[1]) * { "": 1, s: 1, m: 60, h: 3600, d: 86400 }[m[2] as "" | "s" | "m" | "h" | "d"];
  if (seconds < 60 || seconds > 30 * 86400) throw new Error(`"${text}" is out of range; use 1m to 30d`);
  return seconds * 1000;
}

/** Parses the scheduler interval: a number with ms, s, m or h; 100 ms (tests) to 1 hour; returns ms. */
export function parseSchedulerInterval(text: string): number {
  const m = /^(\d{1,9})(ms|s|m|h)$/.exec(text.trim());
  if (m === null) throw new Error(`"${text}" is not a duration; use e.g. 60s or 5m`);
  const ms = Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as "ms" | "s" | "m" | "h"];
  if (ms < 100 || ms > 3_600_000) throw new Error(`"${text}" is out of range; use 1s to 1h (100ms or more in tests)`);
  return ms;
}

/** Parses the election lease: a number with s or m; 2 seconds to 5 minutes; returns whole seconds. */
export function parseElectionTtl(text: string): number {
  const m = /^(\d{1,6})(s|m)$/.exec(text.trim());
  if (m === null) throw new Error(`"${text}" is not a duration; use e.g. 10s`);
  const s = Number(m[1]) * (m[2] === "m" ? 60 : 1);
  if (s < 2 || s > 300) throw new Error(`"${text}" is out of range; use 2s to 5m`);
  return s;
}

/** Parses the pending-version TTL: a number with s, m, h or d (seconds without a unit), 1 second to 365 days; returns ms. */
export function parsePendingTtl(text: string): number {
  const m = /^(\d{1,9})([smhd]?)$/.exec(text.trim());
  if (m === null) throw new Error(`"${text}" is not a duration; use e.g. 30d, 72h or 90m`);
  const seconds = Number(m[1]) * { "": 1, s: 1, m: 60, h: 3600, d: 86400 }[m[2] as "" | "s" | "m" | "h" | "d"];
  if (seconds < 1 || seconds > 365 * 86400) throw new Error(`"${text}" is out of range; use 1s to 365d`);
  return seconds * 1000;
}


/** `kmi kdc init`: make the data dir, the master key, the two roots, the TLS certificate and a first operator token. */
export const initProgram = defineProgram({
  program: "kdc",
  usage: "kmi kdc init [flags]",
  summary:
    "Creates the KDC's data directory (0700), the master key file (0600, unless the key comes from the environment; wrapped by a PKCS#11 " +
    "token's key with --master-key-wrap pkcs11), the KMI root CA and the infrastructure CA (separate ECDSA P-256 keys, sealed in the store, " +
    "or made inside the token with --pkcs11-*), the KDC's TLS certificate, the public kmi-root.pem and infra-ca.pem, " +
    "and a first operator token, printed once. Refuses a data directory that is initialized already.",
  options: {
    ...common,
    ...masterKeyWrapOptions,
    tokenFile: { type: "string", description: "also write the operator token to this file (mode 0600)", valueName: "file", noEnv: true },
  },
});
