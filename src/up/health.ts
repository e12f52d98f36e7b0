/**
 * The health summary of the mesh: what `kmi up --json` prints once ready and what
 * `kmi up status` prints at any time. Each part's entry says whether its process runs and what
 * the part itself reports: the KDC its version, tenants with their active CA version and rollout
 * and whether it holds the Auditserver's attestation key; the Auditserver its health and
 * machines; the agent its attestation, KDC link and keys; the proxy its leaf cache size (from
 * its metrics endpoint). A part that cannot be asked gets an `error` instead, never a crash.
 */
import { access } from "node:fs/promises";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { AttestationState, KeyState, type GetStatusResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { MachineStatus } from "../gen/kmi/audit/v1/audit_pb.js";
import { KeyPurpose } from "../gen/kmi/common/v1/common_pb.js";
import { VERSION } from "../common/version.js";
import { AgentStatusClient, isServing, metricValue, scrapeMetrics, tcpOpen, type ServerClients } from "./clients.js";
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

function iso(ts: Timestamp | undefined): string | undefined {
  return ts === undefined ? undefined : timestampDate(ts).toISOString();
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

const ATTESTATION: Record<number, string> = {
  [AttestationState.ATTESTED]: "attested",
  [AttestationState.NOT_ATTESTED]: "not_attested",
  [AttestationState.REFUSED]: "refused",
  [AttestationState.QUARANTINED]: "quarantined",
};

/** The agent's attestation state as a word. */
export function attestationWord(s: AttestationState): string {
  return ATTESTATION[s] ?? "unknown";
}

/** The intermediate versions an agent holds, by tenant (active keys only). */
export function heldVersions(status: GetStatusResponse): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of status.keys) {
    if (k.purpose !== KeyPurpose.INTERMEDIATE_CA || k.state !== KeyState.ACTIVE) continue;
    out[k.tenantId] = Math.max(out[k.tenantId] ?? 0, k.version);
  }
  return out;
}

/** The agent's GetStatus as summary fields. */
export function agentFields(s: GetStatusResponse): Record<string, unknown> {
  return {
    version: s.version,
    machine_id: s.machineId,
    group: s.group,
    attestation: attestationWord(s.attestation),
    ...(s.attestationProblem !== "" ? { attestation_problem: s.attestationProblem } : {}),
    attestation_expires_at: iso(s.attestationExpiresAt),
    certificate_not_after: iso(s.certificateNotAfter),
    kdc_connected: s.kdcConnected,
    ...(s.kdcError !== "" ? { kdc_error: s.kdcError } : {}),
    last_sync: iso(s.lastSync),
    serving_from_cache: s.servingFromCache,
    keys: s.keys.map((k) => ({
      tenant: k.tenantId,
      purpose: k.purpose === KeyPurpose.INTERMEDIATE_CA ? "intermediate_ca" : k.purpose === KeyPurpose.SIGNING ? "signing" : "unknown",
      version: k.version,
      ...(k.name !== "" ? { name: k.name } : {}),
      state: k.state === KeyState.ACTIVE ? "active" : k.state === KeyState.LEASE_EXPIRED ? "lease_expired" : "unknown",
      lease_expires_at: iso(k.leaseExpiresAt),
    })),
  };
}

async function kdcPart(h: HealthInputs): Promise<Record<string, unknown>> {
  try {
    const s = await h.kdc.kdcAdmin.getKdcStatus({});
    return {
      healthy: true,
      version: s.version,
      uptime_seconds: Number(s.uptimeSeconds),
      attestation_key_loaded: s.attestationKeyLoaded,
      connected_agents: s.connectedAgents,
      audit_head_seq: Number(s.auditHeadSeq),
      tenants: s.tenants.map((t) => ({
        tenant: t.tenantId,
        active_version: t.activeVersion,
        machines_up_to_date: t.machinesUpToDate,
        machines_total: t.machinesTotal,
      })),
    };
  } catch (err) {
    return { healthy: false, error: errorText(err) };
  }
}

async function auditPart(h: HealthInputs): Promise<Record<string, unknown>> {
  try {
    const serving = await isServing(h.audit);
    const machines = await h.audit.auditAdmin.listMachines({});
    return {
      healthy: serving,
      machines: machines.machines.map((m) => ({
        machine_id: m.machineId,
        group: m.group,
        hostname: m.hostname,
        status: m.status === MachineStatus.QUARANTINED ? "quarantined" : m.status === MachineStatus.ACTIVE ? "active" : "unknown",
        ...(m.statusReason !== "" ? { status_reason: m.statusReason } : {}),
        last_attestation:
          m.lastAttestation === undefined
            ? undefined
            : { time: iso(m.lastAttestation.time), ok: m.lastAttestation.ok, ...(m.lastAttestation.problem !== "" ? { problem: m.lastAttestation.problem } : {}) },
      })),
    };
  } catch (err) {
    return { healthy: false, error: errorText(err) };
  }
}

async function agentPart(h: HealthInputs): Promise<Record<string, unknown>> {
  const client = new AgentStatusClient(h.layout.agentSocket);
  try {
    const s = await client.getStatus(3000);
    const held = heldVersions(s);
    return { healthy: true, holds_tenant_key: held[h.tenant] !== undefined, ...agentFields(s) };
  } catch (err) {
    return { healthy: false, error: errorText(err) };
  } finally {
    client.close();
  }
}

async function proxyPart(h: HealthInputs): Promise<Record<string, unknown>> {
  const url = new URL(h.urls.proxy);
  const healthy = await tcpOpen(url.hostname.replace(/^\[|\]$/g, ""), Number(url.port));
  const socket = h.layout.metricsSocket("proxy");
  try {
    await access(socket);
  } catch {
    return { healthy, leaf_cache_entries: null, metrics: "not exposed" };
  }
  try {
    const text = await scrapeMetrics(socket);
    return { healthy, leaf_cache_entries: metricValue(text, "kmi_proxy_leaf_cache_entries") ?? null };
  } catch (err) {
    return { healthy, leaf_cache_entries: null, metrics_error: errorText(err) };
  }
}

/** The `kmi ctl` environment for this mesh. */
export function ctlEnv(layout: Layout, urls: { kdc: string; audit: string }): Record<string, string> {
  return {
    KMI_CTL_KDC: urls.kdc,
    KMI_CTL_AUDIT: urls.audit,
    KMI_CTL_TOKEN_FILE: layout.operatorToken,
    KMI_CTL_CA_FILE: layout.infraCaPem,
  };
}

/** Builds the summary, asking every part in parallel. */
export async function healthSummary(h: HealthInputs): Promise<HealthSummary> {
  const [kdc, audit, agent, proxy] = await Promise.all([kdcPart(h), auditPart(h), agentPart(h), proxyPart(h)]);
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
