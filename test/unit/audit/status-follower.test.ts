/**
 * The machine status follower (src/audit/status-follower.ts) on a real LevelDB store: it
 * publishes each committed status change once, in commit order, and after a "resync" (its
 * position compacted away) it lists again and publishes only what changed meanwhile.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MachineStatus } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { MachineStatusFollower } from "../../../src/audit/status-follower.js";
import { MachineStatusHub, type StatusChange, type StatusSubscription } from "../../../src/audit/status-hub.js";
import { createNopLogger } from "../../../src/common/logger.js";
import type { FeedEvent, Store, Table, WatchOptions } from "../../../src/storage/store.js";
import { enrollMachine, makeGroup } from "./flows.js";
import { makeHarness, type Harness, type TestMachine } from "./harness.js";

let h: Harness;
let a: TestMachine;
let b: TestMachine;
beforeEach(async () => {
  h = await makeHarness();
  await makeGroup(h);
  a = await enrollMachine(h);
  b = await enrollMachine(h);
});
afterEach(async () => h.close());

const signal = new AbortController().signal;

/** The changes `sub` receives until it idles for 300 ms. */
async function drain(sub: StatusSubscription): Promise<Pick<StatusChange, "machineId" | "status" | "reason">[]> {
  const out: Pick<StatusChange, "machineId" | "status" | "reason">[] = [];
  for (;;) {
    const c = await sub.next(signal, 300);
    if (c === undefined || c === "idle") return out;
    out.push({ machineId: c.machineId, status: c.status, reason: c.reason });
  }
}

/** `store` whose first watch waits for `gate`, then answers "resync", as after a compaction it slept through. */
function resyncing(store: Store, gate: Promise<void>): Store {
  let first = true;
  return new Proxy(store, {
    get(target, prop) {
      if (prop !== "watch") {
        const v = Reflect.get(target, prop, target) as unknown;
        return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      }
      return async function* <D extends Table>(table: D, options?: WatchOptions): AsyncGenerator<FeedEvent<unknown>> {
        if (first) {
          first = false;
          await gate;
          yield { type: "resync", compactRevision: await target.revision() };
          return;
        }
        yield* target.watch(table, options) as AsyncIterable<FeedEvent<unknown>>;
      };
    },
  });
}

describe("machine status follower", () => {
  it("publishes each committed quarantine and release once, in commit order", async () => {
    const sub = h.ctx.statusHub.subscribe();
    await h.admin.quarantineMachine({ machineId: a.machineId, reason: "stolen" }, h.operator);
    await h.admin.quarantineMachine({ machineId: b.machineId, reason: "lost" }, h.operator);
    await h.admin.releaseMachine({ machineId: a.machineId, reason: "found" }, h.operator);
    // A refused change (already quarantined) commits nothing and publishes nothing.
    await expect(h.admin.quarantineMachine({ machineId: b.machineId, reason: "again" }, h.operator)).rejects.toThrow(/already quarantined/);
    expect(await drain(sub)).toEqual([
      { machineId: a.machineId, status: MachineStatus.QUARANTINED, reason: "stolen" },
      { machineId: b.machineId, status: MachineStatus.QUARANTINED, reason: "lost" },
      { machineId: a.machineId, status: MachineStatus.ACTIVE, reason: "found" },
    ]);
    sub.close();
  });

  it("after a resync, lists again and publishes only what differs from what it knew", async () => {
    await h.admin.quarantineMachine({ machineId: a.machineId, reason: "stolen" }, h.operator);
    const hub = new MachineStatusHub();
    let open!: () => void;
    const follower = new MachineStatusFollower(resyncing(h.store, new Promise<void>((r) => (open = r))), hub, createNopLogger());
    await follower.start();
    const sub = hub.subscribe();
    try {
      // Changes the follower's feed misses: its watch then answers "resync".
      await h.admin.releaseMachine({ machineId: a.machineId, reason: "found" }, h.operator);
      await h.admin.quarantineMachine({ machineId: b.machineId, reason: "lost" }, h.operator);
      open();
      const seen = await drain(sub);
      expect(seen.sort((x, y) => x.machineId.localeCompare(y.machineId))).toEqual(
        [
          { machineId: a.machineId, status: MachineStatus.ACTIVE, reason: "found" },
          { machineId: b.machineId, status: MachineStatus.QUARANTINED, reason: "lost" },
        ].sort((x, y) => x.machineId.localeCompare(y.machineId)),
      );
      // And it watches on from the list: a later change arrives as usual.
      await h.admin.releaseMachine({ machineId: b.machineId, reason: "back" }, h.operator);
      expect(await drain(sub)).toEqual([{ machineId: b.machineId, status: MachineStatus.ACTIVE, reason: "back" }]);
    } finally {
      sub.close();
      await follower.stop();
    }
  });
});
