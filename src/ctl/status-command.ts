/**
 * `kmi ctl status`: the health summary of every part of the mesh, the same entries `kmi up
 * --json` prints (src/clients/mesh-health.ts): the KDC (--kdc, always asked), and the parts whose
 * address is given: the Auditserver (--audit), a machine's agent (--agent-socket) and proxy
 * (--proxy-metrics). A table for people, `--json` for scripts. A part that does not answer is shown as unreachable with the
 * error; the command still prints everything else, and exits 1 when any part asked is not
 * healthy.
 *
 * --kdc and --audit take every replica's URL: each replica is asked at once, with its own
 * deadline, and listed with its state, error and latency; a service is healthy when at least one
 * of its replicas is (the report shown is that replica's), and the text says how many are down.
 */
import { resolve } from "node:path";
import { agentHealth, auditHealth, kdcHealth, probeReplicas, proxyHealth, replicatedEntry, serverClients, type PartHealth, type ServerClients } from "../clients/mesh-health.js";
import { VERSION } from "../common/version.js";
import { auditConnectionFlags, DEFAULT_AUDIT_URL } from "./audit-commands.js";
import { connectionSettings, DEFAULT_KDC_URL, kdcConnectionFlags, type ConnectionSettings } from "./client.js";
import type { Command, CommandContext } from "./command.js";
import { ExitCode, renderTable } from "./output.js";

/** Deadline of each probe when --timeout is not given: a status should not hang on a dead host. */
const DEFAULT_PROBE_TIMEOUT_MS = 5000;

type Part = PartHealth;

/** A part's state word: ok, unreachable (did not answer), error (answered with an error), unhealthy, not checked. */
export function partState(p: Part): string {
  if (p["checked"] === false) return "not checked";
  if (p["healthy"] === true) return "ok";
  if (p["reachable"] === false) return "unreachable";
  return p["error"] !== undefined ? "error" : "unhealthy";
}

function list(p: Part, key: string): Part[] {
  const v = p[key];
  return Array.isArray(v) ? (v as Part[]) : [];
}

/** What the text says of a service's replicas when some are down ("" when all are up or there is one). */
function replicasNote(p: Part): string {
  const replicas = list(p, "replicas");
  const down = replicas.filter((r) => r["healthy"] !== true).length;
  if (replicas.length <= 1 || down === 0) return "";
  return down === replicas.length ? `all ${down} replicas down; ` : `${down} of ${replicas.length} replicas down; `;
}

/** A replica's row details: how long it took to answer, or its error and how long until it failed. */
function replicaDetail(r: Part): string {
  const ms = `${r["latency_ms"]} ms`;
  if (r["healthy"] !== true) return `${String(r["error"] ?? "not serving")} (after ${ms})`;
  const agents = typeof r["connected_agents"] === "number" ? `, ${r["connected_agents"]} agent(s) connected` : "";
  return `answered in ${ms}${agents}`;
}

function kdcDetail(p: Part): string {
  if (p["healthy"] !== true) return String(p["error"] ?? "");
  return [
    `v${p["version"]}`,
    `up ${p["uptime_seconds"]}s`,
    `${list(p, "tenants").length} tenant(s)`,
    `${p["connected_agents"]} agent(s) connected`,
    `attestation key ${p["attestation_key_loaded"] === true ? "loaded" : "NOT loaded"}`,
    `audit head ${p["audit_head_seq"]}`,
  ].join(", ");
}

function auditDetail(p: Part): string {
  if (p["checked"] === false) return "give --audit URL (or KMI_CTL_AUDIT) to ask the Auditserver";
  if (p["healthy"] !== true) return String(p["error"] ?? "not serving");
  const machines = list(p, "machines");
  const quarantined = machines.filter((m) => m["status"] === "quarantined").length;
  return `serving, ${machines.length} machine(s), ${quarantined} quarantined`;
}

function agentDetail(p: Part): string {
  if (p["checked"] === false) return "give --agent-socket PATH (or KMI_CTL_AGENT_SOCKET) to ask a machine's agent";
  if (p["healthy"] !== true) return String(p["error"] ?? "");
  const keys = list(p, "keys")
    .filter((k) => k["purpose"] === "intermediate_ca")
    .map((k) => `${k["tenant"]} v${k["version"]}${k["state"] !== "active" ? ` (${k["state"]})` : ""}`);
  return [
    `v${p["version"]}`,
    `machine ${p["machine_id"] || "-"}`,
    `${p["attestation"]}${p["attestation_problem"] !== undefined ? ` (${p["attestation_problem"]})` : ""}`,
    `KDC link ${p["kdc_connected"] === true ? "up" : `down${p["kdc_error"] !== undefined ? ` (${p["kdc_error"]})` : ""}`}`,
    `holds ${keys.join(" ") || "no keys"}`,
  ].join(", ");
}

