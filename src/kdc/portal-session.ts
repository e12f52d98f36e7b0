/**
 * Portal sessions and one-time login links: how a browser signs in, and how a call carrying the
 * session cookie becomes the same caller its token would be (so ./authz.ts authorizes it the one
 * way it authorizes tokens).
 *
 * ## Key layout (values: proto/kmi/store/v1/portal.proto)
 *
 * | table             | key                                   | value                  |
 * |-------------------|---------------------------------------|------------------------|
 * | `portal_sessions` | lowercase hex SHA-256 of the secret   | PortalSessionRecord    |
 * | `portal_links`    | lowercase hex SHA-256 of the code     | PortalLoginLinkRecord  |
 *
 * Only hashes of secrets are stored: a stolen store yields no working cookie or link. The
 * secrets have 256 bits of entropy, so a fast hash is enough.
 */
import { createHash, randomBytes } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { HandlerContext } from "@connectrpc/connect";
import { Unauthenticated } from "../common/errors.js";
import { Role } from "../gen/kmi/kdc/v1/admin_pb.js";
import {
  PortalLoginLinkRecordSchema,
  PortalSessionRecordSchema,
  type PortalLoginLinkRecord,
  type PortalSessionRecord,
} from "../gen/kmi/store/v1/portal_pb.js";
import { defineTable, delOp, putOp, type BatchOp, type Compare, type Store, type Table } from "../storage/store.js";
import type { Caller, TokenLookup } from "./authz.js";

/** The portal's tables. */
export const PORTAL_TABLES = {
  sessions: defineTable("portal_sessions", PortalSessionRecordSchema),
  links: defineTable("portal_links", PortalLoginLinkRecordSchema),
} as const;

/** Name of the session cookie. `__Host-` binds it to this origin: Secure, Path=/, no Domain. */
export const SESSION_COOKIE = "__Host-kmi_session";

/** How long a session lasts from sign-in; it is never extended. */
export const SESSION_TTL_MS = 8 * 3600 * 1000;

/** Default and bounds of a login link's lifetime, seconds. */
export const LINK_TTL = { default: 900, min: 60, max: 86_400 } as const;

const SECRET_RE = /^[A-Za-z0-9_-]{43}$/;

/** A new random secret (32 bytes, base64url) and the key its record is stored under. */
export function mintSecret(): { secret: string; key: string; id: string } {
  const secret = randomBytes(32).toString("base64url");
  return { secret, key: secretKey(secret), id: randomBytes(8).toString("hex") };
}

/** The store key of a secret: lowercase hex SHA-256. */
export function secretKey(secret: string): string {
  return createHash("sha256").update(secret, "utf8").digest("hex");
}

/** True when `s` is shaped like a session secret or link code. */
export function isSecretShaped(s: string): boolean {
  return SECRET_RE.test(s);
}

/** The `set-cookie` value that carries a new session to the browser. */
export function sessionCookie(secret: string, expiresAt: Date, now: Date): string {
  const maxAge = Math.max(0, Math.floor((expiresAt.getTime() - now.getTime()) / 1000));
  return `${SESSION_COOKIE}=${secret}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=${maxAge}`;
}

/** The `set-cookie` value that clears the session cookie. */
export function clearedCookie(): string {
  return `${SESSION_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0`;
}

/** The session secret in a `cookie` header, when there is one. */
export function sessionSecretFromCookie(header: string | null): string | undefined {
  if (header === null) return undefined;
  for (const part of header.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === SESSION_COOKIE) {
      const v = part.slice(eq + 1).trim();
      return isSecretShaped(v) ? v : undefined;
    }
  }
  return undefined;
}

/**
 * The CSRF defence of every call that a cookie authenticates (and of SignIn, against login
 * CSRF): the request must use the Connect protocol (a simple cross-site form or image cannot
 * send `Connect-Protocol-Version`, and a script that does triggers a CORS preflight, which the
 * KDC never answers), and its `Origin` must be the KDC's own. SameSite=Strict is the third layer.
 */
