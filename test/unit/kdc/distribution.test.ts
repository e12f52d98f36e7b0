/**
 * DistributionService in-process (createRouterTransport over routes(ctx), the mutual-TLS peer
 * injected as kPeer) on a real LevelDB: authentication refusals, what FetchSecrets releases
 * and its lease, the watch stream's events (SNAPSHOT, ACTIVATED, REVOKED, KEY_ADDED,
 * QUARANTINED, HEARTBEAT, end at token expiry), the tenant filter of `ten`, quarantine
 * persistence, the slow-consumer bound, rollout reports, and fail-closed release (no audit
 * entry, no key). The same over a real process and
 * mutual TLS is in test/integration/distribution/.
 */
import { createPublicKey, generateKeyPairSync, X509Certificate } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { timestampFromDate, timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport, type Interceptor } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { toConnectError } from "../../../src/common/error-mapping.js";
import { createNopLogger } from "../../../src/common/logger.js";
import { kPeer } from "../../../src/common/rpc.js";
import { peerIdentityFromDer, type PeerIdentity } from "../../../src/common/tls.js";
import { KeyPurpose } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { DistributionService, WatchEventType, type WatchSecretsResponse } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { KdcService, Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { FileAttestationKey, NoAttestationKey } from "../../../src/kdc/attestation-key.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { KdcOperations } from "../../../src/kdc/operations.js";
import { SecretRelease } from "../../../src/kdc/release.js";
import { DEFAULT_MAX_OPENING } from "../../../src/kdc/watch-hub.js";
import { routes } from "../../../src/kdc/routes.js";
import { RotationScheduler } from "../../../src/kdc/scheduler.js";
import { Election } from "../../../src/storage/election.js";
import { decodeAttestationTokenUnverified } from "../../../src/attest/index.js";
import type { AuditEntryInput } from "../../../src/storage/audit-log.js";
import { formatWrapAad, keyIdOf, unwrapKey } from "../../../src/keywrap/index.js";
import { Machine, makeTokenKey, signToken, type TokenKey } from "../../fixtures/kdc/machines.js";

const LEASE_MS = 3_600_000;
let dir: string;
let kdc: OpenedKdc;
let operatorToken: string;
let tokenKey: TokenKey;
let ops: KdcOperations;
const machines: Record<string, Machine> = {};

/** Domain errors to wire codes, for unary calls and inside streams (as the real server maps them). */
const mapErrors: Interceptor = (next) => async (req) => {
  const map = (err: unknown) => toConnectError(err, createNopLogger());
  try {
    const res = await next(req);
    if (!res.stream) return res;
    const source = res.message;
    return {
      ...res,
      message: (async function* () {
        try {
          yield* source;
        } catch (err) {
          throw map(err);
        }
      })(),
    } as typeof res;
  } catch (err) {
    throw map(err);
  }
};

/** Peers by test header: the router transport has no TLS, so the test names the peer the server sees. */
const peers = new Map<string, PeerIdentity | undefined>();
const injectPeer: Interceptor = (next) => async (req) => {
  const id = req.header.get("x-test-peer");
  if (id !== null) req.contextValues.set(kPeer, peers.get(id));
  return next(req);
};

function transport(k: OpenedKdc = kdc, token?: string) {
  const auth: Interceptor = (next) => async (req) => {
    if (token !== undefined) req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  return createRouterTransport(routes(k.ctx), { router: { interceptors: [mapErrors, injectPeer] }, transport: { interceptors: [auth] } });
}

const dist = (k: OpenedKdc = kdc) => createClient(DistributionService, transport(k));
const admin = () => {
  const t = transport(kdc, operatorToken);
  return { ca: createClient(KdcService, t), admin: createClient(KdcAdminService, t) };
};

function peerOf(m: Machine): PeerIdentity {
  return peerIdentityFromDer(m.certDer, true);
}

function as(peer: PeerIdentity | undefined, signal?: AbortSignal) {
  const id = String(peers.size);
  peers.set(id, peer);
  return { headers: { "x-test-peer": id }, ...(signal ? { signal } : {}) };
}

function token(m: Machine, extra: Partial<Parameters<typeof signToken>[1]> = {}): string {
  return signToken(tokenKey, { machineId: m.machineId, cert: m.certDer, ...extra });
}

async function failure(p: Promise<unknown>): Promise<string> {
  const e = await p.then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(ConnectError);
  return `${Code[(e as ConnectError).code]}: ${(e as ConnectError).rawMessage}`;
}

async function issue(machineId: string): Promise<Machine> {
  const m = new Machine(machineId);
  const r = await ops.issueMachineCertificate("system", { csrPem: m.csrPem(), machineId, group: "edge", ttlSeconds: 3600 });
  m.certPem = kdc.ctx.pki.certificatePem(r.certificateDer);
  machines[machineId] = m;
  return m;
}

/** Reads a stream in the background, keeping every event. */
function watch(m: Machine, tok = token(m), k: OpenedKdc = kdc, resumeFromRevision = 0n) {
  const abort = new AbortController();
  const events: WatchSecretsResponse[] = [];
  let error: unknown;
  let ended = false;
  const done = (async () => {
    try {
      for await (const ev of dist(k).watchSecrets({ attestationToken: tok, resumeFromRevision }, as(peerOf(m), abort.signal))) events.push(ev);
    } catch (err) {
      error = err;
    } finally {
      ended = true;
    }
  })();
  return {
    events,
    done,
    get error() {
      return error;
    },
    get ended() {
      return ended;
    },
    close: () => abort.abort(),
    /** Waits for an event of `type` after the first `from` events. */
    async next(type: WatchEventType, from = 0, timeoutMs = 3000): Promise<WatchSecretsResponse> {
      const t0 = Date.now();
      for (;;) {
        const ev = events.slice(from).find((e) => e.type === type);
        if (ev !== undefined) return ev;
        if (ended || Date.now() - t0 > timeoutMs) throw new Error(`no ${WatchEventType[type]} (ended=${ended}, error=${String(error)}, got ${events.map((e) => WatchEventType[e.type]).join(",")})`);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
  };
}

async function until(cond: () => boolean | Promise<boolean>, timeoutMs = 3000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 10));
  }
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-kdc-dist-"));
  const r = await initKdc({ dataDir: join(dir, "data"), tls: { dnsNames: [], ipAddresses: [] } });
  operatorToken = r.operatorToken;
  tokenKey = makeTokenKey();
  await writeFile(join(dir, "attestation-key.pem"), tokenKey.publicPem);
  kdc = await openKdc({
    dataDir: join(dir, "data"),
    logger: createNopLogger(),
    attestationKey: await FileAttestationKey.load(join(dir, "attestation-key.pem")),
    leaseMs: LEASE_MS,
    watch: { heartbeatMs: 150, maxQueue: 4 },
  });
  ops = new KdcOperations(kdc.ctx);
  await admin().admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  await admin().admin.createTenant({ tenantId: "other", bootstrapKmiSigned: true });
  for (const id of ["m-aaaa000000000001", "m-bbbb000000000002", "m-cccc000000000003", "m-dddd000000000004"]) await issue(id);
});

