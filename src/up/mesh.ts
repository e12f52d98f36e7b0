/**
 * `kmi up`: brings the whole mesh up on this machine, keeps it up, and takes it down.
 *
 *   1. directories (0700), the run-state file (one `kmi up` per data dir), free ports
 *   1b. with --ha: the local etcd cluster (its CA and certificates, 3 members supervised, a leader)
 *   2. KDC: `kmi kdc init` on first run, then `kmi kdc` supervised (--ha: 3 replicas on etcd)
 *   3. Auditserver: `kmi audit init` on first run (its certificate from the KDC), then `kmi audit`
 *      (--ha: 2 replicas on etcd)
 *   4. the dev tenant (KMI-signed active intermediate), the proxy's and the agent's config
 *      files, the machine group with this build's approved measurements (both config files
 *      included), a join token when it has not enrolled
 *   5. agent, supervised; wait until it is attested and holds the tenant's key
 *   6. proxy, supervised, started with its config file (the agent socket, the default tenant…)
 *   7. print where everything is (or the JSON summary), then watch the agent and report
 *      what changes (rotations reaching it, quarantine, the KDC link) until SIGINT/SIGTERM
 *   8. stop the parts in reverse order and exit 0 once all have exited
 *
 * `runUp` reads as these stages (resolveSite, bringUpEtcd, initKdcIfNeeded, bringUpKdc, bringUpAudit,
 * prepareAgent, bringUpAgent, bringUpProxy, the banner, watchAgent); each takes what it needs.
 */
import { readFileSync } from "node:fs";
import { chmod, mkdir, readFile } from "node:fs/promises";
import { isIP } from "node:net";
import { isAbsolute, join, relative } from "node:path";
import { pathExists } from "../common/fs.js";
import { operatorLoginLink } from "./portal-link.js";
import { banner } from "./banner.js";
import { Progress } from "./progress.js";
import type { UpConfig, TcpAddress } from "./config.js";
import { layout, partIds, programOf, replicaId, HA_SIZE, type Layout, type PartId } from "./layout.js";
import { ensureEtcdPki, type EtcdPki } from "./etcd-pki.js";
import { clusterHealth, etcdArgs, findEtcd, loadOrPlanCluster, memberHealth, storeFlags, upClientTls, type EtcdClientTls, type EtcdClusterPlan } from "./etcd.js";
import { PartStartError, Supervisor, summarizeLogLines, type PartDefinition, type PartProcess } from "./supervisor.js";
import { AgentStatusClient, attestationWord, heldVersions, isServing, serverClients, tcpOpen, type ServerClients } from "../clients/mesh-health.js";
import {
  StepError,
  agentEnrolled,
  auditInitialized,
  checkOperatorToken,
  ensureGroup,
  ensureTenant,
  expectedMeasurements,
  initAudit,
  initKdc,
  kdcInitialized,
  measureFlag,
  removeJoinToken,
  writeIfAbsent,
  writeIfChanged,
  writeJoinToken,
} from "./bootstrap.js";
import { PortError, connectHost, formatHostPort, httpUrl, httpsUrl, resolvePort } from "./ports.js";
import { isKmiProcess, isPartProcess, pidAlive, readRunState, removeRunState, writeRunState, type RunState, type RunStateHa } from "./run-state.js";
import { healthSummary, type HaInputs, type ProcessInfo } from "./health.js";
import { AttestationState, type GetStatusResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { VERSION } from "../common/version.js";
import { sleep } from "../common/backoff.js";
import { dependenciesDirOf } from "../attest/index.js";
import { errorText } from "../common/errors.js";

/** What `kmi up` needs from its surroundings (the process, in production). */
export interface UpIo {
  /** stdout. */
  readonly out: NodeJS.WritableStream & { isTTY?: boolean };
  /** stderr. */
  readonly err: NodeJS.WritableStream & { isTTY?: boolean };
  /** Working directory (relative paths in output are relative to it). */
  readonly cwd: string;
  /** Environment of the parts. */
  readonly env: Record<string, string>;
  /** Colours allowed (NO_COLOR unset). */
  readonly color: boolean;
  /** The command that runs kmi: node, its flags, the kmi script. */
  readonly kmi: readonly string[];
  /** The kmi script (recognizes parts in /proc). */
  readonly kmiScript: string;
  /** The kmi code directory (dist/): what the agent measures as agent.code. */
  readonly codeDir: string;
  /** Where SIGINT and SIGTERM come from. */
  readonly signals: NodeJS.EventEmitter;
}

/** The user asked to stop (a signal). */
class StopRequested extends Error {
  override name = "StopRequested";
}

/** Rejects when `signal` aborts, else settles as `p` does (whose later rejection is then ignored). */
function abortable<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  p.catch(() => undefined);
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      },
      (e) => {
        signal.removeEventListener("abort", onAbort);
        reject(e);
      },
    );
  });
}

/** Polls `fn` until it resolves to a value other than undefined; errors count as "not yet". */
async function poll<T>(fn: () => Promise<T | undefined>, signal: AbortSignal, intervalMs = 200): Promise<T> {
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch {
      // not yet
    }
    await sleep(intervalMs, signal);
    signal.throwIfAborted();
  }
}


/** Paths as the operator typed them: relative to the working directory when inside it. */
function shown(cwd: string, path: string): string {
  const r = relative(cwd, path);
  return r !== "" && !r.startsWith("..") && !isAbsolute(r) ? r : path;
}

/** Sockets are bound in a temporary directory next to their final path first (common/listen.ts): leave room for it. */
const SOCKET_PATH_MAX = 107 - 24;

