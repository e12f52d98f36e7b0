/**
 * Fault test 1 of issue 13: `kill -9` of the etcd leader during a loop of rotations. A 3-member
 * etcd on loopback, two `kmi kdc` replicas on it (each given every member), one `kmi audit`, one
 * `kmi agent` (attached to KDC 0). Rotations alternate between the replicas; the Raft leader
 * (asked with `etcdctl endpoint status`) is SIGKILLed while one is in flight. Then:
 *
 * - every rotation that was acknowledged is in the history, with its key;
 * - no rotation is half there: versions are contiguous, exactly one is active, the tenant's
 *   active pointer names it, and each version past the bootstrap has its audit entry;
 * - the agent holds the newest version (its KeyAgentService);
 * - `kmi ctl audit verify` passes on the KDC and on the Auditserver;
 * - the killed member, started again, rejoins and the cluster is healthy.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { HaMesh } from "../../fixtures/ha/ha-mesh.js";
import { until } from "../../fixtures/mesh/processes.js";
import { clients } from "../kdc/harness.js";

/** Rotations in the loop (bounded); the leader dies as rotation KILL_AT starts. */
const ROTATIONS = 12;
const KILL_AT = 4;

let mesh: HaMesh;
let caPem: string;
let token: string;

beforeAll(async () => {
  mesh = await HaMesh.start({ kdcs: 2, audits: 1, agent: true });
  [caPem, token] = await Promise.all([mesh.caPem(), mesh.token()]);
}, 180_000);

afterAll(async () => {
  await mesh?.close();
});

const kdc = (i: number) => clients(mesh.kdcUrl(i), caPem, { token });

describe("kill -9 of the etcd leader during a loop of rotations", () => {
  it("keeps every acknowledged rotation, no half one, the agent on the newest, and a verifying audit log", async () => {
    const tenantId = mesh.tenant;
    const acked = new Map<number, string>();
    const failed: string[] = [];
    let killed: Awaited<ReturnType<typeof mesh.etcd.leader>>;
    for (let i = 0; i < ROTATIONS; i++) {
      if (i === KILL_AT) {
        killed = await mesh.etcd.leader();
        expect(killed, "a leader before the kill").toBeDefined();
      }
      const rotation = kdc(i % 2)(KdcService).createVersion({ tenantId, signer: Signer.KMI_ROOT, validityDays: 30, activate: true }, { timeoutMs: 20_000 });
      // While the rotation is in flight (the next ones run during the election).
      if (i === KILL_AT) killed!.child.kill("SIGKILL");
      try {
        const v = (await rotation).version!;
        acked.set(v.version, v.keyId);
      } catch (err) {
        failed.push(`${i}: ${ConnectError.from(err).code === Code.DeadlineExceeded ? "deadline" : ConnectError.from(err).message}`);
      }
    }
    // Most rotations went through: only those caught by the election may have failed.
    expect(acked.size, failed.join("; ")).toBeGreaterThanOrEqual(ROTATIONS - 3);
    await until("a new leader", () => mesh.etcd.leader(), 30_000);

    for (const i of [0, 1]) {
      const versions = (await kdc(i)(KdcService).listVersions({ tenantId })).versions;
      const numbers = versions.map((v) => v.version).sort((a, b) => a - b);
      expect(numbers, `KDC ${i}`).toEqual(Array.from({ length: numbers.length }, (_, k) => k + 1));
      for (const [n, keyId] of acked) expect(versions.find((v) => v.version === n)?.keyId, `acknowledged version ${n} on KDC ${i}`).toBe(keyId);
      const active = versions.filter((v) => v.state === VersionState.ACTIVE);
      expect(active.map((v) => v.version)).toEqual([numbers.at(-1)]);
      // The tenant's pointer names that version (a rotation is one transaction: never a pointer to a missing version).
      expect((await kdc(i)(KdcService).getRolloutStatus({ tenantId })).activeVersion).toBe(active[0]!.version);
    }
    const newest = Math.max(...(await kdc(0)(KdcService).listVersions({ tenantId })).versions.map((v) => v.version));
    expect(newest).toBeGreaterThanOrEqual(Math.max(...acked.keys()));

    const tail = await kdc(1)(KdcAdminService).tailAuditLog({ limit: 1000 });
    const created = tail.entries.filter((e) => e.action === "ca.version.create" && e.target.startsWith(`tenant/${tenantId}/`)).map((e) => e.target);
    expect(created.sort()).toEqual(Array.from({ length: newest - 1 }, (_, k) => `tenant/${tenantId}/version/${k + 2}`).sort());

    const held = await until("the agent holds the newest version", async () => {
      const chain = await mesh.agentClient().unary("getCertificateChain", { tenantId }).catch(() => undefined);
      return chain?.version === newest ? chain : undefined;
    }, 30_000, () => mesh.agent!.log().slice(-3000));
    expect(held.keyId).toBe((await kdc(1)(KdcService).listVersions({ tenantId })).versions.find((v) => v.version === newest)!.keyId);

    for (const args of [["audit", "verify", "--json"], ["audit", "verify", "--server", "audit", "--json"]]) {
      const r = await mesh.ctl(args, { kdc: 1 });
      expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ ok: true });
    }

    // The killed member comes back on its data dir and the cluster heals.
    await mesh.etcd.restart(killed!);
    const health = await mesh.etcd.etcdctl(["endpoint", "health"]);
    expect(health.code, health.stderr).toBe(0);
    const after = await kdc(0)(KdcService).createVersion({ tenantId, signer: Signer.KMI_ROOT, validityDays: 30, activate: true });
    expect(after.version!.version).toBe(newest + 1);
  }, 240_000);
});
