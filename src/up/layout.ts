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
 *
 * With `--ha` also (the KDC and Auditserver replicas share their data dir; their store is etcd):
 *
 * | path                              | what                                                   | mode |
 * |-----------------------------------|--------------------------------------------------------|------|
 * | <data>/etcd/                      | the local etcd cluster                                 | 0700 |
 * | <data>/etcd/cluster.json          | its members: names, client and peer URLs (fixed at the first start) | 0600 |
 * | <data>/etcd/etcd-N/               | member N's etcd data dir                               | 0700 |
 * | <data>/etcd/pki/ca.pem, ca.key    | the etcd CA made at the first start (only etcd trusts it) | 0600 |
 * | <data>/etcd/pki/member.pem, .key  | the members' certificate (clients and peers), re-issued at every start | 0600 |
 * | <data>/etcd/pki/<kdc|audit|up>.pem, .key | client certificates of the KDCs, the Auditservers, and `kmi up` itself | 0600 |
 * | <data>/logs/<part>-N.log          | replica N's log (kdc-2, kdc-3, audit-2) and etcd-N's   | 0600 |
 */
import { join } from "node:path";

/** The parts, in start order (they stop in reverse). */
export const PARTS = ["kdc", "audit", "agent", "proxy"] as const;

/** One of the supervised programs. */
export type PartName = (typeof PARTS)[number];

/** How many KDC and Auditserver replicas, and etcd members, `kmi up --ha` runs. */
export const HA_SIZE = { kdc: 3, audit: 2, etcd: 3 } as const;

/**
 * A supervised process: a part (`kdc` and `audit` are the first replica), a further replica
 * (`kdc-2`, `audit-2`, …) or an etcd member (`etcd-1`, …) of `kmi up --ha`.
 */
export type PartId = PartName | `kdc-${number}` | `audit-${number}` | `etcd-${number}`;

/** What a process runs: `kdc-2` is a `kdc`, `etcd-1` an `etcd`. */
export function programOf(id: PartId): PartName | "etcd" {
  return id.replace(/-\d+$/, "") as PartName | "etcd";
}

/** The id of replica `n` (1-based) of a server: the first keeps the plain name. */
export function replicaId(program: "kdc" | "audit", n: number): PartId {
  return n === 1 ? program : `${program}-${n}`;
}

/** The ids of every process of a mesh, in start order (they stop in reverse). */
export function partIds(ha: boolean): PartId[] {
  if (!ha) return [...PARTS];
  const range = (k: number) => Array.from({ length: k }, (_, i) => i + 1);
  return [
    ...range(HA_SIZE.etcd).map((n): PartId => `etcd-${n}`),
    ...range(HA_SIZE.kdc).map((n) => replicaId("kdc", n)),
    ...range(HA_SIZE.audit).map((n) => replicaId("audit", n)),
    "agent",
    "proxy",
  ];
}

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
  /** The local etcd cluster of `--ha`. */
  readonly etcdDir: string;
  /** Its members' names and URLs. */
  readonly etcdClusterFile: string;
  /** Its CA and certificates. */
  readonly etcdPkiDir: string;
  /** The log file of a part. */
  log(part: PartId | "up"): string;
  /** The metrics socket of a part. */
  metricsSocket(part: PartId): string;
  /** The data dir of etcd member `name`. */
  etcdMemberDir(name: string): string;
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
    etcdDir: join(dataDir, "etcd"),
    etcdClusterFile: join(dataDir, "etcd", "cluster.json"),
    etcdPkiDir: join(dataDir, "etcd", "pki"),
    etcdMemberDir: (name) => join(dataDir, "etcd", name),
    log: (part) => join(logsDir, `${part}.log`),
    metricsSocket: (part) => join(metricsDir, `${part}.sock`),
  };
}
