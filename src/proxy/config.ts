/**
 * The options of `kmi proxy` (flags, KMI_PROXY_* environment, JSON config file) and their
 * resolution into ProxyServerOptions: files read, the tenants file validated, limits checked.
 * The only proxy module that touches the environment (through common/config.ts).
 */
import { readFile } from "node:fs/promises";
import { availableParallelism } from "node:os";
import { resolve } from "node:path";
import { ConfigError, defineProgram, type LoadedConfig } from "../common/config.js";
import { parseListenAddress } from "../common/listen.js";
import { LOG_LEVELS, type LogLevel } from "../common/logger.js";
import type { ProxyLimits } from "./context.js";
import { DestinationGuard } from "./destinations.js";
import { MAX_LEAF_LIFETIME_MS } from "./leaf-minter.js";
import { workerAllocator, type AllocatorChoice, type WorkerAllocator } from "./allocator.js";
import type { ProxyServerOptions } from "./server.js";
import { createTenantResolver, type TenantConfig } from "./tenants.js";

function positive(value: number): void {
  if (!(value > 0)) throw new Error("must be a positive number");
}

/** Most workers `--workers` takes. */
export const MAX_WORKERS = 256;

function workerCount(value: string): void {
  if (value === "auto") return;
  if (!/^\d+$/.test(value) || Number(value) > MAX_WORKERS) throw new Error(`must be "auto" or a number from 0 to ${MAX_WORKERS}`);
}

function tcpAddress(value: string): void {
  const a = parseListenAddress(value);
  if (a.kind !== "tcp") throw new Error(`"${value}" is a Unix socket path; the proxy listens on host:port`);
}

/** `kmi proxy`. */
export const proxyProgram = defineProgram({
  program: "proxy",
  usage: "kmi proxy [flags]",
  summary:
    "Runs the TLS-inspecting forward proxy. Plain http:// requests are forwarded and inspected; a CONNECT is intercepted: the " +
    "proxy meets the origin first (same SNI and ALPN offers), verifies its certificate, mints a leaf that copies its names " +
    "(an ECDSA P-256 key made in memory, the certificate issued by the key agent over its Unix socket with the tenant's " +
    "intermediate), and inspects the decrypted HTTP/1.1 or HTTP/2. The proxy never holds a KMI-managed key. SIGHUP rereads " +
    "the policy file and reopens the access log; SIGTERM finishes in-flight requests and stops.",
  options: {
    listen: { type: "string", description: "address to listen on", default: "127.0.0.1:8080", valueName: "host:port", validate: tcpAddress },
    workers: {
      type: "string",
      description:
        "worker processes sharing the listener (node:cluster): auto = one per core; 0 = serve in this one process. The primary holds " +
        "the agent connection, mints each host's leaf once for all workers, shares the session ticket keys, and replaces a worker that dies",
      default: "auto",
      valueName: "n|auto",
      validate: workerCount,
    },
    allocator: {
      type: "string",
      description:
        "the workers' memory allocator: system = the C library's; jemalloc (Debian: libjemalloc2; refused when not installed) gives the " +
        "memory of closed connections back to the system, which glibc keeps, but costs more CPU per large body (docs/proxy.md); " +
        "auto = jemalloc when installed, else system",
      default: "system",
      choices: ["auto", "jemalloc", "system"],
    },
    agentSocket: { type: "string", description: "the key agent's Unix socket", default: "/run/kmi/agent.sock", valueName: "path" },
    defaultTenant: { type: "string", description: "tenant of clients that no address range or proxy user matches (overrides the tenants file's)", valueName: "id" },
    tenantsFile: {
      type: "string",
      description:
        'tenants, JSON: {"tenants": [{"id", "cidrs": [...], "users": [{"name", "passwordHash"}], "policy": {...}}], "defaultTenant", "requireAuth"}; ' +
        "passwordHash from `kmi proxy hash-password` (the older passwordSha256 is accepted, with a warning); a tenant's policy " +
        "overrides the global one field by field and is reloaded with it",
      valueName: "file",
    },
    requireAuth: { type: "boolean", description: "refuse clients without proxy credentials (407)", default: false },
    policy: { type: "string", description: "inspection policy file, JSON (block/bypass hosts, block URLs, scanning); reloaded on change and SIGHUP", valueName: "file" },
    accessLog: { type: "string", description: 'access log: a file path, "-" for stdout, or "off"', default: "-", valueName: "path" },
    accessLogQuery: {
      type: "boolean",
      description: "keep query strings in the access log (they often carry tokens and personal data; by default /a?b=c is logged as /a?)",
      default: false,
    },
    extraCa: { type: "string", description: "more CA files (PEM, comma-separated) trusted for origins, besides Node's root store", valueName: "file,..." },
    systemRoots: { type: "boolean", description: "trust Node's root store for origins", default: true },
    allowPrivate: {
      type: "string",
      description:
        "private and special-use address ranges the proxy may connect to (comma-separated CIDRs, e.g. 10.0.0.0/8); all other " +
        "loopback, RFC 1918, link-local (cloud metadata), unique-local and reserved addresses are refused, checked after DNS",
      valueName: "cidr,...",
    },
    leafCacheSize: { type: "integer", description: "most minted leaves kept (least recently used go first)", default: 10_000, validate: positive },
    leafMaxDays: { type: "integer", description: "longest leaf lifetime asked of the agent, days (at most 47)", default: 47, validate: positive },
    issueRate: { type: "integer", description: "new-host leaf issuances per second per client address (0: no limit)", default: 20 },
    issueBurst: { type: "integer", description: "burst of new-host issuances per client address", default: 100, validate: positive },
    clientHelloTimeoutMs: { type: "integer", description: "time a client has to send its ClientHello after the CONNECT, ms", default: 10_000, validate: positive },
    handshakeTimeoutMs: { type: "integer", description: "time a client has to finish its TLS handshake, ms", default: 10_000, validate: positive },
    originTimeoutMs: { type: "integer", description: "time for the origin's connect and TLS handshake, ms", default: 10_000, validate: positive },
    idleTimeoutMs: { type: "integer", description: "idle connections (tunnels, keep-alive, HTTP/2) are closed after, ms", default: 120_000, validate: positive },
    headersTimeoutMs: { type: "integer", description: "time a client has to send a request's headers, ms", default: 20_000, validate: positive },
    requestTimeoutMs: { type: "integer", description: "time a client has to send a whole request, ms", default: 300_000, validate: positive },
    keepAliveTimeoutMs: { type: "integer", description: "idle HTTP/1.1 keep-alive connections are closed after, ms", default: 5_000, validate: positive },
    originIdleTimeoutMs: {
      type: "integer",
      description: "an intercepted connection's origin side (HTTP/1.1 or HTTP/2) is closed after this long without a request, ms (reopened on the next one)",
      default: 15_000,
      validate: positive,
    },
    maxHeaderBytes: { type: "integer", description: "largest request header block, bytes", default: 16_384, validate: positive },
    ticketKeyRotationSeconds: {
      type: "integer",
      description: "time between rotations of the TLS session ticket keys (per tenant, in memory only; tickets under the old keys then do a full handshake); 0: only on a revoke or quarantine",
      default: 3600,
    },
    shutdownGraceMs: { type: "integer", description: "time in-flight requests get on shutdown, ms", default: 10_000 },
    metricsListen: { type: "string", description: "address of the Prometheus /metrics endpoint: host:port, or unix:PATH for a Unix socket (off when unset)", valueName: "address" },
    logLevel: { type: "string", description: "log level", default: "info", choices: LOG_LEVELS },
  },
});

