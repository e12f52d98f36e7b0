import { describe, expect, it } from "vitest";
import { MachineStatus } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { MAX_QUEUED_CHANGES, MachineStatusHub } from "../../../src/audit/status-hub.js";

const change = (i: number) => ({ machineId: `m-${i.toString(16).padStart(16, "0")}`, status: MachineStatus.QUARANTINED as const, reason: "r", time: new Date(0) });

describe("machine status hub", () => {
  it("delivers changes in order to every subscriber, and idles when there are none", async () => {
    const hub = new MachineStatusHub();
    const a = hub.subscribe();
    const b = hub.subscribe();
    hub.publish(change(1));
    hub.publish(change(2));
    const signal = new AbortController().signal;
    expect([(await a.next(signal, 50)) as { machineId: string }, (await a.next(signal, 50)) as { machineId: string }].map((c) => c.machineId)).toEqual([change(1).machineId, change(2).machineId]);
    expect(((await b.next(signal, 50)) as { machineId: string }).machineId).toBe(change(1).machineId);
    expect(await a.next(signal, 20)).toBe("idle");
    a.close();
    b.close();
    expect(hub.size).toBe(0);
  });

  it("ends a wait when the signal aborts", async () => {
    const hub = new MachineStatusHub();
    const s = hub.subscribe();
    const ac = new AbortController();
    const waiting = s.next(ac.signal, 60_000);
    ac.abort();
    expect(await waiting).toBeUndefined();
  });

  it("cuts off a subscriber that falls too far behind, and frees it", async () => {
    const hub = new MachineStatusHub();
    const s = hub.subscribe();
    for (let i = 0; i <= MAX_QUEUED_CHANGES; i++) hub.publish(change(i));
    expect(hub.size).toBe(0);
    await expect(s.next(new AbortController().signal, 10)).rejects.toThrow(/reconnect for a fresh snapshot/);
  });
});
