/**
 * The Auditserver's services on a real 3-member etcd (TLS, client certificates) instead of
 * LevelDB, two "replicas" (two etcd clients, two audit logs, no shared lock) on one prefix:
 * one join token raced on both enrolls exactly one machine; a quarantine on one is seen by an
 * attestation on the other; the audit chain stays one.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AUDIT_SCHEMA_VERSION, AUDIT_STORE_OWNER, Tables } from "../../../src/audit/store.js";
import { openEtcdStore } from "../../../src/storage/etcd-store.js";
import { startEtcdCluster, type EtcdCluster } from "../../fixtures/storage/etcd-cluster.js";
import { attestWith, enrollMachine, expectCode, joinToken, makeGroup } from "../../unit/audit/flows.js";
import { makeHarness, newMachineKey, type Harness } from "../../unit/audit/harness.js";

let cluster: EtcdCluster;
let one: Harness;
let two: Harness;

beforeAll(async () => {
  cluster = await startEtcdCluster(3);
  const open = (endpoint: string) => openEtcdStore({ endpoints: [endpoint], ca: cluster.ca, cert: cluster.cert, key: cluster.key, prefix: "kmi/audit", owner: AUDIT_STORE_OWNER, schemaVersion: AUDIT_SCHEMA_VERSION });
  one = await makeHarness({ store: await open(cluster.endpoints[0]!) });
  two = await makeHarness({ store: await open(cluster.endpoints[1]!) });
  // Both "replicas" stand for one Auditserver: the same KDC (token signer, CA) and attestation key.
  two.ctx.kdc = one.ctx.kdc;
  two.ctx.caPem = one.ctx.caPem;
  two.ctx.attestationKey = one.ctx.attestationKey;
  await makeGroup(one, "edge");
});

afterAll(async () => {
  await one?.close();
  await two?.close();
  await cluster?.stop();
});

describe("the Auditserver on etcd", () => {
  it("one join token raced on two replicas enrolls exactly one machine", async () => {
    const token = await joinToken(one);
    const results = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => (i % 2 === 0 ? one : two).audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" })));
    const ok = results.filter((r) => r.status === "fulfilled");
    expect(ok).toHaveLength(1);
    for (const r of results.filter((x) => x.status === "rejected")) expect(String((r as PromiseRejectedResult).reason)).toMatch(/already used/);
    const machines: string[] = [];
    for await (const [id] of two.store.iterate(Tables.machines)) machines.push(id);
    expect(machines).toEqual([(ok[0] as PromiseFulfilledResult<{ machineId: string }>).value.machineId]);
    expect(await two.ctx.audit.verify()).toMatchObject({ ok: true });
  });

  it("a machine quarantined on one replica is refused attestation on the other", async () => {
    const m = await enrollMachine(one, "edge");
    await one.admin.quarantineMachine({ machineId: m.machineId, reason: "stolen" }, one.operator);
    await expectCode(attestWith(two, m), "permission_denied", /quarantined \(stolen\)/);
    expect(await one.ctx.audit.verify()).toMatchObject({ ok: true });
  });
});
