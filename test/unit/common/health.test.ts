import { createClient, createRouterTransport, ConnectError, Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { HealthStatus, ServingStatus } from "../../../src/common/health.js";
import { Health } from "../../../src/gen/grpc/health/v1/health_pb.js";

function setup() {
  const status = new HealthStatus();
  status.set("kmi.agent.v1.KeyAgentService", ServingStatus.SERVING);
  const client = createClient(Health, createRouterTransport((r) => r.service(Health, status.service())));
  return { status, client };
}

describe("health", () => {
  it("checks the server and each service; an unknown service is NOT_FOUND", async () => {
    const { status, client } = setup();
    expect((await client.check({ service: "" })).status).toBe(ServingStatus.SERVING);
    status.set("kmi.agent.v1.KeyAgentService", ServingStatus.NOT_SERVING);
    expect((await client.check({ service: "kmi.agent.v1.KeyAgentService" })).status).toBe(ServingStatus.NOT_SERVING);
    const err = await client.check({ service: "nope" }).catch((e: unknown) => ConnectError.from(e));
    expect(err).toMatchObject({ code: Code.NotFound, rawMessage: 'health: unknown service "nope"; list services with server reflection' });
  });

  it("streams changes to a watcher, SERVICE_UNKNOWN first for an unknown service, and ends on shutdown", async () => {
    const { status, client } = setup();
    const seen: ServingStatus[] = [];
    const watching = (async () => {
      for await (const r of client.watch({ service: "later" })) {
        seen.push(r.status);
        if (seen.length === 1) status.set("later", ServingStatus.SERVING);
        else if (seen.length === 2) status.shutdown();
      }
    })();
    await watching;
    expect(seen).toEqual([ServingStatus.SERVICE_UNKNOWN, ServingStatus.SERVING, ServingStatus.NOT_SERVING]);
    expect((await client.check({ service: "" })).status).toBe(ServingStatus.NOT_SERVING);
    status.set("", ServingStatus.SERVING);
    expect((await client.check({ service: "" })).status).toBe(ServingStatus.NOT_SERVING);
  });

  it("ends a watch when the client cancels", async () => {
    const { client } = setup();
    const ac = new AbortController();
    const seen: ServingStatus[] = [];
    const p = (async () => {
      for await (const r of client.watch({ service: "" }, { signal: ac.signal })) {
        seen.push(r.status);
        ac.abort();
      }
    })();
    await expect(p).rejects.toMatchObject({ code: Code.Canceled });
    expect(seen).toEqual([ServingStatus.SERVING]);
  });
});