async function prepareDirectories(l: Layout, ha: boolean): Promise<void> {
  for (const dir of [l.dataDir, l.runDir, l.logsDir, l.configDir, l.metricsDir, ...(ha ? [l.etcdDir] : [])]) {
    await mkdir(dir, { recursive: true, mode: 0o700 });
  }
  // Directories made by an earlier run, or by hand, may be wider: the data dir holds keys.
  await chmod(l.dataDir, 0o700);
  await chmod(l.runDir, 0o700);
  if (ha) await chmod(l.etcdDir, 0o700);
  const sockets = partIds(ha).filter((p) => programOf(p) !== "etcd").map((p) => l.metricsSocket(p));
  for (const path of [l.agentSocket, ...sockets]) {
    if (Buffer.byteLength(path) > SOCKET_PATH_MAX) {
      throw new StepError("up", `socket path ${path} is too long for a Unix socket (at most ${SOCKET_PATH_MAX} bytes here); pass a shorter --run-dir, e.g. --run-dir /tmp/kmi-run`);
    }
  }
}

/** What every stage of `kmi up` works with; none of it changes once the stages begin. */
interface Stage {
  readonly cfg: UpConfig;
  readonly io: UpIo;
  readonly L: Layout;
  readonly progress: Progress;
  /** A path as the operator would type it (relative to the working directory when inside it). */
  readonly show: (p: string) => string;
  readonly sup: Supervisor;
  /** Aborts when the operator asks to stop. */
  readonly signal: AbortSignal;
}

/** The mesh's addresses: what each part listens on (ports resolved) and its URL. */
interface Site {
  /** Replica 1's addresses (the only ones without --ha). */
  readonly listen: { kdc: TcpAddress; audit: TcpAddress; proxy: TcpAddress };
  readonly urls: { kdc: string; audit: string; proxy: string };
  /** Every replica of the KDC and the Auditserver (one each without --ha), replica 1 first. */
  readonly replicas: { kdc: Replica[]; audit: Replica[] };
}

/** One replica of a server. */
interface Replica {
  readonly id: PartId;
  readonly listen: TcpAddress;
  readonly url: string;
}

/** What `--ha` adds: the etcd cluster and its certificates. */
interface Ha {
  readonly etcd: string;
  readonly plan: EtcdClusterPlan;
  readonly pki: EtcdPki;
  readonly tls: EtcdClientTls;
}

/** Writes to a stream, ignoring a closed terminal (it must not stop the shutdown). */
function safeWrite(stream: NodeJS.WritableStream): (text: string) => void {
  return (text) => {
    try {
      stream.write(text);
    } catch {
      // a closed terminal must not stop the shutdown
    }
  };
}

/**
 * Signals: the first one stops in order (aborts `stop`), a second one kills every part at once.
 * Returns the function that removes the handlers.
 */
function installSignals(io: UpIo, progress: Progress, stop: AbortController, livePids: () => number[]): () => void {
  const onSignal = (sig: NodeJS.Signals) => {
    if (!stop.signal.aborted) {
      progress.step("up", `${sig} received: stopping the parts in reverse order (again to kill them at once)…`);
      stop.abort(new StopRequested(sig));
      return;
    }
    progress.warn("up", `second ${sig}: killing every part now`);
    for (const pid of livePids()) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
    process.exit(1);
  };
  // SIGHUP too: a closed terminal must not leave the parts running without their supervisor.
  const signals: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  for (const sig of signals) io.signals.on(sig, onSignal);
  return () => {
    for (const sig of signals) io.signals.off(sig, onSignal);
  };
}

/** Replica N's port: the first one's + 10×(N-1), or a free one with port 0. */
const REPLICA_PORT_STEP = 10;

/** The addresses of `count` replicas of a server whose first replica listens on `first`. */
async function replicaAddresses(program: "kdc" | "audit", first: TcpAddress, count: number, part: string, flag: string, env: string): Promise<Replica[]> {
  const out: Replica[] = [];
  for (let n = 1; n <= count; n++) {
    const want = { host: first.host, port: first.port === 0 ? 0 : first.port + REPLICA_PORT_STEP * (n - 1) };
    const listen = await resolvePort(want, n === 1 ? part : `${part} replica ${n}`, flag, env);
    out.push({ id: replicaId(program, n), listen, url: httpsUrl(listen) });
  }
  return out;
}

/** Resolves the listen ports (port 0 picks one; a taken port is named with the variable that moves it). */
async function resolveSite(cfg: UpConfig): Promise<Site> {
  const kdc = await replicaAddresses("kdc", cfg.listen.kdc, cfg.ha ? HA_SIZE.kdc : 1, "KDC", "--kdc-listen", "KMI_UP_KDC_LISTEN");
  const audit = await replicaAddresses("audit", cfg.listen.audit, cfg.ha ? HA_SIZE.audit : 1, "Auditserver", "--audit-listen", "KMI_UP_AUDIT_LISTEN");
  const proxy = await resolvePort(cfg.listen.proxy, "proxy", "--proxy-listen", "KMI_UP_PROXY_LISTEN");
  const listen = { kdc: kdc[0]!.listen, audit: audit[0]!.listen, proxy };
  return { listen, urls: { kdc: kdc[0]!.url, audit: audit[0]!.url, proxy: httpUrl(proxy) }, replicas: { kdc, audit } };
}

/**
 * The names a server's TLS certificate needs beyond the ones it always has (localhost,
 * 127.0.0.1, ::1) for clients to reach it on `host`, where every replica listens; a wildcard
 * is reached on loopback. Every replica gets the same, since the certificate is shared.
 */
export function tlsNameFlags(host: string): string[] {
  const h = connectHost(host);
  if (h === "localhost" || h === "127.0.0.1" || h === "::1") return [];
  return isIP(h) !== 0 ? ["--ip", h] : ["--dns-name", h];
}

/** Every replica's URL, comma-separated (what the agent is given: it fails over between them). */
function urlsOf(replicas: readonly Replica[]): string {
  return replicas.map((r) => r.url).join(",");
}

