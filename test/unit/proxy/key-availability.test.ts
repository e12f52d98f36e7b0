/**
 * KeyAvailability: which tenants the proxy refuses on the CONNECT, from WatchKeys messages as
 * the agent sends them.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { KeyEventType, KeyInfoSchema, KeyState, WatchKeysResponseSchema } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { KeyPurpose } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { KeyAvailability } from "../../../src/proxy/key-availability.js";

const key = (tenantId: string, keyId: string, state = KeyState.ACTIVE) => create(KeyInfoSchema, { tenantId, keyId, purpose: KeyPurpose.INTERMEDIATE_CA, state });
const event = (type: KeyEventType, keys: ReturnType<typeof key>[], tenantId = "", reason = "") => create(WatchKeysResponseSchema, { type, keys, tenantId, reason });

function withSnapshot(): KeyAvailability {
  const k = new KeyAvailability();
  k.onWatchState(true);
  k.onEvent(event(KeyEventType.SNAPSHOT, [key("acme", "a1"), key("globex", "g1")]));
  return k;
}

describe("KeyAvailability", () => {
  it("refuses nothing before the first snapshot, or while the watch is down", () => {
    const k = new KeyAvailability();
    expect(k.refusal("acme")).toBeUndefined();
    const s = withSnapshot();
    s.onWatchState(false);
    expect(s.refusal("nobody")).toBeUndefined();
  });

  it("a tenant missing from the snapshot has no key; one in it is served", () => {
    const k = withSnapshot();
    expect(k.refusal("acme")).toBeUndefined();
    expect(k.refusal("initech")?.rule).toBe("no-key");
  });

  it("a revoke of the active intermediate refuses the tenant with its reason, until a rotation", () => {
    const k = withSnapshot();
    k.onEvent(event(KeyEventType.REVOKED, [key("acme", "old", KeyState.DROPPED)], "acme", "old one"));
    expect(k.refusal("acme")).toBeUndefined();
    k.onEvent(event(KeyEventType.REVOKED, [key("acme", "a1", KeyState.DROPPED)], "acme", "key exposed"));
    expect(k.refusal("acme")).toEqual({ rule: "tenant-revoked", reason: 'the intermediate of tenant "acme" was revoked (key exposed); wait for a new version to be activated' });
    expect(k.refusal("globex")).toBeUndefined();
    k.onEvent(event(KeyEventType.ROTATED, [key("acme", "a2")], "acme"));
    expect(k.refusal("acme")).toBeUndefined();
  });

  it("a quarantine refuses every tenant until keys come back (the release's ROTATED events)", () => {
    const k = withSnapshot();
    k.onEvent(event(KeyEventType.QUARANTINED, [key("acme", "a1", KeyState.DROPPED)], "", "lost laptop"));
    expect(k.refusal("acme")?.rule).toBe("quarantined");
    expect(k.refusal("globex")?.reason).toContain("quarantined (lost laptop)");
    k.onEvent(event(KeyEventType.ROTATED, [key("acme", "a1")], "acme"));
    expect(k.refusal("acme")).toBeUndefined();
    expect(k.refusal("globex")?.rule).toBe("no-key");
  });

  it("a snapshot taken while quarantined refuses every tenant", () => {
    const k = new KeyAvailability();
    k.onEvent(event(KeyEventType.SNAPSHOT, [], "", "machine quarantined: lost laptop"));
    expect(k.refusal("acme")?.rule).toBe("quarantined");
  });

  it("a lease that ran out is no-key, naming the lease", () => {
    const k = withSnapshot();
    k.onEvent(event(KeyEventType.LEASE_EXPIRED, [key("globex", "g1", KeyState.DROPPED)], "globex"));
    expect(k.refusal("globex")).toMatchObject({ rule: "no-key", reason: expect.stringContaining("lease") });
  });
});