afterAll(async () => {
  await kdc?.store.close();
  await rm(dir, { recursive: true, force: true });
});

const A = () => machines["m-aaaa000000000001"]!;
const B = () => machines["m-bbbb000000000002"]!;

describe("authentication", () => {
  const untrusted = () => peerIdentityFromDer(A().certDer, false, "unable to get local issuer certificate");
  it.each([
    ["no client certificate", () => undefined, () => token(A()), /^Unauthenticated: client certificate required/],
    ["an untrusted certificate", untrusted, () => token(A()), /^Unauthenticated: client certificate not trusted \(unable to get local issuer certificate\)/],
    ["no token", () => peerOf(A()), () => "", /^Unauthenticated: attestation_token: required; attest with the Auditserver/],
    ["garbage token", () => peerOf(A()), () => "not-a-token", /^Unauthenticated: attestation token: malformed/],
    ["an expired token", () => peerOf(A()), () => token(A(), { ttlMs: -1000 }), /^Unauthenticated: attestation token: expired at/],
    ["a token signed by another key", () => peerOf(A()), () => signToken(makeTokenKey(), { machineId: A().machineId, cert: A().certDer }), /^Unauthenticated: attestation token: signed by key .*, not the Auditserver's key/],
    ["machine A's token on machine B's connection", () => peerOf(B()), () => token(A()), /^Unauthenticated: attestation token: issued to machine m-aaaa000000000001, not to m-bbbb000000000002/],
    ["a token bound to another certificate", () => peerOf(A()), () => signToken(tokenKey, { machineId: A().machineId, cert: B().certDer }), /^Unauthenticated: attestation token: bound to another certificate/],
  ])("%s is refused on every RPC", async (_name, peer, tok, want) => {
    const c = dist();
    expect(await failure(c.fetchSecrets({ attestationToken: tok() }, as(peer())))).toMatch(want);
    expect(await failure(c.reportHeldVersions({ attestationToken: tok() }, as(peer())))).toMatch(want);
    expect(await failure((async () => { for await (const _ of c.watchSecrets({ attestationToken: tok() }, as(peer()))) void _; })())).toMatch(want);
  });

  it("a service certificate is PERMISSION_DENIED", async () => {
    const svc = generateKeyPairSync("ec", { namedCurve: "P-256" });
    const infra = await ops.issuer("infra-ca");
    const der = kdc.ctx.pki.issueServiceCertificate({ issuer: infra, serviceName: "audit", spki: new Uint8Array(createPublicKey(svc.privateKey).export({ format: "der", type: "spki" })), dnsNames: ["localhost"], ipAddresses: [], now: new Date(), validitySeconds: 3600 });
    expect(await failure(dist().fetchSecrets({ attestationToken: token(A()) }, as(peerIdentityFromDer(der, true))))).toMatch(/^PermissionDenied: this call is for attested machines only/);
  });

  it("refusals are audited with the token only as a keyed hash", async () => {
    const secret = token(A(), { ttlMs: -1000 });
    await failure(dist().fetchSecrets({ attestationToken: secret }, as(peerOf(A()))));
    const entries = await kdc.ctx.audit.tail({ limit: 5, last: true });
    const e = entries.at(-1)!;
    expect(e).toMatchObject({ actor: "machine:m-aaaa000000000001", action: "secret.release", target: "machine/m-aaaa000000000001", outcome: "refused: unauthenticated" });
    expect(e.details["attestation_token"]).toMatch(/^hmac:[0-9a-f]{32,64}$/);
    expect(e.details["error"]).toMatch(/expired/);
    expect(JSON.stringify(entries, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))).not.toContain(secret.split(".")[2]);
  });

  it("without an attestation key every call is UNAVAILABLE, saying how to configure one", async () => {
    const other = { ...kdc, ctx: { ...kdc.ctx, attestationKey: new NoAttestationKey() } };
    expect(await failure(dist(other).fetchSecrets({ attestationToken: token(A()) }, as(peerOf(A()))))).toMatch(
      /^Unavailable: attestation key not configured; start the KDC with --audit-url .* or --attestation-key-file/,
    );
  });
});

