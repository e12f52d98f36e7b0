import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { FailedPrecondition } from "../../../src/common/errors.js";
import { VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { IntermediateVersionRecordSchema } from "../../../src/gen/kmi/store/v1/kdc_pb.js";
import { newTenant, nextVersion, planActivate, planRevoke, planUpload, requireRenewable } from "../../../src/kdc/model.js";
import { KeyedMutex } from "../../../src/kdc/mutex.js";

const now = new Date("2030-06-01T00:00:00Z");
const valid = { notBefore: new Date("2030-01-01T00:00:00Z"), notAfter: new Date("2031-01-01T00:00:00Z") };
const ver = (version: number, state: VersionState) => create(IntermediateVersionRecordSchema, { tenantId: "acme", version, state });

describe("state machine", () => {
  it("activation retires the previous active version and updates the tenant", () => {
    const t = { ...newTenant("acme", "Acme", now), activeVersion: 1 };
    const p = planActivate(t, ver(2, VersionState.READY), ver(1, VersionState.ACTIVE), valid, now);
    expect(p.tenant.activeVersion).toBe(2);
    expect(p.activated.state).toBe(VersionState.ACTIVE);
    expect(p.retired?.state).toBe(VersionState.RETIRED);
    expect(t.activeVersion).toBe(1); // input untouched
  });

  it("a retired version can be activated again", () => {
    const p = planActivate(newTenant("acme", "Acme", now), ver(1, VersionState.RETIRED), undefined, valid, now);
    expect(p.activated.state).toBe(VersionState.ACTIVE);
    expect(p.retired).toBeUndefined();
  });

  it.each([
    ["pending", VersionState.PENDING, valid, "upload its signed certificate first"],
    ["revoked", VersionState.REVOKED, valid, "revoked and cannot be activated"],
    ["active", VersionState.ACTIVE, valid, "already active"],
    ["expired", VersionState.READY, { notBefore: valid.notBefore, notAfter: new Date("2030-05-01T00:00:00Z") }, "expired on 2030-05-01"],
    ["not yet valid", VersionState.READY, { notBefore: new Date("2030-07-01T00:00:00Z"), notAfter: valid.notAfter }, "not valid before"],
  ])("activation of a %s version is refused", (_n, state, validity, message) => {
    expect(() => planActivate(newTenant("acme", "Acme", now), ver(3, state), undefined, validity, now)).toThrow(FailedPrecondition);
    expect(() => planActivate(newTenant("acme", "Acme", now), ver(3, state), undefined, validity, now)).toThrow(message);
  });

  it("revoking the active version needs allow_active and clears the tenant's active version", () => {
    const t = { ...newTenant("acme", "Acme", now), activeVersion: 1 };
    expect(() => planRevoke(t, ver(1, VersionState.ACTIVE), "x", false, now)).toThrow("allow_active");
    const p = planRevoke(t, ver(1, VersionState.ACTIVE), "compromised", true, now);
    expect(p.tenant.activeVersion).toBe(0);
    expect(p.revoked).toMatchObject({ state: VersionState.REVOKED, revokeReason: "compromised" });
    expect(() => planRevoke(t, p.revoked, "again", true, now)).toThrow("already revoked");
  });

  it("upload only to a pending version; renew not from pending or revoked", () => {
    expect(planUpload(ver(1, VersionState.PENDING), new Uint8Array([1]), undefined).state).toBe(VersionState.READY);
    expect(() => planUpload(ver(1, VersionState.READY), new Uint8Array([1]), undefined)).toThrow("not pending");
    expect(() => requireRenewable(ver(1, VersionState.PENDING))).toThrow(FailedPrecondition);
    expect(() => requireRenewable(ver(1, VersionState.REVOKED))).toThrow(FailedPrecondition);
    expect(() => requireRenewable(ver(1, VersionState.RETIRED))).not.toThrow();
  });

  it("version numbers increase by one", () => {
    const a = nextVersion(newTenant("acme", "Acme", now));
    const b = nextVersion(a.tenant);
    expect([a.version, b.version]).toEqual([1, 2]);
  });
});

describe("KeyedMutex", () => {
  it("serializes one key and lets others run in parallel", async () => {
    const m = new KeyedMutex();
    const order: string[] = [];
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    await Promise.all([
      m.run("a", async () => { order.push("a1+"); await sleep(20); order.push("a1-"); }),
      m.run("a", async () => { order.push("a2+"); order.push("a2-"); }),
      m.run("b", async () => { order.push("b+"); order.push("b-"); }),
    ]);
    expect(order.indexOf("a2+")).toBeGreaterThan(order.indexOf("a1-"));
    expect(order.indexOf("b+")).toBeLessThan(order.indexOf("a1-"));
    expect(m.size).toBe(0);
  });

  it("a failing holder releases the lock", async () => {
    const m = new KeyedMutex();
    await expect(m.run("a", async () => { throw new Error("boom"); })).rejects.toThrow("boom");
    await expect(m.run("a", async () => 7)).resolves.toBe(7);
  });
});
