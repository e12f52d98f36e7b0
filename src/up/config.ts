/**
 * The options of `kmi up` and `kmi up status` (flags, KMI_UP_* environment, JSON config file),
 * resolved into an {@link UpConfig} with absolute paths and parsed listen addresses.
 */
import { resolve } from "node:path";
import { ConfigError, defineProgram, type LoadedConfig } from "../common/config.js";
import { parseListenAddress } from "../common/listen.js";
import { LOG_LEVELS, type LogLevel } from "../common/logger.js";

function tcpAddress(value: string): void {
  if (parseListenAddress(value).kind !== "tcp") throw new Error("must be host:port (port 0 picks a free port)");
}

function tenantId(value: string): void {
  if (!/^[a-z][a-z0-9-]{0,62}$/.test(value)) throw new Error("lowercase letters, digits and '-', 1 to 63 characters, starting with a letter");
}

/** `kmi up`: the whole mesh on this machine. */
export const upProgram = defineProgram({
  program: "up",
  usage: "kmi up [flags]   (kmi up status [--json]: the health of a running kmi up)",
  summary:
    "Runs the whole mesh on this machine as supervised child processes: the KDC, the Auditserver, one key agent and the proxy. " +
    "On first run it initializes everything under --data-dir (the KDC's roots, the Auditserver, a dev tenant with a KMI-signed " +
    "intermediate, a machine group whose approved measurements are this build's, a join token for the agent); later runs reuse it. " +
    "Logs go to <data-dir>/logs/<part>.log; a part that dies is restarted with exponential backoff. " +
    "Ctrl-C (SIGINT), SIGTERM or SIGHUP stops the parts in reverse order (proxy, agent, Auditserver, KDC) and exits 0 once all have exited. " +
    "With --ha the KDC and the Auditserver run as replicas on a local etcd cluster (see --ha); the store is LevelDB otherwise.",
  allowPositionals: true,
  options: {
    dataDir: { type: "string", description: "where all state lives: KDC, Auditserver, agent, logs, operator token", default: "data", valueName: "dir" },
    runDir: { type: "string", description: "sockets (the agent's, the metrics endpoints) and the run-state file", default: "run", valueName: "dir" },
    kdcListen: { type: "string", description: "the KDC's TCP address (port 0 picks a free port)", default: "127.0.0.1:7443", valueName: "host:port", validate: tcpAddress },
    auditListen: {
      type: "string",
      description: "the Auditserver's TCP address (port 0 picks a free port)",
      default: "127.0.0.1:7444",
      valueName: "host:port",
      validate: tcpAddress,
    },
    proxyListen: { type: "string", description: "the proxy's TCP address (port 0 picks a free port)", default: "127.0.0.1:8080", valueName: "host:port", validate: tcpAddress },
    tenant: { type: "string", description: "the tenant made on first run, and the proxy's default tenant", default: "dev", valueName: "id", validate: tenantId },
    originCaFile: {
      type: "string",
      description: "extra CA certificates (PEM files, comma-separated) the proxy trusts for origins besides the system roots, e.g. a test origin's CA",
      valueName: "files",
    },
    proxyAllowPrivate: {
      type: "string",
      description:
        "private or special-use address ranges the proxy may connect to (comma-separated CIDRs, e.g. 127.0.0.0/8 for an origin on this " +
        "machine); the proxy refuses every other loopback, private and link-local destination",
      valueName: "cidr,...",
    },
    proxyIssueRate: { type: "integer", description: "the proxy's new-host leaf issuances per second per client address (0: no limit; its --issue-rate)", default: 20 },
    proxyIssueBurst: { type: "integer", description: "the proxy's burst of new-host issuances per client address (its --issue-burst)", default: 100 },
    proxyWorkers: {
      type: "string",
      description: "the proxy's worker processes (its --workers): a number, auto = one per core, 0 = one process; 2 by default, so that a dev machine runs the shared-leaf path without one process per core",
      default: "2",
      valueName: "n|auto",
    },
    logLevel: { type: "string", description: "log level of the parts (their logs go to <data-dir>/logs)", default: "info", choices: LOG_LEVELS },
    readyTimeoutSeconds: { type: "integer", description: "how long each part may take to become healthy at start", default: 120 },
    json: { type: "boolean", description: "print a machine-readable health summary on stdout once ready (progress goes to stderr)", default: false },
    ha: {
      type: "boolean",
      description:
        "high availability on one machine: a local 3-member etcd cluster (the system's etcd binary: apt-get install etcd-server; TLS with client " +
        "certificates from an etcd CA made under <data-dir>/etcd) as the store of 3 KDC and 2 Auditserver replicas; the agent gets every replica's URL. " +
        "Replica N listens on the first one's port + 10×(N-1) (7443, 7453, 7463; 7444, 7454), or on a free port with port 0. " +
        "A data dir is either --ha or not, for its whole life",
      default: false,
    },
  },
});