describe("FetchSecrets", () => {
  it("releases each tenant's active intermediate and signing keys, wrapped to this machine, with a lease", async () => {
    await admin().ca.createSigningKey({ tenantId: "acme", name: "code-sign" });
    const t0 = Date.now();
    const res = await dist().fetchSecrets({ attestationToken: token(A()) }, as(peerOf(A())));
    const acme = await admin().admin.getTenant({ tenantId: "acme" });
    const root = (await admin().admin.getTrustBundle({})).kmiRootPem;
    const byKind = res.secrets.map((s) => `${s.tenantId}/${s.purpose === KeyPurpose.INTERMEDIATE_CA ? `v${s.version}` : s.name}`).sort();
    expect(byKind).toEqual([`acme/code-sign`, `acme/v${acme.tenant!.activeVersion}`, "other/v1"]);
    for (const s of res.secrets) {
      const key = unwrapKey(s.wrappedKey!, A().key, { expectedAad: formatWrapAad({ machineId: A().machineId, tenantId: s.tenantId, keyId: s.keyId, version: s.version }) });
      expect(keyIdOf(key)).toBe(s.keyId);
      const lease = timestampMs(s.leaseExpiresAt!);
      expect(lease).toBeGreaterThanOrEqual(t0 + LEASE_MS - 2000);
      expect(lease).toBeLessThanOrEqual(Date.now() + LEASE_MS);
      if (s.purpose === KeyPurpose.INTERMEDIATE_CA) {
        const certs = s.chainPem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)!;
        expect(certs).toHaveLength(1); // the intermediate; the KMI root is not sent
        expect(keyIdOf(new X509Certificate(certs[0]!).publicKey)).toBe(s.keyId);
        expect(new X509Certificate(certs[0]!).verify(new X509Certificate(root).publicKey)).toBe(true);
      }
    }
    // Machine B's key does not open A's release.
    expect(() => unwrapKey(res.secrets[0]!.wrappedKey!, B().key)).toThrow(/does not open with this machine's key/);
    const e = (await kdc.ctx.audit.tail({ limit: 1, last: true }))[0]!;
    expect(e).toMatchObject({ actor: "machine:m-aaaa000000000001", action: "secret.release", outcome: "ok" });
    expect(e.details["keys"]!.split(",")).toHaveLength(3);
  });

  it("releases only the tenants the token names", async () => {
    const res = await dist().fetchSecrets({ attestationToken: token(A(), { tenants: ["other", "nope"] }) }, as(peerOf(A())));
    expect(res.secrets.map((s) => s.tenantId)).toEqual(["other"]);
  });

  it('releases every tenant to a token with ten ["*"] (a group with all_tenants)', async () => {
    const tok = token(A(), { tenants: "all" });
    expect(decodeAttestationTokenUnverified(tok)?.claims["ten"]).toEqual(["*"]);
    const res = await dist().fetchSecrets({ attestationToken: tok }, as(peerOf(A())));
    const all = (await admin().admin.listTenants({})).tenants.map((t) => t.tenantId).sort();
    expect(all).toEqual(["acme", "other"]);
    expect([...new Set(res.secrets.map((s) => s.tenantId))].sort()).toEqual(all);
  });

  it("releases nothing to a token with ten [] (a group without tenants), and audits the empty release", async () => {
    const tok = token(A(), { tenants: [] });
    expect(decodeAttestationTokenUnverified(tok)?.claims["ten"]).toEqual([]);
    const res = await dist().fetchSecrets({ attestationToken: tok }, as(peerOf(A())));
    expect(res.secrets).toEqual([]);
    const e = (await kdc.ctx.audit.tail({ limit: 1, last: true }))[0]!;
    expect(e).toMatchObject({ actor: "machine:m-aaaa000000000001", action: "secret.release", outcome: "ok", details: expect.objectContaining({ count: "0" }) });
  });
});

