/**
 * The scanner test: the real kmi proxy sends bodies to a real c-icap (virus_scan over clamd)
 * over ICAP. Clean bodies pass and infected ones are blocked, over HTTP/1.1, h2, plain HTTP
 * and plain HTTP inside a CONNECT (`curl -p`), responses (RESPMOD) and uploads (REQMOD), with
 * the verdict in the access log and the
 * metrics. The infected bodies carry no EICAR string, so the built-in check cannot be what
 * blocks them. With c-icap killed (SIGKILL), a fail-closed tenant is refused and a fail-open
 * one passes; tenants with different policies on one proxy get different decisions; the
 * tenants file reloads without dropping connections, and a bad edit is refused and counted.
 */
import { createHash, randomBytes } from "node:crypto";
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createSecureServer, type Http2SecureServer, type Http2ServerRequest, type Http2ServerResponse } from "node:http2";
import { mkdtemp, rename, rm, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createMetricsRegistry, type MetricsRegistry } from "../../../src/common/metrics.js";
import type { AccessRecord } from "../../../src/proxy/access-log.js";
import { EICAR } from "../../../src/proxy/eicar.js";
import { HASHED_THREAT, MARKER, MARKER_THREAT, startIcapPeer, type IcapPeer } from "../../fixtures/icap/c-icap.js";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { connectTunnel, requestOver, run, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let peer: IcapPeer;
let h: Harness;
let metrics: MetricsRegistry;
let tlsOrigin: Http2SecureServer;
let plainOrigin: Server;
let tlsPort: number;
let plainPort: number;
let tenantsDir: string;
let tenantsFile: string;
const roots: Record<string, string> = {};
const uploads: number[] = [];

const CLEAN = Buffer.concat([Buffer.from("a clean body\n"), randomBytes(200_000)]);
const INFECTED = Buffer.concat([randomBytes(150_000), MARKER, randomBytes(1000)]);
/** Larger than the hold bound (1 MiB): released before the verdict, then cut off. */
const BIG_INFECTED = Buffer.concat([randomBytes(3 << 20), MARKER]);
const BODIES: Record<string, () => Buffer> = { "/empty": () => Buffer.alloc(0), "/clean": () => CLEAN, "/infected": () => INFECTED, "/hashed": () => peer.hashedBody, "/big-infected": () => BIG_INFECTED, "/secret": () => CLEAN };

function sha(s: string): string {
  return createHash("sha256").update(s).digest("hex");
}

/** The origin: named bodies, and /upload that counts what reaches it. */
function route(req: IncomingMessage | Http2ServerRequest, res: ServerResponse | Http2ServerResponse): void {
  // Requests tunnelled with `curl -p` come under /tunnelled, so that their log lines are their own.
  const path = (req.url ?? "/").split("?")[0]!.replace(/^\/tunnelled(?=\/)/, "");
  if (path === "/upload") {
    let n = 0;
    req.on("data", (c: Buffer) => (n += c.length));
    req.on("end", () => {
      uploads.push(n);
      res.writeHead(200, { "content-type": "text/plain" });
      res.end(`received ${n} bytes\n`);
    });
    return;
  }
  const body = BODIES[path];
  if (body === undefined) {
    res.writeHead(404);
    res.end();
    return;
  }
  const b = body();
  res.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(b.length) });
  res.end(b);
}

function icapService(failMode: "open" | "closed") {
  return { name: "clamav", url: peer.url, failMode, readTimeoutMs: 20_000 };
}

/** acme: the global policy (ICAP fail-closed). beta: no ICAP, /secret blocked, uploads not inspected. gamma: ICAP fail-open, 127.0.0.1 bypassed. */
function tenants(betaBlocks = "*/secret*") {
  return [
    { id: "acme", users: [{ name: "ann", passwordSha256: sha("a-pw") }] },
    { id: "beta", users: [{ name: "bob", passwordSha256: sha("b-pw") }], policy: { icap: {}, blockUrls: [betaBlocks], scan: { uploads: false } } },
    { id: "gamma", users: [{ name: "gus", passwordSha256: sha("g-pw") }], policy: { icap: { respmod: icapService("open"), reqmod: icapService("open") }, bypassHosts: ["127.0.0.1"] } },
  ];
}
const USERS: Record<string, string> = { acme: "ann:a-pw", beta: "bob:b-pw", gamma: "gus:g-pw" };