/** A TCP address as `kmi up` uses it. */
export interface TcpAddress {
  /** Host to bind. */
  readonly host: string;
  /** Port; 0 until resolved to a free one. */
  readonly port: number;
}

/** Most workers the proxy's --workers takes (its own check says the same). */
const MAX_WORKERS = 256;

/** The resolved configuration of `kmi up`. */
export interface UpConfig {
  /** Absolute data directory. */
  readonly dataDir: string;
  /** Absolute run directory. */
  readonly runDir: string;
  /** Listen addresses of the three TCP servers. */
  readonly listen: { readonly kdc: TcpAddress; readonly audit: TcpAddress; readonly proxy: TcpAddress };
  /** The dev tenant. */
  readonly tenant: string;
  /** Absolute paths of extra origin CA files for the proxy. */
  readonly originCaFiles: readonly string[];
  /** Private address ranges the proxy may connect to (its --allow-private). */
  readonly proxyAllowPrivate: readonly string[];
  /** The proxy's per-address new-host issuance limit (its --issue-rate, --issue-burst). */
  readonly proxyIssueLimit: { readonly rate: number; readonly burst: number };
  /** The proxy's --workers: a number or "auto". */
  readonly proxyWorkers: string;
  /** Log level of the parts. */
  readonly logLevel: LogLevel;
  /** Per-part start deadline, ms. */
  readonly readyTimeoutMs: number;
  /** Print the JSON summary. */
  readonly json: boolean;
  /** `--ha`: etcd, 3 KDC and 2 Auditserver replicas. */
  readonly ha: boolean;
}

function tcp(value: string): TcpAddress {
  const a = parseListenAddress(value);
  if (a.kind !== "tcp") throw new ConfigError(`"${value}" must be host:port`);
  return { host: a.host, port: a.port };
}

/** Turns loaded options into an {@link UpConfig}; relative paths are taken from `cwd`. */
export function resolveUpConfig(loaded: LoadedConfig<typeof upProgram.options>, cwd: string = process.cwd()): UpConfig {
  const v = loaded.values;
  if (v.readyTimeoutSeconds < 5 || v.readyTimeoutSeconds > 3600) throw new ConfigError("--ready-timeout-seconds: 5 to 3600");
  if (v.proxyIssueRate < 0) throw new ConfigError("--proxy-issue-rate: must be 0 (no limit) or more");
  if (v.proxyIssueBurst < 1) throw new ConfigError("--proxy-issue-burst: must be 1 or more");
  if (v.proxyWorkers !== "auto" && !(/^\d+$/.test(v.proxyWorkers) && Number(v.proxyWorkers) <= MAX_WORKERS)) {
    throw new ConfigError(`--proxy-workers: must be "auto" or a number from 0 to ${MAX_WORKERS}`);
  }
  const originCaFiles = (v.originCaFile ?? "")
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "")
    .map((s) => resolve(cwd, s));
  return {
    dataDir: resolve(cwd, v.dataDir),
    runDir: resolve(cwd, v.runDir),
    listen: { kdc: tcp(v.kdcListen), audit: tcp(v.auditListen), proxy: tcp(v.proxyListen) },
    tenant: v.tenant,
    originCaFiles,
    proxyAllowPrivate: (v.proxyAllowPrivate ?? "").split(",").map((s) => s.trim()).filter((s) => s !== ""),
    proxyIssueLimit: { rate: v.proxyIssueRate, burst: v.proxyIssueBurst },
    proxyWorkers: v.proxyWorkers,
    logLevel: v.logLevel as LogLevel,
    readyTimeoutMs: v.readyTimeoutSeconds * 1000,
    json: v.json,
    ha: v.ha,
  };
}

/**
 * The environment the parts run with: this process's, without any KMI_* setting of the parts
 * (KMI_KDC_*, KMI_AUDIT_*, KMI_AGENT_*, KMI_PROXY_*, KMI_CTL_*, KMI_MASTER_KEY). `kmi up` passes
 * every setting a part needs as a flag or in the part's config file; a stray variable in the
 * operator's shell (another KDC's master key, a join token) must not change what runs.
 */
export function partEnvironment(env: NodeJS.ProcessEnv = process.env): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) continue;
    if (/^KMI_(KDC|AUDIT|AGENT|PROXY|CTL)_/.test(k) || k === "KMI_MASTER_KEY") continue;
    out[k] = v;
  }
  return out;
}

/** True when colours may be used on a terminal (https://no-color.org). */
export function colorAllowed(env: NodeJS.ProcessEnv = process.env): boolean {
  return (env["NO_COLOR"] ?? "") === "" && env["TERM"] !== "dumb";
}
