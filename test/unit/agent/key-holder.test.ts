import { describe, expect, it, vi } from "vitest";
import type { Clock } from "../../../src/agent/context.js";
import { KeyHolder, type HolderEvent } from "../../../src/agent/key-holder.js";
import { pkiLeafIssuerFactory } from "../../../src/agent/leaf-issuer.js";
import { FailedPrecondition, NotFound, Unavailable } from "../../../src/common/errors.js";
import { TestClock } from "../../fixtures/agent/harness.js";
import { intermediateSecret, makeIntermediate, makeRoot, makeSigningKey, signingSecret } from "../../fixtures/agent/tenant-ca.js";

const DAY = 86_400_000;
const past = Date.now() - DAY;
const root = makeRoot(past);
const acme1 = makeIntermediate(root, "acme", 1, { now: past });
const acme2 = makeIntermediate(root, "acme", 2, { now: past });
const acme3 = makeIntermediate(root, "acme", 3, { now: past });
const globex1 = makeIntermediate(root, "globex", 1, { now: past });
const globex2 = makeIntermediate(root, "globex", 2, { now: past });
const s1 = makeSigningKey("acme", "one");
const s2 = makeSigningKey("acme", "two");

function holder(clock: Clock = new TestClock()) {
  const factory = vi.fn(pkiLeafIssuerFactory);
  const h = new KeyHolder({ clock, createLeafIssuer: factory });
  const events: HolderEvent[] = [];
  h.subscribe((e) => events.push(...e));
  return { h, events, factory };
}

