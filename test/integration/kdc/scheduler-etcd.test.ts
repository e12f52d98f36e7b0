/**
 * The rotation scheduler's election and fencing on a real 3-member etcd (bench/lib/etcd.ts):
 * - two in-process elections on two etcd clients: one leads, the other waits and takes over
 *   when the first resigns; the first's fence is refused from then on;
 * - test 4 of issue #13, with two real `kmi kdc --store etcd` processes: the replica holding the
 *   scheduler's election is stopped with SIGSTOP past its lease, the other takes over and makes
 *   the scheduled rotation; after SIGCONT the old leader's write is refused (logged, counted in
 *   kmi_kdc_fenced_writes_total, audited as scheduler.fenced) and the rotation happened exactly
 *   once (versions contiguous, one scheduled stage and one scheduled activation in the audit log);
 * - a version staged on one in-process replica reaches an agent's stream on the other (STAGED,
 *   through the change follower).
 */
import { createServer } from "node:net";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient, createRouterTransport, type Interceptor } from "@connectrpc/connect";
import { createNopLogger } from "../../../src/common/logger.js";
import { kPeer } from "../../../src/common/rpc.js";
import { peerIdentityFromDer } from "../../../src/common/tls.js";
import { DistributionService, WatchEventType, type WatchSecretsResponse } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { FileAttestationKey } from "../../../src/kdc/attestation-key.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { KdcOperations } from "../../../src/kdc/operations.js";
import { routes } from "../../../src/kdc/routes.js";
import { RotationScheduler } from "../../../src/kdc/scheduler.js";
import { Machine, makeTokenKey, signToken } from "../../fixtures/kdc/machines.js";
import { kdcRouterClients } from "../../helpers/kdc-router.js";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { Election, electionKey, isFencedConflict } from "../../../src/storage/election.js";
import { openEtcdStore, type EtcdStore } from "../../../src/storage/etcd-store.js";
import { T } from "../../../src/kdc/kdc-store.js";
import { defineTable, putOp } from "../../../src/storage/store.js";
import { StoreInfoSchema } from "../../../src/gen/kmi/store/v1/store_pb.js";
import { startEtcdCluster, type EtcdCluster } from "../../fixtures/storage/etcd-cluster.js";
import { clients, initDataDir, startKdc, type KdcProcess } from "./harness.js";

let cluster: EtcdCluster;

beforeAll(async () => {
  cluster = await startEtcdCluster(3);
}, 60_000);

afterAll(async () => {
  await cluster?.stop();
});

/** Polls `f` every `everyMs` (100 ms) until it returns a value other than undefined (or fails after `ms`). */
async function until<T>(what: string, f: () => T | undefined | Promise<T | undefined>, ms = 30_000, everyMs = 100): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

describe("elections on etcd", () => {
  it("one of two leads; the other takes over when it resigns, and the first one's fence is refused from then on", async () => {
    const open = () => openEtcdStore({ endpoints: cluster.endpoints, ca: cluster.ca, cert: cluster.cert, key: cluster.key, prefix: "election-test", owner: "test" });
    const stores: EtcdStore[] = [await open(), await open()];
    try {
      const [a, b] = stores.map((s, i) => new Election(s, { name: "job", ttlSeconds: 2, holder: `holder-${i}` })) as [Election, Election];
      const stop = new AbortController();
      const first = await a.campaign(stop.signal);
      expect(await a.current()).toMatchObject({ holder: "holder-0" });
      let secondWon = false;
      const second = b.campaign(stop.signal).then((l) => ((secondWon = true), l));
      await new Promise((r) => setTimeout(r, 500));
      expect(secondWon).toBe(false);
      const t = defineTable("notes", StoreInfoSchema);
      const note = putOp(t, "n", { $typeName: "kmi.store.v1.StoreInfo", format: 1, schemaVersion: 1, owner: "x", restoreInProgress: false });
      await stores[0]!.commit({ compares: [first.fence], ops: [note] });
      await first.step("test resigns");
      const l2 = await second;
      expect(l2.fence.modRevision).toBeGreaterThan(first.fence.modRevision);
      expect(await b.current()).toMatchObject({ holder: "holder-1" });
      const refused = await stores[0]!.commit({ compares: [first.fence], ops: [note] }).then(() => undefined, (e: unknown) => e);
      expect(isFencedConflict(refused)).toBe(true);
      expect((refused as { keys: string[] }).keys).toEqual([electionKey("job")]);
      await stores[1]!.commit({ compares: [l2.fence], ops: [note] });
      await l2.step("done");
    } finally {
      for (const s of stores) await s.close();
    }
  });
});

