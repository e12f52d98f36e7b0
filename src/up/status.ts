/**
 * `kmi up status`: the health summary of the `kmi up` running on a data directory, from another
 * terminal. It finds the mesh through `<run>/up.json` and asks every part itself.
 */
import { readFile } from "node:fs/promises";
import type { UpConfig } from "./config.js";
import { serverClients } from "../clients/mesh-health.js";
import { healthSummary, type HaInputs, type HaSummary, type HealthSummary, type ProcessInfo } from "./health.js";
import { layout, replicaId, type Layout, type PartId } from "./layout.js";
import { isKmiProcess, isPartProcess, pidAlive, readRunState, type RunState } from "./run-state.js";
import { etcdPkiFiles } from "./etcd-pki.js";
import { upClientTls } from "./etcd.js";

/** Where `kmi up status` writes. */
export interface StatusIo {
  readonly out: NodeJS.WritableStream;
  readonly cwd: string;
}

type Part = Record<string, unknown>;

function healthy(s: HealthSummary): boolean {
  const agent = s.agent as Part;
  const ha = s.ha === undefined || [...s.ha.kdc_replicas, ...s.ha.audit_replicas, ...s.ha.etcd.members].every((p) => p["healthy"] === true);
  return (
    (s.kdc as Part)["healthy"] === true &&
    (s.audit as Part)["healthy"] === true &&
    agent["healthy"] === true &&
    agent["holds_tenant_key"] === true &&
    (s.proxy as Part)["healthy"] === true &&
    ha
  );
}

function line(name: string, p: Part, detail: string): string {
  const pid = p["pid"] === null || p["pid"] === undefined ? "-" : String(p["pid"]);
  const restarts = typeof p["restarts"] === "number" && p["restarts"] > 0 ? `, ${p["restarts"]} restarts` : "";
  return `  ${name.padEnd(7)} ${String(p["state"]).padEnd(10)} pid ${pid.padEnd(8)} ${detail}${restarts}`;
}

/** The summary as a few lines for a person. */
export function formatSummary(s: HealthSummary): string {
  const kdc = s.kdc as Part;
  const audit = s.audit as Part;
  const agent = s.agent as Part;
  const proxy = s.proxy as Part;
  const tenants = (kdc["tenants"] as Part[] | undefined) ?? [];
  const kdcDetail =
    kdc["healthy"] === true
      ? `${kdc["url"]}  v${kdc["version"]}; ${tenants.map((t) => `tenant ${t["tenant"]} active v${t["active_version"]} (${t["machines_up_to_date"]}/${t["machines_total"]} machines up to date)`).join(", ") || "no tenants"}; ${kdc["connected_agents"]} agent(s) connected${kdc["attestation_key_loaded"] === false ? "; attestation key NOT loaded" : ""}`
      : `${kdc["url"]}  unreachable: ${kdc["error"]}`;
  const machines = (audit["machines"] as Part[] | undefined) ?? [];
  const auditDetail =
    audit["healthy"] === true
      ? `${audit["url"]}  serving; ${machines.map((m) => `${m["machine_id"]} ${m["status"]}${m["status"] === "quarantined" && m["status_reason"] !== undefined ? ` (${m["status_reason"]})` : ""}`).join(", ") || "no machines"}`
      : `${audit["url"]}  unreachable: ${audit["error"]}`;
  const keys = ((agent["keys"] as Part[] | undefined) ?? []).filter((k) => k["purpose"] === "intermediate_ca").map((k) => `${k["tenant"]} v${k["version"]}${k["state"] !== "active" ? ` (${k["state"]})` : ""}`);
  const agentDetail =
    agent["healthy"] === true
      ? `${agent["socket"]}  machine ${agent["machine_id"]}: ${agent["attestation"]}${agent["attestation_problem"] !== undefined ? ` (${agent["attestation_problem"]})` : ""}, KDC link ${agent["kdc_connected"] === true ? "up" : `down${agent["kdc_error"] !== undefined ? ` (${agent["kdc_error"]})` : ""}`}, holds ${keys.join(", ") || "no keys"}`
      : `${agent["socket"]}  unreachable: ${agent["error"]}`;
  const cache = proxy["leaf_cache_entries"];
  const workers = (proxy["workers"] as { worker: number; pid: number }[] | undefined) ?? [];
  const workersDetail =
    workers.length === 0 ? "" : `; ${workers.length} worker(s): ${workers.map((w) => `#${w.worker} pid ${w.pid}`).join(", ")}${Number(proxy["worker_restarts"] ?? 0) > 0 ? `, ${String(proxy["worker_restarts"])} replaced` : ""}`;
  const proxyDetail = `${proxy["url"]}  ${proxy["healthy"] === true ? "listening" : "NOT listening"}; default tenant ${proxy["default_tenant"]}; leaf cache ${cache === null || cache === undefined ? "not exposed" : `${cache} entries`}${workersDetail}`;
  return [
    `kmi up ${s.kmi_up.ready ? "ready" : "starting"} (pid ${s.kmi_up.pid ?? "-"}), data ${s.kmi_up.data_dir}`,
    ...(s.ha !== undefined ? haLines(s.ha) : []),
    line("kdc", kdc, kdcDetail),
    ...(s.ha?.kdc_replicas.slice(1).map((r) => line(String(r["name"]), r, replicaDetail(r))) ?? []),
    line("audit", audit, auditDetail),
    ...(s.ha?.audit_replicas.slice(1).map((r) => line(String(r["name"]), r, replicaDetail(r))) ?? []),
    line("agent", agent, agentDetail),
    line("proxy", proxy, proxyDetail),
    "",
  ].join("\n");
}

