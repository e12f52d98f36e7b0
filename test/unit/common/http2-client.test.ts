/**
 * The shared HTTP/2 client transport (src/common/http2-client.ts) when the server goes away: a
 * server that shuts down (GOAWAY on an idle session) at the moment the program closes the
 * transport must not crash the process with an unhandled 'error' event of the HTTP/2 session.
 */
import { createClient } from "@connectrpc/connect";
import { expect, it } from "vitest";
import { createGrpcClientTransport } from "../../../src/common/http2-client.js";
import { Health } from "../../../src/gen/grpc/health/v1/health_pb.js";
import { goawayWhileClosing } from "../../helpers/goaway-race.js";

it("a GOAWAY that arrives while the transport is being closed does not crash the process", async () => {
  const uncaught = await goawayWhileClosing((url, caPem) => {
    const t = createGrpcClientTransport({ baseUrl: url, tls: { ca: caPem } });
    const health = createClient(Health, t.transport);
    return { call: () => health.check({ service: "" }), close: () => t.close() };
  });
  expect(uncaught).toEqual([]);
});
