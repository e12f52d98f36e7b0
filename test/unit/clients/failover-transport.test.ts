/**
 * The failover transport over connect router transports (the real connect stack, in process):
 * which failures go to the next replica, which do not, and a server stream's request sent again.
 */
import { Code, ConnectError, createClient, createRouterTransport, type Transport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { Endpoints } from "../../../src/clients/endpoints.js";
import { createFailoverTransport, failedBeforeActing } from "../../../src/clients/failover-transport.js";
import { Health } from "../../../src/gen/grpc/health/v1/health_pb.js";
import { KdcService } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";

const refused = () => new ConnectError("connect ECONNREFUSED 127.0.0.1:1", Code.Unavailable, undefined, undefined, Object.assign(new Error("connect ECONNREFUSED"), { code: "ECONNREFUSED" }));

describe("failedBeforeActing", () => {
  it.each([
    ["a refused connection, on a change", refused(), "CreateVersion", true],
    ["a shed call (retry-after-ms), on a change", new ConnectError("shed", Code.Unavailable, { "retry-after-ms": "1000" }), "CreateVersion", true],
    ["any UNAVAILABLE, on a read", new ConnectError("store unreachable", Code.Unavailable), "ListVersions", true],
    ["UNAVAILABLE without a hint, on a change (it may have acted)", new ConnectError("store unreachable", Code.Unavailable), "CreateVersion", false],
    ["another code, on a read", new ConnectError("no such tenant", Code.NotFound), "GetTenant", false],
    ["not a ConnectError", new Error("x"), "GetTenant", false],
  ])("%s", (_name, err, method, expected) => {
    expect(failedBeforeActing(err, method)).toBe(expected);
  });
});

describe("createFailoverTransport", () => {
  /**
   * Replica "down" refuses connections (as connect-node reports ECONNREFUSED: UNAVAILABLE with
   * the Node error as cause; a router transport would serialize the cause away), "shed" sheds,
   * "up" answers; `seen` records the calls each got.
   */
  function replicas() {
    const seen: string[] = [];
    const down: Transport = {
      unary: (method) => {
        seen.push(`down:${method.name}`);
        return Promise.reject(refused());
      },
      stream: (method) => {
        seen.push(`down:${method.name}`);
        return Promise.reject(refused());
      },
    };
    const make = (name: string) =>
      name === "down" ? down : createRouterTransport(({ service }) => {
        service(KdcService, {
          getCaCertificates() {
            seen.push(`${name}:get`);
            if (name === "shed") throw new ConnectError("busy", Code.Unavailable, { "retry-after-ms": "500" });
            return { root: new TextEncoder().encode(name) };
          },
          createVersion() {
            seen.push(`${name}:create`);
            throw new ConnectError("store unreachable", Code.Unavailable);
          },
        });
        service(Health, {
          async *watch() {
            seen.push(`${name}:watch`);
            yield { status: 1 };
          },
        });
      });
    return { seen, make };
  }

  it("sends a unary call on to the next replica after a refused connection and a shed, and keeps the one that answered", async () => {
    const { seen, make } = replicas();
    const f = createFailoverTransport(new Endpoints(["https://down", "https://shed", "https://up"]), (url) => ({ transport: make(url.slice(8)) }));
    const client = createClient(KdcService, f.transport);
    expect(new TextDecoder().decode((await client.getCaCertificates({})).root)).toBe("up");
    expect(seen).toEqual(["down:GetCaCertificates", "shed:get", "up:get"]);
    expect(f.endpoints.current).toBe("https://up");
  });

  it("does not send a change again after an UNAVAILABLE that may have acted", async () => {
    const { seen, make } = replicas();
    const f = createFailoverTransport(new Endpoints(["https://up", "https://down"]), (url) => ({ transport: make(url.slice(8)) }));
    await expect(createClient(KdcService, f.transport).createVersion({ tenantId: "acme" })).rejects.toMatchObject({ code: Code.Unavailable });
    expect(seen).toEqual(["up:create"]);
  });

  it("sends a server stream's request again to the next replica while the stream has not started", async () => {
    const { seen, make } = replicas();
    const f = createFailoverTransport(new Endpoints(["https://down", "https://up"]), (url) => ({ transport: make(url.slice(8)) }));
    const got: number[] = [];
    for await (const r of createClient(Health, f.transport).watch({ service: "" })) got.push(r.status);
    expect(got).toEqual([1]);
    expect(seen).toEqual(["down:Watch", "up:watch"]);
  });
});