/**
 * Every replica of the other server, for replica `i` (KDC → Auditserver for quarantines and the
 * attestation key, Auditserver → KDC for certificates), comma-separated and starting at replica
 * `i` (round the list): its client calls the first and fails over to the next
 * (src/clients/failover-transport.ts), so the links are spread over the replicas and one
 * replica's death cuts none of them.
 */
function peersOf(replicas: readonly Replica[], i: number): string {
  const n = replicas.length;
  return replicas.map((_, k) => replicas[(i + k) % n]!.url).join(",");
}

/**
 * A data dir is LevelDB (plain `kmi up`) or etcd (`--ha`) for its whole life: the other kind
 * would start on an empty store beside the KDC's files and fail in confusing ways.
 */
async function checkStoreKind(L: Layout, ha: boolean): Promise<void> {
  const hasLevel = await pathExists(join(L.kdcDir, "store"));
  const hasEtcd = await pathExists(L.etcdClusterFile);
  if (ha && hasLevel) {
    throw new StepError("up", `${L.dataDir} holds a mesh made without --ha (LevelDB in ${join(L.kdcDir, "store")}); run kmi up --ha with another --data-dir (and --run-dir), or kmi up without --ha here`);
  }
  if (!ha && hasEtcd) {
    throw new StepError("up", `${L.dataDir} holds a mesh made with --ha (its store is the etcd cluster in ${L.etcdDir}); run kmi up --ha here, or kmi up with another --data-dir`);
  }
}

/**
 * The local etcd cluster: the CA on the first start and fresh certificates at every start, the
 * members (chosen once, see ./etcd.ts), started together (none is healthy before a quorum is),
 * each healthy once etcd's /health says so; then which one leads.
 */
async function bringUpEtcd(s: Stage, etcd: string): Promise<Ha> {
  const { L, progress, show } = s;
  const host = connectHost(s.cfg.listen.kdc.host);
  const pki = await ensureEtcdPki(L.etcdPkiDir, host);
  const tls = await upClientTls(pki);
  const fresh = !(await pathExists(L.etcdClusterFile));
  const plan = await loadOrPlanCluster(L.etcdClusterFile, host);
  progress.step("etcd", `${fresh ? "first run: a new" : "reusing the"} 3-member cluster in ${show(L.etcdDir)} (${etcd}; TLS with client certificates from ${show(pki.ca)})…`);
  for (const m of plan.members) await checkMemberPorts(m, L.etcdClusterFile);
  const started = plan.members.map(async (m) => {
    await mkdir(L.etcdMemberDir(m.name), { recursive: true, mode: 0o700 });
    await chmod(L.etcdMemberDir(m.name), 0o700);
    const def: PartDefinition = {
      name: m.name,
      executable: etcd,
      args: () => etcdArgs(m, plan, pki, L.etcdMemberDir(m.name), s.cfg.logLevel),
      ready: async (_proc, sig) => {
        await poll(async () => ((await memberHealth(m, tls, 2000)).healthy ? true : undefined), sig, 250);
        return `healthy on ${m.clientUrl}`;
      },
    };
    const what = await s.sup.start(def);
    progress.step(m.name, `${what} (pid ${s.sup.status(m.name)?.pid})`);
  });
  await abortable(Promise.all(started), s.signal);
  const leader = (await clusterHealth(plan.members, tls)).find((h) => h.leader);
  progress.step("etcd", `cluster healthy; leader ${leader?.name ?? "not known yet"}`);
  return { etcd, plan, pki, tls };
}

/** A member's ports must be free: they are fixed in cluster.json (etcd keeps its peers' URLs). */
async function checkMemberPorts(m: EtcdClusterPlan["members"][number], file: string): Promise<void> {
  for (const url of [m.clientUrl, m.peerUrl]) {
    const u = new URL(url);
    const addr = { host: u.hostname.replace(/^\[|\]$/g, ""), port: Number(u.port) };
    try {
      await resolvePort(addr, m.name, "--kdc-listen", "KMI_UP_KDC_LISTEN");
    } catch {
      throw new StepError("up", `${url} (etcd member ${m.name}, fixed in ${file} at the first start) is in use by another program; free it (the cluster keeps its members' URLs)`);
    }
  }
}

/** Refuses an --origin-ca-file that cannot be read or holds no certificate, before anything starts. */
async function checkOriginCaFiles(files: readonly string[]): Promise<void> {
  for (const f of files) {
    const pem = await readFile(f, "utf8").catch((err: NodeJS.ErrnoException) => {
      throw new StepError("up", `--origin-ca-file: cannot read ${f} (${err.code ?? err.message})`);
    });
    if (!pem.includes("-----BEGIN CERTIFICATE-----")) throw new StepError("up", `--origin-ca-file: ${f} holds no PEM certificate`);
  }
}

/** `kmi kdc init` on first run (the master key, the roots, the operator token), then the token is checked. */
async function initKdcIfNeeded(s: Stage, ha: Ha | undefined): Promise<void> {
  const { L, progress, show, io } = s;
  if (!(await kdcInitialized(L))) {
    progress.step("kdc", `first run: generating the master key, the KMI root CA and the infrastructure CA${ha !== undefined ? " (the store: etcd)" : ""}…`);
    const extra = [...tlsNameFlags(s.cfg.listen.kdc.host), ...(ha !== undefined ? storeFlags(ha.plan, ha.pki, "kdc") : [])];
    await abortable(initKdc(L, { kmi: io.kmi, cwd: io.cwd, env: io.env }, extra), s.signal);
    progress.step("kdc", `initialized ${show(L.kdcDir)}; operator token in ${show(L.operatorToken)} (0600)`);
  } else {
    progress.step("kdc", `reusing ${show(L.kdcDir)}`);
  }
  await checkOperatorToken(L);
}