async function writeTenants(doc: unknown): Promise<void> {
  const tmp = `${tenantsFile}.tmp`;
  await writeFile(tmp, typeof doc === "string" ? doc : JSON.stringify(doc));
  await rename(tmp, tenantsFile);
}

beforeAll(async () => {
  peer = await startIcapPeer();
  tlsOrigin = createSecureServer({ allowHTTP1: true }, route);
  plainOrigin = createHttpServer(route);
  tenantsDir = await mkdtemp(join(tmpdir(), "kmi-icap-tenants-"));
  tenantsFile = join(tenantsDir, "tenants.json");
  await writeTenants({ tenants: tenants() });
  metrics = createMetricsRegistry();
  h = await startHarness({
    tenants: tenants(),
    defaultTenant: "acme",
    policy: { icap: { respmod: icapService("closed"), reqmod: icapService("closed") } },
    proxy: { tenantsFile, metrics },
  });
  const cert = h.pki.good;
  tlsOrigin.setSecureContext({ cert: cert.cert, key: cert.key });
  await new Promise<void>((r) => tlsOrigin.listen(0, "127.0.0.1", r));
  await new Promise<void>((r) => plainOrigin.listen(0, "127.0.0.1", r));
  tlsPort = (tlsOrigin.address() as AddressInfo).port;
  plainPort = (plainOrigin.address() as AddressInfo).port;
  for (const t of ["acme", "beta", "gamma"]) roots[t] = await h.rootFile(t);
});

afterAll(async () => {
  tlsOrigin?.close();
  plainOrigin?.close();
  await h?.close();
  await peer?.stop();
  if (tenantsDir !== undefined) await rm(tenantsDir, { recursive: true, force: true });
});

/** `tunnelled`: plain HTTP inside a CONNECT (`curl -p`), under the path prefix /tunnelled. */
type Proto = "http/1.1" | "h2" | "plain" | "tunnelled";

function url(proto: Proto, path: string): string {
  if (proto === "tunnelled") return `http://127.0.0.1:${plainPort}/tunnelled${path}`;
  return proto === "plain" ? `http://127.0.0.1:${plainPort}${path}` : `https://localhost:${tlsPort}${path}`;
}

/** curl through the proxy as `tenant`, -i (the status line in stdout); `upload` is POSTed from a file (bytes as they are). */
async function curl(tenant: string, proto: Proto, path: string, upload?: Buffer) {
  const args = ["-sS", "--suppress-connect-headers", "--max-time", "30", "-x", `http://127.0.0.1:${h.port}`, "--proxy-user", USERS[tenant]!, "--cacert", roots[tenant]!, "-i"];
  if (proto === "http/1.1") args.push("--http1.1");
  if (proto === "h2") args.push("--http2");
  if (proto === "tunnelled") args.push("-p");
  if (upload !== undefined) {
    const file = join(tenantsDir, `upload-${randomBytes(4).toString("hex")}`);
    await writeFile(file, upload);
    args.push("--data-binary", `@${file}`, "-H", "content-type: application/octet-stream");
  }
  return run("curl", [...args, url(proto, path)], undefined, 40_000);
}

/** A TLS connection through the proxy as `tenant` (CONNECT with its credentials). */
async function tunnelAs(tenant: string): Promise<TLSSocket> {
  const auth = { "proxy-authorization": `Basic ${Buffer.from(USERS[tenant]!).toString("base64")}` };
  const { socket, status } = await connectTunnel(h.port, `localhost:${tlsPort}`, auth);
  expect(status).toBe(200);
  return new Promise((resolve, reject) => {
    const t = tlsConnect({ socket, servername: "localhost", ca: h.agent.rootPem(tenant), ALPNProtocols: ["http/1.1"] });
    t.once("secureConnect", () => resolve(t));
    t.once("error", reject);
  });
}

