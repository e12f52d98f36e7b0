/**
 * End to end, as a newcomer runs it: a fresh copy of the repository, the start command read
 * from README.md's "Two commands" block and run there (`npm start`: build, then `kmi up`), an
 * HTTPS page fetched through the proxy with `curl --cacert <the root it printed>`, the
 * private-CA flow with openssl as the private CA through `kmi ctl`, a rotation whose rollout
 * `kmi ctl ca status --json` shows complete, a quarantine after which the proxy refuses new
 * interceptions, then Ctrl-C (SIGINT to the process group) and a check that every part exited.
 * A second start reuses the state and exits 0 on SIGINT.
 *
 * Ports: KMI_UP_KDC_LISTEN, KMI_UP_AUDIT_LISTEN and KMI_UP_PROXY_LISTEN are 127.0.0.1:0 (the
 * defaults 7443, 7444 and 8080 may be taken on a shared machine); the test origin's CA is given
 * to the proxy with KMI_UP_ORIGIN_CA_FILE. KMI_E2E_DUMP=<file> saves the first run's output there
 * (for looking at what `npm start` printed).
 */
import { X509Certificate } from "node:crypto";
import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeTempDir, run, type RunResult, type TempDir } from "../../helpers/process.js";
import { copyRepo } from "../../fixtures/up/copy-repo.js";
import { makeOriginCa, type Origin, type OriginCa } from "../../fixtures/up/origin.js";
import { readmeCommands } from "../../fixtures/up/readme.js";
import { startSession, type Session } from "../../fixtures/up/session.js";

const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const PARTS = ["kdc", "audit", "agent", "proxy"] as const;

let tmp: TempDir;
let copy: string;
let ca: OriginCa;
let origin: Origin;
const origins: Origin[] = [];
let session: Session | undefined;
let upEnv: Record<string, string | undefined>;
let ctlEnv: Record<string, string>;
let proxyUrl: string;
let rootFile: string;
/** Every pid the run-state file ever named (kmi up and its parts), for the final check and cleanup. */
const seenPids = new Map<number, string>();

interface RunState {
  pid: number;
  urls: { kdc: string; audit: string; proxy: string };
  parts: Record<string, { pid: number | null; state: string }>;
}

async function runState(): Promise<RunState> {
  const s = JSON.parse(await readFile(join(copy, "run", "up.json"), "utf8")) as RunState;
  seenPids.set(s.pid, "up");
  for (const [name, p] of Object.entries(s.parts)) if (p.pid !== null) seenPids.set(p.pid, name);
  return s;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

async function waitUntil<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined>, intervalMs = 250): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last !== undefined ? ` (last error: ${String(last)})` : ""}\n--- kmi up output ---\n${session?.output() ?? ""}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** `kmi ctl …` in the copy, with the environment kmi up printed. */
async function ctl(args: string[]): Promise<RunResult> {
  return run(process.execPath, [join(copy, "dist", "cmd", "kmi.js"), "ctl", ...args], { cwd: copy, env: ctlEnv, timeoutMs: 30_000 });
}

async function ctlJson<T = Record<string, unknown>>(args: string[]): Promise<T> {
  const r = await ctl([...args, "--json"]);
  if (r.code !== 0) throw new Error(`kmi ctl ${args.join(" ")} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** curl through the proxy, trusting only `cacert`. */
function curl(port: number, cacert: string): Promise<RunResult> {
  return run("curl", ["-sS", "--max-time", "15", "-x", proxyUrl, "--cacert", cacert, `https://localhost:${port}/`], { cwd: copy, timeoutMs: 20_000 });
}

/** The leaf and issuer the proxy presents for an origin (openssl s_client through the proxy). */
async function presentedChain(port: number): Promise<X509Certificate[]> {
  const r = await run(
    "openssl",
    ["s_client", "-proxy", new URL(proxyUrl).host, "-connect", `localhost:${port}`, "-servername", "localhost", "-showcerts"],
    { cwd: copy, input: "", timeoutMs: 20_000 },
  );
  return [...r.stdout.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)].map((m) => new X509Certificate(m[0]));
}

async function openssl(args: string[]): Promise<void> {
  const r = await run("openssl", args, { cwd: tmp.path });
  if (r.code !== 0) throw new Error(`openssl ${args.join(" ")}: ${r.stderr}`);
}

interface Rollout {
  activeVersion?: number;
  machines?: { machineId: string; heldVersion?: number; upToDate?: boolean }[];
  upToDateCount?: number;
}

