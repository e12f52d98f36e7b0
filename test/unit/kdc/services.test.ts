/**
 * The KDC's services in-process (createRouterTransport over routes(ctx)) on a real LevelDB in
 * a temp dir, with an injected clock: time-dependent rules without waiting or faking certificates.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { errorCode, kdcRouterClients } from "../../helpers/kdc-router.js";

const DAY = 86400_000;
let now = new Date("2030-03-01T12:00:00Z");
const clock = { now: () => new Date(now) };
let dir: string;
let kdc: OpenedKdc;
let operatorToken: string;

function client(token?: string) {
  return kdcRouterClients(kdc.ctx, token);
}

const code = errorCode;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-kdc-unit-"));
  const r = await initKdc({ dataDir: join(dir, "data"), tls: { dnsNames: [], ipAddresses: [] }, clock });
  operatorToken = r.operatorToken;
  kdc = await openKdc({ dataDir: join(dir, "data"), logger: createNopLogger(), clock });
});

afterAll(async () => {
  await kdc?.store.close();
  await rm(dir, { recursive: true, force: true });
});

describe("with an injected clock", () => {
  it("a version whose certificate expired cannot be activated; a renewal of its key can", async () => {
    const { ca, admin } = client(operatorToken);
    await admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
    const v = (await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, validityDays: 1 })).version!;
    expect(v.certificate!.notAfter!.seconds).toBe(BigInt(Math.floor((now.getTime() + DAY) / 1000)));
    now = new Date(now.getTime() + 2 * DAY);
    expect(await code(ca.activateVersion({ tenantId: "acme", version: v.version }))).toMatch(/^FailedPrecondition: version \d+: certificate expired on .*; renew it/);
    const r = (await ca.renewVersion({ tenantId: "acme", version: v.version, signer: Signer.KMI_ROOT, activate: true })).version!;
    expect(r.state).toBe(VersionState.ACTIVE);
    expect(r.keyId).toBe(v.keyId);
  });

  it("tokens expire by the injected clock", async () => {
    const { admin } = client(operatorToken);
    const t = await admin.createToken({ role: Role.TENANT_ADMIN, tenantId: "acme", ttlSeconds: 3600n });
    const { ca } = client(t.secret);
    expect((await ca.listVersions({ tenantId: "acme" })).versions.length).toBeGreaterThan(1);
    now = new Date(now.getTime() + 2 * 3600_000);
    expect(await code(ca.listVersions({ tenantId: "acme" }))).toMatch(/^Unauthenticated: invalid, revoked or expired token/);
  });

  it("KMI-signed intermediates never outlive the KMI root (notAfter clamped)", async () => {
    const { ca } = client(operatorToken);
    now = new Date(now.getTime() + 9 * 365 * DAY); // one year before the 10-year root ends
    const late = (await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, validityDays: 1825 })).version!;
    const rootNotAfter = (await kdc.ctx.store.getCredential("kmi-root"))!;
    const rootEnd = kdc.ctx.pki.summarize(rootNotAfter.certificateDer).notAfter.getTime();
    expect(Number(late.certificate!.notAfter!.seconds) * 1000).toBeLessThanOrEqual(rootEnd);
    expect(Number(late.certificate!.notAfter!.seconds) * 1000).toBeLessThan(now.getTime() + 1825 * DAY);
  });

  it("each refused change is one audit entry with its code, and the chain still verifies", async () => {
    const { ca, admin } = client(operatorToken);
    const head = (await admin.tailAuditLog({ last: true, limit: 1 })).headSeq;
    expect(await code(ca.createVersion({ tenantId: "acme", signer: Signer.UNSPECIFIED }))).toMatch(/^InvalidArgument: signer: required/);
    expect(await code(client().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT }))).toMatch(/^Unauthenticated/);
    const tail = await admin.tailAuditLog({ afterSeq: head });
    expect(tail.entries.map((e) => [e.action, e.outcome, e.actor.split(":")[0]])).toEqual([
      ["ca.version.create", "refused: invalid_argument", "token"],
      ["ca.version.create", "refused: unauthenticated", "anonymous"],
    ]);
    expect((await admin.verifyAuditLog({})).ok).toBe(true);
  });

  it("a flood of unauthenticated calls writes at most the address's refusal budget; an operator's refusals are all written", async () => {
    const { ca, admin } = client(operatorToken);
    const head = (await admin.tailAuditLog({ last: true, limit: 1 })).headSeq;
    // The budget refills by the monotonic clock (30 a minute): at most the burst (30) of 80 is
    // written, plus what refilled while the loop ran.
    const started = performance.now();
    for (let i = 0; i < 80; i++) expect(await code(client("not-a-token").ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT }))).toMatch(/^Unauthenticated/);
    for (let i = 0; i < 40; i++) expect(await code(ca.createVersion({ tenantId: "acme", signer: Signer.UNSPECIFIED }))).toMatch(/^InvalidArgument/);
    const tail = (await admin.tailAuditLog({ afterSeq: head, limit: 1000 })).entries;
    const anonymous = tail.filter((e) => e.outcome === "refused: unauthenticated").length;
    expect(anonymous).toBeGreaterThan(0);
    expect(anonymous).toBeLessThanOrEqual(30 + Math.ceil((performance.now() - started) / 2000));
    expect(anonymous).toBeLessThan(80);
    expect(tail.filter((e) => e.outcome === "refused: invalid_argument" && e.actor.startsWith("token:"))).toHaveLength(40);
    expect(kdc.ctx.audit.suppressedRefusals).toBeGreaterThanOrEqual(80 - anonymous);
    expect((await admin.verifyAuditLog({})).ok).toBe(true);
  });
});

describe("concurrent changes of one tenant (no lock: conditional batches on the tenant record)", () => {
  it("six parallel rotations with activation: contiguous versions, exactly one active, one linear audit chain", async () => {
    const { ca, admin } = client(operatorToken);
    await admin.createTenant({ tenantId: "race", bootstrapKmiSigned: true });
    const results = await Promise.all(Array.from({ length: 6 }, () => ca.createVersion({ tenantId: "race", signer: Signer.KMI_ROOT, validityDays: 30, activate: true })));
    expect(results.map((r) => r.version!.version).sort((a, b) => a - b)).toEqual([2, 3, 4, 5, 6, 7]);
    const versions = (await ca.listVersions({ tenantId: "race" })).versions;
    expect(versions.map((v) => v.version).sort((a, b) => a - b)).toEqual([1, 2, 3, 4, 5, 6, 7]);
    const active = versions.filter((v) => v.state === VersionState.ACTIVE);
    expect(active).toHaveLength(1);
    expect(versions.filter((v) => v.state === VersionState.RETIRED)).toHaveLength(6);
    const tenant = await kdc.ctx.store.getTenant("race");
    expect(tenant?.activeVersion).toBe(active[0]!.version);
    expect(tenant?.lastVersion).toBe(7);
    expect(await kdc.ctx.audit.verify()).toMatchObject({ ok: true });
    const creates = (await kdc.ctx.audit.tail({ last: true, limit: 20 })).filter((e) => e.action === "ca.version.create" && e.target.startsWith("tenant/race/"));
    expect(creates).toHaveLength(6);
  });
});