export function checkSameOrigin(hctx: HandlerContext): void {
  if (hctx.requestHeader.get("connect-protocol-version") === null) {
    throw new Unauthenticated("portal calls must use the Connect protocol (header connect-protocol-version); the session cookie is not accepted otherwise");
  }
  const origin = hctx.requestHeader.get("origin");
  if (origin === null || origin !== new URL(hctx.url).origin) {
    throw new Unauthenticated("the request's Origin is not the portal's; the session cookie is accepted only from the portal itself");
  }
}

/** What the portal code needs of the store: the raw store and token lookups. */
export interface PortalStore extends TokenLookup {
  readonly store: Store;
}

/** Reads a session by its secret's key. */
export function getSession(store: PortalStore, key: string): Promise<PortalSessionRecord | undefined> {
  return store.store.get(PORTAL_TABLES.sessions, key);
}

/** Reads a login link with its revision, for a use that must be conditional on it (once only). */
export async function readLink(store: PortalStore, key: string): Promise<{ link: PortalLoginLinkRecord | undefined; guard: Compare }> {
  const r = await store.store.read(PORTAL_TABLES.links, key);
  return { link: r.value, guard: { table: PORTAL_TABLES.links, key, modRevision: r.modRevision } };
}

/** Every session record, with its key. */
export async function listSessions(store: PortalStore): Promise<{ key: string; record: PortalSessionRecord }[]> {
  const out: { key: string; record: PortalSessionRecord }[] = [];
  for await (const [key, record] of store.store.iterate(PORTAL_TABLES.sessions)) out.push({ key, record });
  return out;
}

/**
 * At most this many ended records are removed per sign-in: they ride in the sign-in's commit,
 * which must stay within a store transaction's op limit (MAX_TXN_OPS, 128) with the audit entry.
 */
const PURGE_LIMIT = 64;

/**
 * Delete ops for records that can never work again: sessions past their expiry, links past
 * theirs (used or not). Signing in removes them in its batch, so the tables stay as small as the
 * live sessions and links; a revoked session stays until its expiry (ListSessions skips it).
 */
export async function purgeOps(store: PortalStore, now: Date): Promise<BatchOp[]> {
  const ops: BatchOp[] = [];
  for (const table of [PORTAL_TABLES.sessions, PORTAL_TABLES.links] as const) {
    for await (const [key, r] of store.store.iterate(table as Table)) {
      if (ops.length >= PURGE_LIMIT) return ops;
      if (before((r as PortalSessionRecord | PortalLoginLinkRecord).expiresAt, now)) ops.push(delOp(table, key));
    }
  }
  return ops;
}

/** Put ops of the portal's records. */
export const putPortal = {
  session: (key: string, r: PortalSessionRecord): BatchOp => putOp(PORTAL_TABLES.sessions, key, r),
  link: (key: string, r: PortalLoginLinkRecord): BatchOp => putOp(PORTAL_TABLES.links, key, r),
};

function before(ts: Timestamp | undefined, now: Date): boolean {
  return ts !== undefined && timestampDate(ts).getTime() <= now.getTime();
}

/** True while a session is usable at `now` (not revoked, not expired). */
export function sessionLive(r: PortalSessionRecord, now: Date): boolean {
  return r.revokedAt === undefined && !before(r.expiresAt, now);
}

/** True while a link is usable at `now` (unused, not expired). */
export function linkLive(r: PortalLoginLinkRecord, now: Date): boolean {
  return r.usedAt === undefined && !before(r.expiresAt, now);
}

/** A new session record for a caller. */
export function newSession(p: { id: string; role: Role; tenantId: string; tokenId: string; linkId: string; now: Date }): PortalSessionRecord {
  return create(PortalSessionRecordSchema, {
    recordVersion: 1,
    sessionId: p.id,
    role: p.role,
    tenantId: p.tenantId,
    tokenId: p.tokenId,
    linkId: p.linkId,
    createdAt: timestampFromDate(p.now),
    expiresAt: timestampFromDate(new Date(p.now.getTime() + SESSION_TTL_MS)),
  });
}