type Values = LoadedConfig<typeof proxyProgram.options>["values"];

/** The proxy's configuration, resolved. */
export interface ProxyConfig extends Omit<ProxyServerOptions, "logger"> {
  /** Log level. */
  readonly logLevel: LogLevel;
  /** Worker processes (`auto` resolved to the cores); 0 serves in one process. */
  readonly workers: number;
  /** The workers' allocator (with `--workers 0`, whatever the process was started with). */
  readonly allocator: WorkerAllocator;
}

/** The tenants file's shape. */
interface TenantsFile {
  tenants?: TenantConfig[];
  defaultTenant?: string;
  requireAuth?: boolean;
}

async function readTenantsFile(path: string): Promise<TenantsFile> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    throw new ConfigError(`--tenants-file ${path}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`--tenants-file ${path}: not valid JSON (${(err as Error).message})`);
  }
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) throw new ConfigError(`--tenants-file ${path}: must be a JSON object with "tenants"`);
  const d = doc as Record<string, unknown>;
  for (const k of Object.keys(d)) {
    if (k !== "tenants" && k !== "defaultTenant" && k !== "requireAuth") throw new ConfigError(`--tenants-file ${path}: unknown key "${k}"; keys are tenants, defaultTenant, requireAuth`);
  }
  if (d["tenants"] !== undefined && !Array.isArray(d["tenants"])) throw new ConfigError(`--tenants-file ${path}: "tenants" must be a list`);
  if (d["defaultTenant"] !== undefined && typeof d["defaultTenant"] !== "string") throw new ConfigError(`--tenants-file ${path}: "defaultTenant" must be a string`);
  if (d["requireAuth"] !== undefined && typeof d["requireAuth"] !== "boolean") throw new ConfigError(`--tenants-file ${path}: "requireAuth" must be true or false`);
  return d as TenantsFile;
}

async function readPemFiles(list: string): Promise<string[]> {
  const out: string[] = [];
  for (const f of list.split(",").map((s) => s.trim()).filter((s) => s !== "")) {
    let text: string;
    try {
      text = await readFile(f, "utf8");
    } catch (err) {
      throw new ConfigError(`--extra-ca ${f}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
    if (!text.includes("-----BEGIN CERTIFICATE-----")) throw new ConfigError(`--extra-ca ${f}: no PEM certificate in it; give CA certificates in PEM`);
    out.push(text);
  }
  return out;
}

