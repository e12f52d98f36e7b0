/**
 * A replicated service's health entry (`kmi ctl status` with several --kdc / --audit URLs): the
 * report shown is the first healthy replica's, so the service is up while one replica is; every
 * replica keeps its own state, error, chosen fields and latency, in the order given.
 */
import { describe, expect, it } from "vitest";
import { replicatedEntry, type ReplicaProbe } from "../../../src/clients/mesh-health.js";

const down = (url: string, error: string, latencyMs = 5): ReplicaProbe => ({ url, health: { healthy: false, reachable: false, error }, latencyMs });
const up = (url: string, agents: number, latencyMs = 3): ReplicaProbe => ({
  url,
  health: { healthy: true, version: "0.1.0", connected_agents: agents, tenants: [{ tenant: "acme" }] },
  latencyMs,
});

describe("replicatedEntry", () => {
  it("shows the first healthy replica's report under its url, and every replica in order", () => {
    const e = replicatedEntry([down("https://a", "connect ECONNREFUSED"), up("https://b", 2, 7), up("https://c", 5)], ["version", "connected_agents"]);
    expect(e).toMatchObject({ url: "https://b", healthy: true, connected_agents: 2, tenants: [{ tenant: "acme" }] });
    expect(e["replicas"]).toEqual([
      { url: "https://a", healthy: false, reachable: false, error: "connect ECONNREFUSED", latency_ms: 5 },
      { url: "https://b", healthy: true, version: "0.1.0", connected_agents: 2, latency_ms: 7 },
      { url: "https://c", healthy: true, version: "0.1.0", connected_agents: 5, latency_ms: 3 },
    ]);
  });

  it("keeps only the fields asked for in each replica's entry (no tenant list per replica)", () => {
    const e = replicatedEntry([up("https://a", 1)]);
    expect(e["replicas"]).toEqual([{ url: "https://a", healthy: true, latency_ms: 3 }]);
  });

  it("is down, with the first replica's error, when every replica is", () => {
    const e = replicatedEntry([down("https://a", "first"), down("https://b", "second")]);
    expect(e).toMatchObject({ url: "https://a", healthy: false, reachable: false, error: "first" });
    expect((e["replicas"] as unknown[]).length).toBe(2);
  });

  it("refuses an empty list", () => {
    expect(() => replicatedEntry([])).toThrow(/no replica was probed/);
  });
});
