/**
 * The KDC's DistributionService as a real process (`node dist/cmd/kmi.js kdc`) over mutual TLS:
 * machine certificates issued by the KDC (PeerService.IssueMachineCertificate with a service
 * certificate from IssueServiceCertificate), attestation tokens signed with src/attest by a test
 * key given to the KDC with --attestation-key-file, and a fixture Auditserver serving
 * WatchMachineStatus (quarantine and release) and GetAttestationKey (the --audit-url fetch).
 */
import { createPublicKey, X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyPurpose } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { WatchEventType, type WatchSecretsResponse } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { formatWrapAad, unwrapKey } from "../../../src/keywrap/index.js";
import { FixtureAudit } from "../../fixtures/kdc/fixture-audit.js";
import { Machine, makeTokenKey, signToken, type TokenKey } from "../../fixtures/kdc/machines.js";
import { attestationKeyFile, distributionClient, issueMachines, issueService, operator, serverTls, type ServiceIdentity } from "../../fixtures/kdc/mesh.js";
import { cleanup, ctl, initDataDir, startKdc, type DataDir, type KdcProcess } from "../kdc/harness.js";

let data: DataDir;
let caPem: string;
let tokenKey: TokenKey;
let keyFile: string;
let auditId: ServiceIdentity;
let audit: FixtureAudit;
let kdc: KdcProcess;
const A = new Machine("m-a000000000000001");
const B = new Machine("m-b000000000000002");
const C = new Machine("m-c000000000000003");
const D = new Machine("m-d000000000000004");
const E = new Machine("m-e000000000000005");
const closers: (() => void)[] = [];

const tok = (m: Machine, extra: Partial<Parameters<typeof signToken>[1]> = {}) => signToken(tokenKey, { machineId: m.machineId, cert: m.certPem, ...extra });
const ops = () => operator(kdc.url, caPem, data.token);
function dist(m?: Machine) {
  const c = distributionClient(kdc.url, caPem, m);
  closers.push(c.close);
  return c.client;
}

async function failure(p: Promise<unknown>): Promise<{ code: Code; message: string }> {
  const e = await p.then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(ConnectError);
  return { code: (e as ConnectError).code, message: (e as ConnectError).rawMessage };
}

