/**
 * The options of `kmi agent` (flags, KMI_AGENT_* environment, JSON config file) and their
 * resolution into an AgentConfig: files read, durations checked, the measurement plan built.
 * The only agent module that touches the environment (through common/config.ts).
 */
import { readFile } from "node:fs/promises";
import { hostname as osHostname } from "node:os";
import { dirname, isAbsolute, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { ConfigError, defineProgram, type LoadedConfig } from "../common/config.js";
import { parseListenAddress } from "../common/listen.js";
import { LOG_LEVELS, type LogLevel } from "../common/logger.js";
import { httpsUrlList, urlList } from "../common/urls.js";
import { checkMeasurementName, dependenciesDirOf } from "../attest/index.js";
import type { MeasurementPlan } from "./attestor.js";
import type { LeafPolicy } from "./context.js";
import { SEALING_KEY_PROVIDERS, type SealingKeySource } from "./sealing-key.js";
import type { KdcLinkTiming } from "./kdc-link.js";

const DAY_S = 86_400;


function positive(value: number): void {
  if (!(value > 0)) throw new Error("must be a positive number");
}

/** `kmi agent`. */
export const agentProgram = defineProgram({
  program: "agent",
  usage: "kmi agent [flags]",
  summary:
    "Runs the key agent of this machine. On first start it enrolls with a one-time join token (AuditService.Enroll, a key it " +
    "generates itself), keeps its identity and a sealed cache of its secrets in the state directory (0700, files 0600), attests, " +
    "fetches and watches its secrets on the KDC over mutual TLS, and serves KeyAgentService on a Unix socket (0600, or 0660 with " +
    "--socket-group) to local processes: every call needs the metadata header `kmi-agent-workload: true`. No call returns " +
    "private key material. SIGTERM finishes in-flight calls and stops.",
  options: {
    socket: { type: "string", description: "Unix socket to serve KeyAgentService on", default: "/run/kmi/agent.sock", valueName: "path" },
    socketGroup: { type: "string", description: "group (name or gid) that may use the socket: mode 0660 instead of 0600", valueName: "group" },
    stateDir: { type: "string", description: "state directory: sealing key, machine identity, sealed cache (made 0700)", default: "/var/lib/kmi/agent", valueName: "dir" },
    sealingKey: {
      type: "string",
      description:
        "where the key sealing the identity and cache comes from: file (sealing.key in the state dir, 0600), systemd-creds ($CREDENTIALS_DIRECTORY, or " +
        "`systemd-creds decrypt` of sealing.key.cred), or pkcs11 (encrypted inside a PKCS#11 token by a non-extractable AES key)",
      default: "file",
      choices: SEALING_KEY_PROVIDERS,
    },
    sealingKeyCredential: { type: "string", description: "with --sealing-key systemd-creds: the credential's name", default: "kmi-agent-sealing-key", valueName: "name" },
    pkcs11Module: { type: "string", description: "with --sealing-key pkcs11: the token's PKCS#11 library", valueName: "file.so" },
    pkcs11Token: { type: "string", description: "with --sealing-key pkcs11: the token's label", valueName: "label" },
    pkcs11PinFile: { type: "string", description: "with --sealing-key pkcs11: file holding the token's user PIN", valueName: "file" },
    pkcs11KeyLabel: { type: "string", description: "with --sealing-key pkcs11: label of the AES key in the token (made on first start if absent)", default: "kmi-agent-sealing-key", valueName: "label" },
    auditUrl: {
      type: "string",
      description: "the Auditserver (enrollment, renewal, attestation); its replicas comma-separated",
      required: true,
      valueName: "https://host:port[,...]",
      validate: httpsUrlList,
    },
    kdcUrl: { type: "string", description: "the KDC (secret distribution); its replicas comma-separated", required: true, valueName: "https://host:port[,...]", validate: httpsUrlList },
    caFile: { type: "string", description: "infrastructure CA certificate(s), PEM: trusted for the KDC and the Auditserver", required: true, valueName: "file" },
    joinToken: {
      type: "string",
      description: "one-time join token for the first start (prefer the environment or --join-token-file: argv is visible to other users)",
      secret: true,
      valueName: "kmij_...",
    },
    joinTokenFile: { type: "string", description: "file holding the join token (read once, at enrollment)", valueName: "file" },
    hostname: { type: "string", description: "this machine's name, sent at enrollment (default: the OS hostname)", valueName: "name" },
    measure: {
      type: "string",
      description:
        "what to measure for attestation: name=path[:path...] entries, comma-separated; a path ending in /node_modules measures the packages the program beside it loads " +
        "(default: agent.code=<kmi install dir>, agent.deps=<its node_modules>, agent.node=<the node binary>, plus agent.config=<--config file> and proxy.config=<--proxy-config file> when given)",
      valueName: "name=path,...",
    },
    proxyConfig: { type: "string", description: "the proxy's config file on this machine: measured as proxy.config by default", valueName: "file" },
    measureSoftwareVersion: { type: "boolean", description: 'also send the "software.version" measurement (SHA-256 of the kmi version)', default: true },
    maxLeafLifetimeDays: { type: "integer", description: "longest leaf validity, backdating included", default: 47, validate: positive },
    leafBackdateSeconds: { type: "integer", description: "how far a leaf's notBefore is set back from now (for clients with a slow clock)", default: 3600 },
    reconnectInitialMs: { type: "integer", description: "first delay before reconnecting to the KDC, ms (then exponential with jitter)", default: 500, validate: positive },
    reconnectMaxMs: { type: "integer", description: "longest delay between reconnects, ms", default: 30_000, validate: positive },
    heartbeatTimeoutMs: { type: "integer", description: "a KDC watch stream silent this long is dead, ms (the KDC sends a heartbeat every 15 s)", default: 45_000, validate: positive },
    shutdownTimeoutMs: { type: "integer", description: "how long in-flight calls get on shutdown, ms", default: 10_000 },
    metricsListen: { type: "string", description: "address of the Prometheus /metrics endpoint: host:port, or unix:PATH for a Unix socket (off when unset)", valueName: "address" },
    logLevel: { type: "string", description: "log level", default: "info", choices: LOG_LEVELS },
  },
});

/** Everything the agent runs with, resolved. */
export interface AgentConfig {
  /** Unix socket path. */
  socketPath: string;
  /** Socket group (mode 0660) or undefined (mode 0600). */
  socketGroup: string | undefined;
  /** State directory. */
  stateDir: string;
  /** Where the sealing key comes from. */
  sealingKey: SealingKeySource;
  /** Auditserver URLs: one per replica, in the order given. */
  auditUrls: string[];
  /** KDC URLs: one per replica, in the order given. */
  kdcUrls: string[];
  /** Infrastructure CA, PEM. */
  caPem: string;
  /** Join token, when given (only used before enrollment). */
  joinToken: string | undefined;
  /** Hostname sent at enrollment. */
  hostname: string;
  /** What attestation measures. */
  measurements: MeasurementPlan;
  /** Leaf policy. */
  policy: LeafPolicy;
  /** KDC link timing. */
  timing: KdcLinkTiming;
  /** Shutdown grace, ms. */
  shutdownTimeoutMs: number;
  /** Metrics endpoint, when on. */
  metricsListen: string | undefined;
  /** Log level. */
  logLevel: LogLevel;
}

/** The directory kmi runs from (dist/ of the installed package): what "agent.code" measures by default. */
export function installDir(): string {
  // This file is dist/src/agent/config.js once built: three levels up is dist/.
  return resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
}

/**
 * What the agent measures when --measure is not given: everything that handles its keys — its
 * code, the packages it loads, the node binary that runs it — and the agent's and the proxy's
 * config files when known.
 */
export async function defaultMeasure(agentConfig: string | undefined, proxyConfig: string | undefined): Promise<Record<string, string[]>> {
  const code = installDir();
  const deps = await dependenciesDirOf(code);
  return {
    "agent.code": [code],
    ...(deps !== undefined ? { "agent.deps": [deps] } : {}),
    "agent.node": [process.execPath],
    ...(agentConfig !== undefined ? { "agent.config": [resolve(agentConfig)] } : {}),
    ...(proxyConfig !== undefined ? { "proxy.config": [resolve(proxyConfig)] } : {}),
  };
}

/**
 * The sealing-key provider from --sealing-key and its flags: the pkcs11 flags are required
 * with pkcs11 and refused without it; the PIN is read from its file here.
 */
async function resolveSealingKey(v: LoadedConfig<typeof agentProgram.options>["values"], env: NodeJS.ProcessEnv): Promise<SealingKeySource> {
  const p11 = { "--pkcs11-module": v.pkcs11Module, "--pkcs11-token": v.pkcs11Token, "--pkcs11-pin-file": v.pkcs11PinFile };
  if (v.sealingKey !== "pkcs11") {
    const stray = Object.entries(p11).find(([, value]) => value !== undefined);
    if (stray !== undefined) throw new ConfigError(`${stray[0]}: only used with --sealing-key pkcs11`);
  }
  if (v.sealingKey === "file") return { kind: "file" };
  if (v.sealingKey === "systemd-creds") return { kind: "systemd-creds", credential: v.sealingKeyCredential, credentialsDirectory: env["CREDENTIALS_DIRECTORY"] };
  const missing = Object.entries(p11).find(([, value]) => value === undefined);
  if (missing !== undefined) throw new ConfigError(`${missing[0]}: required with --sealing-key pkcs11`);
  let pin: string;
  try {
    pin = (await readFile(v.pkcs11PinFile!, "utf8")).trim();
  } catch (err) {
    throw new ConfigError(`--pkcs11-pin-file ${v.pkcs11PinFile}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  if (pin === "") throw new ConfigError(`--pkcs11-pin-file ${v.pkcs11PinFile}: empty; it must hold the token's user PIN`);
  return { kind: "pkcs11", module: v.pkcs11Module!, token: v.pkcs11Token!, pin, keyLabel: v.pkcs11KeyLabel };
}

/** Parses "name=path[:path...],name=path" into measurement sources. */
export function parseMeasure(text: string): Record<string, string[]> {
  const out: Record<string, string[]> = {};
  for (const entry of text.split(",").map((e) => e.trim()).filter((e) => e !== "")) {
    const eq = entry.indexOf("=");
    if (eq <= 0) throw new ConfigError(`--measure: "${entry}" is not name=path; e.g. agent.code=/opt/kmi/dist`);
    const name = entry.slice(0, eq);
    try {
      checkMeasurementName(name, "measurement");
    } catch (err) {
      throw new ConfigError(`--measure: ${err instanceof Error ? err.message : String(err)}`);
    }
    const paths = entry.slice(eq + 1).split(":").filter((p) => p !== "");
    if (paths.length === 0) throw new ConfigError(`--measure: "${name}" has no path`);
    for (const p of paths) if (!isAbsolute(p)) throw new ConfigError(`--measure: path "${p}" of "${name}" must be absolute`);
    if (out[name] !== undefined) throw new ConfigError(`--measure: "${name}" appears twice`);
    out[name] = paths;
  }
  return out;
}

/** Resolves loaded options into an AgentConfig: reads the CA file and the join token file, checks combinations. */
export async function resolveAgentConfig(loaded: LoadedConfig<typeof agentProgram.options>, env: NodeJS.ProcessEnv = process.env): Promise<AgentConfig> {
  const v = loaded.values;
  const sealingKey = await resolveSealingKey(v, env);
  try {
    parseListenAddress(`unix:${v.socket}`);
  } catch (err) {
    throw new ConfigError(`--socket: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (v.metricsListen !== undefined) {
    try {
      parseListenAddress(v.metricsListen);
    } catch (err) {
      throw new ConfigError(`--metrics-listen: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  let caPem: string;
  try {
    caPem = await readFile(v.caFile, "utf8");
  } catch (err) {
    throw new ConfigError(`--ca-file ${v.caFile}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  if (!caPem.includes("-----BEGIN CERTIFICATE-----")) throw new ConfigError(`--ca-file ${v.caFile}: no PEM certificate in it`);
  if (v.joinToken !== undefined && v.joinTokenFile !== undefined) {
    throw new ConfigError("--join-token and --join-token-file are both set; give one");
  }
  let joinToken = v.joinToken;
  if (v.joinTokenFile !== undefined) {
    try {
      joinToken = (await readFile(v.joinTokenFile, "utf8")).trim();
    } catch (err) {
      throw new ConfigError(`--join-token-file ${v.joinTokenFile}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
  }
  const files = v.measure !== undefined ? parseMeasure(v.measure) : await defaultMeasure(loaded.configFile, v.proxyConfig);
  if (v.maxLeafLifetimeDays * DAY_S <= v.leafBackdateSeconds) {
    throw new ConfigError("--leaf-backdate-seconds: must be shorter than --max-leaf-lifetime-days");
  }
  if (v.leafBackdateSeconds < 0) throw new ConfigError("--leaf-backdate-seconds: must not be negative");
  if (v.reconnectMaxMs < v.reconnectInitialMs) throw new ConfigError("--reconnect-max-ms: must be at least --reconnect-initial-ms");
  return {
    socketPath: v.socket.replace(/^unix:/, ""),
    socketGroup: v.socketGroup,
    stateDir: v.stateDir,
    sealingKey,
    auditUrls: urlList(v.auditUrl),
    kdcUrls: urlList(v.kdcUrl),
    caPem,
    joinToken: joinToken === "" ? undefined : joinToken,
    hostname: v.hostname ?? osHostname(),
    measurements: { files, softwareVersion: v.measureSoftwareVersion },
    policy: { maxLifetimeMs: v.maxLeafLifetimeDays * DAY_S * 1000, backdateMs: v.leafBackdateSeconds * 1000 },
    timing: { reconnectInitialMs: v.reconnectInitialMs, reconnectMaxMs: v.reconnectMaxMs, heartbeatTimeoutMs: v.heartbeatTimeoutMs },
    shutdownTimeoutMs: v.shutdownTimeoutMs,
    metricsListen: v.metricsListen,
    logLevel: v.logLevel as LogLevel,
  };
}
