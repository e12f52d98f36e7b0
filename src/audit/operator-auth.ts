/**
 * Operator authentication of AuditAdminService calls. Tokens live in one place, the KDC: the
 * Auditserver sends the bearer secret to PeerService.AuthenticateToken over mutual TLS and
 * accepts role operator only. Nothing is cached, so a token revoked on the KDC stops working
 * here at once.
 */
import { PermissionDenied, Unauthenticated } from "../common/errors.js";
import { Role } from "../gen/kmi/kdc/v1/admin_pb.js";
import type { AuditContext } from "./context.js";
import { dateOf } from "./records.js";

const BEARER = /^Bearer\s+(\S+)\s*$/i;
const TOKEN_ID = /^kmi_([0-9a-f]{16})_/;

/** The token id in a bearer header, for the audit actor of a refused call; "anonymous" if none. */
export function actorHint(authorization: string | null): string {
  const bearer = authorization === null ? undefined : BEARER.exec(authorization)?.[1];
  const id = bearer === undefined ? undefined : TOKEN_ID.exec(bearer)?.[1];
  return id === undefined ? "anonymous" : `token:${id}`;
}

/**
 * Checks the call's `authorization: Bearer <token>` with the KDC; returns the audit actor
 * the KDC names ("token:<id>", or "session:<id>" for a portal session relayed by a KDC). Unauthenticated without a usable token, PermissionDenied for a token that
 * is not an operator's, Unavailable when the KDC cannot be asked.
 */
export async function authenticateOperator(ctx: AuditContext, authorization: string | null): Promise<string> {
  const bearer = authorization === null ? undefined : BEARER.exec(authorization)?.[1];
  if (bearer === undefined) {
    throw new Unauthenticated("missing bearer token; send `authorization: Bearer kmi_...` with an operator token (kmi ctl: --token, --token-file or KMI_CTL_TOKEN)");
  }
  const { token: info, actor } = await ctx.kdc.authenticateToken(bearer);
  // The KDC refuses revoked and expired tokens itself; checked again so that a KDC bug cannot
  // let one through here.
  if (info.revoked) throw new Unauthenticated("token: revoked; ask for a new operator token");
  if (info.expiresAt !== undefined && dateOf(info.expiresAt).getTime() <= ctx.clock.now().getTime()) {
    throw new Unauthenticated("token: expired; ask for a new operator token");
  }
  if (info.role !== Role.OPERATOR) {
    throw new PermissionDenied("token: not an operator token; machines, groups and join tokens need role operator");
  }
  return actor;
}