function statusOf(stdout: string): number {
  return Number(/^HTTP\/[\d.]+ (\d{3})/.exec(stdout)?.[1] ?? 0);
}

function record(tenant: string, path: string, proto: Proto, method = "GET", more: (r: AccessRecord) => boolean = () => true): Promise<AccessRecord> {
  const cleartext = proto === "plain" || proto === "tunnelled";
  const p = cleartext ? "http/1.1" : proto;
  const logged = proto === "tunnelled" ? `/tunnelled${path}` : path;
  return h.log.waitFor((r) => r.tenant === tenant && r.path === logged && r.proto === p && r.method === method && r.host === (cleartext ? "127.0.0.1" : "localhost") && more(r), 20_000);
}

async function counter(name: string, labels: string): Promise<number> {
  const line = (await metrics.render()).split("\n").find((l) => l.startsWith(`${name}{${labels}}`) || (labels === "" && l.startsWith(`${name} `)));
  return line === undefined ? 0 : Number(line.split(" ").pop());
}

const PROTOS: Proto[] = ["http/1.1", "h2", "plain"];
/** Plain HTTP inside a CONNECT goes through ICAP and the tenant's policy like plain HTTP. */
const INSPECTED: Proto[] = [...PROTOS, "tunnelled"];

describe("responses (RESPMOD) through c-icap", () => {
  it.each(INSPECTED)("%s: a clean body passes whole, logged clean", async (proto) => {
    const r = await curl("acme", proto, "/clean");
    expect(r.code).toBe(0);
    expect(statusOf(r.stdout)).toBe(200);
    const rec = await record("acme", "/clean", proto);
    expect(rec).toMatchObject({ decision: "allow", status: 200, icap: "clamav", icap_result: "clean", bytes_down: CLEAN.length });
  });

  it.each(INSPECTED)("%s: an empty body (Content-Length: 0) costs no ICAP transaction", async (proto) => {
    expect(statusOf((await curl("acme", proto, "/empty")).stdout)).toBe(200);
    const rec = await record("acme", "/empty", proto);
    expect(rec).toMatchObject({ decision: "allow", status: 200, bytes_down: 0 });
    expect(rec.icap).toBeUndefined();
  });

  it.each(INSPECTED)("%s: an infected body is replaced by a 403 naming the threat, logged with the verdict", async (proto) => {
    for (const path of ["/infected", "/hashed"]) {
      const r = await curl("acme", proto, path);
      expect(statusOf(r.stdout)).toBe(403);
      expect(r.stdout).toContain("icap:clamav");
      expect(r.stdout).not.toContain(MARKER.toString("latin1"));
      const rec = await record("acme", path, proto);
      expect(rec).toMatchObject({ decision: "block", status: 403, rule: "icap:clamav", icap: "clamav", icap_result: "infection" });
      expect(rec.threat).toBe(path === "/infected" ? MARKER_THREAT : HASHED_THREAT);
    }
  });

  it.each(["http/1.1", "h2"] as Proto[])("%s: an infected body past the hold bound is cut off, never completed", async (proto) => {
    const r = await curl("acme", proto, "/big-infected");
    // The headers went out before the verdict; the transfer then fails (curl 18: partial, 92: h2 stream reset).
    expect(statusOf(r.stdout)).toBe(200);
    expect([18, 92, 56]).toContain(r.code);
    expect(r.stdout).not.toContain(MARKER.toString("latin1"));
    const rec = await record("acme", "/big-infected", proto);
    expect(rec).toMatchObject({ decision: "block", rule: "icap:clamav", threat: MARKER_THREAT });
  });
});

