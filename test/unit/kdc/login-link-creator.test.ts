/**
 * A login link lives on the credential that made it. Links cannot be listed or revoked
 * (PortalService has no such RPC), and each session can make more, so a link that outlived a
 * revoked operator token (or a revoked operator session) would keep the access that revocation
 * was meant to end. A link made by a revoked token or session is refused; one whose creator
 * still works signs in.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient, createRouterTransport, type Interceptor } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { KdcAdminService, Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { PortalService } from "../../../src/gen/kmi/kdc/v1/portal_pb.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { routes } from "../../../src/kdc/routes.js";
import { errorCode, kdcRouterClients, mapErrorsAsServer } from "../../helpers/kdc-router.js";

const clock = { now: () => new Date("2030-03-01T12:00:00Z") };
let dir: string;
let kdc: OpenedKdc;
let operatorToken: string;

/** Portal clients as the browser calls them: Connect, the router's own Origin, a cookie or a token. */
function portal(opts: { cookie?: string; token?: string } = {}) {
  const cookies: string[] = [];
  const mapErrors = mapErrorsAsServer();
  const headers: Interceptor = (next) => async (req) => {
    req.header.set("connect-protocol-version", "1");
    req.header.set("origin", "https://in-memory");
    if (opts.cookie !== undefined) req.header.set("cookie", `__Host-kmi_session=${opts.cookie}`);
    if (opts.token !== undefined) req.header.set("authorization", `Bearer ${opts.token}`);
    const res = await next(req);
    const sc = res.header.get("set-cookie");
    if (sc !== null) cookies.push(sc);
    return res;
  };
  const t = createRouterTransport(routes(kdc.ctx), { router: { interceptors: [mapErrors] }, transport: { interceptors: [headers] } });
  return { portal: createClient(PortalService, t), admin: createClient(KdcAdminService, t), cookies };
}

async function signIn(code: string): Promise<{ secret: string; sessionId: string }> {
  const p = portal();
  const r = await p.portal.signIn({ credential: { case: "loginCode", value: code } });
  const secret = /^__Host-kmi_session=([A-Za-z0-9_-]{43});/.exec(p.cookies[0] ?? "")?.[1];
  expect(secret).toBeDefined();
  return { secret: secret!, sessionId: r.session!.sessionId };
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-kdc-links-"));
  const r = await initKdc({ dataDir: join(dir, "data"), tls: { dnsNames: [], ipAddresses: [] }, clock });
  operatorToken = r.operatorToken;
  kdc = await openKdc({ dataDir: join(dir, "data"), logger: createNopLogger(), clock });
});

afterAll(async () => {
  await kdc?.store.close();
  await rm(dir, { recursive: true, force: true });
});

describe("a login link made by a credential that was revoked since", () => {
  it("from a revoked operator token is refused", async () => {
    const { admin } = kdcRouterClients(kdc.ctx, operatorToken);
    const stolen = await admin.createToken({ role: Role.OPERATOR, description: "leaked" });
    const link = await portal({ token: stolen.secret }).portal.createLoginLink({ operator: true, ttlSeconds: 86_400 });
    await admin.revokeToken({ tokenId: stolen.token!.tokenId });
    // The token itself is dead...
    expect(await errorCode(kdcRouterClients(kdc.ctx, stolen.secret).admin.listTenants({}))).toMatch(/^Unauthenticated/);
    // ...and so is the link it made.
    expect(await errorCode(portal().portal.signIn({ credential: { case: "loginCode", value: link.code } }))).toMatch(/^Unauthenticated/);
  });

  it("from a revoked operator session is refused", async () => {
    const { portal: p } = portal({ token: operatorToken });
    const first = await signIn((await p.createLoginLink({ operator: true })).code);
    const spare = await portal({ cookie: first.secret }).portal.createLoginLink({ operator: true, ttlSeconds: 86_400 });
    await p.revokeSession({ sessionId: first.sessionId });
    expect(await errorCode(portal({ cookie: first.secret }).admin.listTenants({}))).toMatch(/^Unauthenticated/);
    expect(await errorCode(portal().portal.signIn({ credential: { case: "loginCode", value: spare.code } }))).toMatch(/^Unauthenticated/);
  });

  it("from a token or session that still works signs in", async () => {
    const { portal: p } = portal({ token: operatorToken });
    const first = await signIn((await p.createLoginLink({ operator: true })).code);
    const next = await portal({ cookie: first.secret }).portal.createLoginLink({ operator: true });
    expect((await signIn(next.code)).sessionId).not.toBe(first.sessionId);
  });
});