/** A further replica's line: its URL and whether it serves (the tenants are the first replica's line). */
function replicaDetail(r: Part): string {
  if (r["healthy"] !== true) return `${r["url"]}  unreachable: ${r["error"]}`;
  return `${r["url"]}  serving${typeof r["connected_agents"] === "number" ? `; ${r["connected_agents"]} agent(s) connected` : ""}`;
}

/** The etcd members' lines: health and which one leads. */
function haLines(ha: HaSummary): string[] {
  return ha.etcd.members.map((m) => {
    const detail = m["healthy"] === true ? `${m["url"]}  healthy${m["leader"] === true ? ", leader" : ""}${m["version"] !== undefined ? `; etcd ${m["version"]}` : ""}` : `${m["url"]}  unhealthy: ${m["error"]}`;
    return line(String(m["name"]), m, detail);
  });
}

/** Runs `kmi up status`; resolves with the exit code. */
export async function runStatus(cfg: UpConfig, io: StatusIo): Promise<number> {
  const L = layout(cfg.dataDir, cfg.runDir);
  const state = await readRunState(L.stateFile);
  if (state === undefined || !pidAlive(state.pid) || !isKmiProcess(state.pid, state.kmi_script, "up")) {
    io.out.write(`kmi up is not running for ${L.dataDir} (no live ${L.stateFile}); start it with npm start\n`);
    return 1;
  }
  const processes: Partial<Record<PartId, ProcessInfo>> = {};
  for (const [name, p] of Object.entries(state.parts) as [PartId, NonNullable<RunState["parts"][PartId]>][]) {
    const alive = p.pid !== null && pidAlive(p.pid) && isPartProcess(p.pid, state.kmi_script, name);
    processes[name] = { state: alive ? p.state : "exited", pid: alive ? (p.pid ?? undefined) : undefined, restarts: p.restarts, version: p.version, log: p.log };
  }
  const caPem = await readFile(L.infraCaPem, "utf8");
  const token = (await readFile(L.operatorToken, "utf8").catch(() => "")).trim();
  const client = (url: string, service: "kdc" | "audit") => serverClients({ url, caPem, token: () => token, timeoutMs: 5000, expectedService: service });
  const kdc = client(state.urls.kdc, "kdc");
  const audit = client(state.urls.audit, "audit");
  const ha = state.ha !== undefined ? await haInputs(L, state.ha, client) : undefined;
  try {
    const summary = await healthSummary({ layout: L, urls: state.urls, tenant: state.tenant, upPid: state.pid, ready: state.ready, processes, kdc, audit, ...(ha !== undefined ? { ha } : {}) });
    io.out.write(cfg.json ? JSON.stringify(summary, null, 2) + "\n" : formatSummary(summary));
    return healthy(summary) ? 0 : 1;
  } finally {
    for (const c of [kdc, audit, ...(ha?.kdc ?? []).map((r) => r.clients), ...(ha?.audit ?? []).map((r) => r.clients)]) c.close();
  }
}

/** The replicas and etcd members the run-state file names, with clients to ask them. */
async function haInputs(L: Layout, ha: NonNullable<RunState["ha"]>, client: (url: string, service: "kdc" | "audit") => ReturnType<typeof serverClients>): Promise<HaInputs> {
  return {
    kdc: ha.kdc.map((url, i) => ({ id: replicaId("kdc", i + 1), url, clients: client(url, "kdc") })),
    audit: ha.audit.map((url, i) => ({ id: replicaId("audit", i + 1), url, clients: client(url, "audit") })),
    etcd: { members: ha.etcd, tls: await upClientTls(etcdPkiFiles(L.etcdPkiDir)) },
  };
}