describe("uploads (REQMOD) through c-icap", () => {
  it.each(INSPECTED)("%s: a clean upload reaches the origin; an infected one never does", async (proto) => {
    const clean = await curl("acme", proto, "/upload", CLEAN);
    expect(clean.stdout).toContain(`received ${CLEAN.length} bytes`);
    expect(await record("acme", "/upload", proto, "POST")).toMatchObject({ decision: "allow", icap: "clamav", icap_result: "clean" });
    const before = uploads.length;
    const bad = await curl("acme", proto, "/upload", INFECTED);
    expect(statusOf(bad.stdout)).toBe(403);
    expect(bad.stdout).toContain(MARKER_THREAT);
    expect(uploads.length).toBe(before);
    const rec = await record("acme", "/upload", proto, "POST", (r) => r.rule === "icap:clamav");
    expect(rec).toMatchObject({ decision: "block", icap_result: "infection", threat: MARKER_THREAT });
  });

  it("keeps ICAP connections alive: clean fetches share a pooled connection", async () => {
    for (let i = 0; i < 3; i++) expect(statusOf((await curl("acme", "http/1.1", "/clean")).stdout)).toBe(200);
    // A connection that carried a 200 (a finding) is closed; one that carried 204s stays, idle.
    expect(await counter("kmi_proxy_icap_connections", "")).toBeGreaterThanOrEqual(1);
    expect(await counter("kmi_proxy_icap_connections", "")).toBeLessThanOrEqual(2);
  });

  it("counts the verdicts in kmi_proxy_icap_requests_total and the tenant's decisions", async () => {
    expect(await counter("kmi_proxy_icap_requests_total", 'service="clamav",method="RESPMOD",result="infection"')).toBeGreaterThanOrEqual(6);
    expect(await counter("kmi_proxy_icap_requests_total", 'service="clamav",method="REQMOD",result="clean"')).toBeGreaterThanOrEqual(3);
    expect(await counter("kmi_proxy_icap_round_trips_total", 'service="clamav"')).toBeGreaterThan(0);

    expect(await counter("kmi_proxy_decisions_total", 'decision="block",tenant="acme"')).toBeGreaterThanOrEqual(9);
  });
});

describe("per-tenant policy", () => {
  it("tenants on one proxy get different decisions for the same requests", async () => {
    // acme: ICAP blocks the infected body, /secret passes. beta: no ICAP, /secret blocked by its own rule.
    expect(statusOf((await curl("acme", "h2", "/infected")).stdout)).toBe(403);
    expect(statusOf((await curl("acme", "h2", "/secret")).stdout)).toBe(200);
    const betaInfected = await curl("beta", "h2", "/infected");
    expect(statusOf(betaInfected.stdout)).toBe(200);
    expect(betaInfected.stdout).toContain(MARKER.toString("latin1"));
    // The same inside a CONNECT (curl -p): beta's tunnelled plain HTTP is not sent to ICAP.
    const betaTunnelled = await curl("beta", "tunnelled", "/infected");
    expect(statusOf(betaTunnelled.stdout)).toBe(200);
    expect((await record("beta", "/infected", "tunnelled")).icap).toBeUndefined();
    expect(statusOf((await curl("beta", "tunnelled", "/secret")).stdout)).toBe(403);
    const betaSecret = await curl("beta", "h2", "/secret");
    expect(statusOf(betaSecret.stdout)).toBe(403);
    expect(await record("beta", "/secret", "h2")).toMatchObject({ decision: "block", rule: "block-url:*/secret*" });
    const rec = await record("beta", "/infected", "h2");
    expect(rec.decision).toBe("allow");
    expect(rec.icap).toBeUndefined();
    // Uploads: acme's are inspected (even the built-in EICAR check), beta's are not.
    const eicarUpload = Buffer.concat([Buffer.from("data "), EICAR]);
    expect(statusOf((await curl("acme", "http/1.1", "/upload", eicarUpload)).stdout)).toBe(403);
    expect((await curl("beta", "http/1.1", "/upload", eicarUpload)).stdout).toContain(`received ${eicarUpload.length} bytes`);
  });

  it("a tenant's bypass rule: its tunnel to the origin is not intercepted, another tenant's is", async () => {
    const originCa = join(tenantsDir, "origin-ca.pem");
    await writeFile(originCa, h.pki.caPem);
    const direct = (tenant: string) =>
      run("curl", ["-sS", "--suppress-connect-headers", "--max-time", "20", "-x", `http://127.0.0.1:${h.port}`, "--proxy-user", USERS[tenant]!, "--cacert", originCa, "-o", "/dev/null", "-w", "%{http_code}", `https://127.0.0.1:${tlsPort}/infected`]);
    // gamma's tunnel carries the origin's own certificate (and the body unscanned); acme's carries a minted leaf.
    expect((await direct("gamma")).stdout).toBe("200");
    expect(await h.log.waitFor((r) => r.tenant === "gamma" && r.method === "CONNECT" && r.host === "127.0.0.1")).toMatchObject({ decision: "bypass", rule: "bypass-host:127.0.0.1" });
    expect((await direct("acme")).code).toBe(60);
  });

  it("a bad edit of the tenants file is refused, counted, and the old policy stays", async () => {
    const failures = await counter("kmi_proxy_policy_reload_failures_total", "");
    await writeTenants({ tenants: tenants().map((t) => (t.id === "beta" ? { ...t, policy: { icap: { respmod: { url: "http://not-icap" } } } } : t)) });
    expect(await h.proxy.context.policy.reload()).toBe(false);
    expect(await counter("kmi_proxy_policy_reload_failures_total", "")).toBe(failures + 1);
    expect(statusOf((await curl("beta", "h2", "/secret")).stdout)).toBe(403);
  });

  it("a good edit applies to a keep-alive connection opened before it, which stays open", async () => {
    const sock = await tunnelAs("beta");
    const first = await requestOver(sock, "/clean", { host: `localhost:${tlsPort}`, headers: { connection: "keep-alive" } });
    expect(first.status).toBe(200);
    await writeTenants({ tenants: tenants("*/clean*") });
    expect(await h.proxy.context.policy.reload()).toBe(true);
    // The same connection: the new rule applies to its next request, and it stays open.
    const second = await requestOver(sock, "/clean", { host: `localhost:${tlsPort}`, headers: { connection: "keep-alive" } });
    expect(second.status).toBe(403);
    expect(second.body.toString()).toContain("block-url:*/clean*");
    const third = await requestOver(sock, "/secret", { host: `localhost:${tlsPort}`, headers: { connection: "keep-alive" } });
    expect(third.status).toBe(200);
    expect(sock.destroyed).toBe(false);
    await writeTenants({ tenants: tenants() });
    expect(await h.proxy.context.policy.reload()).toBe(true);
    sock.destroy();
  });
});