describe("SecretRelease: the ten claim", () => {
  it.each<[string, string[], string[]]>([
    ['["*"]: every tenant', ["*"], ["acme", "other"]],
    ["[]: no tenant", [], []],
    ["named tenants that exist", ["other", "nope"], ["other"]],
  ])("servedTenants of %s", async (_name, ten, want) => {
    expect((await new SecretRelease(kdc.ctx).servedTenants(ten)).sort()).toEqual(want);
  });

  it.each<[string, string[], string, boolean]>([
    ['["*"] serves acme', ["*"], "acme", true],
    ["[] serves no acme", [], "acme", false],
    ['["acme"] serves acme', ["acme"], "acme", true],
    ['["other"] serves no acme', ["other"], "acme", false],
  ])("serves: %s", (_name, ten, tenant, want) => {
    expect(SecretRelease.serves(ten, tenant)).toBe(want);
  });
});

describe("WatchSecrets", () => {
  it("SNAPSHOT first, then ACTIVATED (the tenant's whole set), REVOKED, KEY_ADDED and heartbeats", async () => {
    const w = watch(A());
    const snap = await w.next(WatchEventType.SNAPSHOT);
    expect(w.events[0]!.type).toBe(WatchEventType.SNAPSHOT);
    expect(snap.secrets.length).toBeGreaterThanOrEqual(3);
    expect(kdc.ctx.watches.isConnected(A().machineId)).toBe(true);

    const old = (await admin().admin.getTenant({ tenantId: "acme" })).tenant!.activeVersion;
    const v = (await admin().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, activate: true })).version!;
    const act = await w.next(WatchEventType.ACTIVATED);
    expect(act.tenantId).toBe("acme");
    expect(act.secrets.map((s) => (s.purpose === KeyPurpose.INTERMEDIATE_CA ? `v${s.version}` : s.name)).sort()).toEqual(["code-sign", `v${v.version}`]);

    const n = w.events.length;
    const oldKey = (await admin().ca.listVersions({ tenantId: "acme" })).versions.find((x) => x.version === old)!.keyId;
    await admin().ca.revokeVersion({ tenantId: "acme", version: old, reason: "key compromised" });
    const rev = await w.next(WatchEventType.REVOKED, n);
    expect(rev).toMatchObject({ tenantId: "acme", keyId: oldKey, reason: "key compromised" });

    const k = (await admin().ca.createSigningKey({ tenantId: "acme", name: "second" })).key!;
    const added = await w.next(WatchEventType.KEY_ADDED, n);
    expect(added.secrets.map((s) => s.keyId)).toEqual([k.keyId]);
    await admin().ca.revokeSigningKey({ tenantId: "acme", name: "second", reason: "done" });
    await until(() => w.events.some((e) => e.type === WatchEventType.REVOKED && e.keyId === k.keyId));

    await w.next(WatchEventType.HEARTBEAT, n);
    w.close();
    await w.done;
    await until(() => !kdc.ctx.watches.isConnected(A().machineId));
  });

  it("a renewal's revoked predecessor does not revoke the key the active version still uses", async () => {
    const v = (await admin().ca.createVersion({ tenantId: "other", signer: Signer.KMI_ROOT })).version!;
    const r = (await admin().ca.renewVersion({ tenantId: "other", version: v.version, signer: Signer.KMI_ROOT, activate: true })).version!;
    const w = watch(A());
    await w.next(WatchEventType.SNAPSHOT);
    await admin().ca.revokeVersion({ tenantId: "other", version: v.version, reason: "old certificate" });
    await admin().ca.revokeVersion({ tenantId: "other", version: 1, reason: "old key" });
    const rev = await w.next(WatchEventType.REVOKED);
    expect(rev.keyId).not.toBe(r.keyId);
    await new Promise((res) => setTimeout(res, 100));
    expect(w.events.filter((e) => e.type === WatchEventType.REVOKED).map((e) => e.keyId)).not.toContain(r.keyId);
    w.close();
    await w.done;
  });

  it("a stream hears only of the tenants its token names", async () => {
    const w = watch(B(), token(B(), { tenants: ["other"] }));
    const snap = await w.next(WatchEventType.SNAPSHOT);
    expect(new Set(snap.secrets.map((s) => s.tenantId))).toEqual(new Set(["other"]));
    await admin().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, activate: true });
    await admin().ca.createVersion({ tenantId: "other", signer: Signer.KMI_ROOT, activate: true });
    const act = await w.next(WatchEventType.ACTIVATED);
    expect(act.tenantId).toBe("other");
    expect(w.events.filter((e) => e.tenantId === "acme")).toEqual([]);
    w.close();
    await w.done;
  });

  it("a stream of a token with ten [] gets an empty SNAPSHOT and hears of no tenant", async () => {
    const w = watch(B(), token(B(), { tenants: [] }));
    const snap = await w.next(WatchEventType.SNAPSHOT);
    expect(snap.secrets).toEqual([]);
    const n = w.events.length;
    await admin().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, activate: true });
    await admin().ca.createVersion({ tenantId: "other", signer: Signer.KMI_ROOT, activate: true });
    await kdc.hub.settled();
    await w.next(WatchEventType.HEARTBEAT, n); // the stream is alive, it just serves nothing
    expect(w.events.filter((e) => e.type !== WatchEventType.HEARTBEAT && e.type !== WatchEventType.SNAPSHOT)).toEqual([]);
    w.close();
    await w.done;
  });

  it("ends with OK when the token expires", async () => {
    const w = watch(B(), token(B(), { ttlMs: 1500 }));
    await w.next(WatchEventType.SNAPSHOT);
    await w.done;
    expect(w.error).toBeUndefined();
    expect(w.ended).toBe(true);
  });

  it("a consumer that falls behind is cut off with RESOURCE_EXHAUSTED, not buffered without bound", async () => {
    const m = machines["m-dddd000000000004"]!;
    const it = dist().watchSecrets({ attestationToken: token(m) }, as(peerOf(m)))[Symbol.asyncIterator]();
    expect((await it.next()).value?.type).toBe(WatchEventType.SNAPSHOT);
    // Not reading: five activations overflow the queue of four.
    for (let i = 0; i < 5; i++) await admin().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, activate: true });
    await kdc.hub.settled();
    const got: WatchEventType[] = [];
    const err = await (async () => {
      for (;;) {
        const r = await it.next();
        if (r.done === true) return undefined;
        got.push(r.value.type);
      }
    })().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ConnectError);
    expect((err as ConnectError).code).toBe(Code.ResourceExhausted);
    expect((err as ConnectError).rawMessage).toMatch(/fell 4 events behind; reconnect for a fresh snapshot/);
  });
});

