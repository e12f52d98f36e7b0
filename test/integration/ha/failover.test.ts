/**
 * Failover with real processes on one machine: a 3-member etcd on loopback, KDC replicas
 * (`kmi kdc --store etcd`, one prefix, each its own port), a real `kmi audit` and real
 * `kmi agent`s, killed with SIGKILL where the test simulates a fault.
 *
 * - `kmi ctl` with a replica list whose first URL is dead still works; so do the KDC's Auditserver
 *   client (`--audit-url <dead>,<audit>`: the attestation key every attestation needs) and the
 *   Auditserver's KDC peer (`--kdc <dead>,<kdc0>,<kdc1>`: every enrollment's certificate);
 * - SIGKILL of the KDC replica the agent is attached to: it attaches to another replica (resuming
 *   from its revision) and receives a rotation made after the kill, while it keeps issuing;
 * - a replica at its stream cap sheds a new stream with UNAVAILABLE and `retry-after-ms`; the
 *   agent lands on another replica;
 * - an etcd compaction past the revision of a detached agent: it resyncs with a full SNAPSHOT and
 *   converges on the newest version.
 */
import { generateKeyPairSync } from "node:crypto";
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { stableIndex } from "../../../src/clients/endpoints.js";
import type { GetStatusResponse } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { DistributionService } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { AgentGrpcClient } from "../../fixtures/agent/grpc-client.js";
import { freePort, runCtl, spawnKmi, until, type CtlResult, type KmiProcess } from "../../fixtures/mesh/processes.js";
import { startEtcdCluster, type EtcdCluster } from "../../fixtures/storage/etcd-cluster.js";

const AGENT_CODE = resolve(import.meta.dirname, "../../../dist/src/agent");
const KMI = resolve(import.meta.dirname, "../../../dist/cmd/kmi.js");

let cluster: EtcdCluster;
let dir: string;
let kdcDir: string;
let tokenFile: string;
let caFile: string;
let caPem: string;
let auditUrl: string;
/** A URL nothing listens on, first in the KDC's and the Auditserver's peer lists. */
let deadUrl: string;
let agentConfig: string;
const ports: number[] = [];
const kdcs: (KmiProcess | undefined)[] = [];
const procs: KmiProcess[] = [];
const agents: { proc: KmiProcess; client: AgentGrpcClient; socket: string; state: string; machineId: string }[] = [];

const url = (i: number) => `https://127.0.0.1:${ports[i]}`;
const etcdFlags = () => ["--store", "etcd", "--etcd-endpoints", cluster.endpoints.join(","), "--etcd-ca", cluster.files.ca, "--etcd-cert", cluster.files.cert, "--etcd-key", cluster.files.key, "--etcd-prefix", "ha/kdc"];

async function run(args: string[]): Promise<string> {
  const { execFile } = await import("node:child_process");
  return new Promise((res, rej) => execFile(process.execPath, [KMI, ...args], { encoding: "utf8" }, (err, out, errOut) => (err ? rej(new Error(`kmi ${args.slice(0, 2).join(" ")}: ${errOut}`)) : res(out))));
}

/** Starts KDC replica `i` on its own port (again after a kill). */
async function startKdc(i: number, extra: string[] = []): Promise<KmiProcess> {
  const p = await spawnKmi(`kdc${i}`, ["kdc", "--data-dir", kdcDir, "--listen", `127.0.0.1:${ports[i]}`, "--audit-url", `${deadUrl},${auditUrl}`, ...etcdFlags(), ...extra]);
  kdcs[i] = p;
  procs.push(p);
  return p;
}

function ctl(kdcList: string, args: string[]): Promise<CtlResult> {
  return runCtl(args, { KMI_CTL_KDC: kdcList, KMI_CTL_AUDIT: auditUrl, KMI_CTL_CA_FILE: caFile, KMI_CTL_TOKEN_FILE: tokenFile });
}

