/**
 * Domain errors: what a caller did wrong, or what state refused the call, with a message
 * that names the field and says how to fix the input. One interceptor per server stack maps
 * them to gRPC codes (see `toConnectError` in ./error-mapping.ts); anything else reaches the
 * caller as an opaque INTERNAL with its cause logged on the server.
 *
 * Messages are short and lowercase, e.g.
 * `certificate: not a CA (basicConstraints cA is false); upload the intermediate, not a leaf`.
 * They never carry a key, a token or a whole CSR.
 */
export abstract class KmiError extends Error {
  /** The gRPC status code name this error maps to. */
  abstract readonly code: KmiErrorCode;

  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** gRPC code names used by domain errors. */
export type KmiErrorCode =
  | "invalid_argument"
  | "not_found"
  | "already_exists"
  | "failed_precondition"
  | "permission_denied"
  | "unauthenticated"
  | "unavailable"
  | "resource_exhausted"
  | "aborted"
  | "deadline_exceeded";

/** The request is malformed: a field is missing, out of range or does not parse. */
export class InvalidArgument extends KmiError {
  readonly code = "invalid_argument";
}

/** The named object does not exist. */
export class NotFound extends KmiError {
  readonly code = "not_found";
}

/** The object to create exists already. */
export class AlreadyExists extends KmiError {
  readonly code = "already_exists";
}

/** The request is well-formed but the system's state refuses it (e.g. a revoked key). */
export class FailedPrecondition extends KmiError {
  readonly code = "failed_precondition";
}

/** The caller is known but may not do this (wrong tenant, wrong role, quarantined). */
export class PermissionDenied extends KmiError {
  readonly code = "permission_denied";
}

/** The caller did not prove who it is (no token, bad token, bad attestation). */
export class Unauthenticated extends KmiError {
  readonly code = "unauthenticated";
}

/** The response header/trailer in which a server that sheds load says when to come back, ms. */
export const RETRY_AFTER_HEADER = "retry-after-ms";

/**
 * A dependency is unreachable, a lease ran out, or the server sheds load; retrying later may
 * work. `retryAfterMs`: the server asks the caller to come back after that long (sent as the
 * `retry-after-ms` header/trailer; the caller adds jitter and may try another replica meanwhile).
 */
export class Unavailable extends KmiError {
  readonly code = "unavailable";
  readonly retryAfterMs: number | undefined;

  constructor(message: string, options?: { cause?: unknown; retryAfterMs?: number }) {
    super(message, options);
    this.retryAfterMs = options?.retryAfterMs;
  }
}

/** A limit was hit (rate, size, count). */
export class ResourceExhausted extends KmiError {
  readonly code = "resource_exhausted";
}

/** A concurrent change won; retry the call. */
export class Aborted extends KmiError {
  readonly code = "aborted";
}

/** True when `err` is one of kmi's domain errors. */
export function isKmiError(err: unknown): err is KmiError {
  return err instanceof KmiError;
}

/** The message of an error, or the thrown value as text when it is not an Error. */
export function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
