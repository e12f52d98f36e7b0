/**
 * Rotation policies and the rotation scheduler in-process on a real LevelDB with an injected
 * clock (days pass by moving it): SetRotationPolicy's refusals (table-driven, exact codes,
 * nothing changed), a KMI-signed rotation staged and activated only once the fleet holds it,
 * the activation timeout, a private-CA CSR made before the certificate's end, and fencing on
 * LevelDB (a stale fence is refused, counted, audited).
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { createMetricsRegistry } from "../../../src/common/metrics.js";
import { Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { MachineRolloutRecordSchema } from "../../../src/gen/kmi/store/v1/kdc_pb.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { put } from "../../../src/kdc/kdc-store.js";
import { KdcOperations } from "../../../src/kdc/operations.js";
import { RotationScheduler } from "../../../src/kdc/scheduler.js";
import { Election, isFencedConflict, type Leadership } from "../../../src/storage/election.js";
import { errorCode, kdcRouterClients } from "../../helpers/kdc-router.js";

const DAY = 86400_000;
let now = new Date("2030-05-01T12:00:00Z");
const clock = { now: () => new Date(now) };
let dir: string;
let kdc: OpenedKdc;
let operatorToken: string;
let acmeAdmin: string;
let scheduler: RotationScheduler;
let leadership: Leadership;
const metrics = createMetricsRegistry();

function client(token: string | undefined) {
  return kdcRouterClients(kdc.ctx, token);
}

/** Clients calling as the operator. */
function op() {
  return client(operatorToken);
}

async function versions(tenantId: string) {
  return (await op().ca.listVersions({ tenantId })).versions.map((v) => `${v.version}:${VersionState[v.state]}`).reverse();
}

/** Writes what machine `machineId` reported holding of `tenantId` (what ReportHeldVersions records). */
async function report(tenantId: string, machineId: string, held: number, newest: number) {
  await kdc.ctx.store.store.batch([put.rollout(create(MachineRolloutRecordSchema, { recordVersion: 1, tenantId, machineId, group: "edge", heldVersion: held, newestHeldVersion: newest, lastReport: timestampFromDate(now) }))]);
}

async function schedulerEntries(tenantId: string) {
  return (await kdc.ctx.audit.tail({ last: true, limit: 500 })).filter((e) => e.actor === "system:scheduler" && e.target.startsWith(`tenant/${tenantId}/`)).map((e) => `${e.action} ${e.target} ${e.details["scheduled"] ?? ""}`.trim());
}

async function metric(name: string): Promise<string> {
  return (await metrics.render()).split("\n").filter((l) => l.startsWith(name)).join("\n");
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-kdc-scheduler-"));
  const r = await initKdc({ dataDir: join(dir, "data"), tls: { dnsNames: [], ipAddresses: [] }, clock });
  operatorToken = r.operatorToken;
  kdc = await openKdc({ dataDir: join(dir, "data"), logger: createNopLogger(), clock });
  const { admin } = op();
  await admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  await admin.createTenant({ tenantId: "globex", bootstrapKmiSigned: true });
  acmeAdmin = (await admin.createToken({ role: Role.TENANT_ADMIN, tenantId: "acme" })).secret;
  const election = new Election(kdc.backend, { name: "scheduler", ttlSeconds: 2, now: clock.now });
  scheduler = new RotationScheduler(kdc.ctx, new KdcOperations(kdc.ctx), { election, intervalMs: 60_000, logger: createNopLogger(), metrics });
  leadership = await election.campaign(new AbortController().signal);
});