/** Clients of every KDC and Auditserver replica with the operator token, trusting the infrastructure CA; replica 1 first. */
async function meshClients(L: Layout, site: Site): Promise<{ kdc: ServerClients[]; audit: ServerClients[] }> {
  const caPem = await readFile(L.infraCaPem, "utf8");
  // Read per call (the file is tiny): a replaced token is picked up without a restart.
  const token = () => {
    try {
      return readFileSync(L.operatorToken, "utf8").trim();
    } catch {
      return undefined;
    }
  };
  return {
    kdc: site.replicas.kdc.map((r) => serverClients({ url: r.url, caPem, token, expectedService: "kdc" })),
    audit: site.replicas.audit.map((r) => serverClients({ url: r.url, caPem, token, expectedService: "audit" })),
  };
}

/** Starts one replica (or the only one) and waits until it is healthy; prints the outcome. */
async function startReplica(s: Stage, r: Replica, def: Omit<PartDefinition, "name" | "ready">, healthy: (sig: AbortSignal) => Promise<unknown>): Promise<void> {
  s.progress.step(r.id, `starting on ${formatHostPort(r.listen)}…`);
  const full: PartDefinition = {
    ...def,
    name: r.id,
    ready: async (proc, sig) => {
      await proc.waitForLog((rec) => rec.msg === "started", sig);
      await healthy(sig);
      return `healthy on ${formatHostPort(r.listen)}`;
    },
  };
  s.progress.step(r.id, `${await abortable(s.sup.start(full), s.signal)} (pid ${s.sup.status(r.id)?.pid})`);
}

/**
 * The KDC, started and healthy (it answers GetKdcStatus). With --ha every replica, on etcd:
 * the first alone, then the others together.
 */
async function bringUpKdc(s: Stage, site: Site, kdc: ServerClients[], ha: Ha | undefined): Promise<void> {
  const { L } = s;
  const one = (i: number) => {
    const r = site.replicas.kdc[i]!;
    const args = async () => [
      "kdc",
      "--data-dir",
      L.kdcDir,
      "--listen",
      formatHostPort(r.listen),
      "--metrics-listen",
      `unix:${L.metricsSocket(r.id)}`,
      "--log-level",
      s.cfg.logLevel,
      ...tlsNameFlags(r.listen.host),
      ...(ha !== undefined ? storeFlags(ha.plan, ha.pki, "kdc") : []),
      ...(await kdcAuditLinkFlags(L, peersOf(site.replicas.audit, i))),
    ];
    return startReplica(s, r, { args }, (sig) => poll(async () => (await kdc[i]!.kdcAdmin.getKdcStatus({})).version, sig));
  };
  await one(0);
  await Promise.all(site.replicas.kdc.slice(1).map((_, i) => one(i + 1)));
}

/**
 * The Auditserver: `kmi audit init` on first run (its certificate from the KDC, covering every
 * address the replicas listen on), then every replica started and serving.
 */
async function bringUpAudit(s: Stage, site: Site, audit: ServerClients[], ha: Ha | undefined): Promise<void> {
  const { L, progress, show, io } = s;
  const store = ha !== undefined ? storeFlags(ha.plan, ha.pki, "audit") : [];
  if (!(await auditInitialized(L))) {
    progress.step("audit", `first run: generating the attestation-token key; asking the KDC for the Auditserver's TLS certificate${ha !== undefined ? " (the store: etcd)" : ""}…`);
    await abortable(initAudit(L, site.urls.kdc, { kmi: io.kmi, cwd: io.cwd, env: io.env }, [...tlsNameFlags(site.listen.audit.host), ...store]), s.signal);
    progress.step("audit", `initialized ${show(L.auditDir)}`);
  } else {
    progress.step("audit", `reusing ${show(L.auditDir)}`);
  }
  const one = (i: number) => {
    const r = site.replicas.audit[i]!;
    const args = () => ["audit", "--data-dir", L.auditDir, "--listen", formatHostPort(r.listen), "--kdc", peersOf(site.replicas.kdc, i), ...store, "--metrics-listen", `unix:${L.metricsSocket(r.id)}`, "--log-level", s.cfg.logLevel];
    return startReplica(s, r, { args }, (sig) => poll(async () => ((await isServing(audit[i]!)) ? true : undefined), sig));
  };
  await one(0);
  await Promise.all(site.replicas.audit.slice(1).map((_, i) => one(i + 1)));
}

/**
 * The dev tenant, the agent's config file, the machine group with this build's measurements,
 * and a join token when the agent has not enrolled. Returns whether it had enrolled before.
 */
async function prepareAgent(s: Stage, site: Site, kdc: ServerClients, audit: ServerClients): Promise<boolean> {
  const { L, progress, show, cfg } = s;
  s.signal.throwIfAborted();
  await abortable(ensureTenant(kdc, cfg.tenant, progress), s.signal);
  // The proxy's config is written before the agent's: the agent measures it as proxy.config.
  if (await writeIfChanged(L.proxyConfig, JSON.stringify(proxyConfigOf(proxyArgs(L, cfg, site.listen.proxy)), null, 2) + "\n")) {
    progress.step("proxy", `config written to ${show(L.proxyConfig)}`);
  }
  const plan = { codeDir: s.io.codeDir, depsDir: await dependenciesDirOf(s.io.codeDir), nodeBinary: s.io.kmi[0]!, agentConfig: L.agentConfig, proxyConfig: L.proxyConfig };
  const agentConfig = {
    socket: L.agentSocket,
    "state-dir": L.agentStateDir,
    // Every replica: the agent fails over between them.
    "audit-url": urlsOf(site.replicas.audit),
    "kdc-url": urlsOf(site.replicas.kdc),
    "ca-file": L.infraCaPem,
    "proxy-config": L.proxyConfig,
    measure: measureFlag(plan),
    "metrics-listen": `unix:${L.metricsSocket("agent")}`,
    "log-level": cfg.logLevel,
    // A dev mesh restarts parts often: come back within seconds, not half a minute.
    "reconnect-max-ms": 5000,
  };
  if (await writeIfChanged(L.agentConfig, JSON.stringify(agentConfig, null, 2) + "\n")) {
    progress.step("agent", `config written to ${show(L.agentConfig)}`);
  }
  const measurements = await expectedMeasurements(plan);
  await abortable(ensureGroup(audit, cfg.tenant, measurements, progress), s.signal);
  const enrolledBefore = await agentEnrolled(L);
  if (!enrolledBefore) {
    await abortable(writeJoinToken(audit, L), s.signal);
    progress.step("audit", `one-time join token for the agent written to ${show(L.joinToken)} (0600, expires in 1 h)`);
  }
  return enrolledBefore;
}