/** Reads a watch stream in the background. */
function watch(m: Machine, token = tok(m)) {
  const abort = new AbortController();
  const events: { ev: WatchSecretsResponse; at: number }[] = [];
  let error: unknown;
  let ended = false;
  const done = (async () => {
    try {
      for await (const ev of dist(m).watchSecrets({ attestationToken: token }, { signal: abort.signal })) events.push({ ev, at: Date.now() });
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
    close: () => abort.abort(),
    async next(type: WatchEventType, from = 0, timeoutMs = 5000) {
      const t0 = Date.now();
      for (;;) {
        const hit = events.slice(from).find((e) => e.ev.type === type);
        if (hit !== undefined) return hit;
        if (ended || Date.now() - t0 > timeoutMs) throw new Error(`no ${WatchEventType[type]} (ended=${ended}, error=${String(error)})`);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
  };
}

async function until(what: string, cond: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

beforeAll(async () => {
  data = await initDataDir();
  caPem = await readFile(data.caFile, "utf8");
  ({ key: tokenKey, file: keyFile } = await attestationKeyFile(data));
  // First run: identities (the fixture Auditserver's certificate, the machines').
  kdc = await startKdc(data.dataDir);
  auditId = await issueService(kdc.url, caPem, data.token, "audit");
  const tester = await issueService(kdc.url, caPem, data.token, "audit"); // only the Auditserver may mint machine identities
  await issueMachines(kdc.url, caPem, tester, [A, B, C, D, E]);
  await ops().admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  await kdc.stop();
  audit = new FixtureAudit(serverTls(auditId, caPem), tokenKey, { keepaliveMs: 1000 });
  await audit.start();
  kdc = await startKdc(data.dataDir, ["--audit-url", audit.url, "--attestation-key-file", keyFile, "--lease", "12h"]);
  await until("the KDC follows the machine status stream", async () => audit.watching === 1);
});

afterAll(async () => {
  for (const c of closers) c();
  await kdc?.stop();
  await audit?.stop();
  if (data !== undefined) await cleanup(data.dir);
});

describe("FetchSecrets", () => {
  it("releases the tenant's active intermediate wrapped to the machine key, with a 12h lease; another machine's key cannot open it", async () => {
    const t0 = Date.now();
    const res = await dist(A).fetchSecrets({ attestationToken: tok(A) });
    const s = res.secrets.find((x) => x.purpose === KeyPurpose.INTERMEDIATE_CA && x.tenantId === "acme")!;
    expect(s.version).toBe(1);
    const aad = formatWrapAad({ machineId: A.machineId, tenantId: "acme", keyId: s.keyId, version: s.version });
    const key = unwrapKey(s.wrappedKey!, A.key, { expectedAad: aad });
    const cert = new X509Certificate(s.chainPem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/)![0]);
    // The unwrapped private key is the intermediate certificate's key.
    expect(createPublicKey(key).export({ format: "der", type: "spki" }).equals(cert.publicKey.export({ format: "der", type: "spki" }))).toBe(true);
    expect(cert.ca).toBe(true);
    const lease = timestampMs(s.leaseExpiresAt!) - t0;
    expect(lease).toBeGreaterThan(12 * 3600_000 - 60_000);
    expect(lease).toBeLessThanOrEqual(12 * 3600_000 + 5_000);
    // The same response cannot be opened with B's key (nor with A's key under B's aad).
    expect(() => unwrapKey(s.wrappedKey!, B.key)).toThrow(/does not open with this machine's key/);
    expect(() => unwrapKey({ ...s.wrappedKey!, aad: formatWrapAad({ machineId: B.machineId, tenantId: "acme", keyId: s.keyId, version: 1 }) }, A.key)).toThrow(/does not open/);
  });

  it('a token with ten [] gets no secrets and opens an empty watch; ten ["*"] gets every tenant, one made later too', async () => {
    const none = tok(B, { tenants: [] });
    expect((await dist(B).fetchSecrets({ attestationToken: none })).secrets).toEqual([]);
    const w = watch(B, none);
    expect((await w.next(WatchEventType.SNAPSHOT)).ev.secrets).toEqual([]);
    w.close();
    await w.done;
    const tenantsOf = async (token: string) => [...new Set((await dist(B).fetchSecrets({ attestationToken: token })).secrets.map((x) => x.tenantId))].sort();
    expect(await tenantsOf(tok(B, { tenants: "all" }))).toEqual(["acme"]);
    await ops().admin.createTenant({ tenantId: "globex", bootstrapKmiSigned: true });
    expect(await tenantsOf(tok(B, { tenants: "all" }))).toEqual(["acme", "globex"]);
    expect(await tenantsOf(tok(B, { tenants: ["globex"] }))).toEqual(["globex"]);
    expect(await tenantsOf(tok(B, { tenants: [] }))).toEqual([]);
  });

  it.each([
    ["a missing token", () => dist(A), () => "", /^attestation_token: required/],
    ["an expired token", () => dist(A), () => tok(A, { ttlMs: -5000 }), /^attestation token: expired at/],
    ["a forged token (another signing key)", () => dist(A), () => signToken(makeTokenKey(), { machineId: A.machineId, cert: A.certPem }), /^attestation token: signed by key .*, not the Auditserver's key/],
    ["machine A's token on machine B's mutual TLS", () => dist(B), () => tok(A), /^attestation token: issued to machine m-a000000000000001, not to m-b000000000000002/],
    ["no client certificate", () => dist(), () => tok(A), /^client certificate required/],
  ])("%s is UNAUTHENTICATED, and audited", async (_name, client, token, want) => {
    const before = (await ops().admin.tailAuditLog({ limit: 1, last: true })).headSeq;
    const f = await failure(client().fetchSecrets({ attestationToken: token() }));
    expect(f.code).toBe(Code.Unauthenticated);
    expect(f.message).toMatch(want);
    const w = await failure((async () => { for await (const _ of client().watchSecrets({ attestationToken: token() })) void _; })());
    expect(w.code).toBe(Code.Unauthenticated);
    const entries = (await ops().admin.tailAuditLog({ afterSeq: before, limit: 10 })).entries.filter((e) => e.action === "secret.release");
    expect(entries.map((e) => e.outcome)).toEqual(["refused: unauthenticated", "refused: unauthenticated"]);
    const t = token();
    for (const e of entries) {
      expect(e.details["attestation_token"]).toMatch(t === "" ? /^none$/ : /^hmac:[0-9a-f]+$/);
      if (t !== "") expect(JSON.stringify(e.details)).not.toContain(t.split(".")[2]!);
    }
  });
});

describe("WatchSecrets", () => {
  it("ActivateVersion reaches an open stream as ACTIVATED within 2 s; RevokeVersion as REVOKED", async () => {
    const w = watch(A);
    const snap = await w.next(WatchEventType.SNAPSHOT);
    expect(w.events[0]!.ev.type).toBe(WatchEventType.SNAPSHOT);
    expect(snap.ev.secrets.map((s) => s.version)).toContain(1);
    const v2 = (await ops().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT })).version!;
    const t0 = Date.now();
    await ops().ca.activateVersion({ tenantId: "acme", version: v2.version });
    const act = await w.next(WatchEventType.ACTIVATED);
    expect(act.at - t0).toBeLessThan(2000);
    expect(act.ev.tenantId).toBe("acme");
    const s = act.ev.secrets.find((x) => x.purpose === KeyPurpose.INTERMEDIATE_CA)!;
    expect(s.version).toBe(v2.version);
    expect(createPublicKey(unwrapKey(s.wrappedKey!, A.key)).export({ format: "pem", type: "spki" })).toBe(s.publicKeyPem);

    const n = w.events.length;
    const v1 = (await ops().ca.listVersions({ tenantId: "acme" })).versions.find((v) => v.version === 1)!;
    await ops().ca.revokeVersion({ tenantId: "acme", version: 1, reason: "rotated out" });
    const rev = await w.next(WatchEventType.REVOKED, n);
    expect(rev.ev).toMatchObject({ tenantId: "acme", keyId: v1.keyId, reason: "rotated out" });
    w.close();
    await w.done;
  });

  it("`kmi ctl signing-key create|list|revoke` reach an open stream as KEY_ADDED and REVOKED", async () => {
    const w = watch(A);
    await w.next(WatchEventType.SNAPSHOT);
    const made = await ctl(kdc, data, ["signing-key", "create", "code-sign", "--tenant", "acme", "--json"]);
    expect(made.code).toBe(0);
    const key = (JSON.parse(made.stdout) as { key: { keyId: string; name: string } }).key;
    const added = await w.next(WatchEventType.KEY_ADDED);
    expect(added.ev.secrets.map((x) => [x.name, x.keyId, x.purpose])).toEqual([["code-sign", key.keyId, KeyPurpose.SIGNING]]);
    expect(createPublicKey(unwrapKey(added.ev.secrets[0]!.wrappedKey!, A.key)).export({ format: "pem", type: "spki" })).toBe(added.ev.secrets[0]!.publicKeyPem);
    const list = await ctl(kdc, data, ["signing-key", "list", "--tenant", "acme"]);
    expect(list.stdout).toMatch(new RegExp(`code-sign\\s+ecdsa-p256\\s+active\\s+\\S+\\s+${key.keyId}`));
    const n = w.events.length;
    const revoked = await ctl(kdc, data, ["signing-key", "revoke", "code-sign", "--tenant", "acme", "--reason", "leaked"]);
    expect(revoked.code).toBe(0);
    expect(revoked.stdout).toMatch(/state:\s+revoked/);
    const rev = await w.next(WatchEventType.REVOKED, n);
    expect(rev.ev).toMatchObject({ tenantId: "acme", keyId: key.keyId, reason: "leaked" });
    expect((await ctl(kdc, data, ["signing-key", "revoke", "code-sign", "--tenant", "acme"])).code).toBe(2);
    w.close();
    await w.done;
  });

  it("quarantine (from the Auditserver's status stream) pushes QUARANTINED and refuses the next call; release lets it in again", async () => {
    const w = watch(C);
    await w.next(WatchEventType.SNAPSHOT);
    const t0 = Date.now();
    audit.quarantine(C.machineId, "measurement agent.code differs");
    const q = await w.next(WatchEventType.QUARANTINED);
    expect(q.at - t0).toBeLessThan(2000);
    expect(q.ev.reason).toBe("measurement agent.code differs");
    await w.done;
    expect((w.error as ConnectError).code).toBe(Code.PermissionDenied);
    const f = await failure(dist(C).fetchSecrets({ attestationToken: tok(C) }));
    expect(f.code).toBe(Code.PermissionDenied);
    expect(f.message).toMatch(/^machine m-c000000000000003 is quarantined \(measurement agent.code differs\)/);
    // Others are not affected.
    expect((await dist(A).fetchSecrets({ attestationToken: tok(A) })).secrets.length).toBeGreaterThan(0);

    audit.release(C.machineId);
    await until("C released", async () => (await dist(C).fetchSecrets({ attestationToken: tok(C) }).then(() => true, () => false)), 3000);
    const actions = (await ops().admin.tailAuditLog({ limit: 30, last: true })).entries.map((e) => `${e.actor} ${e.action} ${e.target}`);
    expect(actions).toContain("service:audit machine.quarantine machine/m-c000000000000003");
    expect(actions).toContain("service:audit machine.release machine/m-c000000000000003");
  });
});

describe("rollout", () => {
  it("ReportHeldVersions shows in GetRolloutStatus and `kmi ctl ca status --json` (up_to_date, connected)", async () => {
    const active = (await ops().admin.getTenant({ tenantId: "acme" })).tenant!.activeVersion;
    const w = watch(A);
    const snap = await w.next(WatchEventType.SNAPSHOT);
    const held = snap.ev.secrets.map((s) => ({ tenantId: s.tenantId, keyId: s.keyId, version: s.version }));
    await dist(A).reportHeldVersions({ attestationToken: tok(A), held });
    // B reports the version it held before the rotation, and has no stream open.
    const v1 = (await ops().ca.listVersions({ tenantId: "acme" })).versions.find((v) => v.version === 1)!;
    await dist(B).reportHeldVersions({ attestationToken: tok(B), held: [{ tenantId: "acme", keyId: v1.keyId, version: 1 }] });

    const st = await ops().ca.getRolloutStatus({ tenantId: "acme" });
    expect(st.activeVersion).toBe(active);
    expect(st.machines.find((m) => m.machineId === A.machineId)).toMatchObject({ heldVersion: active, upToDate: true, connected: true, group: "edge" });
    expect(st.machines.find((m) => m.machineId === B.machineId)).toMatchObject({ heldVersion: 1, upToDate: false, connected: false });

    const r = await ctl(kdc, data, ["ca", "status", "--tenant", "acme", "--json"]);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout) as { activeVersion: number; machines: { machineId: string; heldVersion: number; upToDate: boolean; connected: boolean }[] };
    expect(j.machines.find((m) => m.machineId === A.machineId)).toMatchObject({ heldVersion: active, upToDate: true, connected: true });
    expect(j.machines.find((m) => m.machineId === B.machineId)).toMatchObject({ heldVersion: 1, upToDate: false, connected: false });
    const human = await ctl(kdc, data, ["ca", "status", "--tenant", "acme"]);
    expect(human.stdout).toMatch(/1 of 2 machines hold it, 0 not yet, 1 unreachable/);
    expect(human.stdout).toMatch(new RegExp(`${B.machineId}\\s+edge\\s+1\\s+unreachable`));

    const status = await ops().admin.getKdcStatus({});
    expect(status.connectedAgents).toBe(1);
    expect(status.attestationKeyLoaded).toBe(true);
    w.close();
    await w.done;
  });
});

describe("release after a quarantine", () => {
  it("a token issued before the quarantine stays refused after the release, also across a KDC restart; a fresh one works", async () => {
    const before = tok(E, { issuedAt: new Date(Date.now() - 2000) });
    expect((await dist(E).fetchSecrets({ attestationToken: before })).secrets.length).toBeGreaterThan(0);
    audit.quarantine(E.machineId, "operator: investigating");
    const quarantinedBy = Date.now(); // the fixture stamps the change with its clock before this
    await until("E refused", async () => (await dist(E).fetchSecrets({ attestationToken: before }).then(() => false, (e: ConnectError) => e.code === Code.PermissionDenied)), 3000);
    audit.release(E.machineId);
    const stale = /^attestation token issued before the machine's quarantine at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z; attest again$/;
    await until("E no longer quarantined", async () => (await dist(E).fetchSecrets({ attestationToken: before }).then(() => true, (e: ConnectError) => e.code !== Code.PermissionDenied)), 3000);
    const f = await failure(dist(E).fetchSecrets({ attestationToken: before }));
    expect(f.code).toBe(Code.Unauthenticated);
    expect(f.message).toMatch(stale);
    const at = Date.parse(/quarantine at (\S+);/.exec(f.message)![1]!);
    expect(at).toBeGreaterThan(Date.now() - 10_000);
    expect(at).toBeLessThanOrEqual(quarantinedBy);
    const w = await failure((async () => { for await (const _ of dist(E).watchSecrets({ attestationToken: before })) void _; })());
    expect(w.code).toBe(Code.Unauthenticated);
    expect(w.message).toMatch(stale);
    // `iat` has whole seconds: a fresh token is one from a second after the quarantine's.
    await new Promise((r) => setTimeout(r, Math.max(0, (Math.floor(at / 1000) + 1) * 1000 - Date.now() + 20)));
    const fresh = tok(E);
    expect((await dist(E).fetchSecrets({ attestationToken: fresh })).secrets.length).toBeGreaterThan(0);

    await kdc.stop();
    kdc = await startKdc(data.dataDir, ["--audit-url", audit.url, "--attestation-key-file", keyFile, "--lease", "12h"]);
    await until("the KDC follows the machine status stream", async () => audit.watching === 1);
    const again = await failure(dist(E).fetchSecrets({ attestationToken: before }));
    expect(again).toEqual(f);
    expect((await dist(E).fetchSecrets({ attestationToken: fresh })).secrets.length).toBeGreaterThan(0);
  });
});

describe("restarts", () => {
  it("a quarantine survives a KDC restart without the Auditserver", async () => {
    audit.quarantine(D.machineId, "operator: stolen");
    await until("D refused", async () => (await dist(D).fetchSecrets({ attestationToken: tok(D) }).then(() => false, (e: ConnectError) => e.code === Code.PermissionDenied)), 3000);
    // SIGTERM ends open watch streams at once instead of waiting out the 10 s drain deadline.
    const w = watch(A);
    await w.next(WatchEventType.SNAPSHOT);
    const t0 = Date.now();
    try {
      expect(await kdc.stop()).toBe(0);
      expect(Date.now() - t0).toBeLessThan(5000);
      await w.done;
      // OK as the KDC ends it; CANCELED when the connection closes before the client read the end.
      if (w.error !== undefined) expect((w.error as ConnectError).code).toBe(Code.Canceled);
    } finally {
      await audit.stop();
    }
    kdc = await startKdc(data.dataDir, ["--attestation-key-file", keyFile]);
    const f = await failure(dist(D).fetchSecrets({ attestationToken: tok(D) }));
    expect(f.code).toBe(Code.PermissionDenied);
    expect(f.message).toMatch(/operator: stolen/);
    expect((await dist(A).fetchSecrets({ attestationToken: tok(A) })).secrets.length).toBeGreaterThan(0);
  });

  it("with --audit-url only: UNAVAILABLE until the Auditserver answers, then the fetched key is used", async () => {
    await kdc.stop();
    const port = Number(new URL(audit.url).port);
    kdc = await startKdc(data.dataDir, ["--audit-url", audit.url]);
    const f = await failure(dist(A).fetchSecrets({ attestationToken: tok(A) }));
    expect(f.code).toBe(Code.Unavailable);
    expect(f.message).toBe(`attestation key not loaded yet; is the Auditserver at ${audit.url} up?`);
    expect((await ops().admin.getKdcStatus({})).attestationKeyLoaded).toBe(false);

    audit = new FixtureAudit(serverTls(auditId, caPem), tokenKey, { keepaliveMs: 1000, port });
    audit.quarantined.set(D.machineId, "operator: stolen");
    await audit.start();
    await until("key loaded", async () => (await ops().admin.getKdcStatus({})).attestationKeyLoaded, 20_000);
    expect((await dist(A).fetchSecrets({ attestationToken: tok(A) })).secrets.length).toBeGreaterThan(0);
    expect((await failure(dist(D).fetchSecrets({ attestationToken: tok(D) }))).code).toBe(Code.PermissionDenied);
  });
});
