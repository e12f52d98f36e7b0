/**
 * etcd's limits (128 ops per transaction) against writes whose op count grows with their input,
 * on a real 3-member etcd: a machine that serves 200 tenants reports the versions it holds
 * (ReportHeldVersions: one rollout record per tenant), which takes more than one commit.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { FileAttestationKey } from "../../../src/kdc/attestation-key.js";
import type { AttestedMachine } from "../../../src/kdc/authz.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { KdcOperations } from "../../../src/kdc/operations.js";
import { MAX_APPEND_OPS } from "../../../src/storage/audit-log.js";
import type { StoreBackend } from "../../../src/storage/backend.js";
import { makeTokenKey } from "../../fixtures/kdc/machines.js";
import { startEtcdCluster, type EtcdCluster } from "../../fixtures/storage/etcd-cluster.js";

const TENANTS = 200;

let cluster: EtcdCluster;
let dir: string;
let kdc: OpenedKdc;

beforeAll(async () => {
  cluster = await startEtcdCluster(3);
  dir = await mkdtemp(join(tmpdir(), "kmi-ha-limits-"));
  const store: StoreBackend = { kind: "etcd", endpoints: cluster.endpoints, caFile: cluster.files.ca, certFile: cluster.files.cert, keyFile: cluster.files.key, prefix: "kmi/kdc" };
  await initKdc({ dataDir: dir, tls: { dnsNames: [], ipAddresses: [] }, store });
  await writeFile(join(dir, "attestation-key.pem"), makeTokenKey().publicPem);
  kdc = await openKdc({ dataDir: dir, logger: createNopLogger(), store, attestationKey: await FileAttestationKey.load(join(dir, "attestation-key.pem")) });
}, 60_000);

afterAll(async () => {
  await kdc?.follower?.stop();
  kdc?.hub.closeAll();
  await kdc?.store.close();
  await cluster?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe("etcd's 128 ops per transaction", () => {
  it(`ReportHeldVersions from a machine serving ${TENANTS} tenants records every tenant, in commits that fit`, async () => {
    const ops = new KdcOperations(kdc.ctx);
    const ids = Array.from({ length: TENANTS }, (_, i) => `t${String(i).padStart(3, "0")}`);
    for (let i = 0; i < ids.length; i += 8) await Promise.all(ids.slice(i, i + 8).map((tenantId) => ops.createTenant("test", { tenantId, displayName: "", bootstrapKmiSigned: true })));
    const held = [];
    for (const tenantId of ids) held.push({ tenantId, version: 1, keyId: (await kdc.ctx.store.getVersion(tenantId, 1))!.keyId });
    // The one with a wrong key id is not believed.
    held[7] = { ...held[7]!, keyId: "0".repeat(64) };
    const caller: AttestedMachine = {
      kind: "machine",
      machineId: "m-0123456789abcdef",
      attestation: { group: "edge", tenantIds: ["*"], expiresAt: new Date(Date.now() + 60_000), jti: "j", certificateDer: new Uint8Array(), encryptionKeyDer: undefined, quarantined: undefined },
    };

    const records = await ops.reportHeldVersions(caller, { held });
    expect(records).toHaveLength(TENANTS);
    for (const tenantId of ids) {
      const r = await kdc.ctx.store.getRollout(tenantId, caller.machineId);
      expect(r, tenantId).toMatchObject({ heldVersion: tenantId === "t007" ? 0 : 1, group: "edge" });
    }
    const entries = (await kdc.ctx.audit.tail({ last: true, limit: 5 })).filter((e) => e.action === "rollout.report");
    const parts = Math.ceil(TENANTS / MAX_APPEND_OPS);
    expect(entries.map((e) => e.details["part"])).toEqual(Array.from({ length: parts }, (_, i) => `${i + 1}/${parts}`));
    expect(entries.every((e) => e.details["entries"] === String(TENANTS) && e.details["key_mismatch"] === "1")).toBe(true);
    expect(entries.flatMap((e) => e.details["held"]!.split(","))).toHaveLength(TENANTS);
    expect(await kdc.ctx.audit.verify()).toMatchObject({ ok: true });
  }, 120_000);
});