afterAll(async () => {
  await kdc?.store.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe("SetRotationPolicy refusals", () => {
  const policy = (p: Partial<{ rotateEveryDays: number; csrBeforeExpiryDays: number; activationTimeoutHours: number }>) => ({ rotateEveryDays: 0, csrBeforeExpiryDays: 0, activationTimeoutHours: 0, ...p });
  const cases: [string, () => { token: string | undefined; req: Parameters<ReturnType<typeof client>["ca"]["setRotationPolicy"]>[0] }, string][] = [
    ["no policy", () => ({ token: operatorToken, req: { tenantId: "globex" } }), "InvalidArgument: policy: required; all fields 0 turn automatic rotation off"],
    ["rotate_every_days too large", () => ({ token: operatorToken, req: { tenantId: "globex", policy: policy({ rotateEveryDays: 3651 }) } }), "InvalidArgument: policy.rotate_every_days: 3651 is out of range; use 0 (never) or 1 to 3650 days"],
    ["csr_before_expiry_days too large", () => ({ token: operatorToken, req: { tenantId: "globex", policy: policy({ csrBeforeExpiryDays: 4000 }) } }), "InvalidArgument: policy.csr_before_expiry_days: 4000 is out of range"],
    ["activation_timeout_hours too large", () => ({ token: operatorToken, req: { tenantId: "globex", policy: policy({ rotateEveryDays: 30, activationTimeoutHours: 721 }) } }), "InvalidArgument: policy.activation_timeout_hours: 721 is out of range; use 1 to 720 hours (0: 24)"],
    ["next_rotation_at without a period", () => ({ token: operatorToken, req: { tenantId: "globex", policy: policy({ csrBeforeExpiryDays: 14 }), nextRotationAt: timestampFromDate(now) } }), "InvalidArgument: next_rotation_at: only with policy.rotate_every_days"],
    ["next_rotation_at past one period", () => ({ token: operatorToken, req: { tenantId: "globex", policy: policy({ rotateEveryDays: 30 }), nextRotationAt: timestampFromDate(new Date(now.getTime() + 31 * DAY)) } }), "InvalidArgument: next_rotation_at: 2030-06-01T12:00:00.000Z is more than 30 days (policy.rotate_every_days) from now; give an earlier time"],
    ["a bad tenant id", () => ({ token: operatorToken, req: { tenantId: "No", policy: policy({ rotateEveryDays: 30 }) } }), "InvalidArgument: tenant_id:"],
    ["a tenant that does not exist", () => ({ token: operatorToken, req: { tenantId: "nope", policy: policy({ rotateEveryDays: 30 }) } }), 'NotFound: tenant "nope" not found'],
    ["no token", () => ({ token: undefined, req: { tenantId: "globex", policy: policy({ rotateEveryDays: 30 }) } }), "Unauthenticated"],
    ["another tenant's admin", () => ({ token: acmeAdmin, req: { tenantId: "globex", policy: policy({ rotateEveryDays: 30 }) } }), "PermissionDenied"],
  ];

  it.each(cases)("%s", async (_name, input, message) => {
    const { token, req } = input();
    expect(await errorCode(client(token).ca.setRotationPolicy(req))).toContain(message);
    const status = (await op().ca.getRotationPolicy({ tenantId: "globex" })).rotation!;
    expect(status.policy).toMatchObject({ rotateEveryDays: 0, csrBeforeExpiryDays: 0, activationTimeoutHours: 0 });
  });

  it("GetRotationPolicy requires a token and the tenant's own admin", async () => {
    expect(await errorCode(client(undefined).ca.getRotationPolicy({ tenantId: "acme" }))).toContain("Unauthenticated");
    expect(await errorCode(client(acmeAdmin).ca.getRotationPolicy({ tenantId: "globex" }))).toContain("PermissionDenied");
  });
});

describe("a KMI-signed intermediate rotates by itself", () => {
  it("a tenant admin sets the policy: the next rotation is the active version's activation plus the period", async () => {
    const set = (await client(acmeAdmin).ca.setRotationPolicy({ tenantId: "acme", policy: { rotateEveryDays: 30, activationTimeoutHours: 0 } })).rotation!;
    expect(set.policy).toMatchObject({ rotateEveryDays: 30, csrBeforeExpiryDays: 0, activationTimeoutHours: 24 });
    expect(timestampDate(set.nextRotationAt!).toISOString()).toBe("2030-05-31T12:00:00.000Z");
    const entry = (await kdc.ctx.audit.tail({ last: true, limit: 5 })).find((e) => e.action === "ca.policy.set" && e.outcome === "ok");
    expect(entry).toMatchObject({ target: "tenant/acme", details: { rotate_every_days: "30", next_rotation_at: "2030-05-31T12:00:00.000Z" } });
    // ca status carries it too.
    expect((await client(acmeAdmin).ca.getRolloutStatus({ tenantId: "acme" })).rotation?.policy?.rotateEveryDays).toBe(30);
  });

  it("nothing happens before it is due", async () => {
    now = new Date("2030-05-31T11:59:00Z");
    const r = await scheduler.runOnce(leadership);
    expect(r).toMatchObject({ staged: [], activated: [], csrs: [], errors: 0 });
    expect(await versions("acme")).toEqual(["1:ACTIVE"]);
  });

  it("when due, a new version is staged (READY, not active) and activated only once every reporting machine holds it", async () => {
    await report("acme", "m-1", 1, 1);
    await report("acme", "m-2", 1, 1);
    now = new Date("2030-05-31T12:00:00Z");
    expect((await scheduler.runOnce(leadership)).staged).toEqual(["acme/v2"]);
    expect(await versions("acme")).toEqual(["1:ACTIVE", "2:READY"]);
    let status = (await op().ca.getRotationPolicy({ tenantId: "acme" })).rotation!;
    expect(status).toMatchObject({ stagedVersion: 2, stagedHeldCount: 0 });
    // One machine holds it: not yet.
    await report("acme", "m-1", 1, 2);
    now = new Date(now.getTime() + 3600_000);
    expect((await scheduler.runOnce(leadership)).activated).toEqual([]);
    expect((await op().ca.getRotationPolicy({ tenantId: "acme" })).rotation!.stagedHeldCount).toBe(1);
    // Both: activated, the old one retired, the next rotation one period on.
    await report("acme", "m-2", 1, 2);
    expect((await scheduler.runOnce(leadership)).activated).toEqual(["acme/v2"]);
    expect(await versions("acme")).toEqual(["1:RETIRED", "2:ACTIVE"]);
    status = (await op().ca.getRotationPolicy({ tenantId: "acme" })).rotation!;
    expect(status.stagedVersion).toBe(0);
    expect(timestampDate(status.lastRotationAt!).toISOString()).toBe(now.toISOString());
    expect(timestampDate(status.nextRotationAt!).getTime()).toBe(now.getTime() + 30 * DAY);
    const v2 = (await op().ca.listVersions({ tenantId: "acme" })).versions.find((v) => v.version === 2)!;
    expect(v2.signer).toBe(Signer.KMI_ROOT);
    expect(await schedulerEntries("acme")).toEqual(["ca.version.create tenant/acme/version/2 stage", "ca.version.activate tenant/acme/version/2 activate"]);
    const activation = (await kdc.ctx.audit.tail({ last: true, limit: 20 })).find((e) => e.action === "ca.version.activate")!;
    expect(activation.details).toMatchObject({ fleet_held: "2/2", retired_version: "1" });
    // Nothing more to do.
    expect(await scheduler.runOnce(leadership)).toMatchObject({ staged: [], activated: [] });
  });

  it("a fleet that never holds the staged version: activated after the activation timeout, counted", async () => {
    now = new Date(now.getTime() + 30 * DAY);
    expect((await scheduler.runOnce(leadership)).staged).toEqual(["acme/v3"]);
    now = new Date(now.getTime() + 23 * 3600_000);
    expect((await scheduler.runOnce(leadership)).activated).toEqual([]);
    now = new Date(now.getTime() + 3600_000);
    expect((await scheduler.runOnce(leadership)).activated).toEqual(["acme/v3"]);
    expect(await versions("acme")).toEqual(["1:RETIRED", "2:RETIRED", "3:ACTIVE"]);
    expect((await schedulerEntries("acme")).slice(-1)).toEqual(["ca.version.activate tenant/acme/version/3 activate-timeout"]);
    expect(await metric("kmi_kdc_scheduled_rotations_total")).toContain('kmi_kdc_scheduled_rotations_total{step="activate-timeout"} 1');
  });

  it("a staged version activated by hand ends the stage and counts as the rotation", async () => {
    now = new Date(now.getTime() + 30 * DAY);
    expect((await scheduler.runOnce(leadership)).staged).toEqual(["acme/v4"]);
    await op().ca.activateVersion({ tenantId: "acme", version: 4 });
    expect(await scheduler.runOnce(leadership)).toMatchObject({ staged: [], activated: [] });
    const status = (await op().ca.getRotationPolicy({ tenantId: "acme" })).rotation!;
    expect(status.stagedVersion).toBe(0);
    expect(timestampDate(status.nextRotationAt!).getTime()).toBe(now.getTime() + 30 * DAY);
    expect((await schedulerEntries("acme")).slice(-1)).toEqual(["ca.rotation.unstage tenant/acme/version/4"]);
  });
});

describe("a private-CA intermediate gets its CSR before it expires", () => {
  it("makes one PENDING version csr_before_expiry_days before the end, and tells the admins", async () => {
    const { admin, ca } = op();
    await admin.createTenant({ tenantId: "pca" });
    const pki = kdc.ctx.pki;
    const rootKey = await pki.generateKey(1 as never);
    const subject = { commonName: "Customer Root", organization: "", organizationalUnit: "", country: "" };
    const rootDer = pki.selfSignedCa({ pkcs8: rootKey.pkcs8, subject, now, validitySeconds: 3650 * 86400 });
    const csr = (await ca.createVersion({ tenantId: "pca", signer: Signer.PRIVATE_CA })).version!;
    const stored = (await kdc.ctx.store.getVersion("pca", csr.version))!;
    const s = stored.subject!;
    const cert = pki.issueIntermediate({ issuer: { certificateDer: rootDer, pkcs8: rootKey.pkcs8 }, spki: stored.publicKeyDer, subject: { commonName: s.commonName, organization: s.organization, organizationalUnit: s.organizationalUnit, country: s.country }, now, validitySeconds: 90 * 86400 });
    await ca.uploadIntermediate({ tenantId: "pca", version: csr.version, certificate: cert, customerRoot: rootDer, activate: true });
    await ca.setRotationPolicy({ tenantId: "pca", policy: { csrBeforeExpiryDays: 14 } });
    const notAfter = timestampDate((await ca.getRotationPolicy({ tenantId: "pca" })).rotation!.activeNotAfter!);
    now = new Date(notAfter.getTime() - 15 * DAY);
    expect((await scheduler.runOnce(leadership)).csrs).toEqual([]);
    now = new Date(notAfter.getTime() - 14 * DAY);
    expect((await scheduler.runOnce(leadership)).csrs).toEqual(["pca/v2"]);
    // Once: the next runs wait for the upload.
    now = new Date(now.getTime() + DAY);
    expect((await scheduler.runOnce(leadership)).csrs).toEqual([]);
    expect(await versions("pca")).toEqual(["1:ACTIVE", "2:PENDING"]);
    expect((await ca.getRotationPolicy({ tenantId: "pca" })).rotation!.csrDueVersion).toBe(2);
    expect((await ca.getRolloutStatus({ tenantId: "pca" })).rotation!.csrDueVersion).toBe(2);
    const entry = (await kdc.ctx.audit.tail({ last: true, limit: 20 })).find((e) => e.action === "ca.version.create" && e.target === "tenant/pca/version/2")!;
    expect(entry).toMatchObject({ actor: "system:scheduler", details: { scheduled: "csr-due", active_version: "1", active_not_after: notAfter.toISOString(), state: "pending" } });
    expect(await metric("kmi_kdc_scheduled_rotations_total")).toContain('kmi_kdc_scheduled_rotations_total{step="csr-due"} 1');
  });
});

describe("fencing on LevelDB", () => {
  it("a run under a stale fence is refused before it writes anything", async () => {
    const again = await new Election(kdc.backend, { name: "scheduler", ttlSeconds: 2 }).campaign(new AbortController().signal);
    expect(again.fence.modRevision).toBeGreaterThan(leadership.fence.modRevision);
    const before = await kdc.ctx.store.readSchedulerRun("rotation");
    const err = await scheduler.runOnce(leadership).then(() => undefined, (e: unknown) => e);
    expect(isFencedConflict(err)).toBe(true);
    expect((await kdc.ctx.store.readSchedulerRun("rotation")).modRevision).toBe(before.modRevision);
    expect((await scheduler.runOnce(again)).errors).toBe(0);
    leadership = again;
  });
});
