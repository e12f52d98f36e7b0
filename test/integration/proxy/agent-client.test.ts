/**
 * The proxy's agent client against a KeyAgentService on a real Unix socket: the workload
 * header, error codes, and WatchKeys surviving an agent restart (the proxy then drops leaves
 * of intermediates the new agent does not hold).
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Client, credentials, Metadata, status } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { GetCertificateChainRequestSchema, GetCertificateChainResponseSchema, KeyEventType, type WatchKeysResponse } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { MemoryAccessLog } from "../../../src/proxy/access-log.js";
import { AgentCallError, AgentClient } from "../../../src/clients/agent-client.js";
import { ProxyServer } from "../../../src/proxy/server.js";
import { FixtureAgent } from "../../fixtures/proxy/fixture-agent.js";
import { makeOriginPki, startOrigin } from "../../fixtures/proxy/origins.js";
import { tlsViaProxy } from "../../fixtures/proxy/harness.js";

let dir: string;
let agent: FixtureAgent;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-proxy-agent-"));
  agent = await FixtureAgent.start({ tenants: ["acme"], dir });
});

afterAll(async () => {
  await agent?.stop();
  await rm(dir, { recursive: true, force: true });
});

async function until(cond: () => boolean, ms = 5000): Promise<void> {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > ms) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("agent client", () => {
  it("calls carry the workload header; a call without it is refused by the agent", async () => {
    const c = new AgentClient({ socketPath: agent.socketPath, logger: createNopLogger() });
    const chain = await c.getCertificateChain("acme");
    expect(chain.version).toBe(agent.version("acme"));
    expect(chain.chainPem).toBe(agent.intermediatePem("acme"));
    c.close();
    // The same call by hand, without the header.
    const raw = new Client(`unix:${agent.socketPath}`, credentials.createInsecure());
    const err = await new Promise<{ code: number; details: string }>((resolve) => {
      raw.makeUnaryRequest(
        "/kmi.agent.v1.KeyAgentService/GetCertificateChain",
        (m: unknown) => Buffer.from(toBinary(GetCertificateChainRequestSchema, m as never)),
        (b: Buffer) => fromBinary(GetCertificateChainResponseSchema, b),
        create(GetCertificateChainRequestSchema, { tenantId: "acme" }),
        new Metadata(),
        (e) => resolve(e as never),
      );
    });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toContain("kmi-agent-workload");
    raw.close();
  });

  it("agent errors keep their gRPC code and message", async () => {
    const c = new AgentClient({ socketPath: agent.socketPath, logger: createNopLogger() });
    const e = await c.getCertificateChain("nobody").catch((x: unknown) => x);
    expect(e).toBeInstanceOf(AgentCallError);
    expect(e).toMatchObject({ code: "not_found", grpcCode: status.NOT_FOUND });
    expect((e as Error).message).toContain('tenant "nobody"');
    c.close();
  });

  it("WatchKeys: a SNAPSHOT first, then events; reopened after the agent restarts, and the proxy drops stale leaves", async () => {
    const events: WatchKeysResponse[] = [];
    const c = new AgentClient({ socketPath: agent.socketPath, logger: createNopLogger() });
    const w = c.watchKeys((e) => events.push(e));
    await until(() => events.length >= 1);
    expect(events[0]!.type).toBe(KeyEventType.SNAPSHOT);
    agent.rotate("acme");
    await until(() => events.some((e) => e.type === KeyEventType.ROTATED && e.tenantId === "acme"));

    // A proxy with a cached leaf, then an agent restart with new intermediates.
    const pki = makeOriginPki();
    const origin = await startOrigin({ cert: pki.good });
    const proxy = await ProxyServer.create({
      host: "127.0.0.1",
      port: 0,
      agentSocket: agent.socketPath,
      defaultTenant: "acme",
      accessLog: new MemoryAccessLog(),
      extraCaPem: [pki.caPem],
      systemRoots: false,
      allowPrivate: ["127.0.0.0/8"],
      logger: createNopLogger(),
      shutdownGraceMs: 200,
    });
    const { port } = await proxy.start();
    try {
      const t1 = await tlsViaProxy(port, "localhost", origin.port, { ca: agent.rootPem("acme") });
      t1.destroy();
      expect(proxy.leaves.size).toBe(1);
      await agent.stop();
      agent = await FixtureAgent.start({ tenants: ["acme"], dir });
      const snapshots = events.filter((e) => e.type === KeyEventType.SNAPSHOT).length;
      await until(() => events.filter((e) => e.type === KeyEventType.SNAPSHOT).length > snapshots, 8000);
      await until(() => proxy.leaves.size === 0, 8000);
      const t2 = await tlsViaProxy(port, "localhost", origin.port, { ca: agent.rootPem("acme") });
      expect(t2.authorized).toBe(true);
      t2.destroy();
    } finally {
      await proxy.destroy();
      await origin.close();
      w.close();
      c.close();
    }
  });
});
