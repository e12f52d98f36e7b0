/**
 * The health summary of the mesh `kmi up` runs: what `kmi up --json` prints once ready and what
 * `kmi up status` prints at any time. Each part's entry is what the part itself reports (asked
 * by src/clients/mesh-health.ts, which `kmi ctl status` shares) plus whether its process runs;
 * then where the trust files are and the `kmi ctl` environment for this mesh.
 */
import { access } from "node:fs/promises";
import { agentHealth, auditHealth, kdcHealth, proxyHealth, type ServerClients } from "../clients/mesh-health.js";
import { VERSION } from "../common/version.js";
import type { Layout, PartName } from "./layout.js";

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
}

/** What the summary needs. */
export interface HealthInputs {
  readonly layout: Layout;
  readonly urls: { kdc: string; audit: string; proxy: string };
  readonly tenant: string;
  readonly upPid: number | undefined;
  readonly ready: boolean;
  readonly processes: Partial<Record<PartName, ProcessInfo>>;
  readonly kdc: ServerClients;
  readonly audit: ServerClients;
}

/** The proxy's metrics socket when it exists (the proxy made it), else undefined ("not exposed"). */
async function proxyMetrics(layout: Layout): Promise<string | undefined> {
  const socket = layout.metricsSocket("proxy");
  return access(socket).then(
    () => socket,
    () => undefined,
  );
}

/** The `kmi ctl` environment for this mesh (also what `kmi ctl status` reads for the agent and the proxy). */
export function ctlEnv(layout: Layout, urls: { kdc: string; audit: string }): Record<string, string> {
  return {
    KMI_CTL_KDC: urls.kdc,
    KMI_CTL_AUDIT: urls.audit,
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
  const proc = (p: PartName) => {
    const i = h.processes[p];
    return i === undefined ? { state: "not started" } : { state: i.state, pid: i.pid ?? null, restarts: i.restarts, log: i.log };
  };
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
    ctl_env: ctlEnv(h.layout, h.urls),
  };
}
