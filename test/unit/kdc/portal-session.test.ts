/**
 * The portal session's pieces: the cookie (its attributes and parsing), the CSRF check, and
 * over a real LevelDB store: which sessions are live (expiry, revocation, the token behind it)
 * and the purge of ended records.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { createHandlerContext } from "@connectrpc/connect";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { PortalService } from "../../../src/gen/kmi/kdc/v1/portal_pb.js";
import { TokenRecordSchema } from "../../../src/gen/kmi/store/v1/kdc_pb.js";
import { KdcStore, put } from "../../../src/kdc/kdc-store.js";
import {
  checkSameOrigin,
  clearedCookie,
  liveSession,
  mintSecret,
  newLink,
  newSession,
  PORTAL_TABLES,
  purgeOps,
  putPortal,
  sessionCookie,
  sessionSecretFromCookie,
  SESSION_TTL_MS,
} from "../../../src/kdc/portal-session.js";
import { openLevelStore, type LevelStore } from "../../../src/storage/level-store.js";

const NOW = new Date("2026-12-06T12:00:00Z");

function hctx(headers: Record<string, string>, url = "https://127.0.0.1:7443/kmi.kdc.v1.PortalService/GetSession") {
  return createHandlerContext({
    service: PortalService,
    method: PortalService.method.getSession,
    protocolName: "connect",
    requestMethod: "POST",
    url,
    requestHeader: headers,
  });
}

describe("the session cookie", () => {
  it("is __Host-, Secure, HttpOnly, SameSite=Strict, Path=/, no Domain, and lives until the session ends", () => {
    const { secret } = mintSecret();
    const c = sessionCookie(secret, new Date(NOW.getTime() + SESSION_TTL_MS), NOW);
    expect(c).toBe(`__Host-kmi_session=${secret}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=28800`);
    expect(clearedCookie()).toBe("__Host-kmi_session=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0");
  });

  it.each([
    ["the cookie among others", (s: string) => `a=1; __Host-kmi_session=${s}; b=2`, true],
    ["alone", (s: string) => `__Host-kmi_session=${s}`, true],
    ["without the __Host- prefix", (s: string) => `kmi_session=${s}`, false],
    ["a value of the wrong shape", (s: string) => `__Host-kmi_session=${s}x`, false],
    ["empty", () => "__Host-kmi_session=", false],
  ])("is read from a cookie header: %s", (_name, header, found) => {
    const { secret } = mintSecret();
    expect(sessionSecretFromCookie(header(secret))).toBe(found ? secret : undefined);
  });
});

describe("checkSameOrigin", () => {
  it("accepts the Connect header with the server's own origin", () => {
    expect(() => checkSameOrigin(hctx({ "connect-protocol-version": "1", origin: "https://127.0.0.1:7443" }))).not.toThrow();
  });

  it.each([
    ["no Connect header", { origin: "https://127.0.0.1:7443" }, "must use the Connect protocol"],
    ["another origin", { "connect-protocol-version": "1", origin: "https://evil.example" }, "Origin is not the portal's"],
    ["another port of the same host", { "connect-protocol-version": "1", origin: "https://127.0.0.1:7444" }, "Origin is not the portal's"],
    ["plain http", { "connect-protocol-version": "1", origin: "http://127.0.0.1:7443" }, "Origin is not the portal's"],
    ["no origin", { "connect-protocol-version": "1" }, "Origin is not the portal's"],
    ["origin null", { "connect-protocol-version": "1", origin: "null" }, "Origin is not the portal's"],
  ])("refuses %s (UNAUTHENTICATED)", (_name, headers, message) => {
    expect(() => checkSameOrigin(hctx(headers))).toThrow(message);
  });
});

describe("over a store", () => {
  let dir: string;
  let level: LevelStore;
  let store: KdcStore;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "kmi-portal-unit-"));
    level = await openLevelStore(join(dir, "db"), { owner: "kdc" });
    store = new KdcStore(level);
  });

  afterEach(async () => {
    await level.close();
    await rm(dir, { recursive: true, force: true });
  });

  async function saveSession(p: { tokenId?: string; at?: Date; revoked?: boolean }) {
    const m = mintSecret();
    let r = newSession({ id: m.id, role: Role.TENANT_ADMIN, tenantId: "acme", tokenId: p.tokenId ?? "", linkId: p.tokenId === undefined ? "0123456789abcdef" : "", now: p.at ?? NOW });
    if (p.revoked === true) r = { ...r, revokedAt: timestampFromDate(NOW) };
    await level.batch([putPortal.session(m.key, r)]);
    return m;
  }

  it("a session is live until it expires or is revoked, and only under its own id", async () => {
    const s = await saveSession({});
    expect((await liveSession(store, s.secret, NOW))?.sessionId).toBe(s.id);
    expect(await liveSession(store, s.secret, NOW, s.id)).toBeDefined();
    expect(await liveSession(store, s.secret, NOW, "ffffffffffffffff")).toBeUndefined();
    expect(await liveSession(store, s.secret, new Date(NOW.getTime() + SESSION_TTL_MS))).toBeUndefined();
    expect(await liveSession(store, mintSecret().secret, NOW)).toBeUndefined();
    const revoked = await saveSession({ revoked: true });
    expect(await liveSession(store, revoked.secret, NOW)).toBeUndefined();
  });

  it("a session of a token ends when the token is revoked or gone", async () => {
    const token = create(TokenRecordSchema, { recordVersion: 1, tokenId: "aaaaaaaaaaaaaaaa", secretSha256: new Uint8Array(32), role: Role.TENANT_ADMIN, tenantId: "acme" });
    await level.batch([put.token(token)]);
    const s = await saveSession({ tokenId: token.tokenId });
    expect(await liveSession(store, s.secret, NOW)).toBeDefined();
    await level.batch([put.token({ ...token, revokedAt: timestampFromDate(NOW) })]);
    expect(await liveSession(store, s.secret, NOW)).toBeUndefined();
    const orphan = await saveSession({ tokenId: "bbbbbbbbbbbbbbbb" });
    expect(await liveSession(store, orphan.secret, NOW)).toBeUndefined();
  });

  it("purgeOps deletes expired sessions and links only", async () => {
    const old = await saveSession({ at: new Date(NOW.getTime() - SESSION_TTL_MS - 1000) });
    const fresh = await saveSession({});
    const revoked = await saveSession({ revoked: true });
    const link = mintSecret();
    const oldLink = mintSecret();
    await level.batch([
      putPortal.link(link.key, newLink({ id: link.id, role: Role.OPERATOR, tenantId: "", createdBy: "token:x", creator: { kind: "token", tokenId: "x", role: "operator", tenantId: "" }, now: NOW, ttlSeconds: 900 })),
      putPortal.link(oldLink.key, newLink({ id: oldLink.id, role: Role.OPERATOR, tenantId: "", createdBy: "token:x", creator: { kind: "token", tokenId: "x", role: "operator", tenantId: "" }, now: new Date(NOW.getTime() - 3_600_000), ttlSeconds: 900 })),
    ]);
    const ops = await purgeOps(store, NOW);
    expect(ops.map((o) => `${o.type} ${o.table.name} ${o.key}`).sort()).toEqual([`del portal_links ${oldLink.key}`, `del portal_sessions ${old.key}`].sort());
    await level.batch(ops);
    expect(await liveSession(store, fresh.secret, NOW)).toBeDefined();
    expect(await level.has(PORTAL_TABLES.sessions, revoked.key)).toBe(true);
  });
});
