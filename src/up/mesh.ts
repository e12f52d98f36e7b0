/**
 * `kmi up`: brings the whole mesh up on this machine, keeps it up, and takes it down.
 *
 *   1. directories (0700), the run-state file (one `kmi up` per data dir), free ports
 *   2. KDC: `kmi kdc init` on first run, then `kmi kdc` supervised
 *   3. Auditserver: `kmi audit init` on first run (its certificate from the KDC), then `kmi audit`
 *   4. the dev tenant (KMI-signed active intermediate), the machine group with this build's
 *      approved measurements, the agent's config file, a join token when it has not enrolled
 *   5. agent, supervised; wait until it is attested and holds the tenant's key
 *   6. proxy, supervised, with the agent socket and the default tenant
 *   7. print where everything is (or the JSON summary), then watch the agent and report
 *      what changes (rotations reaching it, quarantine, the KDC link) until SIGINT/SIGTERM
 *   8. stop the parts in reverse order and exit 0 once all have exited
 */
import { readFileSync } from "node:fs";
import { chmod, mkdir, readFile } from "node:fs/promises";
import { isAbsolute, relative } from "node:path";
import { Progress } from "./progress.js";
import type { UpConfig, TcpAddress } from "./config.js";
import { layout, PARTS, type Layout, type PartName } from "./layout.js";
import { PartStartError, Supervisor, summarizeLogLines, type PartDefinition, type PartProcess } from "./supervisor.js";
import { AgentStatusClient, attestationWord, heldVersions, isServing, serverClients, tcpOpen, type ServerClients } from "../common/mesh-health.js";
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
import { PortError, formatHostPort, httpUrl, httpsUrl, resolvePort } from "./ports.js";
import { isKmiProcess, pidAlive, readRunState, removeRunState, writeRunState, type RunState } from "./run-state.js";
import { healthSummary, ctlEnv, type ProcessInfo } from "./health.js";
import { AttestationState, type GetStatusResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { VERSION } from "../common/version.js";

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

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
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
  }
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Paths as the operator typed them: relative to the working directory when inside it. */
function shown(cwd: string, path: string): string {
  const r = relative(cwd, path);
  return r !== "" && !r.startsWith("..") && !isAbsolute(r) ? r : path;
}

/** Sockets are bound in a temporary directory next to their final path first (common/listen.ts): leave room for it. */
const SOCKET_PATH_MAX = 107 - 24;

async function prepareDirectories(l: Layout): Promise<void> {
  for (const dir of [l.dataDir, l.runDir, l.logsDir, l.configDir, l.metricsDir]) {
    await mkdir(dir, { recursive: true, mode: 0o700 });
  }
  // Directories made by an earlier run, or by hand, may be wider: the data dir holds keys.
  await chmod(l.dataDir, 0o700);
  await chmod(l.runDir, 0o700);
  for (const path of [l.agentSocket, ...PARTS.map((p) => l.metricsSocket(p))]) {
    if (Buffer.byteLength(path) > SOCKET_PATH_MAX) {
      throw new StepError("up", `socket path ${path} is too long for a Unix socket (at most ${SOCKET_PATH_MAX} bytes here); pass a shorter --run-dir, e.g. --run-dir /tmp/kmi-run`);
    }
  }
}