function proxyDetail(p: Part): string {
  if (p["checked"] === false) return "give --proxy-metrics ADDRESS (or KMI_CTL_PROXY_METRICS): the proxy's --metrics-listen";
  if (p["healthy"] !== true) return String(p["error"] ?? "");
  const cache = p["leaf_cache_entries"];
  return `${p["version"] !== undefined ? `v${p["version"]}, ` : ""}leaf cache ${cache === null || cache === undefined ? "not exposed" : `${cache} entries`}`;
}

interface Row {
  part: string;
  p: Part;
  address: unknown;
  detail: string;
}

/** A replicated service's row, then one row per replica (`kdc[1]`, `kdc[2]`, …) when it has several. */
function serviceRows(part: string, p: Part, detail: (p: Part) => string): Row[] {
  const replicas = list(p, "replicas");
  const main: Row = { part, p, address: p["url"], detail: replicasNote(p) + detail(p) };
  if (replicas.length <= 1) return [main];
  return [main, ...replicas.map((r, i) => ({ part: `${part}[${i + 1}]`, p: r, address: r["url"], detail: replicaDetail(r) }))];
}

/** The summary as a table of parts (and of each service's replicas), then the KDC's tenants, for people. */
export function formatStatus(s: { kdc: Part; audit: Part; agent: Part; proxy: Part }): string {
  const rows: Row[] = [
    ...serviceRows("kdc", s.kdc, kdcDetail),
    ...serviceRows("audit", s.audit, auditDetail),
    { part: "agent", p: s.agent, address: s.agent["socket"], detail: agentDetail(s.agent) },
    { part: "proxy", p: s.proxy, address: s.proxy["metrics_address"], detail: proxyDetail(s.proxy) },
  ];
  let text = renderTable(
    [
      { header: "part", value: (r: Row) => r.part },
      { header: "state", value: (r) => partState(r.p) },
      { header: "address", value: (r) => (typeof r.address === "string" ? r.address : undefined) },
      { header: "details", value: (r) => r.detail },
    ],
    rows,
  );
  const tenants = list(s.kdc, "tenants");
  if (tenants.length > 0) {
    text +=
      "\n" +
      renderTable(
        [
          { header: "tenant", value: (t: Part) => String(t["tenant"]) },
          { header: "active version", value: (t) => (t["active_version"] === 0 ? "none" : Number(t["active_version"])) },
          { header: "machines up to date", value: (t) => `${t["machines_up_to_date"]}/${t["machines_total"]}` },
        ],
        tenants,
      );
  }
  return text;
}

function probeSettings(ctx: CommandContext, urlFlag: string, defaultUrl: string): ConnectionSettings {
  const s = connectionSettings(ctx.args, urlFlag, defaultUrl);
  return ctx.args.parsed.flags.has("timeout") ? s : { ...s, timeoutMs: DEFAULT_PROBE_TIMEOUT_MS };
}

/** A socket path made absolute against the working directory (`run/agent.sock` works as typed from the repo folder). */
function absoluteSocket(path: string | undefined): string | undefined {
  return path === undefined ? undefined : resolve(path);
}

/** `unix:REL` (or a relative path that names a socket) made absolute; host:port and URLs as given. */
export function absoluteMetricsAddress(address: string | undefined): string | undefined {
  if (address === undefined) return undefined;
  if (address.startsWith("unix:")) return `unix:${resolve(address.slice("unix:".length))}`;
  if (address.startsWith("./") || address.startsWith("../")) return `unix:${resolve(address)}`;
  return address;
}

/** Fields of a KDC replica's own report that its `replicas` entry keeps (the tenants are the service's). */
const KDC_REPLICA_FIELDS = ["version", "uptime_seconds", "connected_agents", "audit_head_seq"];

