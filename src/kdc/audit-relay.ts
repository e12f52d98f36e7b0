/**
 * AuditAdminService on the KDC's origin, relayed to the Auditserver: the portal's operator pages
 * (machines, quarantine, groups, join tokens) call the same RPCs `kmi ctl` calls on the
 * Auditserver, through the KDC that serves the page (a browser page reaches its own origin only).
 *
 * The relay decides nothing: it forwards the caller's own credential and the Auditserver
 * authorizes as it always does (asking the KDC about the token). A bearer token is forwarded as
 * it came; a portal session cookie is first checked here like every cookie (Connect header,
 * Origin, live session) and forwarded as the session's bearer form (./portal-session.ts).
 */
import { ConnectError, type CallOptions, type Client, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { Unauthenticated, Unavailable } from "../common/errors.js";
import { AuditAdminService } from "../gen/kmi/audit/v1/admin_pb.js";
import type { KdcContext } from "./context.js";
import { authenticateSession, sessionBearer, sessionSecretFromCookie } from "./portal-session.js";

/** How long a relayed call may take, ms. */
const RELAY_TIMEOUT_MS = 15_000;

/** The credential to forward: the caller's bearer header, or its checked session as a bearer. */
async function forwardedCredential(ctx: KdcContext, hctx: HandlerContext): Promise<string> {
  const authorization = hctx.requestHeader.get("authorization");
  if (authorization !== null) return authorization;
  const caller = await authenticateSession(hctx, ctx.store, ctx.clock.now());
  const secret = sessionSecretFromCookie(hctx.requestHeader.get("cookie"));
  if (caller?.sessionId === undefined || secret === undefined) {
    throw new Unauthenticated("missing bearer token or portal session; send `authorization: Bearer kmi_...` with an operator token");
  }
  return `Bearer ${sessionBearer(caller.sessionId, secret)}`;
}

/** The relay, over the Auditserver's admin client (undefined while the KDC has no --audit-url). */
export function createAuditAdminRelay(ctx: KdcContext, audit: () => Client<typeof AuditAdminService> | undefined): ServiceImpl<typeof AuditAdminService> {
  const impl: Record<string, (req: unknown, hctx: HandlerContext) => Promise<unknown>> = {};
  for (const method of AuditAdminService.methods) {
    impl[method.localName] = async (req, hctx) => {
      const authorization = await forwardedCredential(ctx, hctx);
      const client = audit();
      if (client === undefined) throw new Unavailable("this KDC relays no Auditserver calls (started without --audit-url); call the Auditserver directly");
      const call = client[method.localName as keyof typeof client] as unknown as (req: unknown, opts: CallOptions) => Promise<unknown>;
      return call(req, { headers: { authorization }, signal: hctx.signal, timeoutMs: RELAY_TIMEOUT_MS }).catch((err: unknown) => {
        // The Auditserver's code and words, without its response metadata: its gRPC headers
        // (content-type, grpc-status) must not become this response's.
        if (err instanceof ConnectError) throw new ConnectError(err.rawMessage, err.code);
        throw err;
      });
    };
  }
  return impl as unknown as ServiceImpl<typeof AuditAdminService>;
}