/** Runs `kmi up`; resolves with the exit code. */
export async function runUp(cfg: UpConfig, io: UpIo): Promise<number> {
  const t0 = Date.now();
  const progressOut = cfg.json ? io.err : io.out;
  const safeWrite = (stream: NodeJS.WritableStream) => (text: string) => {
    try {
      stream.write(text);
    } catch {
      // a closed terminal must not stop the shutdown
    }
  };
  for (const s of [io.out, io.err]) s.on("error", () => undefined);
  const progress = new Progress({ write: safeWrite(progressOut), color: progressOut.isTTY === true && io.color });
  const L = layout(cfg.dataDir, cfg.runDir);
  const show = (p: string) => shown(io.cwd, p);

  // Signals: the first one stops in order, a second one kills.
  const stop = new AbortController();
  let supervisor: Supervisor | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    if (!stop.signal.aborted) {
      progress.step("up", `${sig} received: stopping the parts in reverse order (again to kill them at once)…`);
      stop.abort(new StopRequested(sig));
      return;
    }
    progress.warn("up", `second ${sig}: killing every part now`);
    for (const pid of supervisor?.livePids() ?? []) {
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
  // If kmi up itself dies of an error, its parts must not live on without it.
  const onExit = () => supervisor?.terminateAll();
  process.on("exit", onExit);

  let ownsRunState = false;
  let code = 0;
  let ready = false;
  let kdcClients: ServerClients | undefined;
  let auditClients: ServerClients | undefined;
  let monitor: NodeJS.Timeout | undefined;
  let agentClient: AgentStatusClient | undefined;
  const urls = { kdc: "", audit: "", proxy: "" };
  let listen: { kdc: TcpAddress; audit: TcpAddress; proxy: TcpAddress } = cfg.listen;

  const processes = (): Partial<Record<PartName, ProcessInfo>> => {
    const out: Partial<Record<PartName, ProcessInfo>> = {};
    for (const s of supervisor?.statuses() ?? []) out[s.name] = { state: s.state, pid: s.pid, restarts: s.restarts, version: s.version, log: L.log(s.name) };
    return out;
  };
  let stateWrite = Promise.resolve();
  const saveRunState = (): Promise<void> => {
    if (!ownsRunState) return stateWrite;
    const parts: RunState["parts"] = {};
    for (const [name, p] of Object.entries(processes())) {
      (parts as Record<string, unknown>)[name] = { pid: p.pid ?? null, state: p.state, restarts: p.restarts, log: p.log, ...(p.version !== undefined ? { version: p.version } : {}) };
    }
    const state: RunState = {
      pid: process.pid,
      kmi_script: io.kmiScript,
      version: VERSION,
      started_at: new Date(t0).toISOString(),
      ready,
      data_dir: L.dataDir,
      run_dir: L.runDir,
      tenant: cfg.tenant,
      urls: { ...urls },
      parts,
    };
    stateWrite = stateWrite.then(() => writeRunState(L.stateFile, state)).catch(() => undefined);
    return stateWrite;
  };

  try {
    await prepareDirectories(L);
    await claimRunState(L, progress);
    ownsRunState = true;
    saveRunState();

    listen = {
      kdc: await resolvePort(cfg.listen.kdc, "KDC", "--kdc-listen", "KMI_UP_KDC_LISTEN"),
      audit: await resolvePort(cfg.listen.audit, "Auditserver", "--audit-listen", "KMI_UP_AUDIT_LISTEN"),
      proxy: await resolvePort(cfg.listen.proxy, "proxy", "--proxy-listen", "KMI_UP_PROXY_LISTEN"),
    };
    urls.kdc = httpsUrl(listen.kdc);
    urls.audit = httpsUrl(listen.audit);
    urls.proxy = httpUrl(listen.proxy);
    for (const f of cfg.originCaFiles) {
      const pem = await readFile(f, "utf8").catch((err: NodeJS.ErrnoException) => {
        throw new StepError("up", `--origin-ca-file: cannot read ${f} (${err.code ?? err.message})`);
      });
      if (!pem.includes("-----BEGIN CERTIFICATE-----")) throw new StepError("up", `--origin-ca-file: ${f} holds no PEM certificate`);
    }

    const sup = new Supervisor({
      kmi: io.kmi,
      cwd: io.cwd,
      env: io.env,
      logFile: (p) => L.log(p),
      progress,
      readyTimeoutMs: cfg.readyTimeoutMs,
      onChange: saveRunState,
    });
    supervisor = sup;
    const once = { kmi: io.kmi, cwd: io.cwd, env: io.env };
    const signal = stop.signal;

    // ── KDC ───────────────────────────────────────────────────────────────────────────────
    if (!(await kdcInitialized(L))) {
      progress.step("kdc", "first run: generating the master key, the KMI root CA and the infrastructure CA…");
      await abortable(initKdc(L, once), signal);
      progress.step("kdc", `initialized ${show(L.kdcDir)}; operator token in ${show(L.operatorToken)} (0600)`);
    } else {
      progress.step("kdc", `reusing ${show(L.kdcDir)}`);
    }
    await checkOperatorToken(L);
    const caPem = await readFile(L.infraCaPem, "utf8");
    // Read per call (the file is tiny): a replaced token is picked up without a restart.
    const token = () => {
      try {
        return readFileSync(L.operatorToken, "utf8").trim();
      } catch {
        return undefined;
      }
    };
    kdcClients = serverClients({ url: urls.kdc, caPem, token, expectedService: "kdc" });
    auditClients = serverClients({ url: urls.audit, caPem, token, expectedService: "audit" });
    const kdc = kdcClients;
    const audit = auditClients;

    progress.step("kdc", `starting on ${formatHostPort(listen.kdc)}…`);
    const kdcDef: PartDefinition = {
      name: "kdc",
      args: async () => [
        "kdc",
        "--data-dir",
        L.kdcDir,
        "--listen",
        formatHostPort(listen.kdc),
        "--metrics-listen",
        `unix:${L.metricsSocket("kdc")}`,
        "--log-level",
        cfg.logLevel,
        ...(await kdcAuditLinkFlags(L, urls.audit)),
      ],
      ready: async (proc, s) => {
        await proc.waitForLog((r) => r.msg === "started", s);
        await poll(async () => (await kdc.kdcAdmin.getKdcStatus({})).version, s);
        return `healthy on ${formatHostPort(listen.kdc)}`;
      },
    };
    progress.step("kdc", `${await abortable(sup.start(kdcDef), signal)} (pid ${sup.status("kdc")?.pid})`);

    // ── Auditserver ───────────────────────────────────────────────────────────────────────
    if (!(await auditInitialized(L))) {
      progress.step("audit", "first run: generating the attestation-token key; asking the KDC for the Auditserver's TLS certificate…");
      await abortable(initAudit(L, urls.kdc, once), signal);
      progress.step("audit", `initialized ${show(L.auditDir)}`);
    } else {
      progress.step("audit", `reusing ${show(L.auditDir)}`);
    }
    progress.step("audit", `starting on ${formatHostPort(listen.audit)}…`);
    const auditDef: PartDefinition = {
      name: "audit",
      args: () => [
        "audit",
        "--data-dir",
        L.auditDir,
        "--listen",
        formatHostPort(listen.audit),
        "--kdc",
        urls.kdc,
        "--metrics-listen",
        `unix:${L.metricsSocket("audit")}`,
        "--log-level",
        cfg.logLevel,
      ],
      ready: async (proc, s) => {
        await proc.waitForLog((r) => r.msg === "started", s);
        await poll(async () => ((await isServing(audit)) ? true : undefined), s);
        return `healthy on ${formatHostPort(listen.audit)}`;
      },
    };
    progress.step("audit", `${await abortable(sup.start(auditDef), signal)} (pid ${sup.status("audit")?.pid})`);

    // ── tenant, group, agent config, join token ───────────────────────────────────────────
    signal.throwIfAborted();
    await abortable(ensureTenant(kdc, cfg.tenant, progress), signal);
    const plan = { codeDir: io.codeDir, agentConfig: L.agentConfig };
    const agentConfig = {
      socket: L.agentSocket,
      "state-dir": L.agentStateDir,
      "audit-url": urls.audit,
      "kdc-url": urls.kdc,
      "ca-file": L.infraCaPem,
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
    await abortable(ensureGroup(audit, cfg.tenant, measurements, progress), signal);
    const enrolledBefore = await agentEnrolled(L);
    if (!enrolledBefore) {
      await abortable(writeJoinToken(audit, L), signal);
      progress.step("audit", `one-time join token for the agent written to ${show(L.joinToken)} (0600, expires in 1 h)`);
    }

    // ── agent ─────────────────────────────────────────────────────────────────────────────
    progress.step("agent", `starting (socket ${show(L.agentSocket)}, state ${show(L.agentStateDir)})…`);
    const agentStatus = new AgentStatusClient(L.agentSocket);
    agentClient = agentStatus;
    const agentDef: PartDefinition = {
      name: "agent",
      args: async () => ["agent", "--config", L.agentConfig, ...((await agentEnrolled(L)) ? [] : ["--join-token-file", L.joinToken])],
      ready: async (proc, s) => {
        await proc.waitForLog((r) => r.msg === "started", s);
        const st = await poll(() => agentStatus.getStatus(2000), s);
        return `serving on ${show(L.agentSocket)} (machine ${st.machineId})`;
      },
    };
    progress.step("agent", `${await abortable(sup.start(agentDef), signal)} (pid ${sup.status("agent")?.pid})`);
    // The agent serves only once it has an identity: the join token is spent.
    await removeJoinToken(L);
    await waitForAgentKey(agentStatus, cfg, sup.process("agent")!, progress, signal, enrolledBefore);
    signal.throwIfAborted();

    // ── proxy ─────────────────────────────────────────────────────────────────────────────
    if (await writeIfAbsent(L.proxyPolicy, DEFAULT_POLICY)) progress.step("proxy", `inspection policy written to ${show(L.proxyPolicy)} (edit it: the proxy reloads it)`);
    progress.step("proxy", `starting on ${formatHostPort(listen.proxy)} (default tenant ${cfg.tenant})…`);
    const proxyDef: PartDefinition = {
      name: "proxy",
      args: () => proxyArgs(L, cfg, listen.proxy),
      ready: async (_proc, s) => {
        const host = new URL(urls.proxy).hostname.replace(/^\[|\]$/g, "");
        await poll(async () => ((await tcpOpen(host, listen.proxy.port)) ? true : undefined), s, 100);
        return `listening on ${formatHostPort(listen.proxy)}`;
      },
      // A bad edit of the policy file must not go unnoticed: the proxy keeps the old policy and says so here.
      onLog: (r) => {
        if (r["event"] === "policy-reload-failed") progress.warn("proxy", `policy not reloaded, the previous one stays in force: ${String(r["error"] ?? "")}`);
      },
    };
    progress.step("proxy", `${await abortable(sup.start(proxyDef), signal)} (pid ${sup.status("proxy")?.pid})`);

    // ── ready ─────────────────────────────────────────────────────────────────────────────
    signal.throwIfAborted();
    ready = true;
    await saveRunState();
    const first = await agentStatus.getStatus(3000).catch(() => undefined);
    const seconds = ((Date.now() - t0) / 1000).toFixed(1);
    // The ready line and what follows it go out in one write: whoever waits for "ready" sees all of it.
    if (cfg.json) {
      const summary = await healthSummary({ layout: L, urls, tenant: cfg.tenant, upPid: process.pid, ready, processes: processes(), kdc, audit });
      progress.step("up", `ready in ${seconds} s: KDC, Auditserver, agent and proxy are healthy`);
      safeWrite(io.out)(JSON.stringify(summary) + "\n");
    } else {
      progress.stepWith("up", `ready in ${seconds} s: KDC, Auditserver, agent and proxy are healthy`, banner({ L, urls, cfg, show, status: first }));
    }

    // ── watch until told to stop ──────────────────────────────────────────────────────────
    let last = first;
    let busy = false;
    monitor = setInterval(() => {
      if (busy) return;
      busy = true;
      agentStatus
        .getStatus(2000)
        .then((s) => {
          reportAgentChanges(last, s, progress);
          last = s;
        })
        .catch(() => undefined)
        .finally(() => (busy = false));
    }, 2000);
    if (!stop.signal.aborted) await new Promise<void>((resolve) => stop.signal.addEventListener("abort", () => resolve(), { once: true }));
  } catch (err) {
    if (stop.signal.aborted && (err === stop.signal.reason || err instanceof StopRequested || /stopping/.test(errorText(err)))) {
      // Asked to stop while starting: not a failure.
    } else if (err instanceof PartStartError || err instanceof StepError) {
      code = 1;
      progress.error(err.part, err.message);
      if (err.lastLines.length > 0 && err.part !== "up") {
        progress.detail([`its last log lines (${show(L.log(err.part))}):`]);
        progress.detail(summarizeLogLines(err.lastLines).map((l) => "  " + l));
      }
    } else if (err instanceof PortError) {
      code = 1;
      progress.error("up", err.message);
    } else {
      code = 1;
      progress.error("up", errorText(err));
    }
  } finally {
    if (monitor !== undefined) clearInterval(monitor);
    if (supervisor !== undefined) {
      const killed = await supervisor.stop();
      if (killed.length > 0) progress.warn("up", `had to kill: ${killed.join(", ")}`);
    }
    kdcClients?.close();
    auditClients?.close();
    agentClient?.close();
    await stateWrite;
    if (ownsRunState) await removeRunState(L.stateFile);
    for (const sig of signals) io.signals.off(sig, onSignal);
    process.off("exit", onExit);
    progress.step("up", code === 0 ? "stopped; every part has exited" : "stopped after the failure above; every part has exited");
  }
  return code;
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
  for (const part of [...PARTS].reverse()) {
    const pid = prev.parts[part]?.pid;
    if (pid === null || pid === undefined || !isKmiProcess(pid, prev.kmi_script, part)) continue;
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
async function kdcAuditLinkFlags(L: Layout, auditUrl: string): Promise<string[]> {
  const keyFile = (await auditInitialized(L)) ? ["--attestation-key-file", L.attestationKeyPem] : [];
  return ["--audit-url", auditUrl, ...keyFile];
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
    "--access-log",
    L.accessLog,
    "--metrics-listen",
    `unix:${L.metricsSocket("proxy")}`,
    "--log-level",
    cfg.logLevel,
  ];
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
  const deadline = Date.now() + cfg.readyTimeoutMs;
  let said = { machine: false, attested: false, refused: "", kdcError: "" };
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
      if (s.kdcError !== "" && s.kdcError !== said.kdcError && s.attestation === AttestationState.ATTESTED) {
        progress.step("agent", `waiting for its secrets from the KDC (${s.kdcError})`);
        said.kdcError = s.kdcError;
      }
    }
    if (!proc.alive()) throw new StepError("agent", "the agent exited while waiting for its key", proc.tail(12));
    if (Date.now() > deadline) {
      const why = s === undefined ? "its socket does not answer" : s.attestation !== AttestationState.ATTESTED ? `attestation: ${attestationWord(s.attestation)} ${s.attestationProblem}` : `KDC link: ${s.kdcError || "no key received"}`;
      throw new StepError("agent", `no key of tenant ${cfg.tenant} after ${Math.round(cfg.readyTimeoutMs / 1000)} s (${why.trim()})`, proc.tail(12));
    }
    await sleep(250, signal);
  }
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

/** The text printed once everything is healthy. */
function banner(o: {
  L: Layout;
  urls: { kdc: string; audit: string; proxy: string };
  cfg: UpConfig;
  show: (p: string) => string;
  status: GetStatusResponse | undefined;
}): string {
  const { L, urls, cfg, show } = o;
  const env = ctlEnv(L, urls);
  const held = o.status !== undefined ? heldVersions(o.status)[cfg.tenant] : undefined;
  const agentLine =
    o.status === undefined
      ? "status unknown"
      : `machine ${o.status.machineId}, ${attestationWord(o.status.attestation)}${held !== undefined ? `, holds ${cfg.tenant} v${held}` : ""}`;
  const rows: [string, string, string][] = [
    ["KDC", urls.kdc, show(L.log("kdc"))],
    ["Auditserver", urls.audit, show(L.log("audit"))],
    ["agent", show(L.agentSocket), `${show(L.log("agent"))}  (${agentLine})`],
    ["proxy", urls.proxy, `${show(L.log("proxy"))}  (default tenant ${cfg.tenant}; access log ${show(L.accessLog)})`],
  ];
  const w0 = Math.max(...rows.map((r) => r[0].length));
  const w1 = Math.max(...rows.map((r) => r[1].length));
  const root = show(L.kmiRootPem);
  return [
    "",
    "kmi is up:",
    ...rows.map(([a, b, c]) => `  ${a.padEnd(w0)}  ${b.padEnd(w1)}  log ${c}`),
    "",
    `Trust this root CA on your devices (and in curl): ${root}`,
    `Operator token (secret, 0600):                    ${show(L.operatorToken)}`,
    "",
    "Browse through the inspecting proxy:",
    `  curl -x ${urls.proxy} --cacert ${root} https://example.com/`,
    "",
    "Administer it with kmi ctl (alias kmi=\"node dist/cmd/kmi.js\"):",
    `  export KMI_CTL_KDC=${env["KMI_CTL_KDC"]} KMI_CTL_AUDIT=${env["KMI_CTL_AUDIT"]} \\`,
    `         KMI_CTL_TOKEN_FILE=${show(env["KMI_CTL_TOKEN_FILE"]!)} KMI_CTL_CA_FILE=${show(env["KMI_CTL_CA_FILE"]!)}`,
    `  kmi ctl ca status --tenant ${cfg.tenant}`,
    `  kmi ctl machine list`,
    `  kmi up status                 (this mesh's health, from another terminal)`,
    "",
    "Ctrl-C stops everything.",
    "",
  ].join("\n");
}