/** A new login link record; `creator` is the caller that made it, whose credential the link lives on. */
export function newLink(p: { id: string; role: Role; tenantId: string; createdBy: string; creator: Caller; now: Date; ttlSeconds: number }): PortalLoginLinkRecord {
  return create(PortalLoginLinkRecordSchema, {
    recordVersion: 1,
    linkId: p.id,
    role: p.role,
    tenantId: p.tenantId,
    createdBy: p.createdBy,
    creatorTokenId: p.creator.kind === "token" ? p.creator.tokenId : "",
    creatorSessionId: p.creator.kind === "token" ? (p.creator.sessionId ?? "") : "",
    createdAt: timestampFromDate(p.now),
    expiresAt: timestampFromDate(new Date(p.now.getTime() + p.ttlSeconds * 1000)),
  });
}

/** The caller a session stands for: its token's identity, or the link's role as `session:<id>`. */
export function callerOfSession(r: PortalSessionRecord): Caller & { kind: "token" } {
  return {
    kind: "token",
    tokenId: r.tokenId,
    role: r.role === Role.OPERATOR ? "operator" : "tenant-admin",
    tenantId: r.tenantId,
    sessionId: r.sessionId,
  };
}

/**
 * A session as a bearer string, `kmi_<session id>_<secret>` (the shape of a token): what the
 * KDC forwards when it relays a portal call to the Auditserver, which asks the KDC about it
 * (PeerService.AuthenticateToken) as it asks about any token.
 */
export function sessionBearer(sessionId: string, secret: string): string {
  return `kmi_${sessionId}_${secret}`;
}

/**
 * The live session a secret names (and, when given, whose public id is `sessionId`), or
 * undefined. A session that came from a token is dead once that token is revoked or expired.
 */
export async function liveSession(store: PortalStore, secret: string, now: Date, sessionId?: string): Promise<PortalSessionRecord | undefined> {
  if (!isSecretShaped(secret)) return undefined;
  const record = await getSession(store, secretKey(secret));
  if (record === undefined || (sessionId !== undefined && record.sessionId !== sessionId)) return undefined;
  return (await sessionAndTokenLive(store, record, now)) ? record : undefined;
}

/** True while the token `tokenId` works (known, not revoked, not expired). */
async function tokenLive(store: PortalStore, tokenId: string, now: Date): Promise<boolean> {
  const t = await store.getToken(tokenId);
  return t !== undefined && t.revokedAt === undefined && !before(t.expiresAt, now);
}

/** True while a session works: itself live, and the token it came from (if any) too. */
async function sessionAndTokenLive(store: PortalStore, record: PortalSessionRecord, now: Date): Promise<boolean> {
  return sessionLive(record, now) && (record.tokenId === "" || (await tokenLive(store, record.tokenId, now)));
}

/**
 * True while the credential that made a login link still works: the portal session it was made
 * through (found by its public id), else the token. A link made before links named their
 * creator has neither, and lives out its own TTL (24 h at most).
 */
export async function linkCreatorLive(store: PortalStore, link: PortalLoginLinkRecord, now: Date): Promise<boolean> {
  if (link.creatorSessionId !== "") {
    const s = (await listSessions(store)).find((x) => x.record.sessionId === link.creatorSessionId);
    return s !== undefined && (await sessionAndTokenLive(store, s.record, now));
  }
  return link.creatorTokenId === "" || (await tokenLive(store, link.creatorTokenId, now));
}

const INVALID_SESSION = "the portal session is invalid, expired or signed out; sign in again with a login link (`kmi ctl portal login-link`)";

/**
 * Resolves the session cookie of a call, after the CSRF checks. A session that came from a
 * token ends when that token is revoked or expires. Undefined when the call carries no cookie.
 */
export async function authenticateSession(hctx: HandlerContext, store: PortalStore, now: Date): Promise<(Caller & { kind: "token" }) | undefined> {
  const raw = hctx.requestHeader.get("cookie");
  if (raw === null || !raw.includes(SESSION_COOKIE)) return undefined;
  checkSameOrigin(hctx);
  const secret = sessionSecretFromCookie(raw);
  const record = secret === undefined ? undefined : await liveSession(store, secret, now);
  if (record === undefined) throw new Unauthenticated(INVALID_SESSION);
  return callerOfSession(record);
}