describe("test 4: the scheduler's leader paused past its lease (SIGSTOP), then continued (SIGCONT)", () => {
  it("the other replica takes over and rotates; the old leader's write is refused; the rotation happens exactly once", async () => {
    const etcd = ["--store", "etcd", "--etcd-endpoints", cluster.endpoints.join(","), "--etcd-ca", cluster.files.ca, "--etcd-cert", cluster.files.cert, "--etcd-key", cluster.files.key, "--etcd-prefix", "sched/kdc"];
    const data = await initDataDir(etcd);
    const kdcs: Array<KdcProcess & { metrics: string }> = [];
    const runs = await openEtcdStore({ endpoints: cluster.endpoints, ca: cluster.ca, cert: cluster.cert, key: cluster.key, prefix: "sched/kdc", owner: "kdc", create: false });
    try {
      for (let i = 0; i < 2; i++) {
        const port = await freePort();
        const k = await startKdc(data.dataDir, [...etcd, "--scheduler-interval", "1s", "--election-ttl", "2s", "--metrics-listen", `127.0.0.1:${port}`]);
        kdcs.push({ ...k, metrics: `http://127.0.0.1:${port}/metrics` });
      }
      const leads = (k: KdcProcess) => k.stderr().split("\n").filter((l) => l.includes('"msg":"scheduler: leading"')).length;
      const fencedLines = (k: KdcProcess) => k.stderr().split("\n").filter((l) => l.includes("write refused by the election fence")).length;
      const isLeader = async (k: { metrics: string }) => /^kmi_kdc_scheduler_leader 1$/m.test(await (await fetch(k.metrics)).text());
      let leader = await until("a scheduler leader", () => kdcs.find((k) => leads(k) > 0));
      const caPem = await readFile(data.caFile, "utf8");
      const c = clients(kdcs.find((k) => k !== leader)!.url, caPem, { token: data.token });
      await c(KdcAdminService).createTenant({ tenantId: "acme", bootstrapKmiSigned: true });

      // The old leader's write is refused only when it resumes inside the sleep between two runs
      // (its timer fires before it hears its lease is gone); paused inside a run, it hears the loss
      // first and steps down without writing, which is also safe. So the pause starts a third of an
      // interval after a run is recorded, and the experiment is repeated (at most 3 times) until a
      // refused write is seen.
      for (let attempt = 1; ; attempt++) {
        const other = kdcs.find((k) => k !== leader)!;
        const ledBefore = leads(other);
        const seen = (await runs.get(T.schedulerRuns, "rotation"))?.runs;
        await until("a recorded run", async () => ((await runs.get(T.schedulerRuns, "rotation"))?.runs !== seen ? true : undefined), 10_000, 20);
        await new Promise((r) => setTimeout(r, 300));
        leader.proc.kill("SIGSTOP");
        try {
          await until("the other replica to lead", () => (leads(other) > ledBefore ? true : undefined));
          if (attempt === 1) {
            // Due now: the new leader stages v2 and, with no machine reporting, activates it.
            await c(KdcService).setRotationPolicy({ tenantId: "acme", policy: { rotateEveryDays: 30 }, nextRotationAt: timestampFromDate(new Date()) });
            await until("v2 active", async () => ((await c(KdcService).listVersions({ tenantId: "acme" })).versions.some((v) => v.version === 2 && v.state === VersionState.ACTIVE) ? true : undefined));
          }
        } finally {
          leader.proc.kill("SIGCONT");
        }
        await until("the old leader to step down", async () => (!(await isLeader(leader)) ? true : undefined));
        if (fencedLines(leader) > 0) break;
        if (attempt === 3) throw new Error("in 3 pauses the old leader never resumed between runs: no write of it was refused");
        leader = other;
      }
      const fenced = await until("the fenced-write metric", async () => /^kmi_kdc_fenced_writes_total\{job="rotation"\} (\d+)/m.exec(await (await fetch(leader.metrics)).text())?.[1]);
      expect(Number(fenced)).toBeGreaterThanOrEqual(1);
      const current = kdcs.find((k) => k !== leader)!;
      expect(await isLeader(current)).toBe(true);
      // A few more runs of the new leader: still exactly one rotation.
      await new Promise((r) => setTimeout(r, 2000));
      const versions = (await c(KdcService).listVersions({ tenantId: "acme" })).versions.map((v) => `${v.version}:${VersionState[v.state]}`).reverse();
      expect(versions).toEqual(["1:RETIRED", "2:ACTIVE"]);
      const tail = (await c(KdcAdminService).tailAuditLog({ limit: 200 })).entries;
      const scheduled = tail.filter((e) => e.actor === "system:scheduler" && e.target.startsWith("tenant/acme/")).map((e) => `${e.action} ${e.target} ${e.details["scheduled"]}`);
      expect(scheduled).toEqual(["ca.version.create tenant/acme/version/2 stage", "ca.version.activate tenant/acme/version/2 activate"]);
      expect(tail.filter((e) => e.action === "scheduler.fenced").map((e) => e.outcome)).toContain("refused");
      const verified = await c(KdcAdminService).verifyAuditLog({});
      expect(verified.ok, verified.problem).toBe(true);
    } finally {
      await runs.close();
      for (const k of kdcs) await k.stop("SIGKILL");
      await rm(data.dir, { recursive: true, force: true });
    }
  }, 120_000);
});

