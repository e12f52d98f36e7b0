import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { Tables } from "../../../src/audit/store.js";
import { makeHarness, type Harness } from "./harness.js";
import { enrollMachine, expectCode, lastEntry, makeGroup } from "./flows.js";

let h: Harness;
beforeEach(async () => {
  h = await makeHarness();
  h.kdc.addToken("kmi_00000000000000bb_tenant", Role.TENANT_ADMIN, "00000000000000bb");
  h.kdc.addToken("kmi_00000000000000cc_revoked", Role.OPERATOR, "00000000000000cc", { revoked: true });
});
afterEach(async () => h.close());

type Call = (opts: { headers: Record<string, string> }) => Promise<unknown>;
const calls: [string, Call][] = [
  ["CreateGroup", (o) => h.admin.createGroup({ name: "g1", tenantIds: ["acme"] }, o)],
  ["ListGroups", (o) => h.admin.listGroups({}, o)],
  ["ApproveMeasurements", (o) => h.admin.approveMeasurements({ group: "g1", approved: [] }, o)],
  ["CreateJoinToken", (o) => h.admin.createJoinToken({ group: "g1" }, o)],
  ["ListMachines", (o) => h.admin.listMachines({}, o)],
  ["GetMachine", (o) => h.admin.getMachine({ machineId: "m-0000000000000000" }, o)],
  ["QuarantineMachine", (o) => h.admin.quarantineMachine({ machineId: "m-0000000000000000", reason: "x" }, o)],
  ["ReleaseMachine", (o) => h.admin.releaseMachine({ machineId: "m-0000000000000000", reason: "x" }, o)],
  ["TailAuditLog", (o) => h.admin.tailAuditLog({}, o)],
  ["VerifyAuditLog", (o) => h.admin.verifyAuditLog({}, o)],
  ["GetAuditCheckpoint", (o) => h.admin.getAuditCheckpoint({}, o)],
];

describe("operator authentication", () => {
  it.each(calls)("%s requires a token", async (_name, call) => {
    await expectCode(call({ headers: {} }), "unauthenticated", /missing bearer token/);
    expect(await lastEntry(h)).toMatchObject({ actor: "anonymous", outcome: "refused: unauthenticated" });
  });

  it.each(calls)("%s refuses an unknown token", async (_name, call) => {
    await expectCode(call({ headers: { authorization: "Bearer kmi_00000000000000dd_nope" } }), "unauthenticated");
    expect(await lastEntry(h)).toMatchObject({ actor: "token:00000000000000dd", outcome: "refused: unauthenticated" });
  });

  it.each(calls)("%s refuses a tenant-admin token", async (_name, call) => {
    await expectCode(call({ headers: { authorization: "Bearer kmi_00000000000000bb_tenant" } }), "permission_denied", /not an operator token/);
  });

  it("refuses a revoked token even if the KDC answered with it", async () => {
    await expectCode(h.admin.listGroups({}, { headers: { authorization: "Bearer kmi_00000000000000cc_revoked" } }), "unauthenticated", /revoked/);
  });

  it("is UNAVAILABLE when the KDC cannot check the token", async () => {
    h.kdc.down = true;
    await expectCode(h.admin.listGroups({}, h.operator), "unavailable");
  });
});

