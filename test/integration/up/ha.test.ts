/**
 * `kmi up --ha` end to end, with real programs: one `kmi up --ha` in a temp data dir (the
 * system's etcd, 3 members on loopback; 3 KDC and 2 Auditserver replicas; the agent; the proxy).
 * `kmi up status --json` shows 3 healthy members with one leader and every replica healthy; the
 * agent, each KDC replica and each Auditserver replica use every replica of the other server; etcd
 * refuses a client without a certificate; a rotation made with `kmi ctl` against the 2nd KDC
 * replica reaches the agent, and the proxy serves an intercepted HTTPS request with a leaf the
 * new version signed. Then the backup of docs/operations.md, its commands run as written:
 * `etcdctl snapshot save`, a change after it, Ctrl-C (every process recorded is gone),
 * `etcdctl snapshot restore` of every member,
 * and a second `kmi up --ha` on the same data dir that comes back with the snapshot's state
 * (the change after it is gone, `kmi ctl audit verify` passes on both servers) and stops clean.
 * Before all that, without etcd on PATH, `kmi up --ha` says how to install it and writes nothing,
 * and a data dir of the other kind (LevelDB for --ha, etcd without it) is refused with the fix.
 */
import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { request } from "node:https";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { alive, makeTempDir, run, type TempDir } from "../../helpers/process.js";
import { makeOriginCa, type Origin } from "../../fixtures/up/origin.js";
import { startSession, type Session } from "../../fixtures/up/session.js";

const KMI = fileURLToPath(new URL("../../../dist/cmd/kmi.js", import.meta.url));
const READY_MS = 300_000;

let tmp: TempDir;
let dataDir: string;
let runDir: string;
let origin: Origin;
let originCaFile: string;
let session: Session | undefined;
/** Every pid up.json ever named (kmi up and each part), checked dead after each stop. */
const seenPids = new Map<number, string>();

interface Summary {
  kdc: { url: string; tenants?: { tenant: string; active_version: number }[] };
  agent: { healthy: boolean; kdc_url?: string; keys?: { tenant: string; version: number; purpose: string }[] };
  proxy: { url: string };
  trust: { kmi_root_ca: string; infra_ca: string; operator_token_file: string };
  ctl_env: Record<string, string>;
  ha: {
    kdc_replicas: { name: string; url: string; pid: number; healthy: boolean }[];
    audit_replicas: { name: string; url: string; pid: number; healthy: boolean }[];
    etcd: { leader: string | null; members: { name: string; url: string; pid: number; healthy: boolean; leader: boolean }[] };
  };
}

/** The environment without the caller's KMI_* settings. */
function env(extra: Record<string, string> = {}): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith("KMI_")) out[k] = v;
  return { ...out, ...extra };
}

function upArgs(): string[] {
  return [
    process.execPath, KMI, "up", "--ha", "--json",
    "--data-dir", dataDir, "--run-dir", runDir,
    "--kdc-listen", "127.0.0.1:0", "--audit-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0",
    "--origin-ca-file", originCaFile, "--proxy-allow-private", "127.0.0.0/8",
  ];
}

/** Starts `kmi up --ha` and waits until it is ready; records its pids. */
async function startUp(): Promise<void> {
  session = startSession(upArgs(), { cwd: tmp.path, env: env() });
  await session.waitForLine(/up: ready in/, READY_MS);
  await recordPids();
}

async function recordPids(): Promise<void> {
  const s = JSON.parse(await readFile(join(runDir, "up.json"), "utf8")) as { pid: number; parts: Record<string, { pid: number | null }> };
  seenPids.set(s.pid, "up");
  for (const [name, p] of Object.entries(s.parts)) if (p.pid !== null) seenPids.set(p.pid, name);
}

/** Ctrl-C; resolves with the exit code once every stream closed. */
async function stopUp(): Promise<number | null> {
  const s = session!;
  s.interrupt();
  const { code } = await s.closed;
  session = undefined;
  return code;
}