/** Resolves loaded options into the server's configuration; ConfigError names the flag. */
export async function resolveProxyConfig(loaded: LoadedConfig<typeof proxyProgram.options>): Promise<ProxyConfig> {
  const v: Values = loaded.values;
  const listen = parseListenAddress(v.listen);
  if (listen.kind !== "tcp") throw new ConfigError("--listen: must be host:port");
  if (v.leafMaxDays > 47) throw new ConfigError("--leaf-max-days: at most 47 (the CA/Browser Forum ceiling)");
  if (v.issueRate < 0) throw new ConfigError("--issue-rate: must be 0 (no limit) or more");
  if (v.ticketKeyRotationSeconds < 0) throw new ConfigError("--ticket-key-rotation-seconds: must be 0 (only on a revoke or quarantine) or more");
  if (v.metricsListen !== undefined) {
    try {
      parseListenAddress(v.metricsListen);
    } catch (err) {
      throw new ConfigError(`--metrics-listen: ${(err as Error).message}`);
    }
  }
  const allowPrivate = (v.allowPrivate ?? "").split(",").map((s) => s.trim()).filter((s) => s !== "");
  try {
    new DestinationGuard(allowPrivate);
  } catch (err) {
    throw new ConfigError(`--allow-private: ${(err as Error).message.replace(/^allowPrivate\[\d+\]: /, "")}`);
  }
  const tf = v.tenantsFile === undefined ? {} : await readTenantsFile(v.tenantsFile);
  const tenants = tf.tenants ?? [];
  const defaultTenant = v.defaultTenant ?? tf.defaultTenant;
  const requireAuth = loaded.sources.requireAuth === "default" ? (tf.requireAuth ?? false) : v.requireAuth;
  try {
    createTenantResolver(tenants, defaultTenant, requireAuth);
  } catch (err) {
    throw new ConfigError(`${v.tenantsFile !== undefined ? `--tenants-file ${v.tenantsFile}: ` : ""}${(err as Error).message}`);
  }
  let allocator: WorkerAllocator;
  try {
    allocator = workerAllocator(v.allocator as AllocatorChoice, process.env);
  } catch (err) {
    throw new ConfigError(`--${(err as Error).message}`);
  }
  if (tenants.length === 0 && defaultTenant === undefined) {
    throw new ConfigError("no tenant: give --default-tenant, or --tenants-file with tenants");
  }
  const limits: ProxyLimits = {
    clientHelloTimeoutMs: v.clientHelloTimeoutMs,
    handshakeTimeoutMs: v.handshakeTimeoutMs,
    originTimeoutMs: v.originTimeoutMs,
    idleTimeoutMs: v.idleTimeoutMs,
    headersTimeoutMs: v.headersTimeoutMs,
    requestTimeoutMs: v.requestTimeoutMs,
    keepAliveTimeoutMs: v.keepAliveTimeoutMs,
    originIdleTimeoutMs: v.originIdleTimeoutMs,
    maxHeaderBytes: v.maxHeaderBytes,
  };
  return {
    host: listen.host,
    port: listen.port,
    agentSocket: resolve(v.agentSocket),
    tenants,
    defaultTenant,
    requireAuth,
    policyFile: v.policy,
    ...(v.tenantsFile !== undefined ? { tenantsFile: v.tenantsFile } : {}),
    accessLog: v.accessLog,
    accessLogQuery: v.accessLogQuery,
    extraCaPem: v.extraCa === undefined ? [] : await readPemFiles(v.extraCa),
    systemRoots: v.systemRoots,
    allowPrivate,
    leafCacheSize: v.leafCacheSize,
    leafMaxLifetimeMs: Math.min(v.leafMaxDays * 86_400_000, MAX_LEAF_LIFETIME_MS),
    issueRatePerSecond: v.issueRate,
    issueBurst: v.issueBurst,
    limits,
    shutdownGraceMs: v.shutdownGraceMs,
    ticketKeyRotationMs: v.ticketKeyRotationSeconds * 1000,
    metricsListen: v.metricsListen,
    logLevel: v.logLevel as LogLevel,
    workers: v.workers === "auto" ? availableParallelism() : Number(v.workers),
    allocator,
  };
}