describe("KeyHolder", () => {
  it("replaceAll emits ROTATED per new intermediate and ADDED per tenant's new signing keys", () => {
    const { h, events } = holder();
    h.replaceAll([intermediateSecret(acme1), intermediateSecret(globex1), signingSecret(s1)]);
    expect(events.map((e) => [e.type, e.tenantId])).toEqual([
      ["rotated", "acme"],
      ["rotated", "globex"],
      ["added", "acme"],
    ]);
    events.length = 0;
    // Same set again, new leases: nothing to announce.
    h.replaceAll([intermediateSecret(acme1), intermediateSecret(globex1), signingSecret(s1)]);
    expect(events).toEqual([]);
    // globex gone, acme rotated, s1 gone, s2 added.
    h.replaceAll([intermediateSecret(acme2), signingSecret(s2)]);
    expect(events.map((e) => [e.type, e.tenantId, e.keys.map((k) => k.keyId)])).toEqual([
      ["rotated", "acme", [acme2.keyId]],
      ["revoked", "globex", [globex1.keyId]],
      ["added", "acme", [s2.keyId]],
      ["revoked", "acme", [s1.keyId]],
    ]);
  });

  it("a lease renewal keeps the ready leaf issuer (no per-sync rebuild)", () => {
    const { h, factory } = holder();
    h.replaceAll([intermediateSecret(acme1)]);
    expect(factory).toHaveBeenCalledTimes(1);
    h.replaceAll([intermediateSecret(acme1, 2 * DAY)]);
    h.replaceTenant("acme", [intermediateSecret(acme1, 3 * DAY)]);
    expect(factory).toHaveBeenCalledTimes(1);
    expect(h.intermediateFor("acme").leaseExpiresAt).toBeGreaterThan(Date.now() + 2 * DAY);
  });

  it("replaceTenant leaves other tenants alone and refuses a stray tenant's secret", () => {
    const { h, events } = holder();
    h.replaceAll([intermediateSecret(acme1), intermediateSecret(globex1)]);
    events.length = 0;
    h.replaceTenant("acme", [intermediateSecret(acme2)]);
    expect(events.map((e) => e.type)).toEqual(["rotated"]);
    expect(h.intermediateFor("globex").keyId).toBe(globex1.keyId);
    expect(() => h.replaceTenant("acme", [intermediateSecret(globex1)])).toThrow(FailedPrecondition);
    expect(h.intermediateFor("acme").keyId).toBe(acme2.keyId);
  });

  it("keeps the highest version when a set holds two intermediates of one tenant", () => {
    const { h } = holder();
    h.replaceAll([intermediateSecret(acme2), intermediateSecret(acme1)]);
    expect(h.intermediateFor("acme").version).toBe(2);
    expect(h.keys("acme")).toHaveLength(1);
  });

  it("upsert adds a signing key and replaces an intermediate of the same tenant", () => {
    const { h, events } = holder();
    h.replaceAll([intermediateSecret(acme1), signingSecret(s1)]);
    events.length = 0;
    h.upsert([signingSecret(s2)]);
    expect(events.map((e) => e.type)).toEqual(["added"]);
    h.upsert([intermediateSecret(acme2)]);
    expect(h.intermediateFor("acme").version).toBe(2);
    expect(h.keys("acme").map((k) => k.keyId).sort()).toEqual([acme2.keyId, s1.keyId, s2.keyId].sort());
  });

  it("lookups: by id and by tenant/name; CA keys refused for Sign; unknown is NOT_FOUND", () => {
    const { h } = holder();
    h.replaceAll([intermediateSecret(acme1), signingSecret(s1)]);
    expect(h.signingKey(s1.keyId).keyId).toBe(s1.keyId);
    expect(h.signingKey("acme/one").keyId).toBe(s1.keyId);
    expect(() => h.signingKey(acme1.keyId)).toThrow(`key ${acme1.keyId} is an intermediate CA key; CA keys sign only through IssueLeafCertificate`);
    expect(() => h.signingKey("acme/zzz")).toThrow(NotFound);
    expect(() => h.intermediateFor("nope")).toThrow(NotFound);
  });

  it("expireLeases drops the private key and issuer, keeps the public side, and says UNAVAILABLE", () => {
    const clock = new TestClock();
    const { h, events } = holder(clock);
    h.replaceAll([intermediateSecret(acme1, 1000, clock.now()), signingSecret(s1, DAY, clock.now())]);
    expect(h.nextLeaseExpiry()).toBe(clock.now() + 1000);
    events.length = 0;
    expect(h.expireLeases()).toEqual([]);
    clock.advance(1000);
    const ev = h.expireLeases();
    expect(ev.map((e) => [e.type, e.tenantId])).toEqual([["lease_expired", "acme"]]);
    expect(events).toEqual(ev);
    const held = h.keys("acme").find((k) => k.keyId === acme1.keyId)!;
    expect(held.leaseExpired).toBe(true);
    expect(held.privateKey).toBeUndefined();
    expect(held.intermediate?.issuer).toBeUndefined();
    expect(() => h.intermediateFor("acme")).toThrow(Unavailable);
    expect(h.signingKey("acme/one").keyId).toBe(s1.keyId);
    expect(h.nextLeaseExpiry()).toBe(clock.now() - 1000 + DAY);
    // A resync brings it back, as a ROTATED event (the proxy may have cached a refusal).
    events.length = 0;
    h.replaceAll([intermediateSecret(acme1, DAY, clock.now()), signingSecret(s1, DAY, clock.now())]);
    expect(events.map((e) => e.type)).toEqual(["rotated"]);
    expect(h.intermediateFor("acme").intermediate.issuer).toBeDefined();
  });

  it("an entry without a private key (an expired one from the cache) is held as expired", () => {
    const { h } = holder();
    h.replaceAll([{ ...signingSecret(s1), privateKey: undefined }]);
    expect(h.keys()[0]!.leaseExpired).toBe(true);
    expect(() => h.signingKey(s1.keyId)).toThrow(Unavailable);
  });

  it("revoke drops now and remembers why; quarantine drops all until a full sync", () => {
    const { h, events } = holder();
    h.replaceAll([intermediateSecret(acme1), signingSecret(s1), signingSecret(s2)]);
    events.length = 0;
    h.revoke(s1.keyId, "leaked");
    expect(events.map((e) => [e.type, e.reason])).toEqual([["revoked", "leaked"]]);
    expect(() => h.signingKey(s1.keyId)).toThrow(`key_id: key ${s1.keyId} was revoked (leaked)`);
    h.quarantineMachine("compromised");
    expect(h.keys()).toEqual([]);
    expect(events.at(-1)!.type).toBe("quarantined");
    expect(events.at(-1)!.keys.map((k) => k.keyId).sort()).toEqual([acme1.keyId, s2.keyId].sort());
    expect(() => h.signingKey(s2.keyId)).toThrow(/^machine quarantined: compromised; /);
    expect(() => h.intermediateFor("acme")).toThrow(/^machine quarantined: compromised; /);
    h.replaceAll([intermediateSecret(acme1)]);
    expect(h.quarantineReason).toBeUndefined();
    expect(h.intermediateFor("acme").keyId).toBe(acme1.keyId);
  });

  it("replaceAll refuses an unusable secret and changes nothing", () => {
    const { h } = holder();
    h.replaceAll([intermediateSecret(acme1)]);
    expect(() => h.replaceAll([{ ...intermediateSecret(acme2), chainPem: "not a chain" }])).toThrow(FailedPrecondition);
    expect(h.intermediateFor("acme").keyId).toBe(acme1.keyId);
  });
});