describe("WatchSecrets: resume", () => {
  it("RESUMED with nothing when nothing changed, with the changed tenant's set when one did; SNAPSHOT from a compacted or future revision", async () => {
    const m = machines["m-cccc000000000003"]!;
    const first = watch(m);
    const snap = await first.next(WatchEventType.SNAPSHOT);
    expect(snap.revision).toBeGreaterThan(0n);
    first.close();
    await first.done;

    const quiet = watch(m, token(m), kdc, snap.revision);
    const same = await quiet.next(WatchEventType.RESUMED);
    expect(quiet.events[0]!.type).toBe(WatchEventType.RESUMED);
    expect(same.secrets).toEqual([]);
    expect(same.replacedTenantIds).toEqual([]);
    expect(new Set(same.servedTenantIds)).toEqual(new Set(["acme", "other"]));
    expect(same.revision).toBeGreaterThanOrEqual(snap.revision);
    quiet.close();
    await quiet.done;

    const v = (await admin().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, activate: true })).version!;
    await kdc.hub.settled();
    const changed = watch(m, token(m), kdc, same.revision);
    const resumed = await changed.next(WatchEventType.RESUMED);
    expect(resumed.replacedTenantIds).toEqual(["acme"]);
    expect(new Set(resumed.secrets.map((s) => s.tenantId))).toEqual(new Set(["acme"]));
    expect(resumed.secrets.find((s) => s.purpose === KeyPurpose.INTERMEDIATE_CA)?.version).toBe(v.version);
    expect(resumed.revision).toBeGreaterThan(same.revision);
    const entry = (await kdc.ctx.audit.tail({ limit: 20, last: true })).filter((e) => e.action === "secret.release" && e.details["event"] === "watch_resume").at(-1);
    expect(entry?.details["resume_from"]).toBe(String(same.revision));
    changed.close();
    await changed.done;

    // A token that serves fewer tenants now: the agent learns which it still serves.
    const fewer = watch(m, token(m, { tenants: ["acme"] }), kdc, resumed.revision);
    expect((await fewer.next(WatchEventType.RESUMED)).servedTenantIds).toEqual(["acme"]);
    fewer.close();
    await fewer.done;

    const future = watch(m, token(m), kdc, resumed.revision + 1000n);
    expect((await future.next(WatchEventType.SNAPSHOT)).secrets.length).toBeGreaterThanOrEqual(2);
    future.close();
    await future.done;

    const now = await kdc.store.revision();
    await kdc.store.compact(now);
    const compacted = watch(m, token(m), kdc, snap.revision);
    const resync = await compacted.next(WatchEventType.SNAPSHOT);
    expect(compacted.events[0]!.type).toBe(WatchEventType.SNAPSHOT);
    expect(resync.revision).toBeGreaterThanOrEqual(now);
    compacted.close();
    await compacted.done;
  });
});

describe("load shedding", () => {
  it("a replica with every open slot taken answers UNAVAILABLE with retry-after-ms, before any work and without an audit entry; it serves again once a slot frees", async () => {
    const m = machines["m-cccc000000000003"]!;
    const slots = Array.from({ length: DEFAULT_MAX_OPENING }, () => kdc.hub.admit(false));
    const shedBefore = kdc.hub.shed.opening;
    const seqBefore = (await kdc.ctx.audit.tail({ limit: 1, last: true }))[0]!.seq;
    try {
      const w = watch(m);
      await w.done;
      expect(w.error).toBeInstanceOf(ConnectError);
      const err = w.error as ConnectError;
      expect(err.code).toBe(Code.Unavailable);
      expect(err.metadata.get("retry-after-ms")).toBe("1000");
      expect(err.rawMessage).toMatch(new RegExp(`is opening ${DEFAULT_MAX_OPENING} streams already; retry in 1000 ms or at another replica`));
      const fetched = await dist().fetchSecrets({ attestationToken: token(m) }, as(peerOf(m))).catch((e: unknown) => e);
      expect(fetched).toMatchObject({ code: Code.Unavailable });
      expect(kdc.hub.shed.opening).toBe(shedBefore + 2);
      expect((await kdc.ctx.audit.tail({ limit: 1, last: true }))[0]!.seq).toBe(seqBefore);
    } finally {
      for (const release of slots) release();
    }
    const w = watch(m);
    expect((await w.next(WatchEventType.SNAPSHOT)).secrets.length).toBeGreaterThan(0);
    w.close();
    await w.done;
  });
});

