/**
 * The worker's side of the IPC with the proxy's primary (src/proxy/worker-ipc.ts), over an
 * in-memory channel: a leaf answer becomes a TLS context with the primary's ticket keys; each
 * kind of failure comes back as the error class the interceptor turns into the same page as in
 * one process; a ticket key rotation updates the tenant's keys; key events arrive decoded;
 * closing fails the requests still waiting.
 */
import { randomBytes } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { AgentCallError } from "../../../src/clients/agent-client.js";
import { KeyEventType, WatchKeysResponseSchema, type WatchKeysResponse } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { IssuanceRefused } from "../../../src/proxy/leaf-cache.js";
import { LeafRejected, type LeafMaterial } from "../../../src/proxy/leaf-minter.js";
import type { OriginCertificate } from "../../../src/proxy/origin-cert.js";
import {
  createWorkerAgent,
  createWorkerLeafMinter,
  encodeKeyEvent,
  leafFailureOf,
  type LeafRequestMessage,
  type PrimaryChannel,
  type PrimaryMessage,
  type WorkerMessage,
} from "../../../src/proxy/worker-ipc.js";
import { makeOriginPki } from "../../fixtures/proxy/origins.js";

/** A channel whose primary is `answer`. */
function channel(answer: (m: WorkerMessage, reply: (r: PrimaryMessage) => void) => void): PrimaryChannel & { deliver(m: PrimaryMessage): void } {
  const listeners = new Set<(m: PrimaryMessage) => void>();
  const deliver = (m: PrimaryMessage): void => {
    for (const l of [...listeners]) l(m);
  };
  return {
    send: (m) => queueMicrotask(() => answer(m, deliver)),
    on(l) {
      listeners.add(l);
      return () => void listeners.delete(l);
    },
    deliver,
  };
}

const origin: OriginCertificate = { fingerprint: "AA:BB", dnsNames: ["localhost"], ipAddresses: [], notAfter: new Date(Date.now() + 86_400_000) };

describe("a worker's leaf minter", () => {
  it("builds the leaf's TLS context with the ticket keys the primary sent, and follows a rotation", async () => {
    const pki = makeOriginPki();
    const keys = randomBytes(48);
    const material: LeafMaterial = { tenant: "acme", keyPem: pki.good.key, certPem: pki.good.cert, notAfter: Date.now() + 3_600_000, notBefore: Date.now(), issuerKeyId: "k1", intermediateVersion: 1, serialHex: "01" };
    let asked: LeafRequestMessage | undefined;
    const ch = channel((m, reply) => {
      if (m.type !== "kmi:leaf") return;
      asked = m;
      reply({ type: "kmi:leaf", id: m.id, ok: true, material, ticketKeys: new Uint8Array(keys) });
    });
    const minter = createWorkerLeafMinter(ch);
    const entry = await minter.mint("acme", origin, "localhost", { client: "192.0.2.7", target: "localhost:8443" });
    // The client's address and target go along: the primary charges its new-host limit and
    // remembers the host; the worker takes no token (its minter has the shared limit).
    expect(asked).toMatchObject({ tenant: "acme", host: "localhost", origin, client: "192.0.2.7", target: "localhost:8443" });
    expect(minter.sharedLimit).toBeDefined();
    expect(entry).toMatchObject({ tenant: "acme", issuerKeyId: "k1", serialHex: "01" });
    expect(entry.context).toBeDefined();
    expect(minter.ticketKeysOf("acme").equals(keys)).toBe(true);
    const rotated = randomBytes(48);
    ch.deliver({ type: "kmi:ticket-keys", tenant: "acme", keys: new Uint8Array(rotated) });
    expect(minter.ticketKeysOf("acme").equals(rotated)).toBe(true);
    expect(() => minter.ticketKeysOf("globex")).toThrow(/no session ticket keys from the primary for tenant "globex"/);
    minter.close();
  });

  it.each([
    ["an agent error", new AgentCallError("failed_precondition", 9, "tenant revoked"), AgentCallError, "tenant revoked"],
    ["a rejected leaf", new LeafRejected("agent returned a ca certificate as a leaf"), LeafRejected, "agent returned a ca certificate as a leaf"],
    ["the client's new-host limit", new IssuanceRefused("new-host issuance rate limit reached for this client"), IssuanceRefused, "new-host issuance rate limit reached for this client"],
    ["anything else", new Error("boom"), Error, "boom"],
  ])("%s comes back as the same kind of error", async (_name, err, type, message) => {
    const minter = createWorkerLeafMinter(channel((m, reply) => m.type === "kmi:leaf" && reply({ type: "kmi:leaf", id: m.id, ok: false, error: structuredClone(leafFailureOf(err)) })));
    const got = await minter.mint("acme", origin, "localhost").catch((e: unknown) => e);
    expect(got).toBeInstanceOf(type);
    expect((got as Error).message).toBe(message);
    if (got instanceof AgentCallError) expect([got.code, got.grpcCode]).toEqual(["failed_precondition", 9]);
    minter.close();
  });

  it("asks the primary before refusing a CONNECT on the new-host limit; without an answer, refuses", async () => {
    const asked: WorkerMessage[] = [];
    const minter = createWorkerLeafMinter(
      channel((m, reply) => {
        asked.push(m);
        if (m.type === "kmi:new-host") reply({ type: "kmi:new-host", id: m.id, refused: m.target === "new.example:443" });
      }),
    );
    expect(await minter.sharedLimit!.refusesNewHost("acme", "new.example:443", "192.0.2.7")).toBe(true);
    expect(await minter.sharedLimit!.refusesNewHost("acme", "known.example:443", "192.0.2.7")).toBe(false);
    expect(asked[0]).toMatchObject({ type: "kmi:new-host", tenant: "acme", target: "new.example:443", client: "192.0.2.7" });
    minter.close();
    const silent = createWorkerLeafMinter(channel(() => {}));
    const waiting = silent.sharedLimit!.refusesNewHost("acme", "known.example:443", "192.0.2.7");
    silent.close();
    expect(await waiting).toBe(true);
  });

  it("fails the requests still waiting when closed (the primary went away)", async () => {
    const minter = createWorkerLeafMinter(channel(() => {}));
    const pending = minter.mint("acme", origin, "localhost");
    minter.close();
    await expect(pending).rejects.toThrow("the proxy's primary process went away");
  });
});

describe("a worker's agent", () => {
  it("asks the primary for the key state and hands on its watch state and decoded events", async () => {
    const sent: WorkerMessage[] = [];
    const ch = channel((m) => sent.push(m));
    const events: WatchKeysResponse[] = [];
    const states: boolean[] = [];
    const watch = createWorkerAgent(ch).watchKeys((e) => events.push(e), (c) => states.push(c));
    await new Promise((r) => queueMicrotask(() => r(undefined)));
    expect(sent).toEqual([{ type: "kmi:watch" }]);
    ch.deliver({ type: "kmi:watch-state", connected: true });
    ch.deliver({ type: "kmi:key-event", event: encodeKeyEvent(create(WatchKeysResponseSchema, { type: KeyEventType.REVOKED, tenantId: "acme", reason: "lost" })) });
    expect(states).toEqual([true]);
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ type: KeyEventType.REVOKED, tenantId: "acme", reason: "lost" });
    watch.close();
    ch.deliver({ type: "kmi:watch-state", connected: false });
    expect(states).toEqual([true]);
  });
});