describe("KeyHolder: staged versions", () => {
  function staged() {
    const h = holder();
    h.h.replaceAll([intermediateSecret(acme1), intermediateSecret(globex1), signingSecret(s1)]);
    h.events.length = 0;
    h.h.stage(intermediateSecret(acme2));
    return h;
  }

  it("holds a staged version beside the active one, signs nothing with it, announces nothing", () => {
    const { h, events } = staged();
    expect(events).toEqual([]);
    expect(h.stagedKeys().map((k) => [k.tenantId, k.version])).toEqual([["acme", 2]]);
    expect(h.intermediateFor("acme").keyId).toBe(acme1.keyId);
    expect(h.keys("acme").map((k) => k.keyId)).not.toContain(acme2.keyId);
    expect(() => h.signingKey(acme2.keyId)).toThrow(`key ${acme2.keyId} is an intermediate CA key; CA keys sign only through IssueLeafCertificate`);
  });

  it("ACTIVATED carrying the staged version makes it active, reusing its ready issuer", () => {
    const { h, events, factory } = staged();
    const built = factory.mock.calls.length;
    h.replaceTenant("acme", [intermediateSecret(acme2), signingSecret(s1)]);
    expect(factory).toHaveBeenCalledTimes(built);
    expect(h.intermediateFor("acme").keyId).toBe(acme2.keyId);
    expect(h.stagedKeys()).toEqual([]);
    expect(events.map((e) => [e.type, e.tenantId, e.keys[0]!.version])).toEqual([["rotated", "acme", 2]]);
  });

  it("an activation of an older version keeps the staged one; an unrelated tenant's change keeps it too", () => {
    const { h } = staged();
    h.replaceTenant("acme", [intermediateSecret(acme1, 2 * DAY)]);
    h.replaceTenant("globex", [intermediateSecret(globex2)]);
    h.upsert([signingSecret(s2)]);
    expect(h.stagedKeys().map((k) => k.keyId)).toEqual([acme2.keyId]);
    h.upsert([intermediateSecret(acme3)]);
    expect(h.stagedKeys()).toEqual([]);
  });

  it.each([
    ["a signing key", () => signingSecret(s2), "is not an intermediate CA key"],
    ["the active version", () => intermediateSecret(acme1), 'staged version 1 of tenant "acme" is not newer than the active version 1'],
    ["an unparsable chain", () => ({ ...intermediateSecret(acme3), chainPem: "x" }), "comes without a certificate"],
  ])("stage refuses %s and changes nothing", (_name, input, message) => {
    const { h } = staged();
    expect(() => h.stage(input())).toThrow(FailedPrecondition);
    expect(() => h.stage(input())).toThrow(message);
    expect(h.stagedKeys().map((k) => k.keyId)).toEqual([acme2.keyId]);
  });

  it("a newer staged version replaces the older one of its tenant", () => {
    const { h } = staged();
    h.stage(intermediateSecret(globex2));
    h.stage(intermediateSecret(acme3));
    expect(h.stagedKeys().map((k) => [k.tenantId, k.version])).toEqual([["acme", 3], ["globex", 2]]);
  });

  it("a SNAPSHOT drops staged versions (the KDC sends them again); the cache's are kept at load", () => {
    const { h } = staged();
    h.replaceAll([intermediateSecret(acme1)]);
    expect(h.stagedKeys()).toEqual([]);
    h.replaceAll([intermediateSecret(acme1)], undefined, [intermediateSecret(acme2)]);
    expect(h.stagedKeys().map((k) => k.keyId)).toEqual([acme2.keyId]);
    h.replaceAll([], { reason: "compromised", time: 0 }, [intermediateSecret(acme2)]);
    expect(h.stagedKeys()).toEqual([]);
  });

  it("revoking the staged key, or quarantine, drops it; a quarantined holder refuses to stage", () => {
    const { h, events } = staged();
    expect(h.revoke(acme2.keyId, "leaked")).toEqual([]);
    expect(h.stagedKeys()).toEqual([]);
    expect(h.intermediateFor("acme").keyId).toBe(acme1.keyId);
    expect(events).toEqual([]);
    h.stage(intermediateSecret(acme3));
    h.quarantineMachine("compromised");
    expect(h.stagedKeys()).toEqual([]);
    expect(() => h.stage(intermediateSecret(acme3))).toThrow(/^machine quarantined: /);
  });

  it("a staged version whose lease ran out is dropped at the next change", () => {
    const clock = new TestClock();
    const { h } = holder(clock);
    h.replaceAll([intermediateSecret(acme1, DAY, clock.now())]);
    h.stage(intermediateSecret(acme2, 1000, clock.now()));
    clock.advance(1000);
    h.expireLeases();
    expect(h.stagedKeys()).toEqual([]);
  });
});
