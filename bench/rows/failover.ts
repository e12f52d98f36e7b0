/**
 * Row 8: failover. Two KDC replicas (`kmi kdc --store etcd`, one prefix, a 3-member etcd on
 * loopback), a `kmi audit` and a real `kmi agent` given both replicas. A trial SIGKILLs the
 * replica the agent is attached to, rotates the tenant through the other at once, and times
 * until the agent holds the new version (its GetStatus, polled every 10 ms); the killed replica
 * is then started again on its port. The baseline, in the same run: the same rotation reaching
 * the same agent with nothing killed.
 */
import { createHash } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { AgentClient } from "../../src/clients/agent-client.js";
import { KdcAdminService } from "../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, Signer } from "../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { AuditAdminService } from "../../src/gen/kmi/audit/v1/admin_pb.js";
import type { Env } from "../lib/env.js";
import { startEtcdCluster, type EtcdCluster } from "../lib/etcd.js";
import { RowBuilder } from "../lib/results.js";
import { percentile } from "../lib/stats.js";
import { ROW_TITLES } from "./titles.js";
import { runKmi as kmi, startKmi, type KmiProcess } from "../lib/kmi-process.js";
import { freePort } from "../lib/ports.js";

const TARGET_P99_MS = 3000;


/** The processes of the row. */
interface Ha {
  readonly kdcUrls: string[];
  readonly kdcs: (KmiProcess | undefined)[];
  startKdc(i: number): Promise<void>;
  rotate(i: number): Promise<number>;
  agent: AgentClient;
  close(): Promise<void>;
}

async function startHa(env: Env, cluster: EtcdCluster): Promise<Ha> {
  const dir = join(env.dir, "failover");
  const kdcDir = join(dir, "kdc");
  const tokenFile = join(dir, "operator.token");
  const agentConfig = join(dir, "agent.json");
  const etcd = ["--store", "etcd", "--etcd-endpoints", cluster.endpoints.join(","), "--etcd-ca", cluster.files.ca, "--etcd-cert", cluster.files.cert, "--etcd-key", cluster.files.key, "--etcd-prefix", `bench/failover-${process.pid}`];
  const ports = await Promise.all([freePort(), freePort(), freePort()]);
  const kdcUrls = [`https://127.0.0.1:${ports[0]}`, `https://127.0.0.1:${ports[1]}`];
  const auditUrl = `https://127.0.0.1:${ports[2]}`;
  const procs: KmiProcess[] = [];
  const kdcs: (KmiProcess | undefined)[] = [undefined, undefined];
  const startKdc = async (i: number) => {
    const p = await startKmi(["kdc", "--data-dir", kdcDir, "--listen", `127.0.0.1:${ports[i]}`, "--audit-url", auditUrl, ...etcd], `kdc ${i}`);
    kdcs[i] = p;
    procs.push(p);
  };
  const close = async () => {
    await Promise.all(procs.map((p) => p.kill("SIGKILL")));
  };
  try {
    await kmi(["kdc", "init", "--data-dir", kdcDir, "--token-file", tokenFile, ...etcd]);
    const caFile = join(kdcDir, "infra-ca.pem");
    const caPem = await readFile(caFile, "utf8");
    const token = (await readFile(tokenFile, "utf8")).trim();
    await Promise.all([startKdc(0), startKdc(1)]);
    const auth: Interceptor = (next) => async (req) => {
      req.header.set("authorization", `Bearer ${token}`);
      return next(req);
    };
    const clientsOf = (url: string) => {
      const t = createGrpcTransport({ baseUrl: url, interceptors: [auth], nodeOptions: { ca: caPem } });
      return { ca: createClient(KdcService, t), admin: createClient(KdcAdminService, t), auditAdmin: createClient(AuditAdminService, t) };
    };
    const kdc = kdcUrls.map(clientsOf);
    await kdc[0]!.admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
    const auditDir = join(dir, "audit");
    await kmi(["audit", "init", "--data-dir", auditDir, "--kdc", kdcUrls.join(","), "--kdc-ca-file", caFile, "--token-file", tokenFile]);
    procs.push(await startKmi(["audit", "--data-dir", auditDir, "--listen", `127.0.0.1:${ports[2]}`, "--kdc", kdcUrls.join(",")], "audit"));
    const audit = clientsOf(auditUrl).auditAdmin;
    await writeFile(agentConfig, JSON.stringify({ "reconnect-initial-ms": 200, "reconnect-max-ms": 1000 }) + "\n");
    await audit.createGroup({ name: "edge", tenantIds: ["acme"] });
    const version = (await kmi(["--version"])).trim();
    await audit.approveMeasurements({
      group: "edge",
      approved: [
        { name: "agent.config", sha256: [createHash("sha256").update(await readFile(agentConfig)).digest("hex")] },
        { name: "software.version", sha256: [createHash("sha256").update(version).digest("hex")] },
      ],
    });
    const joinToken = join(dir, "join.token");
    await writeFile(joinToken, (await audit.createJoinToken({ group: "edge", ttlSeconds: 600 })).secret, { mode: 0o600 });
    const socket = join(dir, "agent.sock");
    procs.push(
      await startKmi(
        ["agent", "--config", agentConfig, "--audit-url", auditUrl, "--kdc-url", kdcUrls.join(","), "--ca-file", caFile, "--socket", socket, "--state-dir", join(dir, "agent-state"), "--measure", `agent.config=${agentConfig}`, "--join-token-file", joinToken],
        "agent",
      ),
    );
    const agent = new AgentClient({ socketPath: socket });
    const rotate = async (i: number) => (await kdc[i]!.ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, validityDays: 30, activate: true })).version!.version;
    return { kdcUrls, kdcs, startKdc, rotate, agent, close: async () => (agent.close(), await close()) };
  } catch (err) {
    await close();
    throw err;
  }
}