/** Waits until every machine in `ca status` holds the active version, which must be `version`. */
async function rolloutComplete(version: number): Promise<Rollout> {
  return waitUntil(`the rollout of v${version} in kmi ctl ca status --json`, 20_000, async () => {
    const s = await ctlJson<Rollout>(["ca", "status", "--tenant", "dev"]);
    const machines = s.machines ?? [];
    return s.activeVersion === version && machines.length > 0 && machines.every((m) => m.heldVersion === version && m.upToDate === true) && s.upToDateCount === machines.length
      ? s
      : undefined;
  });
}

beforeAll(async () => {
  tmp = await makeTempDir("kmi-up-e2e-");
  copy = join(tmp.path, "kmi");
  await mkdir(copy);
  await copyRepo(REPO, copy);
  ca = await makeOriginCa(tmp.path);
  origin = await ca.start("origin-a", "hello from origin a\n");
  origins.push(origin);
  upEnv = {
    ...process.env,
    KMI_UP_KDC_LISTEN: "127.0.0.1:0",
    KMI_UP_AUDIT_LISTEN: "127.0.0.1:0",
    KMI_UP_PROXY_LISTEN: "127.0.0.1:0",
    KMI_UP_ORIGIN_CA_FILE: ca.caFile,
    // The test origins listen on loopback, which the proxy refuses unless allowed.
    KMI_UP_PROXY_ALLOW_PRIVATE: "127.0.0.0/8",
    NO_COLOR: "1",
  };
});

