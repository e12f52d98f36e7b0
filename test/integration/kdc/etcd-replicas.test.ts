/**
 * The KDC on a real 3-member etcd cluster (TLS, client certificates): `initKdc` and two opened
 * KDCs ("replicas": two etcd clients, two audit logs, no shared lock) on one prefix. Concurrent
 * rotations of one tenant on both leave exactly one active version, contiguous versions and
 * one linear audit chain; etcdctl reads no private key or token in plaintext. Then the same
 * race between two real `kmi kdc --store etcd` processes.
 */
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createClient, createRouterTransport, type Interceptor } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { toConnectError } from "../../../src/common/error-mapping.js";
import { createNopLogger } from "../../../src/common/logger.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { DistributionService, WatchEventType, type WatchSecretsResponse } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { KeyAlgorithm } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { kPeer } from "../../../src/common/rpc.js";
import { peerIdentityFromDer, type PeerIdentity } from "../../../src/common/tls.js";
import { FileAttestationKey } from "../../../src/kdc/attestation-key.js";
import { KdcOperations } from "../../../src/kdc/operations.js";
import { Machine, makeTokenKey, signToken, type TokenKey } from "../../fixtures/kdc/machines.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { credentialAad, intermediateKeyAad } from "../../../src/kdc/kdc-store.js";
import { routes } from "../../../src/kdc/routes.js";
import { parseToken } from "../../../src/kdc/tokens.js";
import type { StoreBackend } from "../../../src/storage/backend.js";
import { openEtcdStore } from "../../../src/storage/etcd-store.js";
import { LeasedWatchPresence } from "../../../src/kdc/watch-presence.js";
import { startEtcdCluster, type EtcdCluster } from "../../fixtures/storage/etcd-cluster.js";
import { clients, initDataDir, startKdc, type KdcProcess } from "./harness.js";

let cluster: EtcdCluster;
let dir: string;
let operatorToken: string;
let tokenKey: TokenKey;
const replicas: OpenedKdc[] = [];

/** Names the mutual-TLS peer of a call (the router transport has no TLS). */
const peers = new Map<string, PeerIdentity>();
const injectPeer: Interceptor = (next) => async (req) => {
  const id = req.header.get("x-test-peer");
  if (id !== null) req.contextValues.set(kPeer, peers.get(id));
  return next(req);
};

