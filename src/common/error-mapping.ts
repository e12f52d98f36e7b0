/**
 * The one place where errors become wire errors.
 *
 * Domain errors (./errors.ts) keep their message and get their code. A `ConnectError` is
 * already a wire error and passes as it is. Anything else is a bug or an unexpected failure:
 * the caller gets an opaque INTERNAL with a short reference id, and the cause is logged with
 * that id. Connect's `Code` values equal gRPC's numeric status codes, so one mapping serves
 * both server stacks.
 */
import { randomBytes } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { KmiError, RETRY_AFTER_HEADER, Unavailable, type KmiErrorCode } from "./errors.js";
import type { Logger } from "./logger.js";

const CODE_OF: Record<KmiErrorCode, Code> = {
  invalid_argument: Code.InvalidArgument,
  not_found: Code.NotFound,
  already_exists: Code.AlreadyExists,
  failed_precondition: Code.FailedPrecondition,
  permission_denied: Code.PermissionDenied,
  unauthenticated: Code.Unauthenticated,
  unavailable: Code.Unavailable,
  resource_exhausted: Code.ResourceExhausted,
  aborted: Code.Aborted,
  deadline_exceeded: Code.DeadlineExceeded,
};

const NAMES: readonly string[] = [
  "ok",
  "canceled",
  "unknown",
  "invalid_argument",
  "deadline_exceeded",
  "not_found",
  "already_exists",
  "permission_denied",
  "resource_exhausted",
  "failed_precondition",
  "aborted",
  "out_of_range",
  "unimplemented",
  "internal",
  "unavailable",
  "data_loss",
  "unauthenticated",
];

/** The snake_case name of a code (`0` is `ok`), as logs and metrics label it. */
export function codeName(code: Code | 0): string {
  return NAMES[code] ?? `code_${code}`;
}

/** The Connect code for a domain error code. */
export function codeOfKmiError(code: KmiErrorCode): Code {
  return CODE_OF[code];
}

/** A short random id that ties an opaque INTERNAL error to its log line. */
export function newErrorRef(): string {
  return randomBytes(6).toString("hex");
}

function isAbortError(err: unknown): boolean {
  return err instanceof Error && (err.name === "AbortError" || err.name === "TimeoutError");
}

/** Context logged with an unexpected error (method, peer…). */
export type ErrorLogFields = Record<string, unknown>;

/**
 * Maps any thrown value to the `ConnectError` the caller sees.
 * Why unexpected errors are opaque: their messages can carry internals (paths, SQL-ish store
 * keys, fragments of input) that a caller must not see; the reference id lets an operator
 * find the full cause in the server log.
 */
export function toConnectError(err: unknown, logger: Logger, fields?: ErrorLogFields): ConnectError {
  if (err instanceof ConnectError) return err;
  if (err instanceof Unavailable && err.retryAfterMs !== undefined) {
    return new ConnectError(err.message, Code.Unavailable, { [RETRY_AFTER_HEADER]: String(Math.round(err.retryAfterMs)) }, undefined, err);
  }
  if (err instanceof KmiError) return new ConnectError(err.message, CODE_OF[err.code], undefined, undefined, err);
  if (isAbortError(err)) {
    const e = err as Error;
    return new ConnectError(
      e.name === "TimeoutError" ? "the call's deadline passed" : "the call was canceled",
      e.name === "TimeoutError" ? Code.DeadlineExceeded : Code.Canceled,
    );
  }
  const ref = newErrorRef();
  logger.error("internal error", { ...fields, ref, err: err instanceof Error ? err : String(err) });
  return new ConnectError(`internal error (ref ${ref}); the server log has the cause under this ref`, Code.Internal, undefined, undefined, err);
}

/** A gRPC status as grpc-js takes it: numeric code and message. */
export interface GrpcStatus {
  /** gRPC status code (equal to Connect's `Code`). */
  code: number;
  /** Status message, shown to the caller. */
  details: string;
}

/** Maps any thrown value to a gRPC status, by the same rules as {@link toConnectError}. */
export function toGrpcStatus(err: unknown, logger: Logger, fields?: ErrorLogFields): GrpcStatus {
  const ce = toConnectError(err, logger, fields);
  return { code: ce.code, details: ce.rawMessage };
}
