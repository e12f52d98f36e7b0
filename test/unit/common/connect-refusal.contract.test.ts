/**
 * Contract of src/common/connect-refusal.ts with connect-node: what it relies on in the
 * responses connect writes for calls refused before any interceptor runs (here: a request
 * message over the size limit), and that its code tables agree with connect's own (private)
 * ones. A connect upgrade that changes any of this fails here, not in production logs.
 */
import { Code, createConnectRouter } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerResponse } from "@connectrpc/connect/protocol";
import { codeFromHttpStatus as connectCodeFromHttpStatus, codeFromString, codeToString } from "@connectrpc/connect/protocol-connect";
import { describe, expect, it } from "vitest";
import { codeFromConnectName, codeFromHttpStatus, responseStatus, tapBodyChunks } from "../../../src/common/connect-refusal.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../../src/gen/grpc/health/v1/health_pb.js";

const LIMIT = 16;

function checkHandler(): UniversalHandler {
  const router = createConnectRouter({ readMaxBytes: LIMIT });
  router.service(Health, { check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }) });
  const h = router.handlers.find((x) => x.requestPath === "/grpc.health.v1.Health/Check");
  if (h === undefined) throw new Error("no Check handler");
  return h;
}

/** A request message (field 1, `service`) longer than LIMIT, as protobuf binary. */
function bigCheckRequest(): Uint8Array {
  const service = Buffer.alloc(LIMIT * 4, "a");
  return Buffer.concat([Buffer.from([0x0a, service.length]), service]);
}

function envelope(payload: Uint8Array): Uint8Array {
  const head = Buffer.alloc(5);
  head.writeUInt32BE(payload.length, 1);
  return Buffer.concat([head, payload]);
}

async function* once(b: Uint8Array): AsyncIterable<Uint8Array> {
  yield b;
}

/** Calls the handler as connect-node's server would, reads the whole body, and returns what the adapter saw. */
async function call(contentType: string, body: Uint8Array): Promise<{ res: UniversalServerResponse; chunks: Uint8Array[]; last: Uint8Array | undefined }> {
  const res = await checkHandler()({
    httpVersion: "2.0",
    method: "POST",
    url: "http://localhost/grpc.health.v1.Health/Check",
    header: new Headers({ "content-type": contentType }),
    body: once(body),
    signal: new AbortController().signal,
  });
  const chunks: Uint8Array[] = [];
  let last: Uint8Array | undefined;
  const tapped = tapBodyChunks(res, (c) => (last = c));
  if (tapped.body !== undefined) for await (const c of tapped.body) chunks.push(c);
  return { res: tapped, chunks, last };
}

describe("connect-node refusals, as src/common/connect-refusal.ts reads them", () => {
  it("gRPC-Web: HTTP 200, and the last body chunk is the trailer frame with the code", async () => {
    const { res, last } = await call("application/grpc-web+proto", envelope(bigCheckRequest()));
    expect(res.status).toBe(200);
    expect(res.header?.get("grpc-status") ?? null).toBeNull();
    expect(last).toBeDefined();
    expect(last![0]! & 0x80).toBe(0x80);
    const st = responseStatus(res, last);
    expect(st.code).toBe(Code.ResourceExhausted);
    expect(st.message).toMatch(/exceeds|limit|max/i);
  });

  it("Connect unary: the error JSON is one body chunk, and its code beats the loose HTTP status", async () => {
    const { res, chunks, last } = await call("application/proto", bigCheckRequest());
    expect(res.status).toBe(429);
    expect(codeFromHttpStatus(res.status)).toBe(Code.Unavailable); // why the body is read
    expect(chunks).toHaveLength(1);
    expect(JSON.parse(Buffer.from(last!).toString("utf8"))).toMatchObject({ code: "resource_exhausted" });
    expect(responseStatus(res, last).code).toBe(Code.ResourceExhausted);
  });

  it("gRPC: the code is in the trailers (or headers), percent-decoded", async () => {
    const { res, last } = await call("application/grpc+proto", envelope(bigCheckRequest()));
    const st = responseStatus(res, last);
    expect(st.code).toBe(Code.ResourceExhausted);
    expect(st.message).not.toMatch(/%[0-9A-F]{2}/);
  });

  it("an OK call reads as code 0 in every protocol", async () => {
    const small = Buffer.from([0x0a, 0x01, 0x61]);
    for (const [type, body] of [
      ["application/grpc-web+proto", envelope(small)],
      ["application/proto", small],
      ["application/grpc+proto", envelope(small)],
    ] as const) {
      const { res, last } = await call(type, body);
      expect(responseStatus(res, last).code, type).toBe(0);
    }
  });

  it("the code tables agree with connect's own", () => {
    for (const c of Object.values(Code).filter((v): v is Code => typeof v === "number")) {
      expect(codeFromConnectName(codeToString(c)), Code[c]).toBe(c);
      expect(codeFromString(codeToString(c))).toBe(c);
    }
    expect(codeFromConnectName("no_such_code")).toBeUndefined();
    for (let status = 100; status < 600; status++) expect(codeFromHttpStatus(status), String(status)).toBe(connectCodeFromHttpStatus(status));
  });
});
