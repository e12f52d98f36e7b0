import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { codeName, toConnectError, toGrpcStatus } from "../../../src/common/error-mapping.js";
import {
  Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable,
} from "../../../src/common/errors.js";
import { createLogger } from "../../../src/common/logger.js";

function capture() {
  const lines: Record<string, unknown>[] = [];
  return { logger: createLogger({ write: (l) => void lines.push(JSON.parse(l) as Record<string, unknown>) }), lines };
}

describe("error mapping", () => {
  it.each([
    [new InvalidArgument("name: required"), Code.InvalidArgument, 3],
    [new NotFound("tenant acme not found"), Code.NotFound, 5],
    [new AlreadyExists("tenant acme exists"), Code.AlreadyExists, 6],
    [new PermissionDenied("tenant-admin of another tenant"), Code.PermissionDenied, 7],
    [new ResourceExhausted("too many"), Code.ResourceExhausted, 8],
    [new FailedPrecondition("key revoked"), Code.FailedPrecondition, 9],
    [new Aborted("retry"), Code.Aborted, 10],
    [new Unavailable("kdc unreachable"), Code.Unavailable, 14],
    [new Unauthenticated("no token"), Code.Unauthenticated, 16],
  ])("maps %s to its code, message kept, nothing logged", (err, code, grpcCode) => {
    const { logger, lines } = capture();
    const ce = toConnectError(err, logger);
    expect(ce.code).toBe(code);
    expect(ce.rawMessage).toBe(err.message);
    expect(toGrpcStatus(err, logger)).toEqual({ code: grpcCode, details: err.message });
    expect(lines).toEqual([]);
  });

  it("passes a ConnectError through", () => {
    const { logger } = capture();
    const e = new ConnectError("nope", Code.OutOfRange);
    expect(toConnectError(e, logger)).toBe(e);
  });

  it.each([new Error("EACCES: /var/lib/kmi/master.key"), new TypeError("x is undefined"), "a thrown string"])(
    "turns %s into an opaque internal, and logs the cause under the same ref",
    (err) => {
      const { logger, lines } = capture();
      const ce = toConnectError(err, logger, { method: "/a.B/C" });
      expect(ce.code).toBe(Code.Internal);
      expect(ce.rawMessage).toMatch(/^internal error \(ref ([0-9a-f]{12})\); the server log has the cause under this ref$/);
      expect(ce.rawMessage).not.toContain("master.key");
      const ref = /ref ([0-9a-f]{12})/.exec(ce.rawMessage)![1];
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatchObject({ level: "error", msg: "internal error", ref, method: "/a.B/C" });
      expect(JSON.stringify(lines[0])).toContain(err instanceof Error ? err.message : err);
    },
  );

  it("maps aborts to canceled and timeouts to deadline_exceeded", () => {
    const { logger, lines } = capture();
    expect(toConnectError(new DOMException("x", "AbortError"), logger).code).toBe(Code.Canceled);
    expect(toConnectError(new DOMException("x", "TimeoutError"), logger).code).toBe(Code.DeadlineExceeded);
    expect(lines).toEqual([]);
  });

  it("names codes in snake_case", () => {
    expect([0, Code.InvalidArgument, Code.Unauthenticated, Code.DeadlineExceeded].map(codeName)).toEqual(["ok", "invalid_argument", "unauthenticated", "deadline_exceeded"]);
  });
});
