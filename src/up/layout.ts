/**
 * Where `kmi up` keeps everything. One place, so that the banner, the docs and `kmi up status`
 * name the same files.
 *
 * | path                              | what                                                   | mode |
 * |-----------------------------------|--------------------------------------------------------|------|
 * | <data>/kdc/                       | the KDC's data dir (store, master.key, kmi-root.pem, infra-ca.pem) | 0700 |
 * | <data>/audit/                     | the Auditserver's data dir                             | 0700 |
 * | <data>/agent/                     | the agent's state dir (sealing key, identity, cache)   | 0700 |
 * | <data>/operator.token             | the first operator token (`kmi kdc init --token-file`) | 0600 |
 * | <data>/agent-join.token           | the agent's one-time join token (removed once used)    | 0600 |
 * | <data>/config/agent.json          | the agent's config file (also its `agent.config` measurement) | 0600 |
 * | <data>/config/proxy.json          | the proxy's config file (also the agent's `proxy.config` measurement) | 0600 |
 * | <data>/config/proxy-policy.json   | the proxy's inspection policy (edit it; the proxy reloads it) | 0600 |
 * | <data>/logs/<part>.log            | each part's JSON log lines (appended)                  | 0600 |
 * | <data>/logs/proxy-access.log      | the proxy's JSON-lines access log                      | 0600 |
 * | <run>/agent.sock                  | the agent's API socket                                 | 0600 |
 * | <run>/metrics/<part>.sock         | each part's Prometheus /metrics endpoint               | 0600 |
 * | <run>/up.json                     | the running `kmi up`: its pid, each part's pid and address | 0600 |
 */
import { join } from "node:path";

/** The parts, in start order (they stop in reverse). */
export const PARTS = ["kdc", "audit", "agent", "proxy"] as const;

/** One of the supervised programs. */
export type PartName = (typeof PARTS)[number];

/** Every path `kmi up` uses, absolute. */
export interface Layout {
  readonly dataDir: string;
  readonly runDir: string;
  readonly kdcDir: string;
  readonly auditDir: string;
  readonly agentStateDir: string;
  readonly configDir: string;
  readonly logsDir: string;
  readonly metricsDir: string;
  /** The KMI root CA: what devices (and curl) trust. */
  readonly kmiRootPem: string;
  /** The infrastructure CA: what kmi ctl and the parts trust for the KDC and the Auditserver. */
  readonly infraCaPem: string;
  /** The Auditserver's attestation-token public key. */
  readonly attestationKeyPem: string;
  readonly operatorToken: string;
  readonly joinToken: string;
  readonly agentConfig: string;
  readonly agentIdentity: string;
  /** The proxy's config file: measured by the agent as proxy.config. */
  readonly proxyConfig: string;
  readonly proxyPolicy: string;
  readonly accessLog: string;
  readonly agentSocket: string;
  readonly stateFile: string;
  /** The log file of a part. */
  log(part: PartName | "up"): string;
  /** The metrics socket of a part. */
  metricsSocket(part: PartName): string;
}

/** The layout under `dataDir` and `runDir` (both absolute). */
export function layout(dataDir: string, runDir: string): Layout {
  const kdcDir = join(dataDir, "kdc");
  const auditDir = join(dataDir, "audit");
  const agentStateDir = join(dataDir, "agent");
  const configDir = join(dataDir, "config");
  const logsDir = join(dataDir, "logs");
  const metricsDir = join(runDir, "metrics");
  return {
    dataDir,
    runDir,
    kdcDir,
    auditDir,
    agentStateDir,
    configDir,
    logsDir,
    metricsDir,
    kmiRootPem: join(kdcDir, "kmi-root.pem"),
    infraCaPem: join(kdcDir, "infra-ca.pem"),
    attestationKeyPem: join(auditDir, "attestation-key.pem"),
    operatorToken: join(dataDir, "operator.token"),
    joinToken: join(dataDir, "agent-join.token"),
    agentConfig: join(configDir, "agent.json"),
    agentIdentity: join(agentStateDir, "identity.pb"),
    proxyConfig: join(configDir, "proxy.json"),
    proxyPolicy: join(configDir, "proxy-policy.json"),
    accessLog: join(logsDir, "proxy-access.log"),
    agentSocket: join(runDir, "agent.sock"),
    stateFile: join(runDir, "up.json"),
    log: (part) => join(logsDir, `${part}.log`),
    metricsSocket: (part) => join(metricsDir, `${part}.sock`),
  };
}
