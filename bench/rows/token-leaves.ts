/**
 * Row 12: leaves signed through a token-held intermediate (issue 17). One real mesh as an
 * operator starts it: a SoftHSM2 token made for the run, `kmi kdc init --pkcs11-*` and `kmi kdc`
 * with the same flags, `kmi audit`, one `kmi agent`, and two tenants served by its group: one
 * escrowed (bootstrapped, KMI-signed: the agent signs its leaves itself) and one whose active
 * version is held in the KDC's token (the agent has each leaf signed by the KDC through
 * DistributionService.SignLeaf). IssueLeafCertificate over the agent's socket, as the proxy calls
 * it (a fresh P-256 public key per call), at concurrency 1 and 16: the escrowed tenant is the
 * baseline, the token-held tenant's figures are its ratios. CPU per leaf of the agent and the KDC
 * from /proc. The row checks that it measured what it says: the KDC logged exactly one signed
 * leaf per token-held call and none for the escrowed ones, and each tenant's leaves verify
 * under its own intermediate.
 */
import { createHash, generateKeyPairSync, X509Certificate } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { AgentClient } from "../../src/clients/agent-client.js";
import { LeanClient } from "../../src/clients/grpc-client.js";
import { AuditAdminService } from "../../src/gen/kmi/audit/v1/admin_pb.js";
import { KdcAdminService } from "../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, KeyCustody, Signer } from "../../src/gen/kmi/kdc/v1/kdc_pb.js";
import type { Env } from "../lib/env.js";
import { runKmi, startKmi, type KmiProcess } from "../lib/kmi-process.js";
import { closedLoop, type LoopResult } from "../lib/loop.js";
import { freePort } from "../lib/ports.js";
import { cpuSeconds } from "../lib/proc.js";
import { RowBuilder, type Figure } from "../lib/results.js";
import { softHsmToken } from "../lib/softhsm.js";
import { fmt, mean } from "../lib/stats.js";
import { ROW_TITLES } from "./titles.js";

/** The two tenants: the baseline first. */
const TENANTS = [
  { key: "escrow", id: "acme", label: "escrowed tenant (agent signs)" },
  { key: "token", id: "vault", label: "token-held tenant (KDC signs via PKCS#11)" },
] as const;
type TenantKey = (typeof TENANTS)[number]["key"];
const CONCURRENCY = [1, 16] as const;
/** Calls per measured window at most, each with its own public key (the pool is made before the windows). */
const CALLS = { quick: 300, full: 3000 } as const;
/** The KDC's log line for each leaf it signs (src/kdc/leaf-signing.ts). */
const SIGNED_LINE = '"msg":"leaf signed with a token-held intermediate"';
const HOST = "www.bench-origin.example";

/** The row's running programs. */
interface TokenMesh {
  readonly kdc: KmiProcess;
  readonly agentProc: KmiProcess;
  readonly agent: AgentClient;
  /** Each tenant's active intermediate, PEM. */
  readonly intermediates: Record<TenantKey, string>;
  /** Leaves the KDC logged as signed with the token-held intermediate so far. */
  signedAtKdc(): number;
  close(): Promise<void>;
}

/** Counts the KDC's "leaf signed" log lines on its stderr (whole lines only). */
function countSignedLines(p: KmiProcess): () => number {
  let n = 0;
  let partial = "";
  p.child.stderr!.on("data", (b: Buffer) => {
    const lines = (partial + b.toString()).split("\n");
    partial = lines.pop()!;
    for (const l of lines) if (l.includes(SIGNED_LINE)) n++;
  });
  return () => n;
}

/** Operator clients of the KDC and the Auditserver (bearer token over TLS). */
function operator(caPem: string, token: string, kdcPort: number, auditPort: number) {
  const opts = (port: number) => ({ target: `127.0.0.1:${port}`, serverName: "localhost", caPem, metadata: { authorization: `Bearer ${token}` } });
  return { kdc: new LeanClient(opts(kdcPort)), audit: new LeanClient(opts(auditPort)) };
}

/**
 * Starts the mesh: token, KDC (init and start with the token), tenants, Auditserver, group and
 * measurements, join token, agent; resolves once the agent holds both tenants' intermediates.
 */