describe("a staged version on two replicas", () => {
  it("staged by the scheduler on replica A, it reaches a machine's stream on replica B (STAGED)", async () => {
    const dir = await mkdtemp(join(tmpdir(), "kmi-kdc-stage-"));
    const backend = { kind: "etcd" as const, endpoints: cluster.endpoints, caFile: cluster.files.ca, certFile: cluster.files.cert, keyFile: cluster.files.key, prefix: "stage/kdc" };
    const replicas: OpenedKdc[] = [];
    const abort = new AbortController();
    try {
      const r = await initKdc({ dataDir: dir, tls: { dnsNames: [], ipAddresses: [] }, store: backend });
      const tokenKey = makeTokenKey();
      await writeFile(join(dir, "attestation-key.pem"), tokenKey.publicPem);
      for (let i = 0; i < 2; i++) replicas.push(await openKdc({ dataDir: dir, logger: createNopLogger(), store: backend, attestationKey: await FileAttestationKey.load(join(dir, "attestation-key.pem")) }));
      const [a, b] = replicas as [OpenedKdc, OpenedKdc];
      await kdcRouterClients(a.ctx, r.operatorToken).admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
      const ops = new KdcOperations(a.ctx);
      const m = new Machine("m-stage00000000001");
      m.certPem = a.ctx.pki.certificatePem((await ops.issueMachineCertificate("system", { csrPem: m.csrPem(), machineId: m.machineId, group: "edge", ttlSeconds: 3600 })).certificateDer);
      const peer = peerIdentityFromDer(m.certDer, true);
      const injectPeer: Interceptor = (next) => async (req) => {
        req.contextValues.set(kPeer, peer);
        return next(req);
      };
      const events: WatchSecretsResponse[] = [];
      const t = createRouterTransport(routes(b.ctx), { router: { interceptors: [injectPeer] } });
      const done = (async () => {
        try {
          for await (const ev of createClient(DistributionService, t).watchSecrets({ attestationToken: signToken(tokenKey, { machineId: m.machineId, cert: m.certDer }) }, { signal: abort.signal })) events.push(ev);
        } catch {
          // ended by the abort
        }
      })();
      await until("the snapshot", () => (events.some((e) => e.type === WatchEventType.SNAPSHOT) ? true : undefined));
      const election = new Election(a.backend, { name: "scheduler", ttlSeconds: 2 });
      const leadership = await election.campaign(abort.signal);
      await kdcRouterClients(a.ctx, r.operatorToken).ca.setRotationPolicy({ tenantId: "acme", policy: { rotateEveryDays: 7 }, nextRotationAt: timestampFromDate(new Date()) });
      expect((await new RotationScheduler(a.ctx, ops, { election, intervalMs: 60_000, logger: createNopLogger() }).runOnce(leadership)).staged).toEqual(["acme/v2"]);
      const staged = await until("STAGED on replica B", () => events.find((e) => e.type === WatchEventType.STAGED));
      expect(staged.tenantId).toBe("acme");
      expect(staged.secrets.map((x) => x.version)).toEqual([2]);
      await leadership.step("done");
      abort.abort();
      await done;
    } finally {
      abort.abort();
      for (const k of replicas) {
        await k.follower?.stop();
        k.hub.closeAll();
        await k.store.close();
      }
      await rm(dir, { recursive: true, force: true });
    }
  });
});
