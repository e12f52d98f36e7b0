/**
 * Contract of src/common/grpc-handler-context.ts with connect and with Node's `Headers`: the
 * adapter builds connect's `HandlerContext` by hand (connect's public `createHandlerContext`
 * is eager and costs tens of times more per call, see the module) and subclasses `Headers`. A connect or
 * Node upgrade that adds a context member, changes a reason, or stops `Headers` from being
 * subclassed fails here. (test/unit/common/grpc-server-context.test.ts covers the same
 * context through a real grpc-js server.)
 */
import { EventEmitter } from "node:events";
import { Code, ConnectError, createContextValues, createHandlerContext } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import { GrpcCallContext, toMetadata, type AnyCall } from "../../../src/common/grpc-handler-context.js";
import { kPeerAddress } from "../../../src/common/rpc.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";

const method = KdcAdminService.method.getTrustBundle;
const target = { service: KdcAdminService, method, url: `http://localhost/${KdcAdminService.typeName}/${method.name}` };

/** A stand-in for a grpc-js server call: what the adapter reads of one. */
function fakeCall(md: grpc.Metadata, deadline: number = Infinity): AnyCall {
  return Object.assign(new EventEmitter(), { metadata: md, cancelled: false, getDeadline: () => deadline }) as unknown as AnyCall;
}

function metadata(): grpc.Metadata {
  const md = new grpc.Metadata();
  md.add("x-multi", "a");
  md.add("x-multi", "b");
  md.add("x-space", "  padded ");
  md.add("x-data-bin", Buffer.from([0, 1, 2, 255]));
  md.add("user-agent", "grpc-node-js/1");
  return md;
}

function ours(md = metadata(), deadline?: number): GrpcCallContext {
  return new GrpcCallContext(target, fakeCall(md, deadline), "unix", undefined, new AbortController().signal);
}

describe("the hand-built HandlerContext against connect's createHandlerContext", () => {
  it("has every member connect's own context has", () => {
    const theirs = createHandlerContext({ ...target, protocolName: "grpc", requestMethod: "POST" });
    // Init options connect copies onto its object, not HandlerContext members.
    const initOnly = new Set(["shutdownSignal", "requestSignal", "contextValues"]);
    const ctx = ours();
    for (const key of Object.keys(theirs).filter((k) => !initOnly.has(k))) expect(key in ctx, key).toBe(true);
    expect(ctx.protocolName).toBe(theirs.protocolName);
    expect(ctx.requestMethod).toBe(theirs.requestMethod);
    expect(ctx.url).toBe(theirs.url);
    expect(ctx.timeoutMs()).toBe(theirs.timeoutMs());
  });

  it("a passed deadline aborts its signal with the reason connect gives", () => {
    const theirs = createHandlerContext({ ...target, protocolName: "grpc", requestMethod: "POST", timeoutMs: 0 });
    const ctx = ours(metadata(), Date.now() - 1);
    expect(theirs.signal.aborted).toBe(true);
    expect(ctx.signal.aborted).toBe(true);
    const [a, b] = [theirs.signal.reason as ConnectError, ctx.signal.reason as ConnectError];
    expect(b).toBeInstanceOf(ConnectError);
    expect([b.code, b.rawMessage]).toEqual([a.code, a.rawMessage]);
    expect(b.code).toBe(Code.DeadlineExceeded);
  });

  it("the end of the call aborts a signal read earlier, with the reason given (as connect's abort does)", () => {
    const theirs = createHandlerContext({ ...target, protocolName: "grpc", requestMethod: "POST" });
    const ctx = ours();
    const signal = ctx.signal;
    const reason = new ConnectError("done", Code.Canceled);
    theirs.abort(reason);
    ctx.abort(reason);
    expect(signal.aborted).toBe(theirs.signal.aborted);
    expect(signal.reason).toBe(theirs.signal.reason);
  });

  it("context values are connect's ContextValues", () => {
    const ctx = ours();
    expect(ctx.values.get(kPeerAddress)).toBe("unix");
    expect(Object.keys(ctx.values)).toEqual(Object.keys(createContextValues()));
  });
});

describe("the metadata-backed request Headers against a Headers built from the metadata", () => {
  it("is a real Headers that reads, iterates and copies as `new Headers(metadata.toHttp2Headers())` would", () => {
    const md = metadata();
    const h = ours(md).requestHeader;
    const record = md.toHttp2Headers() as Record<string, string | string[]>;
    const expected = new Headers(Object.entries(record).map(([k, v]) => [k, Array.isArray(v) ? v.join(",") : v] as [string, string]));
    expect(h).toBeInstanceOf(Headers);
    for (const name of ["x-multi", "X-Multi", "x-space", "x-data-bin", "user-agent", "absent"]) {
      expect([h.get(name), h.has(name)], name).toEqual([expected.get(name), expected.has(name)]);
    }
    expect(() => h.get("bad name")).toThrow(TypeError);
    expect(() => expected.get("bad name")).toThrow(TypeError);
    expect(Headers.prototype.get.call(h, "x-multi")).toBe(expected.get("x-multi"));
    expect([...new Headers(h)]).toEqual([...expected]);
    expect([...h.keys()]).toEqual([...expected.keys()]);
  });

  it("response headers and trailers round-trip to grpc-js metadata, binary values as bytes", () => {
    const h = new Headers({ "x-res": "v", "x-blob-bin": Buffer.from([9, 8, 7]).toString("base64") });
    const md = toMetadata(h);
    expect(md.get("x-res")).toEqual(["v"]);
    expect(md.get("x-blob-bin")).toEqual([Buffer.from([9, 8, 7])]);
  });
});