async function startTokenMesh(env: Env): Promise<TokenMesh> {
  const dir = join(env.dir, "token-leaves");
  const hsm = await softHsmToken(join(dir, "hsm"), "kmi-bench", "2468-bench");
  const kdcDir = join(dir, "kdc");
  const auditDir = join(dir, "audit");
  const tokenFile = join(dir, "operator.token");
  const agentConfig = join(dir, "agent.json");
  const [kdcPort, auditPort] = await Promise.all([freePort(), freePort()]);
  const auditUrl = `https://127.0.0.1:${auditPort}`;
  const procs: KmiProcess[] = [];
  // SIGTERM (each drains and closes its store), SIGKILL after 10 s; the agent first, the KDC last.
  const stopAll = async () => {
    for (const p of [...procs].reverse()) {
      const t = setTimeout(() => p.child.kill("SIGKILL"), 10_000);
      await p.kill("SIGTERM");
      clearTimeout(t);
    }
  };
  try {
    env.log("token leaves: a SoftHSM2 token, kmi kdc init --pkcs11-*, kmi kdc");
    await runKmi(["kdc", "init", "--data-dir", kdcDir, "--token-file", tokenFile, ...hsm.flags], hsm.env);
    // The per-machine limit on signed leaves (50/s, a burst of 500) is lifted: the row measures
    // what signing costs, and its one agent asks for thousands of leaves in seconds.
    const limit = ["--sign-leaf-rate", "1000000", "--sign-leaf-burst", "1000000"];
    const kdc = await startKmi(["kdc", "--data-dir", kdcDir, "--listen", `127.0.0.1:${kdcPort}`, "--audit-url", auditUrl, ...limit, ...hsm.flags], "kdc (token)", undefined, hsm.env);
    procs.push(kdc);
    const signedAtKdc = countSignedLines(kdc);
    const caFile = join(kdcDir, "infra-ca.pem");
    const caPem = await readFile(caFile, "utf8");
    const op = operator(caPem, (await readFile(tokenFile, "utf8")).trim(), kdcPort, auditPort);
    try {
      const intermediates = await makeTenants(op.kdc);
      env.log("token leaves: kmi audit init, kmi audit, the group, kmi agent");
      await runKmi(["audit", "init", "--data-dir", auditDir, "--kdc", `https://127.0.0.1:${kdcPort}`, "--kdc-ca-file", caFile, "--token-file", tokenFile]);
      procs.push(await startKmi(["audit", "--data-dir", auditDir, "--listen", `127.0.0.1:${auditPort}`], "audit (token row)"));
      await writeFile(agentConfig, "{}\n");
      const joinToken = await makeGroup(op.audit, agentConfig, join(dir, "join.token"));
      const socket = join(dir, "agent.sock");
      const agentProc = await startKmi(
        ["agent", "--config", agentConfig, "--audit-url", auditUrl, "--kdc-url", `https://127.0.0.1:${kdcPort}`, "--ca-file", caFile, "--socket", socket, "--state-dir", join(dir, "agent-state"), "--measure", `agent.config=${agentConfig}`, "--join-token-file", joinToken],
        "agent (token row)",
      );
      procs.push(agentProc);
      const agent = new AgentClient({ socketPath: socket });
      await holdsBoth(agent);
      return { kdc, agentProc, agent, intermediates, signedAtKdc, close: async () => (agent.close(), await stopAll()) };
    } finally {
      op.kdc.close();
      op.audit.close();
    }
  } catch (err) {
    await stopAll();
    throw err;
  }
}