/** Watches WatchSecrets on `kdc` as machine `m`, keeping every event. */
function watchAs(kdc: OpenedKdc, m: Machine) {
  const abort = new AbortController();
  const events: WatchSecretsResponse[] = [];
  const id = String(peers.size);
  peers.set(id, peerIdentityFromDer(m.certDer, true));
  const t = createRouterTransport(routes(kdc.ctx), { router: { interceptors: [injectPeer] } });
  const done = (async () => {
    try {
      for await (const ev of createClient(DistributionService, t).watchSecrets({ attestationToken: signToken(tokenKey, { machineId: m.machineId, cert: m.certDer }) }, { headers: { "x-test-peer": id }, signal: abort.signal })) events.push(ev);
    } catch {
      // ended by the abort
    }
  })();
  return {
    events,
    async next(type: WatchEventType, from: number): Promise<WatchSecretsResponse> {
      const end = Date.now() + 20_000;
      for (;;) {
        const ev = events.slice(from).find((e) => e.type === type);
        if (ev !== undefined) return ev;
        if (Date.now() > end) throw new Error(`no ${WatchEventType[type]} after event ${from}; got ${events.map((e) => WatchEventType[e.type]).join(",")}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    async close() {
      abort.abort();
      await done;
    },
  };
}

/** Reports what machine `m` holds (nothing) to `kdc`: its rollout record, which GetRolloutStatus lists. */
async function reportAs(kdc: OpenedKdc, m: Machine): Promise<void> {
  const id = String(peers.size);
  peers.set(id, peerIdentityFromDer(m.certDer, true));
  const t = createRouterTransport(routes(kdc.ctx), { router: { interceptors: [injectPeer] } });
  await createClient(DistributionService, t).reportHeldVersions({ attestationToken: signToken(tokenKey, { machineId: m.machineId, cert: m.certDer }), held: [] }, { headers: { "x-test-peer": id } });
}

/** `connected` of machine `id` in `kdc`'s GetRolloutStatus of `tenant`, once it equals `want` (or the last answer after 15 s). */
async function connectedOn(kdc: OpenedKdc, tenant: string, id: string, want: boolean): Promise<boolean | undefined> {
  const end = Date.now() + 15_000;
  for (;;) {
    const m = (await client(kdc).ca.getRolloutStatus({ tenantId: tenant })).machines.find((x) => x.machineId === id);
    if (m?.connected === want || Date.now() > end) return m?.connected;
    await new Promise((r) => setTimeout(r, 50));
  }
}

function client(kdc: OpenedKdc) {
  const logger = createNopLogger();
  const mapErrors: Interceptor = (next) => async (req) => {
    try {
      return await next(req);
    } catch (err) {
      throw toConnectError(err, logger);
    }
  };
  const auth: Interceptor = (next) => async (req) => {
    req.header.set("authorization", `Bearer ${operatorToken}`);
    return next(req);
  };
  const t = createRouterTransport(routes(kdc.ctx), { router: { interceptors: [mapErrors] }, transport: { interceptors: [auth] } });
  return { ca: createClient(KdcService, t), admin: createClient(KdcAdminService, t) };
}

beforeAll(async () => {
  cluster = await startEtcdCluster(3);
  dir = await mkdtemp(join(tmpdir(), "kmi-kdc-etcd-"));
  const backend = (endpoint: string): StoreBackend => ({ kind: "etcd", endpoints: [endpoint], caFile: cluster.files.ca, certFile: cluster.files.cert, keyFile: cluster.files.key, prefix: "kmi/kdc" });
  const r = await initKdc({ dataDir: dir, tls: { dnsNames: [], ipAddresses: [] }, store: backend(cluster.endpoints[0]!) });
  operatorToken = r.operatorToken;
  tokenKey = makeTokenKey();
  await writeFile(join(dir, "attestation-key.pem"), tokenKey.publicPem);
  // Two replicas, each on its own member, sharing the data dir's master key.
  for (const endpoint of [cluster.endpoints[1]!, cluster.endpoints[2]!]) {
    replicas.push(await openKdc({ dataDir: dir, logger: createNopLogger(), store: backend(endpoint), attestationKey: await FileAttestationKey.load(join(dir, "attestation-key.pem")) }));
  }
});

afterAll(async () => {
  for (const k of replicas) {
    await k.follower?.stop();
    k.hub.closeAll();
    await k.store.close();
  }
  await cluster?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe("KDC replicas on etcd", () => {
  it("refuses a second init of the same prefix", async () => {
    const again = await mkdtemp(join(tmpdir(), "kmi-kdc-etcd-again-"));
    try {
      await expect(
        initKdc({ dataDir: again, tls: { dnsNames: [], ipAddresses: [] }, store: { kind: "etcd", endpoints: cluster.endpoints, caFile: cluster.files.ca, certFile: cluster.files.cert, keyFile: cluster.files.key, prefix: "kmi/kdc" } }),
      ).rejects.toThrow(/prefix kmi\/kdc holds an initialized KDC already/);
    } finally {
      await rm(again, { recursive: true, force: true });
    }
  });

  it("concurrent rotations of one tenant on two replicas: exactly one active version, contiguous versions, one linear audit chain", async () => {
    const [a, b] = replicas.map(client) as [ReturnType<typeof client>, ReturnType<typeof client>];
    await a.admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
    const rotate = (c: typeof a) => c.ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, validityDays: 30, activate: true });
    const made = await Promise.all([rotate(a), rotate(b), rotate(a), rotate(b), rotate(a), rotate(b)]);
    expect(made.map((m) => m.version!.version).sort((x, y) => x - y)).toEqual([2, 3, 4, 5, 6, 7]);
    for (const c of [a, b]) {
      const versions = (await c.ca.listVersions({ tenantId: "acme" })).versions;
      expect(versions.map((v) => v.version).sort((x, y) => x - y)).toEqual([1, 2, 3, 4, 5, 6, 7]);
      expect(versions.filter((v) => v.state === VersionState.ACTIVE)).toHaveLength(1);
    }
    const tenant = await replicas[1]!.ctx.store.getTenant("acme");
    const active = (await b.ca.listVersions({ tenantId: "acme" })).versions.find((v) => v.state === VersionState.ACTIVE)!;
    expect(tenant?.activeVersion).toBe(active.version);
    const verified = await replicas[0]!.ctx.audit.verify();
    expect(verified).toMatchObject({ ok: true });
    const entries = await replicas[0]!.ctx.audit.tail({ last: true, limit: 50 });
    expect(entries.filter((e) => e.action === "ca.version.create" && e.target.startsWith("tenant/acme/"))).toHaveLength(6);
  });

  it("holds every private key sealed: etcdctl reads no key and no operator token in plaintext", async () => {
    const kdc = replicas[0]!;
    const dump = await cluster.etcdctl(["get", "--prefix", "kmi/kdc/", "-w", "json"]);
    expect(dump.code, dump.stderr).toBe(0);
    const kvs = (JSON.parse(dump.stdout) as { kvs: Array<{ key: string; value: string }> }).kvs;
    const keys = kvs.map((kv) => Buffer.from(kv.key, "base64").toString());
    expect(keys).toContain("kmi/kdc/credentials/kmi-root");
    expect(keys.some((k) => k.startsWith("kmi/kdc/versions/acme/"))).toBe(true);
    const all = Buffer.concat(kvs.map((kv) => Buffer.from(kv.value, "base64")));
    const secrets: Uint8Array[] = [];
    for (const name of ["kmi-root", "infra-ca", "kdc-tls"]) {
      const c = await kdc.ctx.store.getCredential(name);
      secrets.push(kdc.ctx.sealer.open(c!.privateKey!, credentialAad(name)));
    }
    for (const v of await kdc.ctx.store.listVersions("acme")) secrets.push(kdc.ctx.sealer.open(v.privateKey!, intermediateKeyAad("acme", v.keyId)));
    expect(secrets).toHaveLength(10);
    for (const pkcs8 of secrets) {
      expect(all.includes(Buffer.from(pkcs8))).toBe(false);
      // The 32-byte private scalar of a P-256 PKCS#8 (after the OCTET STRING header 04 20 at bytes 34-35).
      expect([pkcs8[34], pkcs8[35]]).toEqual([0x04, 0x20]);
      expect(all.includes(Buffer.from(pkcs8.subarray(36, 68)))).toBe(false);
    }
    expect(all.includes(Buffer.from("PRIVATE KEY"))).toBe(false);
    expect(all.includes(Buffer.from(parseToken(operatorToken)!.secret))).toBe(false);
  });
});

describe("watches from the change feed", () => {
  it("a rotation, a new signing key and its revocation on replica A reach a machine watching replica B", async () => {
    const [a] = replicas as [OpenedKdc, OpenedKdc];
    const b = replicas[1]!;
    const ca = client(a);
    await ca.admin.createTenant({ tenantId: "feed", bootstrapKmiSigned: true });
    const m = new Machine("m-feed000000000001");
    m.certPem = a.ctx.pki.certificatePem((await new KdcOperations(a.ctx).issueMachineCertificate("system", { csrPem: m.csrPem(), machineId: m.machineId, group: "edge", ttlSeconds: 3600 })).certificateDer);
    const w = watchAs(b, m);
    const onA = watchAs(a, m);
    try {
      await w.next(WatchEventType.SNAPSHOT, 0);
      await onA.next(WatchEventType.SNAPSHOT, 0);
      const from = w.events.length;
      const fromA = onA.events.length;
      const v = (await ca.ca.createVersion({ tenantId: "feed", signer: Signer.KMI_ROOT, validityDays: 30, activate: true })).version!;
      const activated = await w.next(WatchEventType.ACTIVATED, from);
      expect(activated.tenantId).toBe("feed");
      expect(activated.secrets.map((x) => x.keyId)).toContain(v.keyId);
      const key = await new KdcOperations(a.ctx).createSigningKey("test", { tenantId: "feed", name: "jwt", keyAlgorithm: KeyAlgorithm.ECDSA_P256 });
      expect((await w.next(WatchEventType.KEY_ADDED, from)).secrets.map((x) => x.keyId)).toEqual([key.keyId]);
      await new KdcOperations(a.ctx).revokeSigningKey("test", { tenantId: "feed", name: "jwt", reason: "rotated out" });
      expect(await w.next(WatchEventType.REVOKED, from)).toMatchObject({ tenantId: "feed", keyId: key.keyId, reason: "rotated out" });
      // Announced once on each replica: B through its follower, A by the operation (its follower skips its own commits).
      await onA.next(WatchEventType.REVOKED, fromA);
      await new Promise((r) => setTimeout(r, 300));
      for (const [events, start] of [[w.events, from], [onA.events, fromA]] as const) {
        expect(events.slice(start).filter((e) => e.type !== WatchEventType.HEARTBEAT).map((e) => WatchEventType[e.type])).toEqual(["ACTIVATED", "KEY_ADDED", "REVOKED"]);
      }
    } finally {
      await w.close();
      await onA.close();
    }
  });
});

describe("connected, whichever replica answers", () => {
  it("a machine watching replica B is connected in replica A's rollout status, and is not once its stream ends", async () => {
    const [a, b] = replicas as [OpenedKdc, OpenedKdc];
    await client(a).admin.createTenant({ tenantId: "presence", bootstrapKmiSigned: true });
    const m = new Machine("m-presence00000001");
    m.certPem = a.ctx.pki.certificatePem((await new KdcOperations(a.ctx).issueMachineCertificate("system", { csrPem: m.csrPem(), machineId: m.machineId, group: "edge", ttlSeconds: 3600 })).certificateDer);
    await reportAs(b, m);
    expect(await connectedOn(a, "presence", m.machineId, false)).toBe(false);
    const w = watchAs(b, m);
    try {
      await w.next(WatchEventType.SNAPSHOT, 0);
      // B holds the stream; A knows of it from B's presence record, B from its own stream.
      expect(await connectedOn(b, "presence", m.machineId, true)).toBe(true);
      expect(await connectedOn(a, "presence", m.machineId, true)).toBe(true);
      expect((await client(a).ca.getRolloutStatus({ tenantId: "presence" })).connectedCount).toBe(1);
    } finally {
      await w.close();
    }
    expect(await connectedOn(a, "presence", m.machineId, false)).toBe(false);
    expect(await connectedOn(b, "presence", m.machineId, false)).toBe(false);
  });
});

describe("a replica killed with a stream open", () => {
  it("loses its presence records when its lease expires: the machine stops counting as connected", async () => {
    const prefix = "presence-crash";
    const machineId = "m-crashed00000001";
    const holder = spawn(process.execPath, ["--import", "tsx", "test/fixtures/kdc/presence-holder.ts", JSON.stringify({ endpoints: cluster.endpoints, caFile: cluster.files.ca, certFile: cluster.files.cert, keyFile: cluster.files.key, prefix, machineId, ttlSeconds: 2 })], {
      cwd: resolve(import.meta.dirname, "../../.."),
      stdio: ["ignore", "pipe", "pipe"],
    });
    const reader = await openEtcdStore({ endpoints: cluster.endpoints, ca: cluster.ca, cert: cluster.cert, key: cluster.key, prefix, owner: "test", create: true });
    const presence = new LeasedWatchPresence(reader, createNopLogger(), () => new Date());
    try {
      let err = "";
      holder.stderr.on("data", (b: Buffer) => (err += b.toString()));
      await new Promise<void>((ready, fail) => {
        const timer = setTimeout(() => fail(new Error(`the holder did not start in 30 s: ${err}`)), 30_000);
        holder.stdout.on("data", (b: Buffer) => b.toString().includes("ready") && (clearTimeout(timer), ready()));
        holder.once("exit", (code) => fail(new Error(`the holder exited (${code}): ${err}`)));
      });
      expect((await presence.elsewhere()).has(machineId)).toBe(true);
      holder.kill("SIGKILL");
      const killedAt = Date.now();
      while ((await presence.elsewhere()).has(machineId) && Date.now() - killedAt < 20_000) await new Promise((r) => setTimeout(r, 100));
      expect((await presence.elsewhere()).has(machineId)).toBe(false);
    } finally {
      holder.kill("SIGKILL");
      await presence.close();
      await reader.close();
    }
  }, 60_000);
});

describe("quarantine feed on two replicas", () => {
  it("records a quarantine and its release once, whichever replica hears of it first", async () => {
    const [a, b] = replicas as [OpenedKdc, OpenedKdc];
    const time = new Date();
    const q = { machineId: "m-q000000000000001", quarantined: true, reason: "stolen", time };
    await Promise.all([a.quarantine.apply(q, "service:audit"), b.quarantine.apply(q, "service:audit")]);
    expect([a.quarantine.reasonFor(q.machineId), b.quarantine.reasonFor(q.machineId)]).toEqual(["stolen", "stolen"]);
    await Promise.all([a.quarantine.apply({ ...q, quarantined: false, reason: "found" }, "service:audit"), b.quarantine.apply({ ...q, quarantined: false, reason: "found" }, "service:audit")]);
    expect([a.quarantine.reasonFor(q.machineId), b.quarantine.reasonFor(q.machineId)]).toEqual([undefined, undefined]);
    const entries = (await a.ctx.audit.tail({ last: true, limit: 100 })).filter((e) => e.target === `machine/${q.machineId}`);
    expect(entries.map((e) => e.action)).toEqual(["machine.quarantine", "machine.release"]);
    expect(await a.ctx.audit.verify()).toMatchObject({ ok: true });
  });
});

describe("two real KDC processes on one etcd", () => {
  it("concurrent rotations of one tenant on both: exactly one active version, contiguous versions, one linear audit chain", async () => {
    const flags = (endpoint: string) => ["--store", "etcd", "--etcd-endpoints", endpoint, "--etcd-ca", cluster.files.ca, "--etcd-cert", cluster.files.cert, "--etcd-key", cluster.files.key, "--etcd-prefix", "proc/kdc"];
    const data = await initDataDir(flags(cluster.endpoints.join(",")));
    const kdcs: KdcProcess[] = [];
    try {
      kdcs.push(await startKdc(data.dataDir, flags(cluster.endpoints[0]!)), await startKdc(data.dataDir, flags(cluster.endpoints[1]!)));
      const caPem = await readFile(data.caFile, "utf8");
      const [a, b] = kdcs.map((k) => clients(k.url, caPem, { token: data.token }));
      await a!(KdcAdminService).createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
      const rotate = (c: typeof a) => c!(KdcService).createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, validityDays: 30, activate: true });
      const made = await Promise.all([rotate(a), rotate(b), rotate(a), rotate(b), rotate(a), rotate(b), rotate(a), rotate(b)]);
      expect(made.map((m) => m.version!.version).sort((x, y) => x - y)).toEqual([2, 3, 4, 5, 6, 7, 8, 9]);
      for (const c of [a!, b!]) {
        const versions = (await c(KdcService).listVersions({ tenantId: "acme" })).versions;
        expect(versions.map((v) => v.version).sort((x, y) => x - y)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
        expect(versions.filter((v) => v.state === VersionState.ACTIVE)).toHaveLength(1);
        expect(versions.filter((v) => v.state === VersionState.RETIRED)).toHaveLength(8);
      }
      const verified = await b!(KdcAdminService).verifyAuditLog({});
      expect(verified.ok, verified.problem).toBe(true);
      const tail = await a!(KdcAdminService).tailAuditLog({ limit: 100 });
      expect(tail.entries.filter((e) => e.action === "ca.version.create").map((e) => e.target).sort()).toEqual([2, 3, 4, 5, 6, 7, 8, 9].map((v) => `tenant/acme/version/${v}`));
    } finally {
      for (const k of kdcs) await k.stop("SIGKILL");
      await rm(data.dir, { recursive: true, force: true });
    }
  });
});