async function ctlOk(kdcList: string, args: string[]): Promise<string> {
  const r = await ctl(kdcList, args);
  if (r.code !== 0) throw new Error(`kmi ctl ${args.join(" ")} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** Starts an agent with `kdcUrls` (a join token on its first start); the same state dir keeps its identity. */
async function startAgent(n: number, kdcUrls: string[], joinToken?: string) {
  const prev = agents[n];
  prev?.client.close();
  const socket = prev?.socket ?? join(dir, `agent${n}`, "agent.sock");
  const state = prev?.state ?? join(dir, `agent${n}`, "state");
  const args = ["agent", "--config", agentConfig, "--audit-url", auditUrl, "--kdc-url", kdcUrls.join(","), "--ca-file", caFile, "--socket", socket, "--state-dir", state, "--measure", `agent.code=${AGENT_CODE},agent.config=${agentConfig}`];
  if (joinToken !== undefined) args.push("--join-token-file", joinToken);
  const proc = await spawnKmi(`agent${n}`, args);
  procs.push(proc);
  const machineId = ((proc.entries("started")[0]?.bound ?? {}) as { machineId?: string }).machineId ?? prev?.machineId ?? "";
  agents[n] = { proc, client: new AgentGrpcClient(socket), socket, state, machineId };
  return agents[n]!;
}

function status(n: number): Promise<GetStatusResponse | undefined> {
  return agents[n]!.client.unary("getStatus", {}).catch(() => undefined);
}

/** Waits until agent `n` is attached (to `kdcUrl` when given) and holds acme's version `version` (when given). */
function attached(n: number, want: { kdcUrl?: string; version?: number } = {}, timeoutMs = 30_000): Promise<GetStatusResponse> {
  return until(
    `agent${n} attached${want.kdcUrl ? ` to ${want.kdcUrl}` : ""}${want.version ? ` holding v${want.version}` : ""}`,
    async () => {
      const s = await status(n);
      // Attached: the stream is open and its first message (SNAPSHOT or RESUMED) applied.
      if (s === undefined || !s.kdcConnected || s.kdcRevision === 0n) return undefined;
      if (want.kdcUrl !== undefined && s.kdcUrl !== want.kdcUrl) return undefined;
      if (want.version !== undefined && !s.keys.some((k) => k.tenantId === "acme" && k.version === want.version)) return undefined;
      return s;
    },
    timeoutMs,
    () => agents[n]!.proc.log().slice(-3000),
  );
}

async function rotate(kdcList: string): Promise<number> {
  const out = JSON.parse(await ctlOk(kdcList, ["ca", "rotate", "--tenant", "acme", "--activate", "--validity-days", "30", "--json"])) as { version: { version: number } };
  return out.version.version;
}

async function newJoinToken(name: string): Promise<string> {
  const file = join(dir, name);
  await ctlOk(url(0), ["join-token", "create", "edge", "--ttl", "600", "--out", file]);
  return file;
}

async function etcdRevision(): Promise<number> {
  const r = await cluster.etcdctl(["get", "ha/", "--prefix", "--keys-only", "--limit", "1", "-w", "json"]);
  return Number((JSON.parse(r.stdout) as { header: { revision: number } }).header.revision);
}

const issue = (n: number) =>
  agents[n]!.client.unary("issueLeafCertificate", {
    tenantId: "acme",
    publicKey: generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ type: "spki", format: "der" }),
    dnsNames: ["www.example.test"],
  });

beforeAll(async () => {
  cluster = await startEtcdCluster(3);
  dir = await mkdtemp(join(tmpdir(), "kmi-ha-failover-"));
  kdcDir = join(dir, "kdc");
  tokenFile = join(dir, "operator.token");
  caFile = join(kdcDir, "infra-ca.pem");
  agentConfig = join(dir, "agent.json");
  await writeFile(agentConfig, JSON.stringify({ "reconnect-initial-ms": 200, "reconnect-max-ms": 1000 }) + "\n");
  for (let i = 0; i < 5; i++) ports.push(await freePort());
  auditUrl = `https://127.0.0.1:${ports[3]}`;
  deadUrl = `https://127.0.0.1:${ports[4]}`;
  const [version] = await Promise.all([run(["--version"]).then((v) => v.trim()), run(["kdc", "init", "--data-dir", kdcDir, "--token-file", tokenFile, ...etcdFlags()])]);
  caPem = await readFile(caFile, "utf8");
  await Promise.all([startKdc(0), startKdc(1), startKdc(2, ["--max-watch-streams", "1"])]);
  const kdcList = [url(0), url(1)].join(",");
  await ctlOk(kdcList, ["tenant", "create", "acme", "--bootstrap"]);
  const auditDir = join(dir, "audit");
  await run(["audit", "init", "--data-dir", auditDir, "--kdc", kdcList, "--kdc-ca-file", caFile, "--token-file", tokenFile]);
  procs.push(await spawnKmi("audit", ["audit", "--data-dir", auditDir, "--listen", `127.0.0.1:${ports[3]}`, "--kdc", `${deadUrl},${kdcList}`]));
  await ctlOk(kdcList, ["group", "create", "edge", "--tenant", "acme"]);
  await ctlOk(kdcList, [
    "group", "approve-measurements", "edge",
    "--measure", `agent.code=${AGENT_CODE}`,
    "--measure", `agent.config=${agentConfig}`,
    "--measurement", `software.version=${createHash("sha256").update(version).digest("hex")}`,
  ]);
  await startAgent(0, [url(0), url(1)], await newJoinToken("join0"));
  await attached(0, { version: 1 });
});