describe("the ICAP service killed (SIGKILL)", () => {
  it("fail-closed blocks (response and upload), fail-open passes, each logged; it recovers after a restart", async () => {
    await peer.killIcap();
    try {
      for (const proto of PROTOS) {
        const closed = await curl("acme", proto, "/clean");
        expect(statusOf(closed.stdout), `${proto}: ${closed.stdout.slice(0, 300)} ${closed.stderr}`).toBe(403);
        expect(closed.stdout).toContain("icap-unavailable:clamav");
        expect(await record("acme", "/clean", proto, "GET", (r) => r.rule === "icap-unavailable:clamav")).toMatchObject({ decision: "block", icap_result: "fail-closed" });
        const open = await curl("gamma", proto, "/infected");
        expect(statusOf(open.stdout)).toBe(200);
        expect(await record("gamma", "/infected", proto)).toMatchObject({ decision: "allow", icap: "clamav", icap_result: "fail-open" });
      }
      const before = uploads.length;
      const up = await curl("acme", "http/1.1", "/upload", CLEAN);
      expect(statusOf(up.stdout)).toBe(403);
      expect(uploads.length).toBe(before);
      const upOpen = await curl("gamma", "http/1.1", "/upload", CLEAN);
      expect(upOpen.stdout).toContain(`received ${CLEAN.length} bytes`);
      expect(await record("acme", "/upload", "http/1.1", "POST", (r) => r.rule === "icap-unavailable:clamav")).toMatchObject({ decision: "block", icap_result: "fail-closed" });
    } finally {
      await peer.restart();
    }
    const again = await curl("acme", "http/1.1", "/infected");
    expect(statusOf(again.stdout)).toBe(403);
    expect(again.stdout).toContain(MARKER_THREAT);
  });
});
