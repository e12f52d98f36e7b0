/**
 * The mesh's health summary, shared by `kmi up` (`kmi up --json`, `kmi up status`) and
 * `kmi ctl status`: what each part reports about itself, asked through its public API, and the
 * clients that ask. The KDC: its version, tenants with their active CA version and rollout,
 * connected agents, whether it holds the Auditserver's attestation key. The Auditserver: its
 * health and machines. The agent (over its Unix socket): attestation, KDC link, keys held. The
 * proxy: whether it listens, and its leaf cache size and version from its metrics endpoint.
 *
 * A part that cannot be asked gets `healthy: false` and an `error` (and `reachable: false` when
 * it did not answer at all), never a crash. Generated code, common/ and the clients here only:
 * callers reach the programs through their APIs, never their modules.
 */
import { request as httpRequest } from "node:http";
import { Agent as HttpsAgent } from "node:https";
import { connect } from "node:net";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { AttestationState, KeyState, type GetStatusResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { AuditAdminService } from "../gen/kmi/audit/v1/admin_pb.js";
import { MachineStatus } from "../gen/kmi/audit/v1/audit_pb.js";
import { KeyPurpose } from "../gen/kmi/common/v1/common_pb.js";
import { KdcAdminService } from "../gen/kmi/kdc/v1/admin_pb.js";
import { KdcService } from "../gen/kmi/kdc/v1/kdc_pb.js";
import { parseListenAddress } from "../common/listen.js";
import { serviceIdentityCheck } from "../common/http2-client.js";
import { AgentCallError, AgentClient } from "./agent-client.js";
import { errorText } from "../common/errors.js";
import { bearerAuthorization } from "../common/bearer.js";

// ── clients ─────────────────────────────────────────────────────────────────────────────────

/** Clients of one TLS server (KDC or Auditserver). */
export interface ServerClients {
  readonly kdcAdmin: Client<typeof KdcAdminService>;
  readonly kdc: Client<typeof KdcService>;
  readonly auditAdmin: Client<typeof AuditAdminService>;
  readonly health: Client<typeof Health>;
  /** Releases pooled connections. */
  close(): void;
}

/** Options of {@link serverClients}. */
export interface ServerClientOptions {
  /** `https://host:port`. */
  readonly url: string;
  /** The infrastructure CA, PEM; the system's CAs when undefined. */
  readonly caPem?: string | undefined;
  /** Reads the operator token (called per call, so a token file written later is picked up). */
  readonly token?: () => string | undefined;
  /** Deadline of each call, ms; default 10 s. */
  readonly timeoutMs?: number;
  /** The kmi service the server must be (`kmi://service/<name>` in its certificate); see {@link serviceIdentityCheck}. */
  readonly expectedService?: string;
}

/** Connect-protocol clients (HTTPS/1.1) of a kmi TLS server, sending the bearer token. */
export function serverClients(o: ServerClientOptions): ServerClients {
  const ca = o.caPem !== undefined ? { ca: o.caPem } : {};
  const identity = o.expectedService !== undefined ? { checkServerIdentity: serviceIdentityCheck(o.expectedService) } : {};
  const agent = new HttpsAgent({ keepAlive: true, maxSockets: 4, ...ca, ...identity });
  const auth: Interceptor = (next) => async (req) => {
    const token = o.token?.();
    if (token !== undefined && token !== "") req.header.set("authorization", bearerAuthorization(token));
    return next(req);
  };
  const transport = createConnectTransport({
    baseUrl: o.url,
    httpVersion: "1.1",
    interceptors: [auth],
    defaultTimeoutMs: o.timeoutMs ?? 10_000,
    nodeOptions: { agent, ...ca },
  });
  return {
    kdcAdmin: createClient(KdcAdminService, transport),
    kdc: createClient(KdcService, transport),
    auditAdmin: createClient(AuditAdminService, transport),
    health: createClient(Health, transport),
    close: () => agent.destroy(),
  };
}

/** True when the server's gRPC health check answers SERVING. */
export async function isServing(c: ServerClients): Promise<boolean> {
  const r = await c.health.check({ service: "" });
  return r.status === HealthCheckResponse_ServingStatus.SERVING;
}

/** The agent's client as `kmi up` holds it: GetStatus over the socket, deadlines per call. */
export class AgentStatusClient extends AgentClient {
  constructor(socketPath: string) {
    super({ socketPath });
  }
}

/**
 * Fetches `/metrics` from a Prometheus endpoint and resolves with the text. `address` is what
 * the program's `--metrics-listen` was given: a Unix socket (`unix:/path` or `/path`),
 * `host:port`, or an `http://host:port` URL.
 */
export function scrapeMetrics(address: string, timeoutMs = 3000): Promise<string> {
  let target: { socketPath: string } | { host: string; port: number };
  if (/^https?:\/\//.test(address)) {
    const u = new URL(address);
    if (u.protocol !== "http:") return Promise.reject(new Error(`metrics ${address}: metrics endpoints speak plain HTTP; use http://`));
    target = { host: u.hostname.replace(/^\[|\]$/g, ""), port: Number(u.port || 80) };
  } else {
    const a = parseListenAddress(address);
    target = a.kind === "unix" ? { socketPath: a.path } : { host: a.host, port: a.port };
  }
  return new Promise((resolve, reject) => {
    const req = httpRequest({ ...target, path: "/metrics", method: "GET", timeout: timeoutMs, agent: false }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (body += d));
      res.on("end", () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`metrics: HTTP ${res.statusCode}`))));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error("metrics: timed out")));
    req.on("error", reject);
    req.end();
  });
}

