/**
 * Portal sessions against a real KDC process over TLS, in the Connect protocol a browser uses:
 * one-time login links, token sign-in, the cookie's attributes, the CSRF checks (Connect header
 * and Origin), tenant isolation through the one authorization path, sign-out, revocation (of
 * the session, and of the token it came from), and that the store keeps only hashes.
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { connect } from "node:http2";
import { join } from "node:path";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { toBinary, type DescService } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KdcAdminService, Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { PortalService } from "../../../src/gen/kmi/kdc/v1/portal_pb.js";
import { PORTAL_TABLES } from "../../../src/kdc/portal-session.js";
import { openLevelStore } from "../../../src/storage/level-store.js";
import { cleanup, clients, ctl, initDataDir, startKdc, type DataDir, type KdcProcess } from "./harness.js";

let data: DataDir;
let kdc: KdcProcess;
let caPem: string;
let acmeToken: string;

/** A browser-like client: Connect protocol, the given cookie and Origin; `cookies` collects set-cookie values. */
function browser(opts: { cookie?: string; origin?: string | null; protocol?: "connect" | "grpc" } = {}) {
  const setCookies: string[] = [];
  const headers: Interceptor = (next) => async (req) => {
    if (opts.cookie !== undefined) req.header.set("cookie", `__Host-kmi_session=${opts.cookie}`);
    if (opts.origin !== null) req.header.set("origin", opts.origin ?? new URL(kdc.url).origin);
    const res = await next(req);
    const sc = res.header.get("set-cookie");
    if (sc !== null) setCookies.push(sc);
    return res;
  };
  const transport =
    opts.protocol === "grpc"
      ? createGrpcTransport({ baseUrl: kdc.url, interceptors: [headers], nodeOptions: { ca: caPem } })
      : createConnectTransport({ baseUrl: kdc.url, httpVersion: "2", interceptors: [headers], nodeOptions: { ca: caPem } });
  return { c: <S extends DescService>(s: S) => createClient(s, transport), setCookies };
}

async function refused(p: Promise<unknown>, code: Code, message?: string): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, "the call should have been refused").toBeInstanceOf(ConnectError);
  expect(Code[(err as ConnectError).code]).toBe(Code[code]);
  if (message !== undefined) expect((err as ConnectError).rawMessage).toContain(message);
}

