/**
 * The health summary of the mesh `kmi up` runs: what `kmi up --json` prints once ready and what
 * `kmi up status` prints at any time. Each part's entry is what the part itself reports (asked
 * by src/clients/mesh-health.ts, which `kmi ctl status` shares) plus whether its process runs;
 * then where the trust files are and the `kmi ctl` environment for this mesh.
 */
import { access } from "node:fs/promises";
import { agentHealth, auditHealth, kdcHealth, proxyHealth, type ServerClients } from "../clients/mesh-health.js";
import { VERSION } from "../common/version.js";
import type { Layout, PartId } from "./layout.js";
import { clusterHealth, type EtcdClientTls } from "./etcd.js";

/** A part's process, as the summary reports it. */
export interface ProcessInfo {
  /** "running", "restarting", "stopped", … (from the supervisor, or from the pid for `kmi up status`). */
  readonly state: string;
  readonly pid: number | undefined;
  readonly restarts: number;
  readonly version: string | undefined;
  readonly log: string;
}

/** The JSON health summary (snake_case keys, stable for scripts). */
export interface HealthSummary {
  readonly kmi_up: { version: string; pid: number | undefined; data_dir: string; run_dir: string; ready: boolean; time: string };
  readonly kdc: Record<string, unknown>;
  readonly audit: Record<string, unknown>;
  readonly agent: Record<string, unknown>;
  readonly proxy: Record<string, unknown>;
  readonly trust: { kmi_root_ca: string; infra_ca: string; operator_token_file: string };
  readonly ctl_env: Record<string, string>;
  /** With `--ha`: every replica and every etcd member. */
  readonly ha?: HaSummary;
}

/** The `ha` entry of the summary: each replica as the top-level `kdc`/`audit` entry is, and the etcd members. */
export interface HaSummary {
  readonly kdc_replicas: Record<string, unknown>[];
  readonly audit_replicas: Record<string, unknown>[];
  readonly etcd: {
    readonly members: Record<string, unknown>[];
    /** The leader's name, when one member says it leads. */
    readonly leader: string | null;
  };
}

/** One replica of a server, for the summary. */
export interface ReplicaInput {
  readonly id: PartId;
  readonly url: string;
  readonly clients: ServerClients;
}

/** What the summary asks with `--ha`. */
export interface HaInputs {
  /** Every KDC replica, replica 1 first. */
  readonly kdc: readonly ReplicaInput[];
  /** Every Auditserver replica, replica 1 first. */
  readonly audit: readonly ReplicaInput[];
  /** The etcd members (name = part id) and `kmi up`'s client certificate for them. */
  readonly etcd: { readonly members: readonly { readonly name: string; readonly url: string }[]; readonly tls: EtcdClientTls };
}

/** What the summary needs. */
export interface HealthInputs {
  readonly layout: Layout;
  readonly urls: { kdc: string; audit: string; proxy: string };
  readonly tenant: string;
  readonly upPid: number | undefined;
  readonly ready: boolean;
  readonly processes: Partial<Record<PartId, ProcessInfo>>;
  readonly kdc: ServerClients;
  readonly audit: ServerClients;
  readonly ha?: HaInputs;
}

/** The proxy's metrics socket when it exists (the proxy made it), else undefined ("not exposed"). */
async function proxyMetrics(layout: Layout): Promise<string | undefined> {
  const socket = layout.metricsSocket("proxy");
  return access(socket).then(
    () => socket,
    () => undefined,
  );
}

/**
 * The `kmi ctl` environment for this mesh (also what `kmi ctl status` reads for the agent and the
 * proxy). With `replicas` (--ha), the server URLs are every replica's, comma-separated: `kmi ctl`
 * fails over between them, and `kmi ctl status` asks each.
 */
export function ctlEnv(layout: Layout, urls: { kdc: string; audit: string }, replicas?: { kdc: readonly string[]; audit: readonly string[] }): Record<string, string> {
  return {
    KMI_CTL_KDC: replicas !== undefined ? replicas.kdc.join(",") : urls.kdc,
    KMI_CTL_AUDIT: replicas !== undefined ? replicas.audit.join(",") : urls.audit,
    KMI_CTL_TOKEN_FILE: layout.operatorToken,
    KMI_CTL_CA_FILE: layout.infraCaPem,
    KMI_CTL_AGENT_SOCKET: layout.agentSocket,
    KMI_CTL_PROXY_METRICS: `unix:${layout.metricsSocket("proxy")}`,
  };
}

/** Builds the summary, asking every part in parallel. */
export async function healthSummary(h: HealthInputs): Promise<HealthSummary> {
  const [kdc, audit, agent, proxy] = await Promise.all([
    kdcHealth(h.kdc),
    auditHealth(h.audit),
    agentHealth(h.layout.agentSocket, h.tenant),
    proxyMetrics(h.layout).then((metrics) => proxyHealth({ url: h.urls.proxy, metrics })),
  ]);
  const proc = (p: PartId) => processFields(h.processes[p]);
  return {
    kmi_up: { version: VERSION, pid: h.upPid, data_dir: h.layout.dataDir, run_dir: h.layout.runDir, ready: h.ready, time: new Date().toISOString() },
    kdc: { url: h.urls.kdc, ...proc("kdc"), ...kdc },
    audit: { url: h.urls.audit, ...proc("audit"), ...(h.processes.audit?.version !== undefined ? { version: h.processes.audit.version } : {}), ...audit },
    agent: { socket: h.layout.agentSocket, ...proc("agent"), ...agent },
    proxy: {
      url: h.urls.proxy,
      default_tenant: h.tenant,
      access_log: h.layout.accessLog,
      ...proc("proxy"),
      ...(h.processes.proxy?.version !== undefined ? { version: h.processes.proxy.version } : {}),
      ...proxy,
    },
    trust: { kmi_root_ca: h.layout.kmiRootPem, infra_ca: h.layout.infraCaPem, operator_token_file: h.layout.operatorToken },
    ctl_env: ctlEnv(h.layout, h.urls, h.ha !== undefined ? { kdc: h.ha.kdc.map((r) => r.url), audit: h.ha.audit.map((r) => r.url) } : undefined),
    ...(h.ha !== undefined ? { ha: await haSummary(h.ha, h.processes) } : {}),
  };
}

function processFields(i: ProcessInfo | undefined): Record<string, unknown> {
  return i === undefined ? { state: "not started" } : { state: i.state, pid: i.pid ?? null, restarts: i.restarts, log: i.log };
}

/** Every replica (asked as the top-level entries are) and every etcd member, in parallel. */
async function haSummary(ha: HaInputs, processes: Partial<Record<PartId, ProcessInfo>>): Promise<HaSummary> {
  const replica = (r: ReplicaInput, health: Record<string, unknown>) => ({ name: r.id, url: r.url, ...processFields(processes[r.id]), ...health });
  const [kdc, audit, members] = await Promise.all([
    Promise.all(ha.kdc.map(async (r) => replica(r, await kdcHealth(r.clients)))),
    Promise.all(ha.audit.map(async (r) => replica(r, await auditHealth(r.clients)))),
    clusterHealth(ha.etcd.members.map((m) => ({ name: m.name, clientUrl: m.url })), ha.etcd.tls),
  ]);
  const leader = members.find((m) => m.leader)?.name ?? null;
  return {
    kdc_replicas: kdc,
    audit_replicas: audit,
    etcd: { members: members.map((m) => ({ ...m, ...processFields(processes[m.name as PartId]) })), leader },
  };
}
