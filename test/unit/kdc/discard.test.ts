/**
 * Abandoned private-CA uploads: DiscardPendingVersion and the pending version's expiry, in-process
 * (createRouterTransport over routes(ctx)) on a real LevelDB with an injected clock. Every
 * refusal is table-driven with its exact code and message, and leaves history unchanged.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { errorCode, kdcRouterClients } from "../../helpers/kdc-router.js";

const DAY = 86400_000;
const TTL_DAYS = 30;
let now = new Date("2030-05-01T12:00:00Z");
const clock = { now: () => new Date(now) };
let dir: string;
let kdc: OpenedKdc;
let operatorToken: string;
let otherAdminToken: string;
/** Version numbers of tenant "acme": [active, ready, pending, revoked]. */
let v: { active: number; ready: number; pending: number; revoked: number };

function client(token?: string) {
  return kdcRouterClients(kdc.ctx, token);
}

const code = errorCode;

async function history(tenantId = "acme") {
  return (await client(operatorToken).ca.listVersions({ tenantId })).versions.map((x) => [x.version, VersionState[x.state], x.pendingExpired]);
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-kdc-discard-"));
  const r = await initKdc({ dataDir: join(dir, "data"), tls: { dnsNames: [], ipAddresses: [] }, clock });
  operatorToken = r.operatorToken;
  kdc = await openKdc({ dataDir: join(dir, "data"), logger: createNopLogger(), clock, pendingTtlMs: TTL_DAYS * DAY });
  const { ca, admin } = client(operatorToken);
  await admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  await admin.createTenant({ tenantId: "globex" });
  otherAdminToken = (await admin.createToken({ role: Role.TENANT_ADMIN, tenantId: "globex" })).secret;
  const ready = (await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT })).version!.version;
  const revoked = (await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT })).version!.version;
  await ca.revokeVersion({ tenantId: "acme", version: revoked, reason: "test" });
  const pending = (await ca.createVersion({ tenantId: "acme", signer: Signer.PRIVATE_CA })).version!.version;
  v = { active: 1, ready, revoked, pending };
});

afterAll(async () => {
  await kdc?.store.close();
  await rm(dir, { recursive: true, force: true });
});

describe("DiscardPendingVersion refusals", () => {
  const cases: [string, () => { token: string | undefined; tenantId: string; version: number; reason: string }, string][] = [
    ["the active version", () => ({ token: operatorToken, tenantId: "acme", version: v.active, reason: "" }), "FailedPrecondition: version 1 is active, not pending; only a pending version (a CSR waiting for its certificate) can be discarded; to stop using a version, revoke it (`kmi ctl ca revoke`)"],
    ["a ready version", () => ({ token: operatorToken, tenantId: "acme", version: v.ready, reason: "" }), "FailedPrecondition: version 2 is ready, not pending; only a pending version"],
    ["a revoked version", () => ({ token: operatorToken, tenantId: "acme", version: v.revoked, reason: "" }), "FailedPrecondition: version 3 is revoked, not pending"],
    ["version 0", () => ({ token: operatorToken, tenantId: "acme", version: 0, reason: "" }), "InvalidArgument: version: required"],
    ["a version that does not exist", () => ({ token: operatorToken, tenantId: "acme", version: 99, reason: "" }), 'NotFound: tenant "acme" has no version 99'],
    ["a tenant that does not exist", () => ({ token: operatorToken, tenantId: "nope", version: 1, reason: "" }), 'NotFound: tenant "nope"'],
    ["a reason with control characters", () => ({ token: operatorToken, tenantId: "acme", version: v.pending, reason: "a\nb" }), "InvalidArgument: reason: contains control characters"],
    ["a reason too long", () => ({ token: operatorToken, tenantId: "acme", version: v.pending, reason: "x".repeat(257) }), "InvalidArgument: reason: too long (257 characters); at most 256"],
    ["no token", () => ({ token: undefined, tenantId: "acme", version: v.pending, reason: "" }), "Unauthenticated"],
    ["another tenant's admin", () => ({ token: otherAdminToken, tenantId: "acme", version: v.pending, reason: "" }), "PermissionDenied"],
  ];

  it.each(cases)("%s", async (_name, input, message) => {
    const before = await history();
    const { token, ...req } = input();
    expect(await code(client(token).ca.discardPendingVersion(req))).toContain(message);
    expect(await history()).toEqual(before);
  });
});

