/**
 * `kmi kdc rekey` online on a real 3-member etcd (TLS, client certificates): a KDC replica keeps
 * serving through the rotation. While the rekey runs, the replica revokes signing keys that the
 * rekey is rewrapping (no revocation is lost: every batch is conditional on the records' mod
 * revisions) and renews a CA version (it meets records under the new key and loads the next key
 * file). Afterwards every record is under the new key, the replica and a freshly started one
 * serve, the audit log verifies, and etcdctl reads no private key in plaintext.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { KeyAlgorithm } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { KDC_ETCD_PREFIX } from "../../../src/kdc/config.js";
import { loadKdcKeyring, openKdcBackend } from "../../../src/kdc/init.js";
import { intermediateKeyAad } from "../../../src/kdc/kdc-store.js";
import { storeBackendFrom } from "../../../src/storage/backend.js";
import { readMasterKeyFile } from "../../../src/storage/master-key.js";
import { masterKeyId } from "../../../src/storage/seal.js";
import { T } from "../../../src/kdc/kdc-store.js";
import { startEtcdCluster, type EtcdCluster } from "../../fixtures/storage/etcd-cluster.js";
import { cleanEnv, cleanup, clients, initDataDir, KMI, startKdc, type DataDir, type KdcProcess } from "./harness.js";
import { openSealedBlobs } from "../../fixtures/kdc/rekey.js";

const run = promisify(execFile);
const KEYS = 60;
let cluster: EtcdCluster;
let data: DataDir;
let replica: KdcProcess;
let flags: (endpoint: string) => string[];
let api: ReturnType<typeof clients>;

/** Every sealed blob of the etcd store opened with the data dir's keyring; counts per key id, and the plaintexts of the intermediates. */
async function openEverything(): Promise<{ byKey: Record<string, number>; intermediates: Buffer[] }> {
  const backend = storeBackendFrom({ store: "etcd", etcdEndpoints: cluster.endpoints.join(","), etcdCa: cluster.files.ca, etcdCert: cluster.files.cert, etcdKey: cluster.files.key, etcdPrefix: KDC_ETCD_PREFIX }, KDC_ETCD_PREFIX);
  const keyring = await loadKdcKeyring(data.dataDir, {});
  const store = await openKdcBackend(data.dataDir, false, backend);
  try {
    const byKey = await openSealedBlobs(store, keyring);
    const intermediates = (await store.list(T.versions)).records.map((r) => Buffer.from(keyring.open(r.value.privateKey!, intermediateKeyAad(r.value.tenantId, r.value.keyId))));
    return { byKey, intermediates };
  } finally {
    keyring.wipe();
    await store.close();
  }
}

/** True when etcdctl's dump of the KDC's prefix holds any of the byte strings. */
async function etcdHolds(needles: Buffer[]): Promise<boolean> {
  const dump = await cluster.etcdctl(["get", "--prefix", KDC_ETCD_PREFIX, "-w", "json"]);
  expect(dump.code, dump.stderr).toBe(0);
  const kvs = (JSON.parse(dump.stdout) as { kvs?: { value: string }[] }).kvs ?? [];
  expect(kvs.length).toBeGreaterThan(KEYS);
  const values = kvs.map((kv) => Buffer.from(kv.value, "base64"));
  return needles.some((n) => values.some((v) => v.includes(n) || v.includes(Buffer.from(n.toString("base64").slice(0, 64)))));
}

beforeAll(async () => {
  cluster = await startEtcdCluster();
  flags = (endpoint) => ["--store", "etcd", "--etcd-endpoints", endpoint, "--etcd-ca", cluster.files.ca, "--etcd-cert", cluster.files.cert, "--etcd-key", cluster.files.key];
  data = await initDataDir(flags(cluster.endpoints.join(",")));
  replica = await startKdc(data.dataDir, flags(cluster.endpoints[0]!));
  api = clients(replica.url, await readFile(data.caFile, "utf8"), { token: data.token });
  await api(KdcAdminService).createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  for (let i = 0; i < KEYS; i += 10) {
    await Promise.all(Array.from({ length: 10 }, (_, j) => api(KdcService).createSigningKey({ tenantId: "acme", name: `k-${i + j}`, keyAlgorithm: KeyAlgorithm.ECDSA_P256 })));
  }
}, 180_000);

afterAll(async () => {
  await replica?.stop("SIGKILL");
  await cluster?.stop();
  if (data !== undefined) await cleanup(data.dir);
});

describe("kmi kdc rekey on etcd with a replica serving", () => {
  it("rotates while the replica revokes and renews; nothing is lost, everything is under the new key", async () => {
    const keyFile = join(data.dataDir, "master.key");
    const oldId = masterKeyId(await readMasterKeyFile(keyFile));
    const before = await openEverything();
    expect(Object.keys(before.byKey)).toEqual([oldId]);
    expect(await etcdHolds(before.intermediates)).toBe(false);

    const rekey = run(process.execPath, [KMI, "kdc", "rekey", "--data-dir", data.dataDir, ...flags(cluster.endpoints[1]!), "--batch-size", "2", "--json"], { env: cleanEnv(), encoding: "utf8" });
    // Meanwhile, on the replica: revoke half the keys the rekey is rewrapping, and renew the CA.
    const revoked = Array.from({ length: KEYS / 2 }, (_, i) => `k-${i * 2}`);
    for (const name of revoked) await api(KdcService).revokeSigningKey({ tenantId: "acme", name, reason: "rekey race" });
    const renewed = await api(KdcService).renewVersion({ tenantId: "acme", version: 1, signer: Signer.KMI_ROOT, validityDays: 30 });
    const out = JSON.parse((await rekey).stdout) as { old_key_id: string; new_key_id: string; passes: number };
    expect(out.old_key_id).toBe(oldId);

    const after = await openEverything();
    expect(Object.keys(after.byKey)).toEqual([out.new_key_id]);
    const keys = (await api(KdcService).listSigningKeys({ tenantId: "acme" })).keys;
    expect(keys.filter((k) => k.revoked).map((k) => k.name).sort()).toEqual([...revoked].sort());
    // The replica, started before the rotation, still opens and seals: a rotation after it.
    const rotated = await api(KdcService).createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, validityDays: 30, activate: true });
    expect(rotated.version!.version).toBe(renewed.version!.version + 1);
    const verified = await api(KdcAdminService).verifyAuditLog({});
    expect(verified.ok, verified.problem).toBe(true);
    const fresh = await startKdc(data.dataDir, flags(cluster.endpoints[2]!));
    try {
      const api2 = clients(fresh.url, await readFile(data.caFile, "utf8"), { token: data.token });
      expect((await api2(KdcAdminService).verifyAuditLog({})).ok).toBe(true);
      await api2(KdcService).renewVersion({ tenantId: "acme", version: rotated.version!.version, signer: Signer.KMI_ROOT, validityDays: 30 });
    } finally {
      await fresh.stop();
    }
    const final = await openEverything();
    expect(Object.keys(final.byKey)).toEqual([out.new_key_id]);
    expect(await etcdHolds(final.intermediates)).toBe(false);
  }, 180_000);
});
