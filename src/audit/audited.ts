/**
 * Every refusal goes into the audit log: `audited` runs an operation and, when it throws,
 * appends a "refused: <code>" entry with no change ops (so the refusal changes nothing but the
 * log) before passing the error on. An error is logged once: `audited` marks what it logged,
 * and an operation that logged its own refusal (attestation) marks it with `markAudited`, so
 * an outer `audited` (the service layer) passes it on untouched.
 */
import { isKmiError } from "../common/errors.js";
import type { AuditContext } from "./context.js";

/** Who did what to which object: the part of an audit entry known before the outcome. */
export interface AuditSubject {
  /** "token:<id>", "machine:<id>", "service:<name>", "join_token:<id>", "anonymous" or "system". */
  actor: string;
  /** Dotted verb, e.g. "machine.enroll". */
  action: string;
  /** Object, e.g. "machine/m-…"; may be empty. */
  target: string;
  /** Non-secret details known so far. */
  details?: Record<string, string>;
  /**
   * The caller's address (without port), given only while the caller has proved nothing (no
   * verified certificate, no operator token that checked out, no join-token secret that
   * matched). Its refusal is then written within that address's budget only
   * (AuditSink.appendUnauthenticated), so a flood of bad calls cannot fill the disk; a caller
   * that proved who it is is always logged.
   */
  source?: string;
}

const auditedErrors = new WeakSet<object>();

/** Marks `err` as already in the audit log, so `audited` does not log it twice. */
export function markAudited<E extends object>(err: E): E {
  auditedErrors.add(err);
  return err;
}

/** The outcome text of a refusal: "refused: <code>" (internal for anything not a domain error). */
export function refusalOutcome(err: unknown): string {
  return `refused: ${isKmiError(err) ? err.code : "internal"}`;
}

/**
 * Runs `fn`; if it throws, logs the refusal under `subject()` (evaluated then, so it can name
 * what was learned before the failure) and rethrows. A failure to write the refusal entry is
 * logged and does not replace the original error: the call is refused either way.
 */
export async function audited<T>(ctx: AuditContext, subject: () => AuditSubject, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (typeof err === "object" && err !== null && auditedErrors.has(err)) throw err;
    const s = subject();
    // Why only the message of a domain error: an internal error's text may hold anything.
    const reason = isKmiError(err) ? err.message.slice(0, 1024) : "internal error (see the server log)";
    try {
      const entry = { actor: s.actor, action: s.action, target: s.target, outcome: refusalOutcome(err), details: { ...s.details, reason } };
      if (s.source !== undefined) await ctx.audit.appendUnauthenticated(entry, s.source);
      else await ctx.audit.append(entry);
    } catch (logErr) {
      ctx.logger.error("audit log: cannot record a refusal", { action: s.action, target: s.target, err: logErr });
    }
    if (typeof err === "object" && err !== null) markAudited(err);
    throw err;
  }
}
