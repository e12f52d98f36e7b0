/**
 * The first-run setup and the checks of every start: `kmi kdc init` and `kmi audit init` as
 * one-shot child processes, then, through the admin APIs, the dev tenant, the machine group
 * with this build's approved measurements, the agent's config file and its join token. Every
 * step looks first and acts only when something is missing, so a second `kmi up` (or one after
 * a crash half-way through the first) reuses what is there.
 */
import { spawn } from "node:child_process";
import { createWriteStream } from "node:fs";
import { readFile, rm, stat, writeFile } from "node:fs/promises";
import { createInterface } from "node:readline";
import { Code, ConnectError } from "@connectrpc/connect";
import { measureFiles, measureValue, type MeasurementValue } from "../attest/index.js";
import { VERSION } from "../common/version.js";
import type { ServerClients } from "../clients/mesh-health.js";
import type { Layout, PartId } from "./layout.js";
import type { Progress } from "./progress.js";
import { pathExists } from "../common/fs.js";

/** The machine group `kmi up` enrolls its agent in. */
export const GROUP = "local";

/** The software-version measurement name (what the agent sends unless told not to). */
const SOFTWARE_VERSION = "software.version";

/** A one-shot kmi command failed; the message has its last stderr lines. */
export class StepError extends Error {
  override name = "StepError";
  constructor(
    readonly part: PartId | "up",
    message: string,
    readonly lastLines: string[] = [],
  ) {
    super(message);
  }
}

/** Options of {@link runKmiOnce}. */
export interface RunOnceOptions {
  /** `[node, kmi.js]`. */
  readonly kmi: readonly string[];
  readonly cwd: string;
  readonly env: Record<string, string>;
  /** Log file its stderr is appended to. */
  readonly logFile: string;
  /**
   * Also append stdout to the log. False for `kmi kdc init`: its stdout carries the first
   * operator token, which belongs in the 0600 token file only, never in a log.
   */
  readonly logStdout: boolean;
}

/** Runs `kmi <args>` to completion; resolves with its exit code and stderr lines. */
export function runKmiOnce(args: readonly string[], o: RunOnceOptions): Promise<{ code: number | null; stderr: string[] }> {
  return new Promise((resolve, reject) => {
    const [cmd, ...pre] = o.kmi;
    const log = createWriteStream(o.logFile, { flags: "a", mode: 0o600 });
    log.on("error", () => undefined);
    log.write(JSON.stringify({ time: new Date().toISOString(), level: "info", msg: "kmi up: running", program: "up", args }) + "\n");
    const child = spawn(cmd!, [...pre, ...args], { cwd: o.cwd, env: o.env, stdio: ["ignore", "pipe", "pipe"] });
    const stderr: string[] = [];
    createInterface({ input: child.stderr! }).on("line", (l) => {
      stderr.push(l);
      log.write(l + "\n");
    });
    createInterface({ input: child.stdout! }).on("line", (l) => {
      if (o.logStdout) log.write(l + "\n");
    });
    child.once("error", (err) => {
      log.end();
      reject(err);
    });
    child.once("close", (code) => {
      log.end(() => resolve({ code, stderr }));
    });
  });
}


/** True when `kmi kdc init` completed in the layout's KDC dir. */
export async function kdcInitialized(l: Layout): Promise<boolean> {
  return (await pathExists(l.kmiRootPem)) && (await pathExists(l.infraCaPem));
}

/** True when `kmi audit init` completed in the layout's Auditserver dir. */
export async function auditInitialized(l: Layout): Promise<boolean> {
  return pathExists(l.attestationKeyPem);
}

/** True when the agent enrolled once (its identity file exists). */
export async function agentEnrolled(l: Layout): Promise<boolean> {
  return pathExists(l.agentIdentity);
}