/** The value of a metric without labels in Prometheus text, or undefined. */
export function metricValue(text: string, name: string): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith(name + " ") || line.startsWith(name + "{} ")) {
      const v = Number(line.slice(line.lastIndexOf(" ") + 1));
      if (Number.isFinite(v)) return v;
    }
  }
  return undefined;
}

/** The `version` label of `kmi_build_info` in Prometheus text, or undefined. */
export function buildVersion(text: string): string | undefined {
  return /^kmi_build_info\{[^}]*version="([^"]*)"/m.exec(text)?.[1];
}

/** True when a TCP port accepts a connection (within `timeoutMs`). */
export function tcpOpen(host: string, port: number, timeoutMs = 2000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    s.setTimeout(timeoutMs, () => {
      s.destroy();
      resolve(false);
    });
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

// ── the summary ─────────────────────────────────────────────────────────────────────────────

/** One part's entry: snake_case keys, stable for scripts. */
export type PartHealth = Record<string, unknown>;

function iso(ts: Timestamp | undefined): string | undefined {
  return ts === undefined ? undefined : timestampDate(ts).toISOString();
}

/** An error as a part's status shows it: an agent call's with its gRPC code. */
function partErrorText(err: unknown): string {
  if (err instanceof AgentCallError) return `${err.code.toUpperCase()}: ${err.message}`;
  return errorText(err);
}

const UNREACHABLE_ERRNO = new Set(["ECONNREFUSED", "ENOENT", "EHOSTUNREACH", "ENETUNREACH", "ETIMEDOUT", "ECONNRESET", "EAI_AGAIN", "ENOTFOUND", "EPIPE"]);

/** True when `err` says the part did not answer at all (as opposed to answering with an error). */
export function isUnreachable(err: unknown): boolean {
  if (err instanceof ConnectError) return err.code === Code.Unavailable || err.code === Code.DeadlineExceeded;
  if (err instanceof AgentCallError) return err.grpcCode === GrpcStatus.UNAVAILABLE || err.grpcCode === GrpcStatus.DEADLINE_EXCEEDED;
  const e = err as { code?: unknown } | undefined;
  if (typeof e?.code === "number") return e.code === GrpcStatus.UNAVAILABLE || e.code === GrpcStatus.DEADLINE_EXCEEDED;
  if (typeof e?.code === "string") return UNREACHABLE_ERRNO.has(e.code);
  return /timed out/.test(partErrorText(err));
}

/** The entry of a part that could not be asked. */
function failed(err: unknown): PartHealth {
  return { healthy: false, reachable: !isUnreachable(err), error: partErrorText(err) };
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
export function agentFields(s: GetStatusResponse): PartHealth {
  return {
    version: s.version,
    machine_id: s.machineId,
    group: s.group,
    attestation: attestationWord(s.attestation),
    ...(s.attestationProblem !== "" ? { attestation_problem: s.attestationProblem } : {}),
    attestation_expires_at: iso(s.attestationExpiresAt),
    certificate_not_after: iso(s.certificateNotAfter),
    kdc_connected: s.kdcConnected,
    ...(s.kdcUrl !== "" ? { kdc_url: s.kdcUrl, kdc_failovers: s.kdcFailovers } : {}),
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

/** The KDC's entry: GetKdcStatus (needs an operator token). */
export async function kdcHealth(kdc: ServerClients): Promise<PartHealth> {
  try {
    const s = await kdc.kdcAdmin.getKdcStatus({});
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
    return failed(err);
  }
}

/** The Auditserver's entry: its health check and ListMachines (needs an operator token). */
export async function auditHealth(audit: ServerClients): Promise<PartHealth> {
  try {
    const serving = await isServing(audit);
    const machines = await audit.auditAdmin.listMachines({});
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
    return failed(err);
  }
}

/** One replica's probe: its URL, what it reported (as {@link kdcHealth} / {@link auditHealth} do) and how long it took. */
export interface ReplicaProbe {
  readonly url: string;
  readonly health: PartHealth;
  /** From the call's start to its answer or failure, ms (whole). */
  readonly latencyMs: number;
}

/**
 * Asks every replica of one service at once, each through its own clients (so its own deadline
 * and connection): a dead or slow replica neither delays nor hides the others. Clients are
 * closed when their probe ends.
 */
export async function probeReplicas(urls: readonly string[], clientsFor: (url: string) => ServerClients, probe: (c: ServerClients) => Promise<PartHealth>): Promise<ReplicaProbe[]> {
  return Promise.all(
    urls.map(async (url) => {
      const c = clientsFor(url);
      const start = performance.now();
      try {
        const health = await probe(c);
        return { url, health, latencyMs: Math.round(performance.now() - start) };
      } finally {
        c.close();
      }
    }),
  );
}

/**
 * A replicated service's entry: the report of the first replica that is healthy (the first
 * replica's when none is), with its `url`, so the service is healthy when at least one replica
 * is; then `replicas`, one entry per URL in the order given: `url`, `healthy`, `reachable` and
 * `error` when it failed, the fields of `keep` it reported, and `latency_ms`.
 */
export function replicatedEntry(probes: readonly ReplicaProbe[], keep: readonly string[] = []): PartHealth {
  const shown = probes.find((p) => p.health["healthy"] === true) ?? probes[0];
  if (shown === undefined) throw new RangeError("replicatedEntry: no replica was probed");
  const fields = ["healthy", "reachable", "error", ...keep];
  const replicas = probes.map((p) => {
    const picked = Object.fromEntries(fields.filter((k) => p.health[k] !== undefined).map((k) => [k, p.health[k]]));
    return { url: p.url, ...picked, latency_ms: p.latencyMs };
  });
  return { url: shown.url, ...shown.health, replicas };
}

/**
 * The agent's entry: GetStatus over its socket. With `tenant`, `holds_tenant_key` says whether
 * it holds that tenant's active intermediate.
 */
export async function agentHealth(socket: string, tenant?: string, timeoutMs = 3000): Promise<PartHealth> {
  const client = new AgentClient({ socketPath: socket });
  try {
    const s = await client.getStatus(timeoutMs);
    return { healthy: true, ...(tenant !== undefined ? { holds_tenant_key: heldVersions(s)[tenant] !== undefined } : {}), ...agentFields(s) };
  } catch (err) {
    return failed(err);
  } finally {
    client.close();
  }
}

/** The proxy's workers (`--workers`), from `kmi_proxy_worker_info{worker,pid}`; none for a proxy in one process. */
function proxyWorkers(metrics: string): { worker: number; pid: number }[] {
  const out: { worker: number; pid: number }[] = [];
  for (const m of metrics.matchAll(/^kmi_proxy_worker_info\{worker="(\d+)",pid="(\d+)"\} 1$/gm)) out.push({ worker: Number(m[1]), pid: Number(m[2]) });
  return out.sort((a, b) => a.worker - b.worker);
}

/**
 * The proxy's entry. With `url` (its listen address), `healthy` is whether it accepts
 * connections and a metrics failure is only noted (`metrics_error`); without it, `healthy` is
 * whether its metrics endpoint answers. `metrics` undefined: `leaf_cache_entries` null and
 * `metrics: "not exposed"`. A proxy with workers adds `workers` (id and pid each) and `worker_restarts`.
 */
export async function proxyHealth(o: { url?: string | undefined; metrics?: string | undefined }): Promise<PartHealth> {
  let listening: boolean | undefined;
  if (o.url !== undefined) {
    const u = new URL(o.url);
    listening = await tcpOpen(u.hostname.replace(/^\[|\]$/g, ""), Number(u.port));
  }
  if (o.metrics === undefined) return { healthy: listening ?? false, leaf_cache_entries: null, metrics: "not exposed" };
  try {
    const text = await scrapeMetrics(o.metrics);
    const version = buildVersion(text);
    const workers = proxyWorkers(text);
    return {
      healthy: listening ?? true,
      ...(version !== undefined ? { version } : {}),
      leaf_cache_entries: metricValue(text, "kmi_proxy_leaf_cache_entries") ?? null,
      ...(workers.length > 0 ? { workers, worker_restarts: metricValue(text, "kmi_proxy_worker_restarts_total") ?? 0 } : {}),
    };
  } catch (err) {
    if (listening !== undefined) return { healthy: listening, leaf_cache_entries: null, metrics_error: partErrorText(err) };
    return { ...failed(err), leaf_cache_entries: null };
  }
}