/** The agent: started, its join token spent, then attested and holding the tenant's key. */
async function bringUpAgent(s: Stage, agentStatus: AgentStatusClient, enrolledBefore: boolean): Promise<void> {
  const { L, progress, show } = s;
  progress.step("agent", `starting (socket ${show(L.agentSocket)}, state ${show(L.agentStateDir)})…`);
  const agentDef: PartDefinition = {
    name: "agent",
    args: async () => ["agent", "--config", L.agentConfig, ...((await agentEnrolled(L)) ? [] : ["--join-token-file", L.joinToken])],
    ready: async (proc, sig) => {
      await proc.waitForLog((r) => r.msg === "started", sig);
      const st = await poll(() => agentStatus.getStatus(2000), sig);
      return `serving on ${show(L.agentSocket)} (machine ${st.machineId})`;
    },
  };
  progress.step("agent", `${await abortable(s.sup.start(agentDef), s.signal)} (pid ${s.sup.status("agent")?.pid})`);
  // The agent serves only once it has an identity: the join token is spent.
  await removeJoinToken(L);
  await waitForAgentKey(agentStatus, s.cfg, s.sup.process("agent")!, progress, s.signal, enrolledBefore);
  s.signal.throwIfAborted();
}

/** The proxy: its policy file on first run, then started and listening. */
async function bringUpProxy(s: Stage, site: Site): Promise<void> {
  const { L, progress, show, cfg } = s;
  if (await writeIfAbsent(L.proxyPolicy, DEFAULT_POLICY)) progress.step("proxy", `inspection policy written to ${show(L.proxyPolicy)} (edit it: the proxy reloads it)`);
  progress.step("proxy", `starting on ${formatHostPort(site.listen.proxy)} (default tenant ${cfg.tenant})…`);
  const proxyDef: PartDefinition = {
    name: "proxy",
    // Its settings come from the config file the agent measures (written in prepareAgent).
    args: () => ["proxy", "--config", L.proxyConfig],
    ready: async (_proc, sig) => {
      const host = new URL(site.urls.proxy).hostname.replace(/^\[|\]$/g, "");
      await poll(async () => ((await tcpOpen(host, site.listen.proxy.port)) ? true : undefined), sig, 100);
      return `listening on ${formatHostPort(site.listen.proxy)}`;
    },
    // A bad edit of the policy file must not go unnoticed: the proxy keeps the old policy and says so here.
    onLog: (r) => {
      if (r["event"] === "policy-reload-failed") progress.warn("proxy", `policy not reloaded, the previous one stays in force: ${String(r["error"] ?? "")}`);
    },
  };
  progress.step("proxy", `${await abortable(s.sup.start(proxyDef), s.signal)} (pid ${s.sup.status("proxy")?.pid})`);
}

/** Every 2 s, prints what changed in the agent (rotations reaching it, quarantine, the KDC link). Returns the timer. */
function watchAgent(agentStatus: AgentStatusClient, first: GetStatusResponse | undefined, progress: Progress): NodeJS.Timeout {
  let last = first;
  let busy = false;
  return setInterval(() => {
    if (busy) return;
    busy = true;
    agentStatus
      .getStatus(2000)
      .then((st) => {
        reportAgentChanges(last, st, progress);
        last = st;
      })
      .catch(() => undefined)
      .finally(() => (busy = false));
  }, 2000);
}

/** Prints why `kmi up` failed (a part's last log lines when it was a part); returns the exit code (0 when asked to stop). */
function reportFailure(err: unknown, stop: AbortSignal, progress: Progress, L: Layout, show: (p: string) => string): number {
  if (stop.aborted && (err === stop.reason || err instanceof StopRequested || /stopping/.test(errorText(err)))) return 0; // asked to stop while starting
  if (err instanceof PartStartError || err instanceof StepError) {
    progress.error(err.part, err.message);
    if (err.lastLines.length > 0 && err.part !== "up") {
      progress.detail([`its last log lines (${show(L.log(err.part))}):`]);
      progress.detail(summarizeLogLines(err.lastLines).map((l) => "  " + l));
    }
  } else if (err instanceof PortError) progress.error("up", err.message);
  else progress.error("up", errorText(err));
  return 1;
}