describe("groups and join tokens", () => {
  it("creates a group with defaults resolved and lists it", async () => {
    const { group } = await h.admin.createGroup({ name: "edge", tenantIds: ["globex", "acme"] }, h.operator);
    expect(group).toMatchObject({ name: "edge", tenantIds: ["acme", "globex"], certificateTtlSeconds: 86400, tokenTtlSeconds: 300, approved: [] });
    expect((await h.admin.listGroups({}, h.operator)).groups.map((g) => g.name)).toEqual(["edge"]);
    expect(await lastEntry(h)).toMatchObject({ actor: "token:00000000000000aa", action: "group.create", target: "group/edge", outcome: "ok", details: expect.objectContaining({ tenants: "acme,globex" }) });
    expect(await h.store.get(Tables.groups, "edge")).toMatchObject({ tenantIds: ["acme", "globex"], allTenants: false });
  });

  it("creates a group serving every tenant only when all_tenants says so, and stores and logs it", async () => {
    const { group } = await h.admin.createGroup({ name: "core", allTenants: true }, h.operator);
    expect(group).toMatchObject({ name: "core", tenantIds: [], allTenants: true });
    expect(await h.store.get(Tables.groups, "core")).toMatchObject({ tenantIds: [], allTenants: true });
    expect((await h.admin.listGroups({}, h.operator)).groups).toEqual([expect.objectContaining({ name: "core", allTenants: true, tenantIds: [] })]);
    expect(await lastEntry(h)).toMatchObject({ action: "group.create", target: "group/core", outcome: "ok", details: expect.objectContaining({ tenants: "*" }) });
  });

  it("replaces the approved set and pins it in the audit log", async () => {
    await makeGroup(h, "edge");
    const { group } = await h.admin.approveMeasurements({ group: "edge", approved: [{ name: "z.last", sha256: ["1".repeat(64)] }, { name: "a.first", sha256: ["3".repeat(64), "2".repeat(64)] }] }, h.operator);
    expect(group!.approved.map((a) => [a.name, a.sha256])).toEqual([
      ["a.first", ["2".repeat(64), "3".repeat(64)]],
      ["z.last", ["1".repeat(64)]],
    ]);
    expect((await lastEntry(h)).details).toMatchObject({ measurements: "a.first(2),z.last(1)", set_sha256: expect.stringMatching(/^[0-9a-f]{64}$/) });
  });

  it("stores only a hash of a join token's secret", async () => {
    await makeGroup(h, "edge");
    const t = await h.admin.createJoinToken({ group: "edge", description: "rack 4" }, h.operator);
    expect(t.secret).toMatch(new RegExp(`^kmij_${t.tokenId}_[A-Za-z0-9_-]{43}$`));
    expect(Number(t.expiresAt!.seconds) - Date.parse("2030-01-01T00:00:00Z") / 1000).toBe(3600);
    const rec = await h.store.get(Tables.joinTokens, t.tokenId);
    expect(rec).toMatchObject({ group: "edge", description: "rack 4", createdBy: "token:00000000000000aa" });
    expect(rec!.secretSha256).toHaveLength(32);
    const secretPart = t.secret.split("_").slice(2).join("_");
    for (const v of (await h.snapshot()).values()) expect(Buffer.from(v, "hex").toString("latin1")).not.toContain(secretPart);
  });

  it.each<[string, () => Promise<unknown>, string, RegExp]>([
    ["a group name with capitals", () => h.admin.createGroup({ name: "Edge" }, h.operator), "invalid_argument", /^name: "Edge" is not a valid group name/],
    ["an empty group name", () => h.admin.createGroup({ name: "" }, h.operator), "invalid_argument", /^name: required/],
    ["a bad tenant id", () => h.admin.createGroup({ name: "g", tenantIds: ["ok", "Not OK"] }, h.operator), "invalid_argument", /^tenant_ids\[1\]: /],
    ["a duplicate tenant", () => h.admin.createGroup({ name: "g", tenantIds: ["a", "a"] }, h.operator), "invalid_argument", /^tenant_ids\[1\]: "a" given twice/],
    ["a group without tenant_ids or all_tenants", () => h.admin.createGroup({ name: "g" }, h.operator), "invalid_argument", /^tenant_ids: give the tenants this group's machines serve, or all_tenants to serve every tenant$/],
    ["a group with an empty tenant_ids and all_tenants false", () => h.admin.createGroup({ name: "g", tenantIds: [], allTenants: false }, h.operator), "invalid_argument", /^tenant_ids: give the tenants this group's machines serve, or all_tenants to serve every tenant$/],
    ["a group with both tenant_ids and all_tenants", () => h.admin.createGroup({ name: "g", tenantIds: ["acme"], allTenants: true }, h.operator), "invalid_argument", /^all_tenants: give either tenant_ids or all_tenants, not both$/],
    ['"*" as a tenant id', () => h.admin.createGroup({ name: "g", tenantIds: ["*"] }, h.operator), "invalid_argument", /^tenant_ids\[0\]: "\*" is not a valid tenant id/],
    ["a certificate TTL too short", () => h.admin.createGroup({ name: "g", tenantIds: ["acme"], certificateTtlSeconds: 299 }, h.operator), "invalid_argument", /^certificate_ttl_seconds: 299 is out of range; give 300 to 2592000/],
    ["a token TTL too long", () => h.admin.createGroup({ name: "g", tenantIds: ["acme"], tokenTtlSeconds: 3601 }, h.operator), "invalid_argument", /^token_ttl_seconds: 3601 is out of range/],
    ["an existing group", () => h.admin.createGroup({ name: "edge", tenantIds: ["acme"] }, h.operator), "already_exists", /^name: group "edge" exists/],
    ["approving for an unknown group", () => h.admin.approveMeasurements({ group: "nope", approved: [] }, h.operator), "not_found", /^group: no group "nope"/],
    ["an approved digest in capitals", () => h.admin.approveMeasurements({ group: "edge", approved: [{ name: "a", sha256: ["A".repeat(64)] }] }, h.operator), "invalid_argument", /^approved\[0\]\.sha256\[0\]: want 64 lowercase hex/],
    ["an approved name twice", () => h.admin.approveMeasurements({ group: "edge", approved: [{ name: "a", sha256: ["1".repeat(64)] }, { name: "a", sha256: ["2".repeat(64)] }] }, h.operator), "invalid_argument", /^approved\[1\]\.name: "a" given twice/],
    ["an approved name without digests", () => h.admin.approveMeasurements({ group: "edge", approved: [{ name: "a", sha256: [] }] }, h.operator), "invalid_argument", /^approved\[0\]\.sha256: at least one digest/],
    ["17 digests for one name", () => h.admin.approveMeasurements({ group: "edge", approved: [{ name: "a", sha256: Array.from({ length: 17 }, (_, i) => i.toString(16).padStart(64, "0")) }] }, h.operator), "invalid_argument", /^approved\[0\]\.sha256: 17 digests, at most 16/],
    ["a join token for an unknown group", () => h.admin.createJoinToken({ group: "nope" }, h.operator), "not_found", /^group: no group "nope"/],
    ["a join token TTL of 59 s", () => h.admin.createJoinToken({ group: "edge", ttlSeconds: 59 }, h.operator), "invalid_argument", /^ttl_seconds: 59 is out of range; give 60 to 604800/],
    ["a long description", () => h.admin.createJoinToken({ group: "edge", description: "x".repeat(257) }, h.operator), "invalid_argument", /^description: longer than 256/],
    ["a tail limit over 1000", () => h.admin.tailAuditLog({ limit: 1001 }, h.operator), "invalid_argument", /^limit: 1001 is out of range/],
    ["an unknown machine", () => h.admin.getMachine({ machineId: "m-0000000000000000" }, h.operator), "not_found", /^machine_id: no machine/],
    ["a list filter that is no group name", () => h.admin.listMachines({ group: "A B" }, h.operator), "invalid_argument", /^group: /],
  ])("refuses %s, audited, with nothing changed", async (_name, call, code, message) => {
    await makeGroup(h, "edge");
    const before = await h.snapshot();
    await expectCode(call(), code, message);
    expect(await h.snapshot()).toEqual(before);
    expect((await lastEntry(h)).outcome).toBe(`refused: ${code}`);
  });
});

describe("stored records", () => {
  it("refuses a record written by a newer kmi instead of half-understanding it", async () => {
    await makeGroup(h, "edge");
    const { putOp } = await import("../../../src/storage/store.js");
    const g = (await h.store.get(Tables.groups, "edge"))!;
    g.recordVersion = 2;
    await h.store.batch([putOp(Tables.groups, "edge", g)]);
    await expectCode(h.admin.listGroups({}, h.operator), "failed_precondition", /record_version 2, newer than this kmi knows \(1\); upgrade kmi/);
  });
});

describe("machines and the audit log", () => {
  it("lists and shows machines with their last attestation", async () => {
    await makeGroup(h, "edge");
    await makeGroup(h, "core");
    const a = await enrollMachine(h, "edge");
    const b = await enrollMachine(h, "core");
    const all = (await h.admin.listMachines({}, h.operator)).machines.map((x) => x.machineId);
    expect(all).toEqual([a.machineId, b.machineId].sort());
    expect((await h.admin.listMachines({ group: "core" }, h.operator)).machines.map((x) => x.machineId)).toEqual([b.machineId]);
    const shown = (await h.admin.getMachine({ machineId: a.machineId }, h.operator)).machine!;
    expect(shown).toMatchObject({ group: "edge", hostname: "proxy-1", certificateSha256: expect.stringMatching(/^[0-9a-f]{64}$/) });
    expect(shown.lastAttestation).toBeUndefined();
  });

  it("tails and verifies the log over the API; verify finds an edited entry", async () => {
    await makeGroup(h, "edge");
    const tail = await h.admin.tailAuditLog({ last: true, limit: 2 }, h.operator);
    expect(tail.entries.map((e) => e.action)).toEqual(["group.create", "group.approve_measurements"]);
    expect(tail.headSeq).toBe(2n);
    expect(await h.admin.verifyAuditLog({}, h.operator)).toMatchObject({ ok: true, entries: 2n });
    // Edit entry 1 under the log's feet.
    const { AUDIT_LOG_TABLE } = await import("../../../src/storage/audit-log.js");
    const { putOp, numericKey } = await import("../../../src/storage/store.js");
    const e1 = (await h.store.get(AUDIT_LOG_TABLE, numericKey(1)))!;
    e1.actor = "token:someoneelse";
    await h.store.batch([putOp(AUDIT_LOG_TABLE, numericKey(1), e1)]);
    expect(await h.admin.verifyAuditLog({}, h.operator)).toMatchObject({ ok: false, firstBadSeq: 1n, problem: expect.stringMatching(/hash mismatch/) });
  });
});