/** Polls the agent every 10 ms until `ok(status)`; the time it took from `t0`, ms. */
async function until(ha: Ha, ok: (s: Awaited<ReturnType<AgentClient["getStatus"]>>) => boolean, t0: number, what: string): Promise<number> {
  const end = t0 + 60_000;
  for (;;) {
    const s = await ha.agent.getStatus(1000).catch(() => undefined);
    if (s !== undefined && ok(s)) return performance.now() - t0;
    if (performance.now() > end) throw new Error(`failover: ${what} not within 60 s`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const holds = (v: number) => (s: Awaited<ReturnType<AgentClient["getStatus"]>>) => s.kdcConnected && s.keys.some((k) => k.tenantId === "acme" && k.version === v);

/** Runs row 8. */
export async function runFailover(env: Env): Promise<RowBuilder> {
  const trials = env.mode === "quick" ? 1 : 10;
  const row = new RowBuilder(
    "8",
    ROW_TITLES["8"]!,
    `Two \`kmi kdc --store etcd\` replicas on one prefix of a 3-member etcd on 127.0.0.1 (TLS, client certificates), \`kmi audit\`, and one real \`kmi agent\` given both replicas (reconnect backoff 200 ms to 1 s, jittered). Failover trial: SIGKILL the replica the agent is attached to (its GetStatus kdc_url), rotate the tenant through the other at once, time until the agent's GetStatus shows the new version (polled every 10 ms); then start the killed replica again. Baseline, same run: a rotation reaching the attached agent with nothing killed. ${trials} trials each; p50/p99 over the trials.`,
  );
  env.log("starting a 3-member etcd cluster");
  const cluster = await env.memo("etcd", () => startEtcdCluster(3), (c) => c.stop());
  env.log("failover: starting 2 KDC replicas, the Auditserver and an agent");
  const ha = await startHa(env, cluster);
  try {
    await until(ha, holds(1), performance.now(), "the agent's first sync");
    const baseline: number[] = [];
    for (let t = 0; t < trials; t++) {
      const s = await ha.agent.getStatus();
      const other = 1 - ha.kdcUrls.indexOf(s.kdcUrl);
      const t0 = performance.now();
      const v = await ha.rotate(other);
      baseline.push(await until(ha, holds(v), t0, `rotation v${v} reaching the agent`));
    }
    const failover: number[] = [];
    for (let t = 0; t < trials; t++) {
      env.log(`failover trial ${t + 1}/${trials}`);
      const s = await ha.agent.getStatus();
      const victim = ha.kdcUrls.indexOf(s.kdcUrl);
      if (victim < 0) throw new Error(`failover: the agent reports kdc_url "${s.kdcUrl}", not one of its replicas`);
      const t0 = performance.now();
      await ha.kdcs[victim]!.kill("SIGKILL");
      const v = await ha.rotate(1 - victim);
      failover.push(await until(ha, holds(v), t0, `the agent holding v${v} after the kill`));
      if (t + 1 < trials) await ha.startKdc(victim);
    }
    const stat = (xs: number[]) => ({ p50: [percentile(xs, 0.5)], p99: [percentile(xs, 0.99)] });
    const base = row.figure("failover.baseline", "rotation reaching the agent, nothing killed", "ms", [percentile(baseline, 0.5)], stat(baseline), true);
    const fo = row.figure("failover.kill", "kill -9 of the agent's replica until it holds a rotation made after it", "ms", [percentile(failover, 0.5)], stat(failover));
    row.ratio(fo, base, "of the rotation without a kill");
    const p99 = percentile(failover, 0.99);
    row.target(fo, `p99 under ${TARGET_P99_MS / 1000} s`, p99 < TARGET_P99_MS);
    row.note(`Over ${trials} trials: max ${Math.round(Math.max(...failover))} ms. The agent moves to the other replica after its first jittered retry (100-200 ms here) and resumes there from its revision (RESUMED, not a full snapshot); the rest is the rotation itself (see the baseline) on a loaded machine.`);
    row.note("The reattachment of 2,000 agents at once (issue 13) is row 11.");
  } finally {
    await ha.close();
  }
  return row;
}