/** Every replica of one service asked at once, as one entry (see {@link replicatedEntry}). */
async function serviceHealth(s: ConnectionSettings, probe: (c: ServerClients) => Promise<Part>, keep: readonly string[] = []): Promise<Part> {
  const clientsFor = (url: string) => serverClients({ url, caPem: s.caPem, token: () => s.token, timeoutMs: s.timeoutMs, expectedService: s.service });
  return replicatedEntry(await probeReplicas(s.urls, clientsFor, probe), keep);
}

/** True when a service is healthy but some of its replicas are not. */
function degraded(p: Part): boolean {
  return p["healthy"] === true && list(p, "replicas").some((r) => r["healthy"] !== true);
}

/** `kmi ctl status`. */
export const statusCommand: Command = {
  name: ["status"],
  summary: "health of every part: the KDC, and with --audit / --agent-socket / --proxy-metrics the Auditserver and a machine's agent and proxy (operator)",
  details:
    "the same entries as `kmi up --json`. The KDC is always asked; every other part when its address is given (flag or\n" +
    "environment), else it is shown as not checked. A part that does not answer is shown as unreachable with the error;\n" +
    "exit code 0 when every part asked is healthy, 1 otherwise. --kdc and --audit take every replica's URL,\n" +
    "comma-separated: each replica is asked at once (each with its own --timeout, default 5 s) and shown on its own\n" +
    "row with its state, error and latency; a service is healthy when at least one replica is (a replica down is\n" +
    "said on the service's row, and `degraded: true` in --json). After `kmi up`, its printed KMI_CTL_* environment\n" +
    "(ctl_env in `kmi up --json`) points every flag at the local mesh.\n" +
    "examples:\n  kmi ctl status\n  kmi ctl status --agent-socket /run/kmi/agent.sock --proxy-metrics 127.0.0.1:9080 --json",
  flags: {
    ...kdcConnectionFlags,
    timeout: { ...kdcConnectionFlags["timeout"]!, help: `give up on each probe after this many seconds (default ${DEFAULT_PROBE_TIMEOUT_MS / 1000})` },
    audit: auditConnectionFlags["audit"]!,
    "agent-socket": { type: "string", value: "PATH", help: "the agent's Unix socket, to ask it for its status (not asked when unset)", env: "KMI_CTL_AGENT_SOCKET" },
    "proxy-metrics": {
      type: "string",
      value: "ADDRESS",
      help: "the proxy's metrics endpoint (its --metrics-listen: unix:PATH, relative or absolute, host:port or http://host:port; not asked when unset)",
      env: "KMI_CTL_PROXY_METRICS",
    },
  },
  async run(ctx) {
    ctx.args.noPositionals();
    const kdcSettings = probeSettings(ctx, "kdc", DEFAULT_KDC_URL);
    // The KDC is always asked (at its default address when none is given); the other parts only
    // when their address is given, so that a status of a KDC alone is not a list of failures.
    const auditSettings = ctx.args.str("audit") !== undefined ? probeSettings(ctx, "audit", DEFAULT_AUDIT_URL) : undefined;
    const agentSocket = absoluteSocket(ctx.args.str("agent-socket"));
    const metrics = absoluteMetricsAddress(ctx.args.str("proxy-metrics"));
    const [k, a, g, p] = await Promise.all([
      serviceHealth(kdcSettings, kdcHealth, KDC_REPLICA_FIELDS),
      auditSettings === undefined ? Promise.resolve<Part>({ checked: false }) : serviceHealth(auditSettings, auditHealth),
      agentSocket === undefined ? Promise.resolve<Part>({ checked: false }) : agentHealth(agentSocket, undefined, kdcSettings.timeoutMs),
      metrics === undefined ? Promise.resolve<Part>({ checked: false }) : proxyHealth({ metrics }),
    ]);
    const summary = {
      kmi_ctl: { version: VERSION, time: new Date().toISOString() },
      kdc: k,
      audit: a,
      agent: { ...(agentSocket !== undefined ? { socket: agentSocket } : {}), ...g },
      proxy: { ...(metrics !== undefined ? { metrics_address: metrics } : {}), ...p },
    };
    const parts: Part[] = [summary.kdc, summary.audit, summary.agent, summary.proxy];
    const healthy = parts.every((x) => x["checked"] === false || x["healthy"] === true);
    ctx.out.result({ healthy, degraded: parts.some(degraded), ...summary }, () => formatStatus(summary));
    return healthy ? ExitCode.ok : ExitCode.failure;
  },
};
