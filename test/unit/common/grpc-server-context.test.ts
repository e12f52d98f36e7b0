/**
 * The per-call HandlerContext of the grpc-js adapter, which makes its abort signal, response
 * headers and context values only when a handler reads them, and answers request header reads
 * from the gRPC metadata: what a handler sees must be what an eager context would show.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { GrpcServer } from "../../../src/common/grpc-server.js";
import { createNopLogger } from "../../../src/common/logger.js";
import { kPeerAddress } from "../../../src/common/rpc.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";

const method = KdcAdminService.method.getTrustBundle;
const NAMES = ["x-multi", "X-MULTI", "x-case", "x-data-bin", "x-space", "user-agent", "absent"];

interface Seen {
  headers?: Headers;
  /** get/has of NAMES read before anything filled the Headers, then after. */
  lazy?: [string | null, boolean][];
  filled?: [string | null, boolean][];
  reason?: unknown;
  timeoutMs?: number | undefined;
  peerAddress?: string;
}

describe("grpc-server per-call context", () => {
  let dir: string;
  let server: GrpcServer;
  let client: grpc.Client;
  const seen: Seen = {};
  let handlerDone: (() => void) | undefined;

  const impl: Partial<ServiceImpl<typeof KdcAdminService>> = {
    async getTrustBundle(_req, ctx: HandlerContext) {
      const mode = ctx.requestHeader.get("x-mode");
      seen.headers = ctx.requestHeader;
      seen.lazy = NAMES.map((n) => [ctx.requestHeader.get(n), ctx.requestHeader.has(n)]);
      ctx.requestHeader.forEach(() => {}); // fills the real Headers from the metadata
      seen.filled = NAMES.map((n) => [ctx.requestHeader.get(n), ctx.requestHeader.has(n)]);
      seen.timeoutMs = ctx.timeoutMs();
      seen.peerAddress = ctx.values.get(kPeerAddress);
      if (mode === "late-signal") {
        // Reads the signal only after the client canceled.
        await new Promise((r) => setTimeout(r, 300));
        seen.reason = ctx.signal.aborted ? ctx.signal.reason : "not aborted";
        handlerDone?.();
        throw new Error("late");
      }
      if (mode === "wait-signal") {
        await new Promise<void>((resolve) => ctx.signal.addEventListener("abort", () => resolve(), { once: true }));
        seen.reason = ctx.signal.reason;
        handlerDone?.();
        throw new Error("aborted");
      }
      ctx.responseHeader.set("x-res", "h");
      ctx.responseTrailer.set("x-trl", "t");
      return { kmiRootPem: "root", infrastructureCaPem: "" };
    },
  };

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "kmi-ctx-"));
    server = GrpcServer.create({ name: "t", services: [{ service: KdcAdminService, impl }], unix: { path: join(dir, "s.sock") }, logger: createNopLogger() });
    await server.start();
    client = new grpc.Client(`unix:${join(dir, "s.sock")}`, grpc.credentials.createInsecure());
  });

  afterAll(async () => {
    client.close();
    await server.destroy();
    rmSync(dir, { recursive: true, force: true });
  });

  function call(md: grpc.Metadata, opts: grpc.CallOptions = {}, onMeta?: (m: grpc.Metadata) => void) {
    let status: grpc.StatusObject | undefined;
    let resolveStatus: () => void;
    const statusSeen = new Promise<void>((r) => (resolveStatus = r));
    const c = client.makeUnaryRequest(
      `/${KdcAdminService.typeName}/${method.name}`,
      (v: unknown) => Buffer.from(toBinary(method.input, v as never)),
      (b: Buffer) => fromBinary(method.output, b),
      create(method.input),
      md,
      opts,
      () => {},
    );
    c.on("metadata", (m: grpc.Metadata) => onMeta?.(m));
    c.on("status", (s: grpc.StatusObject) => {
      status = s;
      resolveStatus();
    });
    return { c, done: statusSeen.then(() => status!) };
  }

  it("answers header reads as a Headers built from the metadata would", async () => {
    const md = new grpc.Metadata();
    md.add("x-multi", "a");
    md.add("x-multi", "b");
    md.set("X-Case", "v");
    md.set("x-data-bin", Buffer.from([1, 2, 3]));
    md.set("x-space", "  padded ");
    let header: grpc.Metadata | undefined;
    const { done } = call(md, { deadline: Date.now() + 30_000 }, (m) => (header = m));
    const st = await done;
    expect(st.code).toBe(grpc.status.OK);
    expect(st.metadata.get("x-trl")).toEqual(["t"]);
    expect(header?.get("x-res")).toEqual(["h"]);
    const h = seen.headers!;
    expect(seen.lazy).toEqual(seen.filled);
    expect(seen.lazy![2]).toEqual(["v", true]);
    expect(seen.lazy![3]).toEqual([Buffer.from([1, 2, 3]).toString("base64"), true]);
    expect(seen.lazy![6]).toEqual([null, false]);
    expect(() => h.get("bad name")).toThrow(TypeError);
    // Iteration holds every header of the call (the client adds its own, like user-agent).
    expect([...h.keys()]).toEqual(expect.arrayContaining(["x-multi", "x-case", "x-data-bin", "user-agent"]));
    expect(seen.timeoutMs).toBeGreaterThan(25_000);
    expect(seen.timeoutMs).toBeLessThanOrEqual(30_000);
    expect(seen.peerAddress).toBe("unix");
  });

  it("a signal read after the client canceled is already aborted, as canceled", async () => {
    const md = new grpc.Metadata();
    md.set("x-mode", "late-signal");
    const finished = new Promise<void>((r) => (handlerDone = r));
    const { c, done } = call(md);
    await new Promise((r) => setTimeout(r, 100));
    c.cancel();
    expect((await done).code).toBe(grpc.status.CANCELLED);
    await finished;
    expect(seen.reason).toBeInstanceOf(ConnectError);
    expect((seen.reason as ConnectError).code).toBe(Code.Canceled);
  });

  it("a signal read before the cancel aborts when the client cancels", async () => {
    const md = new grpc.Metadata();
    md.set("x-mode", "wait-signal");
    const finished = new Promise<void>((r) => (handlerDone = r));
    const { c, done } = call(md);
    await new Promise((r) => setTimeout(r, 100));
    c.cancel();
    expect((await done).code).toBe(grpc.status.CANCELLED);
    await finished;
    expect((seen.reason as ConnectError).code).toBe(Code.Canceled);
  });

  it("a signal read before the deadline aborts at the deadline", async () => {
    const md = new grpc.Metadata();
    md.set("x-mode", "wait-signal");
    const finished = new Promise<void>((r) => (handlerDone = r));
    const { done } = call(md, { deadline: Date.now() + 200 });
    expect((await done).code).toBe(grpc.status.DEADLINE_EXCEEDED);
    await finished;
    expect([Code.DeadlineExceeded, Code.Canceled]).toContain((seen.reason as ConnectError).code);
  });
});