describe("quarantine", () => {
  it("pushes QUARANTINED and ends the stream; every call is PERMISSION_DENIED; it survives a restart; release restores, but not the tokens from before", async () => {
    const m = machines["m-cccc000000000003"]!;
    const w = watch(m);
    await w.next(WatchEventType.SNAPSHOT);
    const oldToken = token(m);
    const quarantinedAt = new Date(Date.now() + 1);
    await kdc.quarantine.apply({ machineId: m.machineId, quarantined: true, reason: "measurement agent.code differs", time: quarantinedAt }, "service:audit");
    const q = await w.next(WatchEventType.QUARANTINED);
    expect(q.reason).toBe("measurement agent.code differs");
    await w.done;
    expect((w.error as ConnectError).code).toBe(Code.PermissionDenied);
    expect(await failure(dist().fetchSecrets({ attestationToken: token(m) }, as(peerOf(m))))).toMatch(
      /^PermissionDenied: machine m-cccc000000000003 is quarantined \(measurement agent.code differs\)/,
    );
    expect(await failure(dist().reportHeldVersions({ attestationToken: token(m) }, as(peerOf(m))))).toMatch(/^PermissionDenied/);
    // Another machine is not affected.
    expect((await dist().fetchSecrets({ attestationToken: token(B()) }, as(peerOf(B())))).secrets.length).toBeGreaterThan(0);

    // A KDC opened again on the same store refuses it too.
    const dataDir = join(dir, "data");
    await kdc.store.close();
    kdc = await openKdc({ dataDir, logger: createNopLogger(), attestationKey: await FileAttestationKey.load(join(dir, "attestation-key.pem")), leaseMs: LEASE_MS, watch: { heartbeatMs: 150, maxQueue: 4 } });
    ops = new KdcOperations(kdc.ctx);
    expect(await failure(dist().fetchSecrets({ attestationToken: token(m) }, as(peerOf(m))))).toMatch(/^PermissionDenied: machine m-cccc000000000003 is quarantined/);

    // A snapshot that no longer lists it releases it: a token issued after the quarantine (iat in
    // whole seconds, so from the next second) is served; one from before it is not.
    await kdc.quarantine.replaceAll([], "service:audit");
    const fresh = token(m, { issuedAt: new Date(Math.floor(quarantinedAt.getTime() / 1000) * 1000 + 1000) });
    expect((await dist().fetchSecrets({ attestationToken: fresh }, as(peerOf(m))))).toBeDefined();
    expect(await failure(dist().fetchSecrets({ attestationToken: oldToken }, as(peerOf(m))))).toBe(
      `Unauthenticated: attestation token issued before the machine's quarantine at ${quarantinedAt.toISOString()}; attest again`,
    );
    expect(kdc.quarantine.list()).toEqual([]);
    const actions = (await kdc.ctx.audit.tail({ limit: 50, last: true })).map((e) => `${e.action} ${e.target}`);
    expect(actions).toContain("machine.quarantine machine/m-cccc000000000003");
    expect(actions).toContain("machine.release machine/m-cccc000000000003");
  });
});

describe("ReportHeldVersions", () => {
  it("records the held version per tenant; GetRolloutStatus shows up_to_date and connected", async () => {
    const acme = (await admin().admin.getTenant({ tenantId: "acme" })).tenant!;
    const active = (await admin().ca.listVersions({ tenantId: "acme" })).versions.find((v) => v.version === acme.activeVersion)!;
    const w = watch(A());
    await w.next(WatchEventType.SNAPSHOT);
    await dist().reportHeldVersions({ attestationToken: token(A()), held: [{ tenantId: "acme", keyId: active.keyId, version: active.version }] }, as(peerOf(A())));
    // A claim whose key id is not the version's is not believed.
    await dist().reportHeldVersions({ attestationToken: token(B()), held: [{ tenantId: "acme", keyId: "0".repeat(64), version: active.version }] }, as(peerOf(B())));
    const st = await admin().ca.getRolloutStatus({ tenantId: "acme" });
    const a = st.machines.find((x) => x.machineId === A().machineId)!;
    const b = st.machines.find((x) => x.machineId === B().machineId)!;
    expect(a).toMatchObject({ heldVersion: active.version, upToDate: true, connected: true, group: "edge" });
    expect(b).toMatchObject({ heldVersion: 0, upToDate: false, connected: false });
    expect(st.upToDateCount).toBe(1);
    expect(st.connectedCount).toBe(1);
    const status = await admin().admin.getKdcStatus({});
    expect(status.connectedAgents).toBe(1);
    expect(status.attestationKeyLoaded).toBe(true);
    w.close();
    await w.done;
  });

  it("records nothing for a token with ten [] (it serves no tenant)", async () => {
    const m = await issue("m-eeee000000000005");
    const acme = (await admin().admin.getTenant({ tenantId: "acme" })).tenant!;
    const active = (await admin().ca.listVersions({ tenantId: "acme" })).versions.find((v) => v.version === acme.activeVersion)!;
    await dist().reportHeldVersions({ attestationToken: token(m, { tenants: [] }), held: [{ tenantId: "acme", keyId: active.keyId, version: active.version }] }, as(peerOf(m)));
    expect((await admin().ca.getRolloutStatus({ tenantId: "acme" })).machines.map((x) => x.machineId)).not.toContain(m.machineId);
    expect((await kdc.ctx.audit.tail({ limit: 1, last: true }))[0]).toMatchObject({ action: "rollout.report", details: expect.objectContaining({ held: "", not_served: "1" }) });
    await dist().reportHeldVersions({ attestationToken: token(m, { tenants: "all" }), held: [{ tenantId: "acme", keyId: active.keyId, version: active.version }] }, as(peerOf(m)));
    expect((await admin().ca.getRolloutStatus({ tenantId: "acme" })).machines.find((x) => x.machineId === m.machineId)).toMatchObject({ heldVersion: active.version, upToDate: true });
  });

  it.each([
    ["a bad tenant id", [{ tenantId: "Bad!", keyId: "0".repeat(64), version: 1 }], /^InvalidArgument: held\[0\]\.tenant_id: "Bad!" is not a tenant id/],
    ["a bad key id", [{ tenantId: "acme", keyId: "xyz", version: 1 }], /^InvalidArgument: held\[0\]\.key_id: "xyz" is not a key id/],
  ])("%s is INVALID_ARGUMENT naming the field", async (_n, held, want) => {
    expect(await failure(dist().reportHeldVersions({ attestationToken: token(A()), held }, as(peerOf(A()))))).toMatch(want);
  });
});

