/**
 * Every refusal goes into the Auditserver's audit log: `audited` runs an operation and, when it
 * throws, appends a "refused: <code>" entry whose details carry the reason, through the one
 * refusal pipeline both servers share (src/common/refusal-audit.ts).
 */
import { audited as auditedCall, refusalMessage, type RefusalSubject } from "../common/refusal-audit.js";
import type { AuditContext } from "./context.js";

export { markAudited, refusalOutcome } from "../common/refusal-audit.js";

/** Who did what to which object: the part of an audit entry known before the outcome. */
export type AuditSubject = RefusalSubject;

/**
 * Runs `fn`; if it throws, logs the refusal under `subject()` (evaluated then, so it can name
 * what was learned before the failure) with the error's reason, and rethrows.
 */
export function audited<T>(ctx: AuditContext, subject: () => AuditSubject, fn: () => Promise<T>): Promise<T> {
  return auditedCall(
    ctx.audit,
    ctx.logger,
    (err) => {
      const s = subject();
      return { ...s, details: { ...s.details, reason: refusalMessage(err).slice(0, 1024) } };
    },
    fn,
  );
}
