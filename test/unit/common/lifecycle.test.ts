import { EventEmitter } from "node:events";
import { describe, expect, it } from "vitest";
import { runUntilSignal } from "../../../src/common/lifecycle.js";
import { createLogger } from "../../../src/common/logger.js";

function harness(destroyMs = 0, failDestroy = false) {
  const events: string[] = [];
  const logs: Record<string, unknown>[] = [];
  const source = new EventEmitter();
  const exits: number[] = [];
  const server = {
    async start() {
      events.push("start");
      return { unix: "/run/x.sock" };
    },
    async destroy() {
      events.push("destroy");
      await new Promise((r) => setTimeout(r, destroyMs));
      if (failDestroy) throw new Error("store would not close");
      events.push("destroyed");
    },
  };
  const logger = createLogger({ write: (l) => void logs.push(JSON.parse(l) as Record<string, unknown>) });
  return { events, logs, source, exits, server, logger };
}

describe("runUntilSignal", () => {
  it("starts, waits for SIGTERM, destroys, runs onStopped, and exits 0", async () => {
    const h = harness(20);
    const started: unknown[] = [];
    const done = runUntilSignal(h.server, {
      logger: h.logger,
      signalSource: h.source,
      exit: (c) => void h.exits.push(c),
      onStarted: (b) => void started.push(b),
      onStopped: () => void h.events.push("stopped-hook"),
    });
    await new Promise((r) => setTimeout(r, 10));
    expect(h.events).toEqual(["start"]);
    expect(started).toEqual([{ unix: "/run/x.sock" }]);
    h.source.emit("SIGTERM");
    expect(await done).toBe(0);
    expect(h.events).toEqual(["start", "destroy", "destroyed", "stopped-hook"]);
    expect(h.exits).toEqual([0]);
    expect(h.logs.map((l) => l["msg"])).toEqual(["started", "signal received; shutting down", "exiting"]);
    expect(h.source.listenerCount("SIGTERM")).toBe(0);
    expect(h.source.listenerCount("SIGINT")).toBe(0);
  });

  it("exits 1 at once on a second signal", async () => {
    const h = harness(200);
    const done = runUntilSignal(h.server, { logger: h.logger, signalSource: h.source, exit: (c) => void h.exits.push(c) });
    await new Promise((r) => setTimeout(r, 10));
    h.source.emit("SIGINT");
    await new Promise((r) => setTimeout(r, 10));
    h.source.emit("SIGTERM");
    expect(h.exits).toEqual([1]);
    expect(await done).toBe(1);
    expect(h.exits).toEqual([1]);
  });

  it("exits 1 when the shutdown fails, with the cause logged", async () => {
    const h = harness(0, true);
    const done = runUntilSignal(h.server, { logger: h.logger, signalSource: h.source, exit: (c) => void h.exits.push(c) });
    await new Promise((r) => setTimeout(r, 10));
    h.source.emit("SIGTERM");
    expect(await done).toBe(1);
    expect(h.exits).toEqual([1]);
    expect(JSON.stringify(h.logs.find((l) => l["msg"] === "shutdown failed"))).toContain("store would not close");
  });

  it("rejects when start fails, leaving no signal handlers", async () => {
    const h = harness();
    h.server.start = async () => {
      throw new Error("address in use");
    };
    await expect(runUntilSignal(h.server, { logger: h.logger, signalSource: h.source, exit: () => {} })).rejects.toThrow("address in use");
    expect(h.source.listenerCount("SIGTERM")).toBe(0);
  });
});
