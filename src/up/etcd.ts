/**
 * The local etcd cluster of `kmi up --ha`: which `etcd` runs (the system's, from PATH), the
 * members' names and URLs (chosen at the first start and kept in `<data>/etcd/cluster.json`,
 * because etcd records its peers' URLs in its data: a restart must use the same ones), each
 * member's command line, and its health as etcd itself reports it (`/health`, and
 * `/v3/maintenance/status` for the leader) over TLS with `kmi up`'s client certificate.
 */
import { constants } from "node:fs";
import { access, readFile } from "node:fs/promises";
import { request } from "node:https";
import { delimiter, join } from "node:path";
import { randomBytes } from "node:crypto";
import { writeFileAtomicSync } from "../common/fs.js";
import type { LogLevel } from "../common/logger.js";
import type { EtcdPki } from "./etcd-pki.js";
import { HA_SIZE } from "./layout.js";
import { formatHostPort, resolvePort } from "./ports.js";

/** One member: its name (also its part id) and URLs. */
export interface EtcdMemberPlan {
  readonly name: `etcd-${number}`;
  /** Where clients reach it (https). */
  readonly clientUrl: string;
  /** Where the other members reach it (https). */
  readonly peerUrl: string;
}

/** The cluster as `cluster.json` keeps it. */
export interface EtcdClusterPlan {
  /** The `--initial-cluster-token`: keeps this cluster's members apart from another's. */
  readonly token: string;
  readonly members: readonly EtcdMemberPlan[];
}

/** etcd is not installed (or not on PATH); the message says how to install it. */
export class EtcdMissingError extends Error {
  override name = "EtcdMissingError";
}

/** The path of the `etcd` executable on `PATH`; {@link EtcdMissingError} when there is none. */
export async function findEtcd(path: string | undefined): Promise<string> {
  for (const dir of (path ?? "").split(delimiter)) {
    if (dir === "") continue;
    const candidate = join(dir, "etcd");
    try {
      await access(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  throw new EtcdMissingError("kmi up --ha runs a local etcd cluster, but no etcd is on PATH; install it: apt-get install etcd-server (Debian/Ubuntu), or put etcd 3.4+ on PATH");
}

/**
 * The cluster of this data dir: read from `file`, or, at the first start, 3 members on `host`
 * with free client and peer ports, written there (0600). A later start whose port is taken
 * fails naming the member and the file.
 */
export async function loadOrPlanCluster(file: string, host: string): Promise<EtcdClusterPlan> {
  const existing = await readFile(file, "utf8").then(
    (t) => JSON.parse(t) as EtcdClusterPlan,
    (err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") return undefined;
      throw new Error(`cannot read ${file}: ${err.message}`);
    },
  );
  if (existing !== undefined) return existing;
  const members: EtcdMemberPlan[] = [];
  for (let n = 1; n <= HA_SIZE.etcd; n++) {
    const client = await resolvePort({ host, port: 0 }, `etcd-${n}`, "--kdc-listen", "KMI_UP_KDC_LISTEN");
    const peer = await resolvePort({ host, port: 0 }, `etcd-${n}`, "--kdc-listen", "KMI_UP_KDC_LISTEN");
    members.push({ name: `etcd-${n}`, clientUrl: `https://${formatHostPort(client)}`, peerUrl: `https://${formatHostPort(peer)}` });
  }
  const plan: EtcdClusterPlan = { token: `kmi-up-${randomBytes(8).toString("hex")}`, members };
  writeFileAtomicSync(file, JSON.stringify(plan, null, 2) + "\n", 0o600);
  return plan;
}

/**
 * The command line of member `m`: client and peer TLS with client certificates required, data
 * in `dataDir`. `--initial-cluster*` only matter on the first start; later ones read the
 * membership from the data dir. History is compacted hourly, so it does not grow forever.
 */
export function etcdArgs(m: EtcdMemberPlan, plan: EtcdClusterPlan, pki: EtcdPki, dataDir: string, logLevel: LogLevel): string[] {
  return [
    "--name", m.name,
    "--data-dir", dataDir,
    "--listen-client-urls", m.clientUrl,
    "--advertise-client-urls", m.clientUrl,
    "--listen-peer-urls", m.peerUrl,
    "--initial-advertise-peer-urls", m.peerUrl,
    "--initial-cluster", plan.members.map((x) => `${x.name}=${x.peerUrl}`).join(","),
    "--initial-cluster-state", "new",
    "--initial-cluster-token", plan.token,
    "--client-cert-auth", "--trusted-ca-file", pki.ca, "--cert-file", pki.member.cert, "--key-file", pki.member.key,
    "--peer-client-cert-auth", "--peer-trusted-ca-file", pki.ca, "--peer-cert-file", pki.member.cert, "--peer-key-file", pki.member.key,
    "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
    "--logger", "zap", "--log-outputs", "stderr", "--log-level", logLevel, // etcd's zap levels have kmi's names
  ];
}

/** The `--store etcd` flags of a KDC or Auditserver replica (and of its `init`). */
export function storeFlags(plan: EtcdClusterPlan, pki: EtcdPki, who: "kdc" | "audit"): string[] {
  const c = pki.clients[who];
  return ["--store", "etcd", "--etcd-endpoints", plan.members.map((m) => m.clientUrl).join(","), "--etcd-ca", pki.ca, "--etcd-cert", c.cert, "--etcd-key", c.key];
}

/** TLS material of a client of the cluster (PEM). */
export interface EtcdClientTls {
  readonly ca: Buffer;
  readonly cert: Buffer;
  readonly key: Buffer;
}

/** Reads `kmi up`'s own client certificate. */
export async function upClientTls(pki: EtcdPki): Promise<EtcdClientTls> {
  const [ca, cert, key] = await Promise.all([readFile(pki.ca), readFile(pki.clients.up.cert), readFile(pki.clients.up.key)]);
  return { ca, cert, key };
}

/** One HTTPS call to a member's client URL; resolves with the parsed JSON body. */
function call(url: string, path: string, tls: EtcdClientTls, timeoutMs: number, body?: string): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const req = request(
      new URL(path, url),
      { method: body === undefined ? "GET" : "POST", ca: tls.ca, cert: tls.cert, key: tls.key, timeout: timeoutMs, headers: body === undefined ? {} : { "content-type": "application/json" } },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (d: string) => (text += d.length + text.length > 1 << 20 ? "" : d));
        res.on("end", () => {
          try {
            resolve(JSON.parse(text) as Record<string, unknown>);
          } catch {
            reject(new Error(`${path}: HTTP ${res.statusCode}, not JSON`));
          }
        });
      },
    );
    req.on("timeout", () => req.destroy(new Error(`no answer in ${timeoutMs} ms`)));
    req.on("error", reject);
    req.end(body);
  });
}

