import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { PermissionDenied, Unauthenticated } from "../../../src/common/errors.js";
import { Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { TokenRecordSchema, type TokenRecord } from "../../../src/gen/kmi/store/v1/kdc_pb.js";
import { actorOf, authenticateToken, authorize, callerFromPeer, type Caller } from "../../../src/kdc/authz.js";
import { mintToken, parseToken, secretMatches } from "../../../src/kdc/tokens.js";

const now = new Date("2030-01-01T00:00:00Z");

function lookup(records: TokenRecord[]) {
  return { getToken: async (id: string) => records.find((r) => r.tokenId === id) };
}

describe("tokens", () => {
  it("mints kmi_<id>_<secret> and matches only its own secret", () => {
    const t = mintToken();
    expect(t.bearer).toMatch(/^kmi_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$/);
    const p = parseToken(t.bearer)!;
    expect(p.tokenId).toBe(t.tokenId);
    expect(secretMatches(p.secret, t.secretSha256)).toBe(true);
    expect(secretMatches(p.secret.replace(/^./, (c) => (c === "A" ? "B" : "A")), t.secretSha256)).toBe(false);
    expect(parseToken("kmi_zz_abc")).toBeUndefined();
  });
});

describe("authenticateToken", () => {
  const op = mintToken();
  const opRec = create(TokenRecordSchema, { tokenId: op.tokenId, secretSha256: op.secretSha256, role: Role.OPERATOR });
  const revoked = mintToken();
  const revokedRec = create(TokenRecordSchema, { tokenId: revoked.tokenId, secretSha256: revoked.secretSha256, role: Role.OPERATOR, revokedAt: timestampFromDate(now) });
  const expired = mintToken();
  const expiredRec = create(TokenRecordSchema, { tokenId: expired.tokenId, secretSha256: expired.secretSha256, role: Role.OPERATOR, expiresAt: timestampFromDate(new Date(now.getTime() - 1000)) });
  const tokens = lookup([opRec, revokedRec, expiredRec]);

  it("accepts a valid operator token", async () => {
    const c = await authenticateToken(`Bearer ${op.bearer}`, tokens, now);
    expect(c).toEqual({ kind: "token", tokenId: op.tokenId, role: "operator", tenantId: "" });
    expect(actorOf(c)).toBe(`token:${op.tokenId}`);
  });

  it.each([
    ["no header", undefined, "missing bearer token"],
    ["not bearer", `Basic ${op.bearer}`, "missing bearer token"],
    ["malformed", "Bearer nope", "invalid, revoked or expired"],
    ["wrong secret", `Bearer kmi_${op.tokenId}_${"A".repeat(43)}`, "invalid, revoked or expired"],
    ["unknown id", `Bearer kmi_0000000000000000_${"A".repeat(43)}`, "invalid, revoked or expired"],
    ["revoked", `Bearer ${revoked.bearer}`, "invalid, revoked or expired"],
    ["expired", `Bearer ${expired.bearer}`, "invalid, revoked or expired"],
  ])("refuses %s", async (_n, header, message) => {
    const err = await authenticateToken(header, tokens, now).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Unauthenticated);
    expect((err as Error).message).toContain(message);
  });
});

describe("authorize", () => {
  const operator: Caller = { kind: "token", tokenId: "a", role: "operator", tenantId: "" };
  const acme: Caller = { kind: "token", tokenId: "b", role: "tenant-admin", tenantId: "acme" };
  const service: Caller = { kind: "service", name: "audit" };
  const machine: Caller = { kind: "machine", machineId: "m1" };

  it.each([
    ["operator on operator call", operator, { kind: "operator" } as const, null],
    ["operator on any tenant", operator, { kind: "tenant", tenantId: "acme" } as const, null],
    ["tenant admin on own tenant", acme, { kind: "tenant", tenantId: "acme" } as const, null],
    ["tenant admin on other tenant", acme, { kind: "tenant", tenantId: "globex" } as const, PermissionDenied],
    ["tenant admin on operator call", acme, { kind: "operator" } as const, PermissionDenied],
    ["service on operator call", service, { kind: "operator" } as const, PermissionDenied],
    ["service on service call", service, { kind: "service" } as const, null],
    ["machine on service call", machine, { kind: "service" } as const, PermissionDenied],
    ["audit service on an audit-only call", service, { kind: "service", names: ["audit"] } as const, null],
    ["another service on an audit-only call", { kind: "service", name: "watcher" } as const, { kind: "service", names: ["audit"] } as const, PermissionDenied],
    ["operator token on service call", operator, { kind: "service" } as const, PermissionDenied],
    ["anonymous on public call", { kind: "anonymous" } as const, { kind: "public" } as const, null],
  ])("%s", (_n, caller, need, error) => {
    if (error === null) expect(() => authorize(caller, need)).not.toThrow();
    else expect(() => authorize(caller, need)).toThrow(error);
  });

  it("reads service and machine identities from URI SANs", () => {
    expect(callerFromPeer({ uris: ["kmi://service/audit"] })).toEqual(service);
    expect(callerFromPeer({ uris: ["kmi://machine/m1"] })).toEqual(machine);
    expect(callerFromPeer({ uris: ["https://x"] })).toEqual({ kind: "anonymous" });
    expect(callerFromPeer(undefined)).toEqual({ kind: "anonymous" });
  });
});