describe("fail-closed release: no audit entry, no key", () => {
  /**
   * Makes every "secret.release" entry with outcome ok fail to append, as a full disk or a broken
   * store would, while `fn` runs; other entries (the change itself, the refusal) still append.
   * Returns what the release tried to write.
   */
  async function withReleaseAuditFailing(fn: () => Promise<void>): Promise<AuditEntryInput[]> {
    const audit = kdc.ctx.audit;
    const original = audit.append.bind(audit);
    const attempts: AuditEntryInput[] = [];
    const spy = vi.spyOn(audit, "append").mockImplementation(async (entry, changeOps) => {
      if (entry.action === "secret.release" && entry.outcome === "ok") {
        attempts.push(entry);
        throw new Error("audit log: write failed (no space left on device)");
      }
      return original(entry, changeOps);
    });
    try {
      await fn();
    } finally {
      spy.mockRestore();
    }
    return attempts;
  }

  it("FetchSecrets fails with an opaque INTERNAL and no secret when the release's audit entry cannot be written; the refusal is audited", async () => {
    const m = A();
    let res: unknown;
    let err: unknown;
    const attempts = await withReleaseAuditFailing(async () => {
      [res, err] = await dist().fetchSecrets({ attestationToken: token(m) }, as(peerOf(m))).then((r) => [r, undefined], (e: unknown) => [undefined, e]);
    });
    expect(res).toBeUndefined();
    expect(err).toBeInstanceOf(ConnectError);
    expect(Code[(err as ConnectError).code]).toBe(Code[Code.Internal]);
    expect((err as ConnectError).rawMessage).toMatch(/^internal error \(ref [0-9a-f]{12}\); the server log has the cause under this ref$/);
    // The release got as far as its audit entry, with keys to release: the failure is the audit's.
    expect(attempts).toHaveLength(1);
    expect(attempts[0]).toMatchObject({ actor: `machine:${m.machineId}`, action: "secret.release", details: expect.objectContaining({ event: "fetch" }) });
    expect(Number(attempts[0]!.details!["count"])).toBeGreaterThan(0);
    // The log has the refusal, not a release.
    const last = (await kdc.ctx.audit.tail({ limit: 1, last: true }))[0]!;
    expect(last).toMatchObject({ actor: `machine:${m.machineId}`, action: "secret.release", target: `machine/${m.machineId}`, outcome: "refused: internal" });
    // With the audit log writable again, the same call releases.
    expect((await dist().fetchSecrets({ attestationToken: token(m) }, as(peerOf(m)))).secrets.length).toBeGreaterThan(0);
  });

  it("WatchSecrets sends no SNAPSHOT (no key) and ends with INTERNAL when the snapshot's audit entry cannot be written", async () => {
    const m = A();
    let w!: ReturnType<typeof watch>;
    const attempts = await withReleaseAuditFailing(async () => {
      w = watch(m);
      await until(() => w.ended).finally(() => w.close());
    });
    expect(w.events).toEqual([]);
    expect(w.error).toBeInstanceOf(ConnectError);
    expect(Code[(w.error as ConnectError).code]).toBe(Code[Code.Internal]);
    expect(attempts).toHaveLength(1);
    expect(attempts[0]!.details).toMatchObject({ event: "watch_snapshot" });
    expect(Number(attempts[0]!.details!["count"])).toBeGreaterThan(0);
    // The failed stream is not left registered as a connected agent.
    expect(kdc.ctx.watches.isConnected(m.machineId)).toBe(false);
  });

  it("an open stream gets no ACTIVATED when the release's audit entry cannot be written; it ends with UNAVAILABLE instead", async () => {
    const m = A();
    const w = watch(m, token(m, { tenants: ["acme"] }));
    await w.next(WatchEventType.SNAPSHOT);
    const n = w.events.length;
    const attempts = await withReleaseAuditFailing(async () => {
      await admin().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, activate: true });
      await kdc.hub.settled();
      await until(() => w.ended).finally(() => w.close());
    });
    expect(attempts.map((e) => e.details?.["event"])).toEqual(["activated"]);
    expect(w.events.slice(n).filter((e) => e.type !== WatchEventType.HEARTBEAT)).toEqual([]);
    expect(w.events.some((e) => e.type === WatchEventType.SNAPSHOT && e.secrets.length > 0)).toBe(true);
    expect(w.error).toBeInstanceOf(ConnectError);
    expect(Code[(w.error as ConnectError).code]).toBe(Code[Code.Unavailable]);
    expect((w.error as ConnectError).rawMessage).toBe("the KDC cannot write its audit log; reconnect later for the current secrets");
  });
});