/** `kmi kdc init` into the layout (the operator token to its 0600 file); `extra`: more flags (the store's). */
export async function initKdc(l: Layout, o: Omit<RunOnceOptions, "logFile" | "logStdout">, extra: readonly string[] = []): Promise<void> {
  const r = await runKmiOnce(["kdc", "init", "--data-dir", l.kdcDir, "--token-file", l.operatorToken, ...extra], { ...o, logFile: l.log("kdc"), logStdout: false });
  if (r.code !== 0) throw new StepError("kdc", `kmi kdc init failed (exit ${r.code})`, r.stderr.slice(-8));
}

/** Checks the operator token file of an initialized KDC: present, and not readable by others. */
export async function checkOperatorToken(l: Layout): Promise<void> {
  let st;
  try {
    st = await stat(l.operatorToken);
  } catch {
    throw new StepError(
      "up",
      `${l.kdcDir} is initialized but the operator token ${l.operatorToken} is missing; put the token back in that file (mode 0600), or move ${l.dataDir} away to start from scratch`,
    );
  }
  if ((st.mode & 0o077) !== 0) {
    throw new StepError("up", `${l.operatorToken} is readable by other users (mode ${(st.mode & 0o777).toString(8)}); run: chmod 600 ${l.operatorToken}`);
  }
}

/** `kmi audit init`: its service certificate comes from the KDC, with the operator token; `extra`: more flags (the store's). */
export async function initAudit(l: Layout, kdcUrl: string, o: Omit<RunOnceOptions, "logFile" | "logStdout">, extra: readonly string[] = []): Promise<void> {
  const r = await runKmiOnce(
    ["audit", "init", "--data-dir", l.auditDir, "--kdc", kdcUrl, "--kdc-ca-file", l.infraCaPem, "--token-file", l.operatorToken, ...extra],
    { ...o, logFile: l.log("audit"), logStdout: true },
  );
  if (r.code !== 0) throw new StepError("audit", `kmi audit init failed (exit ${r.code})`, r.stderr.slice(-8));
}

/** Makes the tenant with a KMI-signed active intermediate unless it exists; resolves with its active version. */
export async function ensureTenant(c: ServerClients, tenant: string, progress: Progress): Promise<number> {
  try {
    const t = (await c.kdcAdmin.getTenant({ tenantId: tenant })).tenant;
    const active = t?.activeVersion ?? 0;
    if (active === 0) progress.warn("kdc", `tenant ${tenant} has no active intermediate; the proxy cannot intercept until one is activated (kmi ctl ca rotate --tenant ${tenant} --activate)`);
    else progress.step("kdc", `tenant ${tenant}: active intermediate v${active}`);
    return active;
  } catch (err) {
    if (!(err instanceof ConnectError && err.code === Code.NotFound)) throw err;
  }
  progress.step("kdc", `creating tenant ${tenant} with a KMI-signed intermediate CA…`);
  const t = (await c.kdcAdmin.createTenant({ tenantId: tenant, displayName: tenant, bootstrapKmiSigned: true })).tenant;
  progress.step("kdc", `tenant ${tenant}: active intermediate v${t?.activeVersion ?? 0}, signed by the KMI root`);
  return t?.activeVersion ?? 0;
}

/** What the agent measures, exactly as `kmi up` configures it. */
export interface MeasurementPlan {
  /** The kmi code the agent runs (the dist directory). */
  readonly codeDir: string;
  /** The node_modules the code loads its packages from (measured as their closure), if any. */
  readonly depsDir: string | undefined;
  /** The node binary that runs the agent. */
  readonly nodeBinary: string;
  /** The agent's config file. */
  readonly agentConfig: string;
  /** The proxy's config file. */
  readonly proxyConfig: string;
}

/** The `--measure` value the agent gets: the same sources {@link expectedMeasurements} hashes. */
export function measureFlag(p: MeasurementPlan): string {
  return Object.entries(measureSources(p)).map(([name, path]) => `${name}=${path}`).join(",");
}

function measureSources(p: MeasurementPlan): Record<string, string> {
  return {
    "agent.code": p.codeDir,
    ...(p.depsDir !== undefined ? { "agent.deps": p.depsDir } : {}),
    "agent.node": p.nodeBinary,
    "agent.config": p.agentConfig,
    "proxy.config": p.proxyConfig,
  };
}