/** Runs `kmi up`; resolves with the exit code. */
export async function runUp(cfg: UpConfig, io: UpIo): Promise<number> {
  const t0 = Date.now();
  const progressOut = cfg.json ? io.err : io.out;
  for (const st of [io.out, io.err]) st.on("error", () => undefined);
  const progress = new Progress({ write: safeWrite(progressOut), color: progressOut.isTTY === true && io.color });
  const L = layout(cfg.dataDir, cfg.runDir);
  const show = (p: string) => shown(io.cwd, p);

  const stop = new AbortController();
  let supervisor: Supervisor | undefined;
  const removeSignals = installSignals(io, progress, stop, () => supervisor?.livePids() ?? []);
  // If kmi up itself dies of an error, its parts must not live on without it.
  const onExit = () => supervisor?.terminateAll();
  process.on("exit", onExit);

  let ownsRunState = false;
  let code = 0;
  let ready = false;
  let clients: { kdc: ServerClients[]; audit: ServerClients[] } | undefined;
  let monitor: NodeJS.Timeout | undefined;
  let agentClient: AgentStatusClient | undefined;
  const urls = { kdc: "", audit: "", proxy: "" };
  let haState: RunStateHa | undefined;

  const processes = (): Partial<Record<PartId, ProcessInfo>> => {
    const out: Partial<Record<PartId, ProcessInfo>> = {};
    for (const st of supervisor?.statuses() ?? []) out[st.name] = { state: st.state, pid: st.pid, restarts: st.restarts, version: st.version, log: L.log(st.name) };
    return out;
  };
  let stateWrite = Promise.resolve();
  const saveRunState = (): Promise<void> => {
    if (!ownsRunState) return stateWrite;
    const state = runStateOf({ t0, kmiScript: io.kmiScript, ready, L, tenant: cfg.tenant, urls, ha: haState, processes: processes() });
    stateWrite = stateWrite.then(() => writeRunState(L.stateFile, state)).catch(() => undefined);
    return stateWrite;
  };

  try {
    // Before anything is written: a missing etcd is a one-line fix.
    const etcdBinary = cfg.ha ? await findEtcd(io.env["PATH"]) : undefined;
    await prepareDirectories(L, cfg.ha);
    await claimRunState(L, progress);
    ownsRunState = true;
    saveRunState();
    await checkStoreKind(L, cfg.ha);
    const site = await resolveSite(cfg);
    Object.assign(urls, site.urls);
    await checkOriginCaFiles(cfg.originCaFiles);

    supervisor = new Supervisor({ kmi: io.kmi, cwd: io.cwd, env: io.env, logFile: (p) => L.log(p), progress, readyTimeoutMs: cfg.readyTimeoutMs, onChange: saveRunState });
    const s: Stage = { cfg, io, L, progress, show, sup: supervisor, signal: stop.signal };

    const ha = etcdBinary !== undefined ? await bringUpEtcd(s, etcdBinary) : undefined;
    if (ha !== undefined) {
      haState = { kdc: site.replicas.kdc.map((r) => r.url), audit: site.replicas.audit.map((r) => r.url), etcd: ha.plan.members.map((m) => ({ name: m.name, url: m.clientUrl })) };
      await saveRunState();
    }
    await initKdcIfNeeded(s, ha);
    clients = await meshClients(L, site);
    const kdc = clients.kdc[0]!;
    const audit = clients.audit[0]!;
    await bringUpKdc(s, site, clients.kdc, ha);
    await bringUpAudit(s, site, clients.audit, ha);
    const haInputs = ha !== undefined ? haHealthInputs(site, clients, ha) : undefined;
    const enrolledBefore = await prepareAgent(s, site, kdc, audit);
    agentClient = new AgentStatusClient(L.agentSocket);
    await bringUpAgent(s, agentClient, enrolledBefore);
    await bringUpProxy(s, site);

    // ── ready ─────────────────────────────────────────────────────────────────────────────
    stop.signal.throwIfAborted();
    ready = true;
    await saveRunState();
    const first = await agentClient.getStatus(3000).catch(() => undefined);
    const seconds = ((Date.now() - t0) / 1000).toFixed(1);
    // The ready line and what follows it go out in one write: whoever waits for "ready" sees all of it.
    if (cfg.json) {
      const summary = await healthSummary({ layout: L, urls, tenant: cfg.tenant, upPid: process.pid, ready, processes: processes(), kdc, audit, ...(haInputs !== undefined ? { ha: haInputs } : {}) });
      progress.step("up", `ready in ${seconds} s: ${readyParts(cfg.ha)} are healthy`);
      safeWrite(io.out)(JSON.stringify(summary) + "\n");
    } else {
      const portal = await operatorLoginLink({
        kdcUrl: urls.kdc,
        caPem: await readFile(L.infraCaPem, "utf8"),
        token: readFileSync(L.operatorToken, "utf8").trim(),
      }).catch(() => undefined);
      const replicas = ha !== undefined ? { kdc: haState!.kdc, audit: haState!.audit, etcd: haState!.etcd } : undefined;
      progress.stepWith("up", `ready in ${seconds} s: ${readyParts(cfg.ha)} are healthy`, banner({ L, urls, cfg, kmiScript: io.kmiScript, status: first, portal, ha: replicas }));
    }

    // ── watch until told to stop ──────────────────────────────────────────────────────────
    monitor = watchAgent(agentClient, first, progress);
    if (!stop.signal.aborted) await new Promise<void>((resolve) => stop.signal.addEventListener("abort", () => resolve(), { once: true }));
  } catch (err) {
    code = reportFailure(err, stop.signal, progress, L, show);
  } finally {
    if (monitor !== undefined) clearInterval(monitor);
    if (supervisor !== undefined) {
      const killed = await supervisor.stop();
      if (killed.length > 0) progress.warn("up", `had to kill: ${killed.join(", ")}`);
    }
    for (const c of [...(clients?.kdc ?? []), ...(clients?.audit ?? [])]) c.close();
    agentClient?.close();
    await stateWrite;
    if (ownsRunState) await removeRunState(L.stateFile);
    removeSignals();
    process.off("exit", onExit);
    progress.step("up", code === 0 ? "stopped; every part has exited" : "stopped after the failure above; every part has exited");
  }
  return code;
}

/** What the ready line names. */
function readyParts(ha: boolean): string {
  return ha ? "etcd (3 members), 3 KDC and 2 Auditserver replicas, agent and proxy" : "KDC, Auditserver, agent and proxy";
}