async function status(): Promise<{ code: number | null; summary: Summary }> {
  const r = await run(process.execPath, [KMI, "up", "status", "--json", "--data-dir", dataDir, "--run-dir", runDir], { env: env(), timeoutMs: 60_000 });
  try {
    return { code: r.code, summary: JSON.parse(r.stdout) as Summary };
  } catch {
    throw new Error(`kmi up status --json printed no JSON (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  }
}

/** `kmi ctl` against `kdcUrl` with the mesh's operator token and infrastructure CA; throws unless it exits 0. */
async function ctl(kdcUrl: string, args: string[], auditUrl?: string): Promise<string> {
  const r = await run(process.execPath, [KMI, "ctl", ...args], {
    env: env({
      KMI_CTL_KDC: kdcUrl,
      ...(auditUrl !== undefined ? { KMI_CTL_AUDIT: auditUrl } : {}),
      KMI_CTL_TOKEN_FILE: join(dataDir, "operator.token"),
      KMI_CTL_CA_FILE: join(dataDir, "kdc", "infra-ca.pem"),
    }),
    timeoutMs: 60_000,
  });
  if (r.code !== 0) throw new Error(`kmi ctl ${args.join(" ")}: exit ${r.code}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

/** The dev tenant's versions, newest first, as `kmi ctl ca history --json` lists them on `kdcUrl`. */
async function versions(kdcUrl: string): Promise<number[]> {
  const res = JSON.parse(await ctl(kdcUrl, ["ca", "history", "--tenant", "dev", "--json"])) as { versions: { version: number }[] };
  return res.versions.map((v) => v.version);
}

/** The first ```sh block of docs/operations.md after the line that contains `marker`. */
async function docBlock(marker: string): Promise<string> {
  const doc = await readFile(fileURLToPath(new URL("../../../docs/operations.md", import.meta.url)), "utf8");
  const at = doc.indexOf(marker);
  if (at < 0) throw new Error(`docs/operations.md no longer says "${marker}"`);
  const block = /```sh\n([\s\S]*?)```/.exec(doc.slice(at));
  if (block === null) throw new Error(`docs/operations.md has no sh block after "${marker}"`);
  return block[1]!;
}

/** Runs a block of docs/operations.md with bash in the temp dir (where data-ha is), stopping at the first failure. */
async function runDocBlock(marker: string): Promise<string> {
  const script = await docBlock(marker);
  const r = await run("bash", ["-euo", "pipefail", "-c", script], { cwd: tmp.path, timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`docs/operations.md block after "${marker}" failed (exit ${r.code}):\n${script}\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`);
  return r.stdout;
}

/** The field `field` of the last line logged with message `msg` in a part's log (data/logs/<part>.log); undefined when there is none yet. */
async function loggedField(part: string, msg: string, field: string): Promise<string | undefined> {
  const lines = (await readFile(join(dataDir, "logs", `${part}.log`), "utf8")).split("\n").filter((l) => l.startsWith("{"));
  const hits = lines.flatMap((l) => {
    try {
      return [JSON.parse(l) as Record<string, unknown>];
    } catch {
      return []; // a line still being written
    }
  }).filter((l) => l["msg"] === msg);
  const v = hits.at(-1)?.[field];
  return typeof v === "string" ? v : undefined;
}

async function waitUntil<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined>): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last !== undefined ? ` (last error: ${String(last)})` : ""}\n--- kmi up ---\n${session?.output() ?? ""}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

beforeAll(async () => {
  tmp = await makeTempDir("kmi-up-ha-");
  // The name docs/operations.md's commands use (they run here as written, in tmp).
  dataDir = join(tmp.path, "data-ha");
  // Short: the agent's socket path must fit in a Unix socket address.
  runDir = join(tmp.path, "run");
  const ca = await makeOriginCa(tmp.path);
  originCaFile = ca.caFile;
  origin = await ca.start("origin", "hello from the origin behind kmi up --ha\n");
}, 60_000);

afterAll(async () => {
  if (session !== undefined) {
    session.interrupt();
    const quit = await Promise.race([session.closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 60_000))]);
    if (!quit) session.killGroup();
  }
  // Whatever a failed test left behind.
  for (const pid of seenPids.keys()) {
    if (alive(pid)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  }
  await origin?.close();
  await tmp?.cleanup();
}, 120_000);

describe("kmi up --ha", () => {
  it("without etcd on PATH: exit 1 naming apt-get install etcd-server, and nothing written", async () => {
    const bare = join(tmp.path, "no-etcd");
    const r = await run(process.execPath, [KMI, "up", "--ha", "--data-dir", join(bare, "data"), "--run-dir", join(bare, "run")], { env: { PATH: join(tmp.path, "empty-bin") }, timeoutMs: 60_000 });
    expect(r.code).toBe(1);
    expect(r.stdout + r.stderr).toMatch(/no etcd is on PATH; install it: apt-get install etcd-server/);
    await expect(stat(bare)).rejects.toMatchObject({ code: "ENOENT" });
  });

  it.each([
    ["kmi up on a data dir made with --ha", [], "etcd/cluster.json", /holds a mesh made with --ha .*; run kmi up --ha here, or kmi up with another --data-dir/],
    ["kmi up --ha on a data dir made without it", ["--ha"], "kdc/store/CURRENT", /holds a mesh made without --ha \(LevelDB in .*\); run kmi up --ha with another --data-dir/],
  ])("%s: exit 1 with the fix, nothing started", async (_name, flags, marker, message) => {
    const base = join(tmp.path, `kind-${flags.length}`);
    await mkdir(join(base, "data", dirname(marker)), { recursive: true, mode: 0o700 });
    await writeFile(join(base, "data", marker), "{}\n", { mode: 0o600 });
    const r = await run(process.execPath, [KMI, "up", ...flags, "--data-dir", join(base, "data"), "--run-dir", join(base, "run"), "--kdc-listen", "127.0.0.1:0", "--audit-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0"], { env: env(), timeoutMs: 60_000 });
    expect(r.code).toBe(1);
    expect(r.stdout + r.stderr).toMatch(message);
    await expect(stat(join(base, "data", "logs", "kdc.log"))).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("starts 3 etcd members (one leader), 3 KDC and 2 Auditserver replicas, all healthy in kmi up status", { timeout: READY_MS + 60_000 }, async () => {
    await startUp();
    const { code, summary } = await status();
    expect(code).toBe(0);
    const { etcd, kdc_replicas: kdcs, audit_replicas: audits } = summary.ha;
    expect(etcd.members.map((m) => m.name)).toEqual(["etcd-1", "etcd-2", "etcd-3"]);
    expect(etcd.members.every((m) => m.healthy && alive(m.pid))).toBe(true);
    expect(etcd.members.filter((m) => m.leader)).toHaveLength(1);
    expect(etcd.leader).toBe(etcd.members.find((m) => m.leader)!.name);
    expect(kdcs.map((r) => r.name)).toEqual(["kdc", "kdc-2", "kdc-3"]);
    expect(audits.map((r) => r.name)).toEqual(["audit", "audit-2"]);
    for (const r of [...kdcs, ...audits]) {
      expect(r.healthy, `${r.name} ${r.url}`).toBe(true);
      expect(alive(r.pid)).toBe(true);
    }
    expect(new Set([...kdcs, ...audits].map((r) => r.url)).size).toBe(5);
    // Each replica's certificate covers the address it listens on, as openssl judges it.
    for (const r of [...kdcs, ...audits]) {
      const u = new URL(r.url);
      const v = await run("openssl", ["s_client", "-connect", u.host, "-CAfile", summary.trust.infra_ca, "-verify_ip", u.hostname, "-verify_return_error"], { input: "", timeoutMs: 30_000 });
      expect(v.stdout, `${r.name}: ${v.stderr}`).toMatch(/Verify return code: 0 \(ok\)/);
    }
    // The agent was given every replica.
    const agentConfig = JSON.parse(await readFile(join(dataDir, "config", "agent.json"), "utf8")) as Record<string, string>;
    expect(agentConfig["kdc-url"]!.split(",")).toEqual(kdcs.map((r) => r.url));
    expect(agentConfig["audit-url"]!.split(",")).toEqual(audits.map((r) => r.url));
    // So was each server, of the other: every replica, each list starting at another one (the
    // client tries the first, then fails over down the list), as the servers log what they use.
    const rotations = (urls: string[]) => urls.map((_, i) => [...urls.slice(i), ...urls.slice(0, i)].join(","));
    const auditRotations = rotations(audits.map((r) => r.url));
    const kdcLinks = await Promise.all(kdcs.map((r) => waitUntil(`${r.name} to open its machine status stream`, 60_000, () => loggedField(r.name, "machine status stream open", "audit"))));
    expect(kdcLinks).toEqual(kdcs.map((_, i) => auditRotations[i % audits.length]));
    const auditLinks = await Promise.all(audits.map((r) => loggedField(r.name, "audit store opened", "kdc")));
    expect(auditLinks).toEqual(rotations(kdcs.map((r) => r.url)).slice(0, audits.length));

    // And kmi ctl, through the environment kmi up prints: `kmi ctl status` asks every replica.
    expect(summary.ctl_env["KMI_CTL_KDC"]!.split(",")).toEqual(kdcs.map((r) => r.url));
    expect(summary.ctl_env["KMI_CTL_AUDIT"]!.split(",")).toEqual(audits.map((r) => r.url));
    const st = await run(process.execPath, [KMI, "ctl", "status", "--json"], { env: env(summary.ctl_env), timeoutMs: 60_000 });
    expect(st.code, st.stderr).toBe(0);
    type Replica = { url: string; healthy: boolean; connected_agents?: number };
    const ctlStatus = JSON.parse(st.stdout) as { degraded: boolean; kdc: { replicas: Replica[] }; audit: { replicas: Replica[] }; agent: { kdc_url?: string } };
    expect(ctlStatus.degraded).toBe(false);
    expect(ctlStatus.kdc.replicas.map((r) => [r.url, r.healthy])).toEqual(kdcs.map((r) => [r.url, true]));
    expect(ctlStatus.audit.replicas.map((r) => [r.url, r.healthy])).toEqual(audits.map((r) => [r.url, true]));
    // The one agent is attached to one replica, and that replica counts it.
    expect(ctlStatus.kdc.replicas.find((r) => r.url === ctlStatus.agent.kdc_url)?.connected_agents).toBe(1);
  });

  it("etcd's keys are the data dir's: pki 0700 with 0600 files, and a client without a certificate is refused", async () => {
    const pki = join(dataDir, "etcd", "pki");
    expect((await stat(join(dataDir, "etcd"))).mode & 0o777).toBe(0o700);
    expect((await stat(pki)).mode & 0o777).toBe(0o700);
    for (const f of ["ca.key", "member.key", "kdc.key", "audit.key", "up.key"]) expect((await stat(join(pki, f))).mode & 0o777, f).toBe(0o600);
    const { summary } = await status();
    const url = new URL("/health", summary.ha.etcd.members[0]!.url);
    const ca = await readFile(join(pki, "ca.pem"));
    const outcome = await new Promise<string>((resolve) => {
      const req = request(url, { ca }, (res) => resolve(`HTTP ${res.statusCode}`));
      req.on("error", (err) => resolve(`refused: ${err.message}`));
      req.end();
    });
    expect(outcome).toMatch(/^refused/);
  });

  it("a rotation made on the 2nd KDC replica reaches the agent, and the proxy intercepts with the new version", { timeout: 120_000 }, async () => {
    const { summary } = await status();
    const second = summary.ha.kdc_replicas[1]!.url;
    await ctl(second, ["ca", "rotate", "--tenant", "dev", "--activate"]);
    await waitUntil("the agent to hold dev v2", 60_000, async () => {
      const s = (await status()).summary;
      return s.agent.keys?.some((k) => k.tenant === "dev" && k.purpose === "intermediate_ca" && k.version === 2) ? true : undefined;
    });
    const curl = await waitUntil("an intercepted request signed by dev v2", 60_000, async () => {
      const r = await run("curl", ["-sS", "-v", "--max-time", "20", "-x", summary.proxy.url, "--cacert", summary.trust.kmi_root_ca, `https://localhost:${origin.port}/`], { timeoutMs: 30_000 });
      return r.code === 0 && /issuer: CN=dev MITM CA 2/.test(r.stderr) ? r : undefined;
    });
    expect(curl.stdout).toBe("hello from the origin behind kmi up --ha\n");
  });

  it("backup: docs/operations.md's etcdctl endpoint status and snapshot save; Ctrl-C then leaves no process behind", { timeout: 180_000 }, async () => {
    const { summary } = await status();
    const out = await runDocBlock("a backup of it, with");
    // endpoint status's table names every member's client URL.
    for (const m of summary.ha.etcd.members) expect(out).toContain(m.url);
    const snap = join(tmp.path, "kmi-etcd.db");
    // The snapshot holds every sealed key and hashed token: etcdctl writes it for its owner only.
    expect((await stat(snap)).mode & 0o777).toBe(0o600);
    // A change after the snapshot: a restore must not have it.
    await ctl(summary.kdc.url, ["ca", "rotate", "--tenant", "dev"]);
    expect(await versions(summary.kdc.url)).toEqual([3, 2, 1]);
    await recordPids();
    expect(await stopUp()).toBe(0);
    const left = [...seenPids].filter(([pid]) => alive(pid));
    expect(left).toEqual([]);
  });

  it("restore: docs/operations.md's etcdctl snapshot restore of each member, then a second kmi up --ha comes back with the snapshot's state", { timeout: READY_MS + 180_000 }, async () => {
    const cluster = JSON.parse(await readFile(join(dataDir, "etcd", "cluster.json"), "utf8")) as { token: string; members: { name: string; clientUrl: string; peerUrl: string }[] };
    await runDocBlock("With `kmi up --ha` the same: stop `kmi up`");
    for (const m of cluster.members) await expect(stat(join(dataDir, "etcd", `${m.name}.before-restore`))).resolves.toBeTruthy();
    await startUp();
    const { code, summary } = await status();
    expect(code).toBe(0);
    expect(summary.ha.etcd.members.map((m) => m.url)).toEqual(cluster.members.map((m) => m.clientUrl));
    expect(summary.kdc.tenants?.find((t) => t.tenant === "dev")?.active_version).toBe(2);
    expect(await versions(summary.ha.kdc_replicas[2]!.url)).toEqual([2, 1]);
    await ctl(summary.kdc.url, ["audit", "verify"]);
    await ctl(summary.kdc.url, ["audit", "verify", "--server", "audit"], summary.ha.audit_replicas[1]!.url);
    await recordPids();
    expect(await stopUp()).toBe(0);
    expect([...seenPids].filter(([pid]) => alive(pid))).toEqual([]);
  });
});
