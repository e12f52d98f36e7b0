/**
 * The one pipeline that writes refused calls to an audit log, for the KDC (its handler wrapper,
 * src/kdc/handler.ts) and the Auditserver (`audited`, src/audit/audited.ts): the outcome
 * `refused: <code>`, no change ops (a refusal changes nothing but the log), the caller's budget
 * while it has proved nothing, and a failed write that is logged without replacing the call's
 * error (the call is refused either way). Each error is written once: what is written is marked,
 * and an operation that wrote its own refusal marks it with {@link markAudited}.
 */
import { isKmiError } from "./errors.js";
import type { Logger } from "./logger.js";

/** A refusal entry, in the shape both servers' audit logs take. */
export interface RefusalEntry {
  actor: string;
  action: string;
  target: string;
  /** `refused: <code>`. */
  outcome: string;
  details: Record<string, string>;
}

/** Where refusals are written: the server's audit log. */
export interface RefusalSink {
  /** Writes the entry (a caller that proved who it is: always). */
  append(entry: RefusalEntry): Promise<unknown>;
  /** Writes the entry within `source`'s budget (a caller that proved nothing). */
  appendUnauthenticated(entry: RefusalEntry, source: string): Promise<unknown>;
}

/** Who did what to which object: the part of an audit entry known before the outcome. */
export interface RefusalSubject {
  /** "token:<id>", "machine:<id>", "service:<name>", "join_token:<id>", "anonymous" or "system". */
  actor: string;
  /** Dotted verb, e.g. "machine.enroll". */
  action: string;
  /** Object, e.g. "machine/m-…"; may be empty. */
  target: string;
  /** Non-secret details, the refusal's reason included. */
  details?: Record<string, string>;
  /**
   * The caller's address (without port), given only while the caller has proved nothing (no
   * verified certificate, no token that checked out). Its refusal is then written within that
   * address's budget only, so a flood of bad calls cannot fill the disk; a caller that proved
   * who it is is always written.
   */
  source?: string | undefined;
}

const auditedErrors = new WeakSet<object>();

/** Marks `err` as already in the audit log, so it is not written twice. */
export function markAudited<E extends object>(err: E): E {
  auditedErrors.add(err);
  return err;
}

/** True when `err` was written already. */
export function isAudited(err: unknown): boolean {
  return typeof err === "object" && err !== null && auditedErrors.has(err);
}

/** The outcome text of a refusal: "refused: <code>" (internal for anything not a domain error). */
export function refusalOutcome(err: unknown): string {
  return `refused: ${isKmiError(err) ? err.code : "internal"}`;
}

/** What an entry may say of `err`: a domain error's message; never an internal error's text, which may hold anything. */
export function refusalMessage(err: unknown): string {
  return isKmiError(err) ? err.message : "internal error (see the server log)";
}

/**
 * Writes the refusal of `err` under `subject` (once per error) and marks it written. A failed
 * write is logged and swallowed: the caller rethrows the call's own error.
 */
export async function recordRefusal(sink: RefusalSink, logger: Logger, subject: RefusalSubject, err: unknown): Promise<void> {
  if (isAudited(err)) return;
  const entry: RefusalEntry = { actor: subject.actor, action: subject.action, target: subject.target, outcome: refusalOutcome(err), details: { ...subject.details } };
  try {
    if (subject.source !== undefined) await sink.appendUnauthenticated(entry, subject.source);
    else await sink.append(entry);
  } catch (writeErr) {
    logger.error("audit log: cannot record a refusal", { action: subject.action, target: subject.target, err: writeErr });
  }
  if (typeof err === "object" && err !== null) markAudited(err);
}

/**
 * Runs `fn`; if it throws, writes the refusal under `subject(err)` (evaluated then, so it can
 * name what was learned before the failure) and rethrows.
 */
export async function audited<T>(sink: RefusalSink, logger: Logger, subject: (err: unknown) => RefusalSubject, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (!isAudited(err)) await recordRefusal(sink, logger, subject(err), err);
    throw err;
  }
}
