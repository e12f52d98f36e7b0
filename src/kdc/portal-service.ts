/**
 * PortalService: login links, sign-in (a link's code or a token for a session cookie), the
 * caller's session, sign-out, and the operator's list and revoke of sessions. See
 * ./portal-session.ts for the records and the cookie's CSRF checks.
 */
import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { FailedPrecondition, InvalidArgument, NotFound, Unauthenticated } from "../common/errors.js";
import { Role } from "../gen/kmi/kdc/v1/admin_pb.js";
import {
  CreateLoginLinkResponseSchema,
  GetSessionResponseSchema,
  ListSessionsResponseSchema,
  PortalService,
  RevokeSessionResponseSchema,
  SessionSchema,
  SignInResponseSchema,
  SignOutResponseSchema,
  type CreateLoginLinkRequest,
  type Session,
  type SignInRequest,
} from "../gen/kmi/kdc/v1/portal_pb.js";
import { PortalLoginLinkRecordSchema, PortalSessionRecordSchema, type PortalSessionRecord } from "../gen/kmi/store/v1/portal_pb.js";
import { retryOnConflict } from "../storage/retry.js";
import type { Compare } from "../storage/store.js";
import { actorOf, authenticateToken, type Caller } from "./authz.js";
import type { KdcContext } from "./context.js";
import { handle } from "./handler.js";
import type { KdcOperations } from "./operations.js";
import {
  checkSameOrigin,
  clearedCookie,
  PORTAL_TABLES,
  readLink,
  getSession,
  isSecretShaped,
  LINK_TTL,
  linkCreatorLive,
  linkLive,
  listSessions,
  mintSecret,
  newLink,
  newSession,
  purgeOps,
  putPortal,
  secretKey,
  sessionCookie,
  sessionLive,
  sessionSecretFromCookie,
} from "./portal-session.js";
import * as V from "./validate.js";

const SESSION_ID = /^[0-9a-f]{16}$/;

/** CreateLoginLink, validated. */
interface LinkInput {
  role: Role;
  tenantId: string;
  ttlSeconds: number;
}

function parseLink(req: CreateLoginLinkRequest): LinkInput {
  let tenantId = "";
  if (req.operator) {
    if (req.tenantId !== "") throw new InvalidArgument("tenant_id: must be empty with operator (an operator acts on every tenant)");
  } else {
    tenantId = V.tenantId(req.tenantId);
  }
  const ttl = req.ttlSeconds === 0 ? LINK_TTL.default : req.ttlSeconds;
  if (ttl < LINK_TTL.min || ttl > LINK_TTL.max) {
    throw new InvalidArgument(`ttl_seconds: ${req.ttlSeconds} is out of range; use ${LINK_TTL.min} to ${LINK_TTL.max} (0 means ${LINK_TTL.default})`);
  }
  return { role: req.operator ? Role.OPERATOR : Role.TENANT_ADMIN, tenantId, ttlSeconds: ttl };
}

type SignInInput = { kind: "link"; code: string } | { kind: "token"; token: string };

function parseSignIn(req: SignInRequest): SignInInput {
  const c = req.credential;
  if (c.case === "loginCode") {
    if (!isSecretShaped(c.value)) throw new InvalidArgument("login_code: not a login link's code; open the whole link that `kmi ctl portal login-link` printed");
    return { kind: "link", code: c.value };
  }
  if (c.case === "token") {
    if (c.value.trim() === "") throw new InvalidArgument("token: required; paste a kmi_... token");
    return { kind: "token", token: c.value };
  }
  throw new InvalidArgument("credential: required; give login_code or token");
}

/** The wire form of a session record. */
function session(r: PortalSessionRecord): Session {
  return create(SessionSchema, {
    sessionId: r.sessionId,
    role: r.role,
    tenantId: r.tenantId,
    ...(r.createdAt ? { createdAt: r.createdAt } : {}),
    ...(r.expiresAt ? { expiresAt: r.expiresAt } : {}),
    source: r.linkId !== "" ? `link:${r.linkId}` : `token:${r.tokenId}`,
  });
}