/** A member's health as etcd reports it. */
export interface EtcdMemberHealth {
  readonly name: string;
  readonly url: string;
  /** `/health` says true: the member has a leader and serves. */
  readonly healthy: boolean;
  /** This member is the raft leader. */
  readonly leader: boolean;
  /** etcd's member id (hex), when it answered. */
  readonly id?: string;
  /** etcd's version, when it answered. */
  readonly version?: string;
  /** Why it is not healthy. */
  readonly error?: string;
}

function hex(id: unknown): string | undefined {
  return typeof id === "string" && /^\d+$/.test(id) ? BigInt(id).toString(16) : undefined;
}

/** Asks one member for its health and whether it leads. */
export async function memberHealth(m: { readonly name: string; readonly clientUrl: string }, tls: EtcdClientTls, timeoutMs = 3000): Promise<EtcdMemberHealth> {
  try {
    const [health, status] = await Promise.all([call(m.clientUrl, "/health", tls, timeoutMs), call(m.clientUrl, "/v3/maintenance/status", tls, timeoutMs, "{}")]);
    const header = status["header"] as Record<string, unknown> | undefined;
    const id = hex(header?.["member_id"]);
    const healthy = health["health"] === "true";
    return {
      name: m.name,
      url: m.clientUrl,
      healthy,
      leader: id !== undefined && hex(status["leader"]) === id,
      ...(id !== undefined ? { id } : {}),
      ...(typeof status["version"] === "string" ? { version: status["version"] } : {}),
      ...(healthy ? {} : { error: `etcd says unhealthy${typeof health["reason"] === "string" && health["reason"] !== "" ? ` (${health["reason"]})` : ""}` }),
    };
  } catch (err) {
    return { name: m.name, url: m.clientUrl, healthy: false, leader: false, error: err instanceof Error ? err.message : String(err) };
  }
}

/** Every member's health, asked in parallel. */
export function clusterHealth(members: readonly { readonly name: string; readonly clientUrl: string }[], tls: EtcdClientTls, timeoutMs = 3000): Promise<EtcdMemberHealth[]> {
  return Promise.all(members.map((m) => memberHealth(m, tls, timeoutMs)));
}