/** What the health summary asks with --ha: every replica, every etcd member. */
function haHealthInputs(site: Site, clients: { kdc: ServerClients[]; audit: ServerClients[] }, ha: Ha): HaInputs {
  return {
    kdc: site.replicas.kdc.map((r, i) => ({ id: r.id, url: r.url, clients: clients.kdc[i]! })),
    audit: site.replicas.audit.map((r, i) => ({ id: r.id, url: r.url, clients: clients.audit[i]! })),
    etcd: { members: ha.plan.members.map((m) => ({ name: m.name, url: m.clientUrl })), tls: ha.tls },
  };
}

/** The run-state file's content (`run/up.json`): pids, states and addresses, for `kmi up status` and the next `kmi up`. */
function runStateOf(o: {
  t0: number;
  kmiScript: string;
  ready: boolean;
  L: Layout;
  tenant: string;
  urls: RunState["urls"];
  ha: RunStateHa | undefined;
  processes: Partial<Record<PartId, ProcessInfo>>;
}): RunState {
  const parts: RunState["parts"] = {};
  for (const [name, p] of Object.entries(o.processes)) {
    if (p === undefined) continue;
    (parts as Record<string, unknown>)[name] = { pid: p.pid ?? null, state: p.state, restarts: p.restarts, log: p.log, ...(p.version !== undefined ? { version: p.version } : {}) };
  }
  return {
    pid: process.pid,
    kmi_script: o.kmiScript,
    version: VERSION,
    started_at: new Date(o.t0).toISOString(),
    ready: o.ready,
    data_dir: o.L.dataDir,
    run_dir: o.L.runDir,
    tenant: o.tenant,
    urls: { ...o.urls },
    ...(o.ha !== undefined ? { ha: o.ha } : {}),
    parts,
  };
}

/**
 * Makes this process the data dir's `kmi up`: refuses when another one runs, and stops the
 * leftover parts of one that was killed without stopping them.
 */