/** The code of a fresh login link made with `kmi ctl portal login-link`. */
async function loginCode(args: string[]): Promise<string> {
  const r = await ctl(kdc, data, ["portal", "login-link", ...args]);
  expect(r.code, r.stderr).toBe(0);
  const m = /^(https:\/\/[^\s#]+)\/#login=([A-Za-z0-9_-]{43})$/m.exec(r.stdout);
  expect(m, r.stdout).not.toBeNull();
  expect(m![1]).toBe(new URL(kdc.url).origin);
  return m![2]!;
}

/** Signs in with a link's code; returns the session secret from the cookie and the cookie line. */
async function signIn(code: string): Promise<{ secret: string; line: string }> {
  const b = browser();
  await b.c(PortalService).signIn({ credential: { case: "loginCode", value: code } });
  const line = b.setCookies[0] ?? "";
  const secret = /^__Host-kmi_session=([A-Za-z0-9_-]{43});/.exec(line)?.[1];
  expect(secret, line).toBeDefined();
  return { secret: secret!, line };
}

beforeAll(async () => {
  data = await initDataDir();
  caPem = await readFile(data.caFile, "utf8");
  kdc = await startKdc(data.dataDir);
  const admin = clients(kdc.url, caPem, { token: data.token })(KdcAdminService);
  await admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  await admin.createTenant({ tenantId: "globex", bootstrapKmiSigned: true });
  acmeToken = (await admin.createToken({ role: Role.TENANT_ADMIN, tenantId: "acme" })).secret;
});

afterAll(async () => {
  await kdc?.stop();
  if (data !== undefined) await cleanup(data.dir);
});

describe("login links", () => {
  it("sign a tenant admin in once: the cookie is __Host-, HttpOnly, Secure, SameSite=Strict; a second use is refused", async () => {
    const code = await loginCode(["--tenant", "acme"]);
    const { secret, line } = await signIn(code);
    expect(line).toMatch(/; Path=\/; Secure; HttpOnly; SameSite=Strict; Max-Age=\d+$/);
    expect(line).not.toMatch(/Domain=/i);
    const me = await browser({ cookie: secret }).c(PortalService).getSession({});
    expect(me.session?.role).toBe(Role.TENANT_ADMIN);
    expect(me.session?.tenantId).toBe("acme");
    await refused(browser().c(PortalService).signIn({ credential: { case: "loginCode", value: code } }), Code.Unauthenticated, "invalid, used or expired");
  });

  it("sign an operator in with --operator", async () => {
    const { secret } = await signIn(await loginCode(["--operator"]));
    const tenants = await browser({ cookie: secret }).c(KdcAdminService).listTenants({});
    expect(tenants.tenants.map((t) => t.tenantId).sort()).toEqual(["acme", "globex"]);
  });

  it.each([
    ["no audience", [], "exactly one of --tenant ID and --operator"],
    ["both", ["--tenant", "acme", "--operator"], "exactly one of --tenant ID and --operator"],
    ["unknown tenant", ["--tenant", "nope"], "nope"],
    ["ttl too long", ["--tenant", "acme", "--ttl", "100000"], "ttl_seconds: 100000 is out of range"],
  ])("are refused with %s", async (_name, args, message) => {
    const r = await ctl(kdc, data, ["portal", "login-link", ...args]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain(message);
  });

  it("are made by operators only", async () => {
    await refused(clients(kdc.url, caPem, { token: acmeToken })(PortalService).createLoginLink({ tenantId: "acme" }), Code.PermissionDenied, "operator role required");
  });
});

describe("the session's caller is the token's caller", () => {
  it("reads its own tenant and is PERMISSION_DENIED on another, like a tenant-admin token", async () => {
    const { secret } = await signIn(await loginCode(["--tenant", "acme"]));
    const ca = browser({ cookie: secret }).c(KdcService);
    expect((await ca.listVersions({ tenantId: "acme" })).versions.length).toBe(1);
    await refused(ca.listVersions({ tenantId: "globex" }), Code.PermissionDenied, 'may not act on tenant "globex"');
    await refused(browser({ cookie: secret }).c(KdcAdminService).listTenants({}), Code.PermissionDenied, "operator role required");
  });

  it("a token exchanged for a session: the session ends when the token is revoked", async () => {
    const admin = clients(kdc.url, caPem, { token: data.token })(KdcAdminService);
    const t = await admin.createToken({ role: Role.TENANT_ADMIN, tenantId: "acme" });
    const b = browser();
    const s = await b.c(PortalService).signIn({ credential: { case: "token", value: t.secret } });
    expect(s.session?.source).toBe(`token:${t.token?.tokenId}`);
    const secret = /__Host-kmi_session=([^;]+);/.exec(b.setCookies[0] ?? "")![1]!;
    expect((await browser({ cookie: secret }).c(KdcService).listVersions({ tenantId: "acme" })).versions.length).toBe(1);
    await admin.revokeToken({ tokenId: t.token!.tokenId });
    await refused(browser({ cookie: secret }).c(KdcService).listVersions({ tenantId: "acme" }), Code.Unauthenticated, "sign in again");
  });
});

describe("CSRF", () => {
  it.each([
    ["another Origin", { origin: "https://evil.example" }, "Origin is not the portal's"],
    ["no Origin", { origin: null }, "Origin is not the portal's"],
    ["the gRPC protocol (no Connect-Protocol-Version header)", { protocol: "grpc" as const }, "must use the Connect protocol"],
  ])("a cookie call with %s is UNAUTHENTICATED and changes nothing", async (_name, opts, message) => {
    const { secret } = await signIn(await loginCode(["--tenant", "acme"]));
    const before = (await browser({ cookie: secret }).c(KdcService).listVersions({ tenantId: "acme" })).versions.length;
    await refused(browser({ cookie: secret, ...opts }).c(KdcService).createVersion({ tenantId: "acme", signer: 1 }), Code.Unauthenticated, message);
    expect((await browser({ cookie: secret }).c(KdcService).listVersions({ tenantId: "acme" })).versions.length).toBe(before);
  });

  it("sign-in from another Origin is refused (login CSRF) and the link stays unused", async () => {
    const code = await loginCode(["--tenant", "acme"]);
    await refused(browser({ origin: "https://evil.example" }).c(PortalService).signIn({ credential: { case: "loginCode", value: code } }), Code.Unauthenticated, "Origin");
    await signIn(code);
  });
});

describe("ending sessions", () => {
  it("sign-out clears the cookie and the session stops working", async () => {
    const { secret } = await signIn(await loginCode(["--tenant", "acme"]));
    const b = browser({ cookie: secret });
    await b.c(PortalService).signOut({});
    expect(b.setCookies.at(-1)).toMatch(/^__Host-kmi_session=; .*Max-Age=0$/);
    await refused(browser({ cookie: secret }).c(PortalService).getSession({}), Code.Unauthenticated, "signed out");
  });

  it("concurrent sign-outs of one session end it once: one audit entry, each call answered", async () => {
    const { secret } = await signIn(await loginCode(["--tenant", "acme"]));
    const id = (await browser({ cookie: secret }).c(PortalService).getSession({})).session!.sessionId;
    const outcomes = await Promise.allSettled(Array.from({ length: 6 }, () => browser({ cookie: secret }).c(PortalService).signOut({})));
    for (const o of outcomes) if (o.status === "rejected") expect(Code[(o.reason as ConnectError).code]).toBe(Code[Code.Unauthenticated]);
    expect(outcomes.some((o) => o.status === "fulfilled")).toBe(true);
    const r = await ctl(kdc, data, ["audit", "tail", "--limit", "1000", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const entries = (JSON.parse(r.stdout) as { entries: { action: string; target: string; outcome: string }[] }).entries;
    expect(entries.filter((e) => e.action === "portal.sign-out" && e.target === `session/${id}` && e.outcome === "ok")).toHaveLength(1);
  });

  it("an operator lists and revokes a session with kmi ctl", async () => {
    const { secret } = await signIn(await loginCode(["--tenant", "globex"]));
    const me = await browser({ cookie: secret }).c(PortalService).getSession({});
    const id = me.session!.sessionId;
    const list = await ctl(kdc, data, ["portal", "sessions"]);
    expect(list.stdout).toContain(id);
    const r = await ctl(kdc, data, ["portal", "revoke-session", id]);
    expect(r.code, r.stderr).toBe(0);
    await refused(browser({ cookie: secret }).c(KdcService).listVersions({ tenantId: "globex" }), Code.Unauthenticated);
    expect((await ctl(kdc, data, ["portal", "sessions"])).stdout).not.toContain(id);
  });
});

describe("authorization of the new RPCs", () => {
  const calls: [string, (c: ReturnType<typeof clients>) => Promise<unknown>][] = [
    ["CreateLoginLink", (c) => c(PortalService).createLoginLink({ tenantId: "acme" })],
    ["GetSession", (c) => c(PortalService).getSession({})],
    ["SignOut", (c) => c(PortalService).signOut({})],
    ["ListSessions", (c) => c(PortalService).listSessions({})],
    ["RevokeSession", (c) => c(PortalService).revokeSession({ sessionId: "0123456789abcdef" })],
    ["WatchRolloutStatus", async (c) => {
      for await (const m of c(KdcService).watchRolloutStatus({ tenantId: "acme" })) return m;
    }],
  ];

  it.each(calls)("%s requires a token or a session (UNAUTHENTICATED without)", async (_name, call) => {
    await refused(call(clients(kdc.url, caPem)), Code.Unauthenticated, "bearer token");
  });

  it.each([calls[0]!, calls[3]!, calls[4]!])("operator-only %s with a tenant-admin token is PERMISSION_DENIED", async (_name, call) => {
    await refused(call(clients(kdc.url, caPem, { token: acmeToken })), Code.PermissionDenied, "operator role required");
  });

  it.each([calls[1]!, calls[2]!])("%s with a bearer token (no session) is FAILED_PRECONDITION", async (_name, call) => {
    await refused(call(clients(kdc.url, caPem, { token: acmeToken })), Code.FailedPrecondition, "needs a portal session");
  });
});

describe("serving the portal", () => {
  /** One HTTP/2 request to the KDC; status, headers and body. */
  async function get(path: string, method = "GET"): Promise<{ status: number; headers: Record<string, string>; body: string }> {
    const session = connect(kdc.url, { ca: caPem });
    try {
      return await new Promise((resolve, reject) => {
        const req = session.request({ ":method": method, ":path": path });
        let body = "";
        let headers: Record<string, string> = {};
        req.on("response", (h) => (headers = Object.fromEntries(Object.entries(h).map(([k, v]) => [k, String(v)]))));
        req.setEncoding("utf8");
        req.on("data", (d: string) => (body += d));
        req.on("end", () => resolve({ status: Number(headers[":status"]), headers, body }));
        req.on("error", reject);
        req.end();
      });
    } finally {
      session.close();
    }
  }

  it.each([
    ["/", 200, "text/html; charset=utf-8"],
    ["/app.js", 200, "text/javascript; charset=utf-8"],
    ["/app.css", 200, "text/css; charset=utf-8"],
    ["/no-such-page", 404, "text/plain; charset=utf-8"],
  ])("GET %s: %d %s, with CSP default-src 'self' and the other security headers", async (path, status, type) => {
    const r = await get(path);
    expect(r.status).toBe(status);
    expect(r.headers["content-type"]).toBe(type);
    expect(r.headers["content-security-policy"]).toBe("default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'");
    expect(r.headers["x-frame-options"]).toBe("DENY");
    expect(r.headers["x-content-type-options"]).toBe("nosniff");
    expect(r.headers["referrer-policy"]).toBe("no-referrer");
  });

  it("the page loads only its own files: no absolute URL in index.html, no inline script", async () => {
    const html = (await get("/")).body;
    expect([...html.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1])).toEqual(["/app.css", "/app.js", "#main"]);
    expect(html).not.toMatch(/<script(?![^>]*\bsrc=)[^>]*>/);
  });

  it("answers other methods on pages with 405, and HEAD without a body", async () => {
    expect((await get("/", "POST")).status).toBe(405);
    const head = await get("/", "HEAD");
    expect(head.status).toBe(200);
    expect(head.body).toBe("");
  });
});

describe("WatchRolloutStatus", () => {
  it("sends the status at once and again when it changes, and ends when the session is revoked", async () => {
    const { secret } = await signIn(await loginCode(["--tenant", "acme"]));
    const ca = browser({ cookie: secret }).c(KdcService);
    const ctl_ = new AbortController();
    const stream = ca.watchRolloutStatus({ tenantId: "acme" }, { signal: ctl_.signal })[Symbol.asyncIterator]();
    try {
      const first = await stream.next();
      const active = first.value?.status?.activeVersion ?? 0;
      expect(active).toBeGreaterThan(0);
      const op = clients(kdc.url, caPem, { token: data.token })(KdcService);
      await op.createVersion({ tenantId: "acme", signer: 1, activate: true });
      const second = await stream.next();
      expect(second.value?.status?.activeVersion).toBe(active + 1);
      const id = (await browser({ cookie: secret }).c(PortalService).getSession({})).session!.sessionId;
      expect((await ctl(kdc, data, ["portal", "revoke-session", id])).code).toBe(0);
      await refused(stream.next(), Code.Unauthenticated, "sign in again");
    } finally {
      ctl_.abort();
    }
  });

  it("of another tenant is PERMISSION_DENIED before anything is sent", async () => {
    await refused(
      (async () => {
        for await (const m of clients(kdc.url, caPem, { token: acmeToken })(KdcService).watchRolloutStatus({ tenantId: "globex" })) return m;
      })(),
      Code.PermissionDenied,
      'may not act on tenant "globex"',
    );
  });
});

describe("at rest", () => {
  it("the store holds sessions and links under the SHA-256 of their secrets, never the secrets", async () => {
    const code = await loginCode(["--tenant", "acme"]);
    const { secret } = await signIn(code);
    await kdc.stop();
    const store = await openLevelStore(join(data.dataDir, "store"), { owner: "kdc", create: false });
    try {
      const sha = (s: string) => createHash("sha256").update(s).digest("hex");
      const session = await store.get(PORTAL_TABLES.sessions, sha(secret));
      const link = await store.get(PORTAL_TABLES.links, sha(code));
      expect(session?.tenantId).toBe("acme");
      expect(link?.usedAt).toBeDefined();
      const encoded = async function* (): AsyncGenerator<[string, Uint8Array]> {
        for await (const [k, v] of store.iterate(PORTAL_TABLES.sessions)) yield [k, toBinary(PORTAL_TABLES.sessions.schema, v)];
        for await (const [k, v] of store.iterate(PORTAL_TABLES.links)) yield [k, toBinary(PORTAL_TABLES.links.schema, v)];
      };
      {
        for await (const [key, raw] of encoded()) {
          const bytes = Buffer.from(raw);
          expect(key).not.toBe(secret);
          expect(bytes.includes(Buffer.from(secret)) || bytes.includes(Buffer.from(code))).toBe(false);
        }
      }
    } finally {
      await store.close();
      kdc = await startKdc(data.dataDir);
    }
  });
});