/** The escrowed tenant (bootstrapped) and the token-held one (a KMI-signed version in the token, active); their intermediates. */
async function makeTenants(kdc: LeanClient): Promise<Record<TenantKey, string>> {
  const [escrow, token] = TENANTS;
  await kdc.unary(KdcAdminService.method.createTenant, { tenantId: escrow.id, displayName: `${escrow.id} (bench, escrowed)`, bootstrapKmiSigned: true });
  await kdc.unary(KdcAdminService.method.createTenant, { tenantId: token.id, displayName: `${token.id} (bench, token-held)`, bootstrapKmiSigned: false });
  const made = await kdc.unary(KdcService.method.createVersion, { tenantId: token.id, signer: Signer.KMI_ROOT, validityDays: 30, activate: true, keyCustody: KeyCustody.TOKEN });
  if (made.version?.keyCustody !== KeyCustody.TOKEN) throw new Error(`token leaves: tenant "${token.id}"'s new version is not held in the token`);
  const held = await kdc.unary(KdcService.method.getCaCertificates, { tenantId: escrow.id });
  if (held.version === undefined || held.version.certificatePem === "") throw new Error(`token leaves: tenant "${escrow.id}" has no active intermediate`);
  return { escrow: held.version.certificatePem, token: made.version.certificatePem };
}

/** Group `edge` serving both tenants, approving what the agent measures; a join token in `file` (0600). */
async function makeGroup(audit: LeanClient, agentConfig: string, file: string): Promise<string> {
  const sha = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");
  const version = (await runKmi(["--version"])).trim();
  await audit.unary(AuditAdminService.method.createGroup, { name: "edge", tenantIds: TENANTS.map((t) => t.id) });
  await audit.unary(AuditAdminService.method.approveMeasurements, {
    group: "edge",
    approved: [
      { name: "agent.config", sha256: [sha(await readFile(agentConfig))] },
      { name: "software.version", sha256: [sha(version)] },
    ],
  });
  await writeFile(file, (await audit.unary(AuditAdminService.method.createJoinToken, { group: "edge", ttlSeconds: 600 })).secret, { mode: 0o600 });
  return file;
}