describe("discarding and expiry", () => {
  it("a pending version carries when its CSR expires: made + the pending TTL", async () => {
    const p = (await client(operatorToken).ca.listVersions({ tenantId: "acme" })).versions.find((x) => x.version === v.pending)!;
    expect(timestampDate(p.pendingExpiresAt!).getTime() - timestampDate(p.createdAt!).getTime()).toBe(TTL_DAYS * DAY);
    expect(p.pendingExpired).toBe(false);
    const ready = (await client(operatorToken).ca.listVersions({ tenantId: "acme" })).versions.find((x) => x.version === v.ready)!;
    expect(ready.pendingExpiresAt).toBeUndefined();
  });

  it("the tenant's admin discards a pending version: DISCARDED, key erased, audited; it cannot be uploaded, activated, renewed or discarded again", async () => {
    const { admin } = client(operatorToken);
    const adminToken = (await admin.createToken({ role: Role.TENANT_ADMIN, tenantId: "acme" })).secret;
    const { ca } = client(adminToken);
    const head = (await admin.tailAuditLog({ last: true, limit: 1 })).headSeq;
    const res = await ca.discardPendingVersion({ tenantId: "acme", version: v.pending, reason: "CSR lost" });
    expect(res.version).toMatchObject({ version: v.pending, state: VersionState.DISCARDED, discardReason: "CSR lost" });
    expect(res.version!.discardedAt).toBeDefined();
    const stored = await kdc.ctx.store.getVersion("acme", v.pending);
    expect(stored?.privateKey).toBeUndefined();
    expect(stored?.csrDer.length).toBeGreaterThan(0);
    const tail = (await admin.tailAuditLog({ afterSeq: head })).entries;
    expect(tail.map((e) => [e.action, e.target, e.outcome, e.details["reason"]])).toEqual([["ca.version.discard", `tenant/acme/version/${v.pending}`, "ok", "CSR lost"]]);
    const before = await history();
    expect(await code(ca.uploadIntermediate({ tenantId: "acme", version: v.pending, certificate: new Uint8Array([0x30, 0x00]) }))).toContain(`FailedPrecondition: version ${v.pending} is discarded, not pending`);
    expect(await code(ca.activateVersion({ tenantId: "acme", version: v.pending }))).toContain(`FailedPrecondition: version ${v.pending} is discarded and cannot be activated`);
    expect(await code(ca.renewVersion({ tenantId: "acme", version: v.pending, signer: Signer.KMI_ROOT }))).toContain(`FailedPrecondition: version ${v.pending} is discarded and its key is gone`);
    expect(await code(ca.discardPendingVersion({ tenantId: "acme", version: v.pending }))).toBe(
      `FailedPrecondition: version ${v.pending} is discarded, not pending; only a pending version (a CSR waiting for its certificate) can be discarded`,
    );
    expect(await code(ca.revokeVersion({ tenantId: "acme", version: v.pending, reason: "x" }))).toContain("is discarded and has no key");
    expect(await code(ca.getVersionCsr({ tenantId: "acme", version: v.pending }))).toContain("is discarded, not pending");
    expect(await history()).toEqual(before);
  });

  it("a pending version past its TTL is shown expired and refused on upload and CSR download; it can still be discarded", async () => {
    const { ca } = client(operatorToken);
    const p = (await ca.createVersion({ tenantId: "acme", signer: Signer.PRIVATE_CA })).version!.version;
    now = new Date(now.getTime() + (TTL_DAYS + 1) * DAY);
    const shown = (await ca.listVersions({ tenantId: "acme" })).versions.find((x) => x.version === p)!;
    expect([shown.state, shown.pendingExpired]).toEqual([VersionState.PENDING, true]);
    const before = await history();
    const expired = `FailedPrecondition: version ${p}: its CSR expired on `;
    expect(await code(ca.uploadIntermediate({ tenantId: "acme", version: p, certificate: new Uint8Array([0x30, 0x00]) }))).toContain(expired);
    // Version 0 means the newest pending version: the same refusal, and the fix in the message.
    expect(await code(ca.uploadIntermediate({ tenantId: "acme", certificate: new Uint8Array([0x30, 0x00]) }))).toMatch(
      new RegExp(`^FailedPrecondition: version ${p}: its CSR expired on \\S+ \\(pending versions expire 30 days after \`ca csr\`\\); discard it \\(\`kmi ctl ca discard --tenant acme --version ${p}\`\\) and make a new CSR`),
    );
    expect(await code(ca.getVersionCsr({ tenantId: "acme", version: p }))).toContain(expired);
    expect(await history()).toEqual(before);
    const d = await ca.discardPendingVersion({ tenantId: "acme", version: p });
    expect(d.version?.state).toBe(VersionState.DISCARDED);
  });
});

describe("a tenant's audit trail", () => {
  it("shows refused calls on the tenant without their caller (another tenant's admin probed it above)", async () => {
    const acmeAdmin = (await client(operatorToken).admin.createToken({ role: Role.TENANT_ADMIN, tenantId: "acme" })).secret;
    const globexTokenId = otherAdminToken.split("_")[1]!;
    const operatorView = (await client(operatorToken).admin.tailAuditLog({ limit: 1000 })).entries;
    // The refusal is in the log with its caller, for operators.
    expect(operatorView.some((e) => e.target.startsWith("tenant/acme") && e.outcome !== "ok" && e.actor.includes(globexTokenId))).toBe(true);
    const trail = (await client(acmeAdmin).admin.tailAuditLog({ tenantId: "acme", limit: 1000 })).entries;
    const refused = trail.filter((e) => e.outcome !== "ok");
    expect(refused.length).toBeGreaterThan(0);
    expect(refused.every((e) => e.actor === "(refused caller)" && Object.keys(e.details).length === 0)).toBe(true);
    expect(JSON.stringify(trail.map((e) => [e.actor, e.details]))).not.toContain(globexTokenId);
    expect(trail.some((e) => e.outcome === "ok" && e.actor !== "(refused caller)")).toBe(true);
  });
});