describe("a version staged by the rotation scheduler", () => {
  it("reaches open streams (STAGED), follows the snapshot of a new stream, and is held once reported with its key id", async () => {
    await admin().admin.createTenant({ tenantId: "stg", bootstrapKmiSigned: true });
    const m = A();
    const tok = () => token(m, { tenants: ["stg"] });
    const before = watch(m, tok());
    await before.next(WatchEventType.SNAPSHOT);
    const election = new Election(kdc.backend, { name: "scheduler", ttlSeconds: 2 });
    const scheduler = new RotationScheduler(kdc.ctx, ops, { election, intervalMs: 60_000, logger: createNopLogger() });
    const leadership = await election.campaign(new AbortController().signal);
    await admin().ca.setRotationPolicy({ tenantId: "stg", policy: { rotateEveryDays: 30 }, nextRotationAt: timestampFromDate(new Date()) });
    expect((await scheduler.runOnce(leadership)).staged).toEqual(["stg/v2"]);
    const v2 = (await admin().ca.listVersions({ tenantId: "stg" })).versions.find((v) => v.version === 2)!;
    const pushed = await before.next(WatchEventType.STAGED);
    expect(pushed.tenantId).toBe("stg");
    expect(pushed.secrets.map((s) => [s.version, s.keyId])).toEqual([[2, v2.keyId]]);
    // The key is wrapped to this machine, as every release is.
    const s = pushed.secrets[0]!;
    const pkcs8 = unwrapKey(s.wrappedKey!, m.key, { expectedAad: formatWrapAad({ machineId: m.machineId, tenantId: "stg", keyId: s.keyId, version: 2 }) });
    expect(keyIdOf(pkcs8)).toBe(v2.keyId);
    // A new stream: the snapshot carries the active version only, then STAGED carries v2.
    const after = watch(m, tok());
    const snap = await after.next(WatchEventType.SNAPSHOT);
    expect(snap.secrets.filter((x) => x.purpose === KeyPurpose.INTERMEDIATE_CA).map((x) => x.version)).toEqual([1]);
    expect((await after.next(WatchEventType.STAGED)).secrets.map((x) => x.version)).toEqual([2]);
    const releases = (await kdc.ctx.audit.tail({ last: true, limit: 30 })).filter((e) => e.action === "secret.release").map((e) => e.details["event"]);
    expect(releases).toEqual(expect.arrayContaining(["staged", "watch_staged"]));
    // Reported with the active one: the rollout keeps v1 as held, and v2 as the newest held.
    const active = (await admin().ca.listVersions({ tenantId: "stg" })).versions.find((v) => v.version === 1)!;
    await dist().reportHeldVersions({ attestationToken: tok(), held: [{ tenantId: "stg", keyId: active.keyId, version: 1 }, { tenantId: "stg", keyId: v2.keyId, version: 2 }] }, as(peerOf(m)));
    expect((await kdc.ctx.store.getRollout("stg", m.machineId))).toMatchObject({ heldVersion: 1, newestHeldVersion: 2 });
    expect((await admin().ca.getRolloutStatus({ tenantId: "stg" })).rotation).toMatchObject({ stagedVersion: 2, stagedHeldCount: 1 });
    // The only machine that reports holds it: the next run activates it, and the streams get ACTIVATED.
    expect((await scheduler.runOnce(leadership)).activated).toEqual(["stg/v2"]);
    expect((await after.next(WatchEventType.ACTIVATED)).secrets.map((x) => x.version)).toContain(2);
    // A staged claim with another key id is not believed.
    await dist().reportHeldVersions({ attestationToken: tok(), held: [{ tenantId: "stg", keyId: v2.keyId, version: 2 }, { tenantId: "stg", keyId: "0".repeat(64), version: 3 }] }, as(peerOf(m)));
    expect((await kdc.ctx.store.getRollout("stg", m.machineId))).toMatchObject({ heldVersion: 2, newestHeldVersion: 2 });
    before.close();
    after.close();
    await Promise.all([before.done, after.done]);
  });
});