/**
 * The measurements the agent will present: `measureFiles` over the same paths the agent is told
 * to measure, plus `software.version` (SHA-256 of the version string), which the agent adds by
 * default. The group must approve exactly this set.
 */
export async function expectedMeasurements(p: MeasurementPlan): Promise<MeasurementValue[]> {
  const files = await measureFiles(measureSources(p));
  return [...files, measureValue(SOFTWARE_VERSION, VERSION)].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

function sameApproval(approved: readonly { name: string; sha256: readonly string[] }[], want: readonly MeasurementValue[]): boolean {
  if (approved.length !== want.length) return false;
  const byName = new Map(approved.map((a) => [a.name, a.sha256]));
  return want.every((w) => {
    const digests = byName.get(w.name);
    return digests !== undefined && digests.length === 1 && digests[0] === w.sha256;
  });
}

/**
 * Makes the machine group unless it exists, and approves this build's measurements unless
 * they are approved already (a rebuilt kmi, or an edited agent config, changes them: a dev
 * machine follows its own build; a fleet approves a build once, see docs/operations.md).
 */
export async function ensureGroup(c: ServerClients, tenant: string, want: readonly MeasurementValue[], progress: Progress): Promise<void> {
  const groups = (await c.auditAdmin.listGroups({})).groups;
  let group = groups.find((g) => g.name === GROUP);
  if (group === undefined) {
    progress.step("audit", `creating machine group ${GROUP} (tenant ${tenant})…`);
    group = (await c.auditAdmin.createGroup({ name: GROUP, tenantIds: [tenant], quarantineOnMismatch: false })).group;
  } else if (!group.allTenants && !group.tenantIds.includes(tenant)) {
    const serves = group.tenantIds.length === 0 ? "no tenant: it was made before all_tenants existed" : `it serves ${group.tenantIds.join(", ")}`;
    progress.warn("audit", `machine group ${GROUP} does not serve tenant ${tenant} (${serves}); the agent will not receive its key`);
  }
  if (group !== undefined && sameApproval(group.approved, want)) {
    progress.step("audit", `group ${GROUP}: this build's measurements are approved`);
    return;
  }
  progress.step("audit", `approving this build's measurements for group ${GROUP}: ${want.map((m) => `${m.name} ${m.sha256.slice(0, 12)}…`).join(", ")}`);
  await c.auditAdmin.approveMeasurements({ group: GROUP, approved: want.map((m) => ({ name: m.name, sha256: [m.sha256] })) });
}

/** Makes a one-time join token (1 h) for the agent and writes it 0600. */
export async function writeJoinToken(c: ServerClients, l: Layout): Promise<void> {
  const r = await c.auditAdmin.createJoinToken({ group: GROUP, ttlSeconds: 3600, description: "kmi up: the local agent" });
  // A fresh file, never an existing one whose mode someone widened.
  await rm(l.joinToken, { force: true });
  await writeFile(l.joinToken, r.secret + "\n", { mode: 0o600, flag: "wx" });
}

/** Removes the join token once the agent enrolled (it is spent). */
export async function removeJoinToken(l: Layout): Promise<void> {
  await rm(l.joinToken, { force: true });
}

/** Writes `content` to `path` (0600) when it differs; resolves true when it changed. */
export async function writeIfChanged(path: string, content: string): Promise<boolean> {
  try {
    if ((await readFile(path, "utf8")) === content) return false;
  } catch {
    // absent
  }
  await writeFile(path, content, { mode: 0o600 });
  return true;
}

/** Writes `content` to `path` (0600) unless the file exists (an operator's edits stay); resolves true when written. */
export async function writeIfAbsent(path: string, content: string): Promise<boolean> {
  try {
    await writeFile(path, content, { mode: 0o600, flag: "wx" });
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return false;
    throw err;
  }
}