/** PortalService over the KDC's context. */
export function createPortalService(ctx: KdcContext, ops: KdcOperations): ServiceImpl<typeof PortalService> {
  const now = () => ctx.clock.now();

  /** The record of the caller's own session (the cookie's), or FailedPrecondition. */
  async function ownSession(c: Caller, hctx: HandlerContext): Promise<{ key: string; record: PortalSessionRecord }> {
    const secret = sessionSecretFromCookie(hctx.requestHeader.get("cookie"));
    if (c.kind !== "token" || c.sessionId === undefined || secret === undefined) {
      throw new FailedPrecondition("this call needs a portal session (the cookie set by SignIn), not a bearer token");
    }
    const key = secretKey(secret);
    const record = await getSession(ctx.store, key);
    if (record === undefined) throw new Unauthenticated("the portal session is gone; sign in again");
    return { key, record };
  }

  /** Makes a session for a verified credential and sets its cookie. */
  async function startSession(
    hctx: HandlerContext,
    p: { role: Role; tenantId: string; tokenId: string; linkId: string; linkOp?: ReturnType<typeof putPortal.link>; guards?: readonly Compare[] },
  ): Promise<PortalSessionRecord> {
    const minted = mintSecret();
    const record = newSession({ id: minted.id, role: p.role, tenantId: p.tenantId, tokenId: p.tokenId, linkId: p.linkId, now: now() });
    const actor = p.linkId !== "" ? `session:${minted.id}` : `token:${p.tokenId}`;
    await ctx.audit.append(
      {
        actor,
        action: "portal.sign-in",
        target: `session/${minted.id}`,
        outcome: "ok",
        details: { via: p.linkId !== "" ? `link:${p.linkId}` : `token:${p.tokenId}`, role: p.role === Role.OPERATOR ? "operator" : "tenant-admin", tenant: p.tenantId },
      },
      [putPortal.session(minted.key, record), ...(p.linkOp ? [p.linkOp] : []), ...(await purgeOps(ctx.store, now())).filter((op) => p.linkOp === undefined || op.key !== p.linkOp.key)],
      p.guards ?? [],
    );
    hctx.responseHeader.append("set-cookie", sessionCookie(minted.secret, timestampDate(record.expiresAt!), now()));
    return record;
  }

  /**
   * Uses a login link once: marked used in the same commit as the new session, conditional on
   * the link's revision as read, so two sign-ins racing with one link (on any replicas) make one
   * session; the loser retries, reads it used, and is refused.
   */
  function signInWithLink(hctx: HandlerContext, code: string): Promise<PortalSessionRecord> {
    return retryOnConflict(async () => {
      const key = secretKey(code);
      const { link, guard } = await readLink(ctx.store, key);
      // One message for unknown, used and expired: a guesser learns nothing.
      if (link === undefined || !linkLive(link, now()) || !(await linkCreatorLive(ctx.store, link, now()))) throw new Unauthenticated("this login link is invalid, used or expired; ask an operator for a new one (`kmi ctl portal login-link`)");
      const used = create(PortalLoginLinkRecordSchema, { ...link, usedAt: timestampFromDate(now()) });
      return startSession(hctx, { role: link.role, tenantId: link.tenantId, tokenId: "", linkId: link.linkId, linkOp: putPortal.link(key, used), guards: [guard] });
    });
  }

  return {
    createLoginLink: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "portal.login-link.create",
        target: (r) => (r.operator ? "portal/operator" : `tenant/${r.tenantId}`),
        auth: "token",
        parse: parseLink,
        need: () => ({ kind: "operator" }) as const,
        act: async (c, i) => {
          if (i.role === Role.TENANT_ADMIN) await ops.requireTenant(i.tenantId);
          const minted = mintSecret();
          const record = newLink({ id: minted.id, role: i.role, tenantId: i.tenantId, createdBy: actorOf(c), creator: c, now: now(), ttlSeconds: i.ttlSeconds });
          await ctx.audit.append(
            {
              actor: actorOf(c),
              action: "portal.login-link.create",
              target: `link/${minted.id}`,
              outcome: "ok",
              // The code appears only as a keyed hash.
              details: { role: i.role === Role.OPERATOR ? "operator" : "tenant-admin", tenant: i.tenantId, ttl_seconds: String(i.ttlSeconds), code: ctx.sealer.keyedHash(minted.secret) },
            },
            [putPortal.link(minted.key, record)],
          );
          return create(CreateLoginLinkResponseSchema, { code: minted.secret, linkId: minted.id, expiresAt: record.expiresAt! });
        },
      }),

    signIn: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "portal.sign-in",
        target: (r) => (r.credential.case === "token" ? "portal/token" : "portal/link"),
        auth: "none",
        parse: (r) => {
          checkSameOrigin(hctx);
          return parseSignIn(r);
        },
        need: () => ({ kind: "public" }) as const,
        act: async (_c, i) => {
          if (i.kind === "link") return create(SignInResponseSchema, { session: session(await signInWithLink(hctx, i.code)) });
          const t = await authenticateToken(`Bearer ${i.token.trim()}`, ctx.store, now());
          const role = t.role === "operator" ? Role.OPERATOR : Role.TENANT_ADMIN;
          return create(SignInResponseSchema, { session: session(await startSession(hctx, { role, tenantId: t.tenantId, tokenId: t.tokenId, linkId: "" })) });
        },
      }),

    getSession: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "portal/session",
        auth: "token",
        parse: () => ({}),
        need: () => ({ kind: "public" }) as const,
        act: async (c) => create(GetSessionResponseSchema, { session: session((await ownSession(c, hctx)).record) }),
      }),

    signOut: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "portal.sign-out",
        target: () => "portal/session",
        auth: "token",
        parse: () => ({}),
        need: () => ({ kind: "public" }) as const,
        act: async (c) => {
          const { key } = await ownSession(c, hctx);
          // Conditional on the record as read, like revokeSession: a purge or revoke in between is not undone.
          await retryOnConflict(async () => {
            const read = await ctx.store.store.read(PORTAL_TABLES.sessions, key);
            if (read.value === undefined || !sessionLive(read.value, now())) return;
            const ended = create(PortalSessionRecordSchema, { ...read.value, revokedAt: timestampFromDate(now()) });
            await ctx.audit.append(
              { actor: actorOf(c), action: "portal.sign-out", target: `session/${read.value.sessionId}`, outcome: "ok", details: {} },
              [putPortal.session(key, ended)],
              [{ table: PORTAL_TABLES.sessions, key, modRevision: read.modRevision }],
            );
          });
          hctx.responseHeader.append("set-cookie", clearedCookie());
          return create(SignOutResponseSchema, {});
        },
      }),

    listSessions: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "portal/sessions",
        auth: "token",
        parse: () => ({}),
        need: () => ({ kind: "operator" }) as const,
        act: async () => {
          const live = (await listSessions(ctx.store)).map((s) => s.record).filter((r) => sessionLive(r, now()));
          live.sort((a, b) => Number((a.createdAt?.seconds ?? 0n) - (b.createdAt?.seconds ?? 0n)));
          return create(ListSessionsResponseSchema, { sessions: live.map(session) });
        },
      }),

    revokeSession: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "portal.session.revoke",
        // Why not echo a malformed id: an operator may paste the cookie's secret by mistake.
        target: (r) => (SESSION_ID.test(r.sessionId) ? `session/${r.sessionId}` : "session/<invalid>"),
        auth: "token",
        parse: (r) => {
          if (!SESSION_ID.test(r.sessionId)) throw new InvalidArgument("session_id: not a session id; use the 16 hex characters of `kmi ctl portal sessions`");
          return { sessionId: r.sessionId };
        },
        need: () => ({ kind: "operator" }) as const,
        act: async (c, i) => {
          const found = (await listSessions(ctx.store)).find((s) => s.record.sessionId === i.sessionId && sessionLive(s.record, now()));
          if (found === undefined) throw new NotFound(`session ${i.sessionId} not found or already ended; see \`kmi ctl portal sessions\``);
          const ended = create(PortalSessionRecordSchema, { ...found.record, revokedAt: timestampFromDate(now()) });
          // Conditional on the record as read: a purge or sign-out in between is not undone by this write.
          const read = await ctx.store.store.read(PORTAL_TABLES.sessions, found.key);
          if (read.value === undefined || !sessionLive(read.value, now())) throw new NotFound(`session ${i.sessionId} not found or already ended; see \`kmi ctl portal sessions\``);
          await ctx.audit.append(
            { actor: actorOf(c), action: "portal.session.revoke", target: `session/${i.sessionId}`, outcome: "ok", details: {} },
            [putPortal.session(found.key, ended)],
            [{ table: PORTAL_TABLES.sessions, key: found.key, modRevision: read.modRevision }],
          );
          return create(RevokeSessionResponseSchema, {});
        },
      }),
  };
}
