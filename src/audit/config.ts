/**
 * The options of `kmi audit` and `kmi audit init` (flags, KMI_AUDIT_* environment, JSON config
 * file). Only this module (through common/config.ts) reads the environment.
 */
import { defineProgram, storeOptions } from "../common/config.js";
import { LOG_LEVELS } from "../common/logger.js";
import { httpsUrlList } from "../common/urls.js";

/** Default KDC URL (what `kmi kdc` listens on by default). */
export const DEFAULT_KDC_URL = "https://127.0.0.1:7443";


/** Default etcd key prefix of the Auditserver's tables. */
export const AUDIT_ETCD_PREFIX = "kmi/audit";

const common = {
  dataDir: { type: "string", description: "data directory: LevelDB store, master key file, public PEM files", default: "data/audit", valueName: "dir" },
  masterKeyFile: { type: "string", description: "master key file, mode 0600 (default <data-dir>/master.key)", valueName: "file" },
  masterKey: {
    type: "string",
    description: "master key as base64 instead of a file (prefer the environment: argv is visible to other users)",
    secret: true,
    valueName: "base64",
  },
  logLevel: { type: "string", description: "log level", default: "info", choices: LOG_LEVELS },
  ...storeOptions(AUDIT_ETCD_PREFIX),
} as const;

/** `kmi audit`: serve. */
export const serveProgram = defineProgram({
  program: "audit",
  usage: "kmi audit [flags]   (first: kmi audit init)",
  summary:
    "Runs the Auditserver: machine enrollment with one-time join tokens, certificate renewal, attestation (nonces, signed evidence, " +
    "attestation tokens), quarantine, and the operator API (AuditAdminService; operator tokens are checked by the KDC), with health and " +
    "reflection, over TLS on TCP (gRPC, gRPC-Web and Connect). Machines and kmi services authenticate with client certificates from the " +
    "infrastructure CA (mutual TLS mode optional: Enroll and GetAttestationKey need TLS only). SIGTERM drains in-flight calls and closes the store.",
  options: {
    ...common,
    listen: { type: "string", description: "TCP address to serve on (port 0 picks a free port)", default: "127.0.0.1:7444", valueName: "host:port" },
    kdc: { type: "string", description: "the KDC's URL (default: the one given at init); its replicas comma-separated", valueName: "url[,...]", validate: httpsUrlList },
    metricsListen: { type: "string", description: "address of the Prometheus /metrics endpoint: host:port, or unix:PATH for a Unix socket (off when unset)", valueName: "address" },
    shutdownTimeoutMs: { type: "integer", description: "how long in-flight calls get on shutdown, ms", default: 10000 },
    readyFile: { type: "string", description: "write the bound address to this file once serving (for scripts and tests)", valueName: "file", noEnv: true },
    clockOffsetSeconds: {
      type: "integer",
      description: "TESTING ONLY: shift the Auditserver's clock by this many seconds (token and nonce expiry); logged as a warning when set",
      default: 0,
      // A flag only: an environment variable left set by accident would move the clock unseen.
      noEnv: true,
    },
  },
});

/** `kmi audit init`: make the data dir, master key, token-signing key and the service certificate. */
export const initProgram = defineProgram({
  program: "audit",
  usage: "kmi audit init --kdc-ca-file <infra-ca.pem> --token-file <file> [flags]",
  summary:
    "Creates the Auditserver's data directory (0700), the master key file (0600, unless the key comes from the environment), its " +
    "attestation-token signing key (ECDSA P-256, sealed in the store), and its TLS identity kmi://service/audit: a key made here and a " +
    "certificate issued by the KDC's infrastructure CA through KdcAdminService.IssueServiceCertificate with an operator token. Writes the " +
    "public infra-ca.pem and attestation-key.pem. Refuses an initialized data directory unless --reissue-certificate is given, which " +
    "replaces only the TLS identity (new key, new certificate).",
  options: {
    ...common,
    kdc: { type: "string", description: "the KDC's URL; its replicas comma-separated", default: DEFAULT_KDC_URL, valueName: "url[,...]", validate: httpsUrlList },
    kdcCaFile: { type: "string", description: "the KDC's infra-ca.pem (from `kmi kdc init`): trusted for the KDC's TLS certificate", required: true, valueName: "file" },
    token: { type: "string", description: "an operator token (prefer --token-file or the environment: argv is visible to other users)", secret: true, valueName: "kmi_…" },
    tokenFile: { type: "string", description: "file holding an operator token", valueName: "file" },
    dnsName: { type: "string", description: "extra DNS names for the Auditserver's TLS certificate, comma-separated (localhost is always in)", valueName: "names" },
    ip: { type: "string", description: "extra IP addresses for the TLS certificate, comma-separated (127.0.0.1 and ::1 are always in)", valueName: "addrs" },
    validityDays: { type: "integer", description: "lifetime of the TLS certificate in days (1 to 825)", default: 365 },
    reissueCertificate: { type: "boolean", description: "on an initialized data directory: replace the TLS key and certificate only", default: false, noEnv: true },
  },
});