/** Waits (60 s at most) until the agent is connected and holds both tenants' intermediates. */
async function holdsBoth(agent: AgentClient): Promise<void> {
  const end = performance.now() + 60_000;
  for (;;) {
    const s = await agent.getStatus(1000).catch(() => undefined);
    if (s?.kdcConnected === true && TENANTS.every((t) => s.keys.some((k) => k.tenantId === t.id))) return;
    if (performance.now() > end) throw new Error(`token leaves: the agent did not hold both tenants' intermediates within 60 s (status: ${JSON.stringify(s?.keys.map((k) => k.tenantId) ?? "no answer")})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** `n` P-256 public keys (SPKI DER), made before any window: the proxy makes one per new host. */
function publicKeys(n: number): Uint8Array[] {
  return Array.from({ length: n }, () => generateKeyPairSync("ec", { namedCurve: "prime256v1" }).publicKey.export({ type: "spki", format: "der" }));
}

/** One measured window, with the CPU the agent and the KDC used in it. */
interface Window {
  loop: LoopResult;
  cpuAgent: number;
  cpuKdc: number;
}

/** Per tenant and concurrency, the windows of each repeat. */
type Windows = Record<TenantKey, Record<number, Window[]>>;

/** Runs one window of IssueLeafCertificate for `tenant` at `concurrency`; each measured call has its own key. */
async function measure(mesh: TokenMesh, tenantId: string, concurrency: number, keys: Uint8Array[], windowMs: number, ok: () => void): Promise<Window> {
  let next = 0;
  const cpu = () => ({ agent: cpuSeconds(mesh.agentProc.child.pid!) ?? NaN, kdc: cpuSeconds(mesh.kdc.child.pid!) ?? NaN });
  let before = cpu();
  let after = before;
  const loop = await closedLoop(
    async () => {
      const publicKeyDer = keys[next++ % keys.length]!;
      await mesh.agent.issueLeafCertificate({ tenantId, publicKeyDer, dnsNames: [HOST], ipAddresses: [], commonName: HOST, notAfter: undefined });
      ok();
    },
    {
      concurrency,
      durationMs: windowMs,
      maxOps: keys.length,
      onWindow: {
        start: () => {
          next = 0;
          before = cpu();
        },
        end: () => (after = cpu()),
      },
    },
  );
  return { loop, cpuAgent: after.agent - before.agent, cpuKdc: after.kdc - before.kdc };
}

/** The leaf of one more call for `tenant`, checked under `intermediatePem`; a reason when it does not verify. */
async function leafProblem(mesh: TokenMesh, tenantId: string, intermediatePem: string): Promise<string | undefined> {
  const [spki] = publicKeys(1);
  const res = await mesh.agent.issueLeafCertificate({ tenantId, publicKeyDer: spki!, dnsNames: [HOST], ipAddresses: [], commonName: HOST, notAfter: undefined });
  const leaf = new X509Certificate(res.certificatePem);
  const inter = new X509Certificate(intermediatePem);
  if (!leaf.checkIssued(inter) || !leaf.verify(inter.publicKey)) return `a leaf of tenant "${tenantId}" does not verify under its active intermediate`;
  return undefined;
}

/** Waits up to 10 s for the KDC's log to reach `n` signed leaves (its stderr is read asynchronously); the count then. */
async function signedReaching(mesh: TokenMesh, n: number): Promise<number> {
  const end = performance.now() + 10_000;
  while (mesh.signedAtKdc() < n && performance.now() < end) await new Promise((r) => setTimeout(r, 50));
  await new Promise((r) => setTimeout(r, 200));
  return mesh.signedAtKdc();
}

/** Runs row 12. */
export async function runTokenLeaves(env: Env): Promise<RowBuilder> {
  const b = env.budget;
  const calls = CALLS[env.mode];
  const row = new RowBuilder(
    "12",
    ROW_TITLES["12"]!,
    `One mesh of real programs: a SoftHSM2 token made for the run, \`kmi kdc init\` and \`kmi kdc\` with \`--pkcs11-module/--pkcs11-token/--pkcs11-pin-file\`, \`kmi audit\`, one \`kmi agent\` (mutual TLS to the KDC on 127.0.0.1), and one group serving two tenants: "${TENANTS[0].id}", bootstrapped KMI-signed with its key escrowed (the agent signs each leaf itself: the baseline), and "${TENANTS[1].id}", whose active KMI-signed version is held in the token (the agent has each leaf signed by the KDC, DistributionService.SignLeaf: a mutual-TLS round trip and a PKCS#11 signature). The KDC runs with \`--sign-leaf-rate 1000000 --sign-leaf-burst 1000000\`: its per-machine limit (50 a second, a burst of 500, by default) would otherwise be what the row measures. IssueLeafCertificate over the agent's Unix socket with the proxy's client (src/clients/agent-client.ts), a fresh P-256 public key per call (made before the windows), ${CONCURRENCY.join(" and ")} calls in flight, each window ${b.windowMs} ms or ${calls.toLocaleString("en-US")} calls, whichever ends first; the two tenants' windows interleaved, ${b.repeats} repeat(s). CPU per leaf: utime+stime of the agent and KDC processes (/proc) over the windows, divided by the leaves issued.`,
  );
  env.log("token leaves: starting the mesh with a SoftHSM2 token");
  const mesh = await startTokenMesh(env);
  try {
    const keys = publicKeys(calls);
    const okCalls: Record<TenantKey, number> = { escrow: 0, token: 0 };
    const windows: Windows = { escrow: {}, token: {} };
    for (let r = 0; r < b.repeats; r++) {
      for (const c of CONCURRENCY) {
        for (const t of TENANTS) {
          env.log(`token leaves: repeat ${r + 1}, ${t.label}, c=${c}`);
          const w = await measure(mesh, t.id, c, keys, b.windowMs, () => okCalls[t.key]++);
          (windows[t.key][c] ??= []).push(w);
          if (w.loop.errors > 0) row.fail(`${t.label} at c=${c}: ${w.loop.errors} of ${w.loop.errors + w.loop.ops} calls failed (first: ${w.loop.firstError})`);
        }
      }
    }
    for (const t of TENANTS) {
      const problem = await leafProblem(mesh, t.id, mesh.intermediates[t.key]);
      okCalls[t.key]++;
      if (problem !== undefined) row.fail(problem);
    }
    const signed = await signedReaching(mesh, okCalls.token);
    report(row, windows);
    if (signed !== okCalls.token) row.fail(`the KDC logged ${signed} leaves signed with the token-held intermediate for ${okCalls.token} token-held calls (and ${okCalls.escrow} escrowed ones, which it must not sign)`);
    else row.note(`The KDC logged ${signed.toLocaleString("en-US")} leaves signed with the token-held intermediate, one per token-held call (warm-ups and the check included), none for the ${okCalls.escrow.toLocaleString("en-US")} escrowed calls; a leaf of each tenant verifies under its own active intermediate.`);
  } finally {
    await mesh.close();
  }
  return row;
}

/** The figures: rate and latency per concurrency, CPU per leaf; the token-held tenant's as ratios to the escrowed. */
function report(row: RowBuilder, w: Windows): void {
  const [escrow, token] = TENANTS;
  for (const c of CONCURRENCY) {
    const lat = (k: TenantKey) => ({ p50: w[k][c]!.map((x) => x.loop.p50), p99: w[k][c]!.map((x) => x.loop.p99) });
    const rate = (k: TenantKey) => w[k][c]!.map((x) => x.loop.perSecond);
    const base = row.figure(`token_leaf.escrow.c${c}`, `${escrow.label}: IssueLeafCertificate, c=${c}`, "calls/s", rate("escrow"), lat("escrow"), true);
    row.ratio(row.figure(`token_leaf.token.c${c}`, `${token.label}: IssueLeafCertificate, c=${c}`, "calls/s", rate("token"), lat("token")), base, `of escrowed c=${c}`);
    for (const q of ["p50", "p99"] as const) {
      const qBase = row.figure(`token_leaf.escrow.c${c}.${q}`, `${escrow.label}: ${q} latency, c=${c}`, "ms", lat("escrow")[q], undefined, true);
      row.ratio(row.figure(`token_leaf.token.c${c}.${q}`, `${token.label}: ${q} latency, c=${c}`, "ms", lat("token")[q]), qBase, `of escrowed c=${c}`);
    }
  }
  const perLeaf = (k: TenantKey, part: (x: Window) => number) => repeatsOf(w[k]).map((ws) => (1000 * ws.reduce((a, x) => a + part(x), 0)) / ws.reduce((a, x) => a + x.loop.ops, 0));
  const both = (x: Window) => x.cpuAgent + x.cpuKdc;
  const cpuBase = row.figure("token_leaf.escrow.cpu", `${escrow.label}: CPU per leaf, agent + KDC`, "ms", perLeaf("escrow", both), undefined, true);
  const cpuToken = row.figure("token_leaf.token.cpu", `${token.label}: CPU per leaf, agent + KDC`, "ms", perLeaf("token", both));
  row.ratio(cpuToken, cpuBase, "of escrowed");
  const kdcShare: Figure = row.figure("token_leaf.token.cpu_kdc", `${token.label}: CPU per leaf, KDC alone`, "ms", perLeaf("token", (x) => x.cpuKdc));
  row.ratio(kdcShare, cpuBase, "of escrowed (agent + KDC)");
  const p50 = (k: TenantKey) => row.result.figures.find((f) => f.id === `token_leaf.${k}.c1.p50`)!.value.median;
  row.note(
    `At c=1 a token-held leaf takes ${fmt(p50("token") - p50("escrow"))} ms more than an escrowed one at p50 (${fmt(p50("token"))} vs ${fmt(p50("escrow"))} ms): what the first connection to a new host waits longer (the proxy caches leaves per host).`,
  );
  const agentOnly = (k: TenantKey) => mean(perLeaf(k, (x) => x.cpuAgent));
  row.note(
    `CPU per leaf split (means over repeats): escrowed, agent ${fmt(agentOnly("escrow"))} ms and KDC ${fmt(mean(perLeaf("escrow", (x) => x.cpuKdc)))} ms (its idle work); token-held, agent ${fmt(agentOnly("token"))} ms and KDC ${fmt(kdcShare.value.median)} ms (TLS, checks, the leaf builder, SoftHSM2's signature). The bench client's own CPU is not counted.`,
  );
}

/** The windows of each repeat (every concurrency), in repeat order. */
function repeatsOf(byC: Record<number, Window[]>): Window[][] {
  const n = Math.min(...CONCURRENCY.map((c) => byC[c]!.length));
  return Array.from({ length: n }, (_, r) => CONCURRENCY.map((c) => byC[c]![r]!));
}