afterAll(async () => {
  for (const a of agents) a?.client.close();
  await Promise.all(procs.map((p) => p.stop("SIGKILL", 5_000).catch(() => undefined)));
  await cluster?.stop();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

describe("failover with real processes", () => {
  it("kmi ctl with a replica list whose first URL is dead still works (a read and a change)", async () => {
    const dead = deadUrl;
    const versions = JSON.parse(await ctlOk(`${dead},${url(1)}`, ["ca", "history", "--tenant", "acme", "--json"])) as { versions: unknown[] };
    expect(versions.versions.length).toBeGreaterThanOrEqual(1);
    const r = await ctl(`${dead},${url(1)}`, ["group", "create", "spare", "--tenant", "acme"]);
    expect(r.code, r.stderr).toBe(0);
    // One URL, dead: the error says so.
    const alone = await ctl(dead, ["ca", "history", "--tenant", "acme"]);
    expect(alone.code).not.toBe(0);
    expect(alone.stderr).toMatch(/ECONNREFUSED|unavailable/i);
  });

  it("SIGKILL of the replica the agent is attached to: it attaches to the other, resumes, and receives a rotation made after the kill, issuing all along", async () => {
    const before = await attached(0);
    const victim = [url(0), url(1)].indexOf(before.kdcUrl);
    expect(victim).toBeGreaterThanOrEqual(0);
    const survivor = 1 - victim;
    let issuing = true;
    let issued = 0;
    const failures: string[] = [];
    const loop = (async () => {
      while (issuing) {
        await issue(0).then(() => issued++, (e: unknown) => failures.push(String(e)));
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    try {
      await kdcs[victim]!.stop("SIGKILL");
      // The rotation goes through kmi ctl with the dead replica first in its list.
      const v = await rotate(`${url(victim)},${url(survivor)}`);
      const after = await attached(0, { kdcUrl: url(survivor), version: v });
      expect(after.kdcFailovers).toBeGreaterThanOrEqual(1);
      const opens = agents[0]!.proc.entries("kdc watch open");
      expect(opens.at(-1)).toMatchObject({ kdc: url(survivor), start: "resumed" });
      expect(agents[0]!.proc.entries("kdc replica failed; moving to the next").some((e) => e["kdc"] === url(victim) && e["next"] === url(survivor))).toBe(true);
    } finally {
      issuing = false;
      await loop;
    }
    expect(failures).toEqual([]);
    expect(issued).toBeGreaterThan(0);
    await startKdc(victim);
  });

  it("a replica at its stream cap sheds a new stream with UNAVAILABLE and retry-after-ms; the agent lands on another replica", async () => {
    // Agent 1 takes replica 2's only stream.
    await startAgent(1, [url(2)], await newJoinToken("join1"));
    await attached(1, { kdcUrl: url(2) });
    // A stream refused on the wire: UNAVAILABLE with the hint, before any authentication.
    const transport = createGrpcTransport({ baseUrl: url(2), nodeOptions: { ca: caPem } });
    const refused = await (async () => {
      for await (const _ of createClient(DistributionService, transport).watchSecrets({ attestationToken: "" })) return undefined;
      return undefined;
    })().catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(ConnectError);
    expect((refused as ConnectError).code).toBe(Code.Unavailable);
    expect((refused as ConnectError).metadata.get("retry-after-ms")).toBe("10000");
    expect((refused as ConnectError).rawMessage).toMatch(/holds 1 watch streams, its limit; retry in 10000 ms or at another replica/);

    // Agent 0, restarted with a list in which its machine id's hash picks replica 2 first.
    await agents[0]!.proc.stop("SIGTERM");
    const list = stableIndex(agents[0]!.machineId, 2) === 0 ? [url(2), url(0)] : [url(0), url(2)];
    await startAgent(0, list);
    const s = await attached(0, { kdcUrl: url(0) });
    expect(s.kdcFailovers).toBeGreaterThanOrEqual(1);
    const moved = agents[0]!.proc.entries("kdc replica failed; moving to the next");
    expect(moved.some((e) => e["kdc"] === url(2) && e["next"] === url(0) && e["retry_after_ms"] === 10000)).toBe(true);
  });

  it("a compaction past a detached agent's revision: it resyncs with a full SNAPSHOT and converges on the newest version", async () => {
    const held = await attached(0, { kdcUrl: url(0) });
    expect(held.kdcRevision).toBeGreaterThan(0n);
    // Detach the agent: replica 0 dies, and replica 2, the other in its list, sheds it (agent 1 holds its only stream).
    await kdcs[0]!.stop("SIGKILL");
    await until("agent 0 detached", async () => ((await status(0))?.kdcConnected === false ? true : undefined), 20_000);
    // Rotations through replica 2 (it serves calls, only no more streams), then a compaction past the agent's revision.
    await rotate(url(2));
    const newest = await rotate(url(2));
    const rev = await etcdRevision();
    expect(BigInt(rev)).toBeGreaterThan(held.kdcRevision);
    const compacted = await cluster.etcdctl(["compact", String(rev), "--physical"]);
    expect(compacted.code, compacted.stderr).toBe(0);
    const back = await startKdc(0);
    const after = await attached(0, { kdcUrl: url(0), version: newest });
    expect(after.kdcRevision).toBeGreaterThanOrEqual(BigInt(rev));
    const open = agents[0]!.proc.entries("kdc watch open").at(-1)!;
    expect(open).toMatchObject({ kdc: url(0), start: "snapshot", from_revision: String(held.kdcRevision) });
    expect(back.entries("watch resume refused; sending a snapshot").some((e) => e["from_revision"] === String(held.kdcRevision))).toBe(true);
    expect((await status(1))?.kdcUrl).toBe(url(2));
  });
});