async function claimRunState(L: Layout, progress: Progress): Promise<void> {
  const prev = await readRunState(L.stateFile);
  if (prev === undefined) return;
  if (prev.pid !== process.pid && pidAlive(prev.pid) && isKmiProcess(prev.pid, prev.kmi_script, "up")) {
    throw new StepError("up", `kmi up is already running for ${L.dataDir} (pid ${prev.pid}); stop it first (Ctrl-C there, or kill -INT ${prev.pid})`);
  }
  // Every part the file names, in reverse start order (proxy first, etcd last).
  const order = partIds(true);
  const recorded = (Object.keys(prev.parts) as PartId[]).sort((a, b) => order.indexOf(b) - order.indexOf(a));
  for (const part of recorded) {
    const pid = prev.parts[part]?.pid;
    if (pid === null || pid === undefined || !isPartProcess(pid, prev.kmi_script, part)) continue;
    progress.warn(part, `a ${part} (pid ${pid}) of an earlier kmi up that did not stop it is still running; stopping it`);
    process.kill(pid, "SIGTERM");
    const end = Date.now() + 15_000;
    while (pidAlive(pid) && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
    if (pidAlive(pid)) process.kill(pid, "SIGKILL");
  }
  await removeRunState(L.stateFile);
}

/**
 * The KDC's link to the Auditserver: it follows the machine status stream (quarantines) and
 * fetches the attestation key from it. Once `kmi audit init` wrote the key file, the KDC also
 * reads it at start, so it releases secrets without waiting for the Auditserver.
 */
async function kdcAuditLinkFlags(L: Layout, auditUrls: string): Promise<string[]> {
  const keyFile = (await auditInitialized(L)) ? ["--attestation-key-file", L.attestationKeyPem] : [];
  return ["--audit-url", auditUrls, ...keyFile];
}

/** The proxy's policy on first run: the EICAR test file is blocked; nothing else is. */
const DEFAULT_POLICY = JSON.stringify({ blockHosts: [], blockUrls: [], bypassHosts: [], scan: { eicar: true } }, null, 2) + "\n";

/** The proxy's command line. */
export function proxyArgs(L: Layout, cfg: UpConfig, addr: TcpAddress): string[] {
  return [
    "proxy",
    "--listen",
    formatHostPort(addr),
    "--agent-socket",
    L.agentSocket,
    "--default-tenant",
    cfg.tenant,
    "--policy",
    L.proxyPolicy,
    ...(cfg.originCaFiles.length > 0 ? ["--extra-ca", cfg.originCaFiles.join(",")] : []),
    ...(cfg.proxyAllowPrivate.length > 0 ? ["--allow-private", cfg.proxyAllowPrivate.join(",")] : []),
    "--issue-rate",
    String(cfg.proxyIssueLimit.rate),
    "--issue-burst",
    String(cfg.proxyIssueLimit.burst),
    "--workers",
    cfg.proxyWorkers,
    "--access-log",
    L.accessLog,
    "--metrics-listen",
    `unix:${L.metricsSocket("proxy")}`,
    "--log-level",
    cfg.logLevel,
  ];
}

/**
 * The proxy's command line as a config file's JSON object (`"flag-name": value`): what
 * `kmi up` writes to <data>/config/proxy.json, so that the agent measures the proxy's settings
 * as proxy.config. A flag without a value (followed by another flag, or last) is `true`.
 */
export function proxyConfigOf(args: readonly string[]): Record<string, string | boolean> {
  const out: Record<string, string | boolean> = {};
  for (let i = args[0] === "proxy" ? 1 : 0; i < args.length; i++) {
    const flag = args[i]!;
    if (!flag.startsWith("--")) throw new Error(`proxy args: "${flag}" is not a flag`);
    const next = args[i + 1];
    if (next === undefined || next.startsWith("--")) out[flag.slice(2)] = true;
    else {
      out[flag.slice(2)] = next;
      i++;
    }
  }
  return out;
}

/** Waits until the agent is attested and holds the tenant's intermediate, reporting each step. */
async function waitForAgentKey(
  client: AgentStatusClient,
  cfg: UpConfig,
  proc: PartProcess,
  progress: Progress,
  signal: AbortSignal,
  enrolledBefore: boolean,
): Promise<void> {
  const started = Date.now();
  const deadline = started + cfg.readyTimeoutMs;
  const said = { machine: false, attested: false, refused: "", kdcError: "" };
  for (;;) {
    const s = await client.getStatus(2000).catch(() => undefined);
    if (s !== undefined) {
      if (!said.machine && s.machineId !== "") {
        progress.step("agent", enrolledBefore ? `machine ${s.machineId} (group ${s.group})` : `enrolled as machine ${s.machineId} in group ${s.group}`);
        said.machine = true;
      }
      if (s.attestation === AttestationState.QUARANTINED) {
        progress.warn(
          "agent",
          `machine ${s.machineId} is quarantined${quarantineReason(s) !== "" ? ` (${quarantineReason(s)})` : ""}: the proxy refuses to intercept until an operator releases it: kmi ctl machine release ${s.machineId} --reason "…"`,
        );
        return;
      }
      if (s.attestation === AttestationState.ATTESTED && !said.attested) {
        progress.step("agent", "attested by the Auditserver");
        said.attested = true;
      }
      if (s.attestation === AttestationState.REFUSED && s.attestationProblem !== said.refused) {
        progress.warn("agent", `attestation refused: ${s.attestationProblem}`);
        said.refused = s.attestationProblem;
      }
      const held = heldVersions(s)[cfg.tenant];
      if (held !== undefined) {
        progress.step("agent", `holds tenant ${cfg.tenant}'s intermediate v${held}${s.kdcConnected ? "; watching the KDC for changes" : ""}`);
        return;
      }
      if (shouldReportSecretsWait(s, said, Date.now() - started)) {
        progress.step("agent", `still waiting for its secrets from the KDC after ${Math.round((Date.now() - started) / 1000)} s (${s.kdcError})`);
        said.kdcError = s.kdcError;
      }
    }
    if (!proc.alive()) throw new StepError("agent", "the agent exited while waiting for its key", proc.tail(12));
    if (Date.now() > deadline) {
      const why = s === undefined ? "its socket does not answer" : s.attestation === AttestationState.REFUSED || (s.kdcError === "" && s.attestation !== AttestationState.ATTESTED) ? `attestation: ${attestationWord(s.attestation)} ${s.attestationProblem}` : `KDC link: ${s.kdcError || "no key received"}`;
      throw new StepError("agent", `no key of tenant ${cfg.tenant} after ${Math.round(cfg.readyTimeoutMs / 1000)} s (${why.trim()})`, proc.tail(12));
    }
    await sleep(250, signal);
    signal.throwIfAborted();
  }
}

/**
 * How long a first start may wait for the agent's secrets before the KDC link's error is shown:
 * the KDC loads the attestation key and the agent attests in the first seconds, and the
 * transient "attestation key not loaded yet" would make a healthy start look broken.
 */
export const SECRETS_WAIT_GRACE_MS = 10_000;

/**
 * Whether to print the agent's KDC-link error while waiting for its key: a new error, past the
 * grace period, unless attestation itself was refused or the machine quarantined (each has its
 * own line). The agent's attestation state is not required: an agent the KDC refuses attests
 * again after each refusal, so a poll rarely sees it attested.
 */
export function shouldReportSecretsWait(
  s: Pick<GetStatusResponse, "kdcError" | "attestation">,
  said: { readonly kdcError: string },
  waitedMs: number,
  graceMs = SECRETS_WAIT_GRACE_MS,
): boolean {
  const ownLine = s.attestation === AttestationState.REFUSED || s.attestation === AttestationState.QUARANTINED;
  return s.kdcError !== "" && s.kdcError !== said.kdcError && !ownLine && waitedMs >= graceMs;
}

/** Why the agent says its machine is quarantined, without the agent's own "machine quarantined:" prefix. */
function quarantineReason(s: GetStatusResponse): string {
  return s.attestationProblem.replace(/^machine quarantined:?\s*/i, "").trim();
}

/** Prints what changed in the agent since the last look: attestation, keys, the KDC link. */
function reportAgentChanges(prev: GetStatusResponse | undefined, s: GetStatusResponse, progress: Progress): void {
  if (prev === undefined) return;
  const quarantined = s.attestation === AttestationState.QUARANTINED;
  if (prev.attestation !== s.attestation) {
    if (quarantined) {
      const why = quarantineReason(s);
      progress.warn("agent", `machine ${s.machineId} quarantined${why !== "" ? ` (${why})` : ""}: keys wiped, the proxy refuses new interceptions; release: kmi ctl machine release ${s.machineId} --reason "…"`);
    } else if (s.attestation === AttestationState.REFUSED) {
      progress.warn("agent", `attestation refused: ${s.attestationProblem}`);
    } else {
      progress.step("agent", `attestation: ${attestationWord(s.attestation)}`);
    }
  }
  const before = heldVersions(prev);
  const now = heldVersions(s);
  for (const t of new Set([...Object.keys(before), ...Object.keys(now)])) {
    if (before[t] === now[t]) continue;
    if (now[t] === undefined) {
      if (!quarantined) progress.warn("agent", `no longer holds a key of tenant ${t} (was v${before[t]})`);
    } else if (before[t] === undefined) progress.step("agent", `now holds tenant ${t}'s intermediate v${now[t]}`);
    else progress.step("agent", `tenant ${t}: now holds intermediate v${now[t]} (was v${before[t]})`);
  }
  if (prev.kdcConnected !== s.kdcConnected && !quarantined) {
    if (s.kdcConnected) progress.step("agent", "KDC link up");
    else progress.warn("agent", `KDC link down${s.kdcError !== "" ? `: ${s.kdcError}` : ""} (the agent serves what it holds until the leases run out)`);
  }
}