afterAll(async () => {
  if (session !== undefined) {
    session.interrupt();
    const t = setTimeout(() => session?.killGroup(), 30_000);
    await session.closed;
    clearTimeout(t);
  }
  // Never leave a part running on a shared machine, whatever failed above.
  for (const pid of seenPids.keys()) {
    if (alive(pid)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  }
  for (const o of origins) await o.close();
  await tmp?.cleanup();
});

describe("npm start, exactly as README.md says", () => {
  it("README's Two commands are npm start and npm test", async () => {
    const commands = await readmeCommands(join(copy, "README.md"));
    expect(commands.map((c) => c.argv.join(" "))).toEqual(["npm start", "npm test"]);
  });

  it("comes up in a fresh copy and prints where everything is", { timeout: 150_000 }, async () => {
    const start = (await readmeCommands(join(copy, "README.md"))).find((c) => c.argv[0] === "npm" && c.argv[1] === "start")!;
    session = startSession(start.argv, { cwd: copy, env: upEnv });
    await session.waitForLine(/ up: ready in [\d.]+ s/, 140_000);
    await session.waitForLine(/^Ctrl-C stops everything\.$/, 5_000);
    const out = session.output();
    // One progress line per step, then the banner.
    expect(out).toMatch(/kdc: first run: generating the master key, the KMI root CA and the infrastructure CA/);
    expect(out).toMatch(/audit: healthy on 127\.0\.0\.1:\d+/);
    expect(out).toMatch(/agent: holds tenant dev's intermediate v1/);
    const curlLine = /curl -x (http:\/\/127\.0\.0\.1:\d+) --cacert (\S+) https:\/\//.exec(out);
    expect(curlLine, out).not.toBeNull();
    proxyUrl = curlLine![1]!;
    rootFile = resolve(copy, curlLine![2]!);
    expect(rootFile).toBe(join(copy, "data", "kdc", "kmi-root.pem"));
    const env = (name: string) => new RegExp(`${name}=(\\S+)`).exec(out)?.[1];
    ctlEnv = {
      KMI_CTL_KDC: env("KMI_CTL_KDC")!,
      KMI_CTL_AUDIT: env("KMI_CTL_AUDIT")!,
      KMI_CTL_TOKEN_FILE: resolve(copy, env("KMI_CTL_TOKEN_FILE")!),
      KMI_CTL_CA_FILE: resolve(copy, env("KMI_CTL_CA_FILE")!),
    };
    expect(ctlEnv.KMI_CTL_KDC).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
    expect(ctlEnv.KMI_CTL_TOKEN_FILE).toBe(join(copy, "data", "operator.token"));
    expect((await stat(ctlEnv.KMI_CTL_TOKEN_FILE)).mode & 0o777).toBe(0o600);
    // The join token was spent and removed; every part logs to data/logs.
    await expect(stat(join(copy, "data", "agent-join.token"))).rejects.toThrow();
    for (const p of PARTS) expect((await stat(join(copy, "data", "logs", `${p}.log`))).size).toBeGreaterThan(0);
    const state = await runState();
    for (const p of PARTS) expect(state.parts[p]?.state).toBe("running");
  });

  it("fetches an HTTPS page through the proxy, trusting only the printed root", { timeout: 60_000 }, async () => {
    const r = await waitUntil("curl through the proxy", 20_000, async () => {
      const c = await curl(origin.port, rootFile);
      return c.code === 0 ? c : undefined;
    });
    expect(r.stdout).toBe(origin.body);
    const [leaf, intermediate] = await presentedChain(origin.port);
    expect(leaf!.subjectAltName).toContain("DNS:localhost");
    expect(leaf!.checkIssued(intermediate!)).toBe(true);
    expect(intermediate!.checkIssued(new X509Certificate(await readFile(rootFile)))).toBe(true);
  });

  it("runs the private-CA flow with openssl as the private CA, via kmi ctl ca csr / ca upload", { timeout: 60_000 }, async () => {
    const csrFile = join(tmp.path, "dev.csr");
    const csr = await ctlJson<{ version?: { version?: number } }>(["ca", "csr", "--tenant", "dev", "--org", "Dev Corp", "--out", csrFile]);
    const version = csr.version?.version ?? 0;
    expect(version).toBe(2);
    // openssl is the customer's private CA.
    const rootKey = join(tmp.path, "private-root.key");
    const privateRoot = join(tmp.path, "private-root.pem");
    const signed = join(tmp.path, "dev-intermediate.pem");
    const ext = join(tmp.path, "intermediate.ext");
    await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", rootKey, "-out", privateRoot, "-days", "30",
      "-subj", "/O=Dev Corp/CN=Dev Corp Private Root", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    await writeFile(ext, "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,digitalSignature,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n");
    await openssl(["x509", "-req", "-in", csrFile, "-CA", privateRoot, "-CAkey", rootKey, "-set_serial", "0x1001", "-days", "20", "-extfile", ext, "-out", signed]);
    const uploaded = await ctl(["ca", "upload", "--tenant", "dev", "--cert", signed, "--root", privateRoot, "--activate", "--json"]);
    expect(uploaded.code, uploaded.stderr).toBe(0);
    await rolloutComplete(version);
    // New interceptions are certified by the private CA's intermediate: trusting only the private root works.
    const r = await waitUntil("curl trusting only the private root", 20_000, async () => {
      const c = await curl(origin.port, privateRoot);
      return c.code === 0 ? c : undefined;
    });
    expect(r.stdout).toBe(origin.body);
  });

  it("rotates, and kmi ctl ca status --json shows the rollout complete", { timeout: 60_000 }, async () => {
    const rotated = await ctlJson<{ version?: { version?: number } }>(["ca", "rotate", "--tenant", "dev", "--activate"]);
    expect(rotated.version?.version).toBe(3);
    const status = await rolloutComplete(3);
    expect(status.machines).toHaveLength(1);
    await session!.waitForLine(/agent: tenant dev: now holds intermediate v3/, 10_000);
    const r = await waitUntil("curl after the rotation", 20_000, async () => {
      const c = await curl(origin.port, rootFile);
      return c.code === 0 ? c : undefined;
    });
    expect(r.stdout).toBe(origin.body);
    // kmi up status reports the same health as kmi up --json.
    const st = await run(process.execPath, [join(copy, "dist", "cmd", "kmi.js"), "up", "status", "--json"], { cwd: copy });
    expect(st.code, st.stdout + st.stderr).toBe(0);
    const summary = JSON.parse(st.stdout) as Record<string, Record<string, unknown>>;
    expect(summary["agent"]).toMatchObject({ attestation: "attested", kdc_connected: true, holds_tenant_key: true });
    expect(summary["kdc"]!["tenants"]).toEqual([expect.objectContaining({ tenant: "dev", active_version: 3 })]);
    expect(summary["audit"]).toMatchObject({ healthy: true, machines: [expect.objectContaining({ status: "active" })] });
    expect(summary["proxy"]).toMatchObject({ healthy: true, state: "running" });
    expect(summary["proxy"]!["leaf_cache_entries"]).toBeGreaterThanOrEqual(1);
  });

  it("restarts a part that dies, says which and why, and the mesh keeps working", { timeout: 60_000 }, async () => {
    const before = await runState();
    const agentPid = before.parts["agent"]!.pid!;
    process.kill(agentPid, "SIGKILL");
    await session!.waitForLine(new RegExp(`agent: died: killed by SIGKILL after .* \\(pid ${agentPid}\\); its last log lines`), 10_000);
    await session!.waitForLine(/agent: restarting in 1 s \(restart 1\)/, 5_000);
    await session!.waitForLine(/agent: back: serving on run\/agent\.sock/, 20_000);
    const after = await runState();
    expect(after.parts["agent"]!.pid).not.toBe(agentPid);
    expect(after.parts["agent"]!.state).toBe("running");
    // The restarted agent serves from its sealed cache and resyncs; the proxy reconnects to it.
    const fresh = await ca.start("origin-c", "hello from origin c\n");
    origins.push(fresh);
    const r = await waitUntil("curl through the proxy after the agent's restart", 20_000, async () => {
      const c = await curl(fresh.port, rootFile);
      return c.code === 0 ? c : undefined;
    });
    expect(r.stdout).toBe(fresh.body);
  });

  it("quarantines the machine; the proxy then refuses new interceptions", { timeout: 60_000 }, async () => {
    const machines = await ctlJson<{ machines?: { machineId: string }[] }>(["machine", "list"]);
    expect(machines.machines).toHaveLength(1);
    const id = machines.machines![0]!.machineId;
    const q = await ctl(["machine", "quarantine", id, "--reason", "e2e: suspected compromise", "--json"]);
    expect(q.code, q.stderr).toBe(0);
    await session!.waitForLine(/agent: .*quarantined/, 15_000);
    // A host the proxy never minted a leaf for: it must not get a trusted one.
    const fresh = await ca.start("origin-b", "hello from origin b\n");
    origins.push(fresh);
    const r = await curl(fresh.port, rootFile);
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain(fresh.body);
    // Nor an origin it intercepted before.
    const again = await curl(origin.port, rootFile);
    expect(again.stdout).not.toContain(origin.body);
    // The access log says why: the agent refuses to certify for a quarantined machine.
    const log = (await readFile(join(copy, "data", "logs", "proxy-access.log"), "utf8"))
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    const refused = log.filter((x) => String(x["host"] ?? "").includes("localhost") && x["decision"] !== "allow");
    expect(refused.length, JSON.stringify(log.slice(-5))).toBeGreaterThan(0);
    expect(JSON.stringify(refused), JSON.stringify(refused)).toMatch(/quarantin/i);
  });

  it("Ctrl-C stops every part in reverse order, and no process is left", { timeout: 60_000 }, async () => {
    const state = await runState();
    const pids = [state.pid, ...PARTS.map((p) => state.parts[p]!.pid!)];
    for (const pid of pids) expect(alive(pid)).toBe(true);
    session!.interrupt();
    await session!.closed;
    const out = session!.output();
    if (process.env["KMI_E2E_DUMP"]) await writeFile(process.env["KMI_E2E_DUMP"], out);
    expect(out).toMatch(/up: stopped; every part has exited/);
    const order = PARTS.map((p) => out.indexOf(`${p}: stopping (pid`));
    expect(order.every((i) => i > 0)).toBe(true);
    expect([...order].sort((a, b) => b - a)).toEqual(order);
    for (const pid of pids) expect(alive(pid), `pid ${pid} (${seenPids.get(pid)}) still runs`).toBe(false);
    await expect(stat(join(copy, "run", "up.json"))).rejects.toThrow();
    session = undefined;
  });

  it("a second start reuses the state (no re-init) and exits 0 on SIGINT", { timeout: 60_000 }, async () => {
    session = startSession([process.execPath, join(copy, "dist", "cmd", "kmi.js"), "up", "--json"], { cwd: copy, env: upEnv });
    const line = await session.waitForLine(/^\{"kmi_up":/, 45_000);
    const summary = JSON.parse(line) as Record<string, Record<string, unknown>>;
    expect(summary["kmi_up"]!["ready"]).toBe(true);
    expect(summary["kdc"]!["tenants"]).toEqual([expect.objectContaining({ tenant: "dev", active_version: 3 })]);
    // The quarantine outlives restarts until an operator releases the machine.
    expect(summary["agent"]).toMatchObject({ attestation: "quarantined" });
    const out = session.output();
    expect(out).toMatch(/kdc: reusing data\/kdc/);
    expect(out).toMatch(/audit: reusing data\/audit/);
    expect(out).not.toMatch(/first run/);
    await runState();
    session.interrupt();
    const exit = await session.closed;
    expect(exit).toEqual({ code: 0, signal: null });
    for (const pid of seenPids.keys()) expect(alive(pid)).toBe(false);
    session = undefined;
  });
});
