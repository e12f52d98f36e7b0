/**
 * Tenants: by client address range, by proxy credentials (scrypt passwordHash users, and the
 * older passwordSha256 ones), or the default; each gets leaves from its own intermediate.
 */
import { createHash } from "node:crypto";
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { connect as netConnect, type AddressInfo } from "node:net";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createLogger } from "../../../src/common/logger.js";
import { hashPassword } from "../../../src/proxy/tenants.js";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { run, startHarness, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
let plain: HttpServer;
let plainPort: number;
const logLines: Record<string, unknown>[] = [];
const sha = (s: string) => createHash("sha256").update(s).digest("hex");
const DAVE_TOKEN = "dave-9Vq2mX4tYb7LcP0e";
const FRANK_TOKEN = "frank-Hs8Kd1Wq5Zr3Nf6u";

beforeAll(async () => {
  h = await startHarness({
    tenants: [
      { id: "acme" },
      { id: "globex", cidrs: ["127.0.0.2/32", "10.0.0.0/8"], users: [{ name: "bob", passwordSha256: sha("s3cret-token") }] },
      { id: "initech", users: [{ name: "carol", passwordSha256: sha("other-token") }] },
      // What `kmi proxy hash-password` prints (same function, real scrypt).
      { id: "umbrella", users: [{ name: "dave", passwordHash: await hashPassword(DAVE_TOKEN) }, { name: "frank", passwordHash: await hashPassword(FRANK_TOKEN) }] },
    ],
    defaultTenant: "acme",
    proxy: { logger: createLogger({ level: "warn", write: (line) => void logLines.push(JSON.parse(line) as Record<string, unknown>) }) },
  });
  good = await startOrigin({ cert: h.pki.good });
  plain = createHttpServer((_req, res) => res.end("plain hello\n"));
  await new Promise<void>((resolve) => plain.listen(0, "127.0.0.1", resolve));
  plainPort = (plain.address() as AddressInfo).port;
});

afterAll(async () => {
  await h?.close();
  await good?.close();
  await new Promise((resolve) => plain?.close(resolve));
});

/** Sends one raw request head from `localAddress`; resolves with the status and the head. */
function rawRequest(localAddress: string, head: string): Promise<{ status: number; head: string }> {
  return new Promise((resolve, reject) => {
    const s = netConnect({ host: "127.0.0.1", port: h.port, localAddress });
    s.on("error", reject);
    s.on("connect", () => s.write(head));
    let buf = "";
    s.on("data", (d: Buffer) => {
      buf += d.toString("latin1");
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      s.destroy();
      resolve({ status: Number(buf.split(" ")[1]), head: buf.slice(0, end) });
    });
  });
}

const basic = (auth: string) => `Basic ${Buffer.from(auth).toString("base64")}`;

/** CONNECT from `localAddress` with optional credentials; TLS trusting `ca`; resolves with the leaf's issuer CN or the CONNECT status. */
function viaProxy(localAddress: string, ca: string, auth?: string): Promise<{ status: number; issuer?: string }> {
  return new Promise((resolve, reject) => {
    const s = netConnect({ host: "127.0.0.1", port: h.port, localAddress });
    s.on("error", reject);
    s.on("connect", () => {
      const hdr = auth === undefined ? "" : `Proxy-Authorization: Basic ${Buffer.from(auth).toString("base64")}\r\n`;
      s.write(`CONNECT localhost:${good.port} HTTP/1.1\r\nHost: localhost\r\n${hdr}\r\n`);
    });
    let buf = "";
    const onData = (d: Buffer) => {
      buf += d.toString("latin1");
      if (!buf.includes("\r\n\r\n")) return;
      s.off("data", onData);
      const status = Number(buf.split(" ")[1]);
      if (status !== 200) {
        s.destroy();
        resolve({ status });
        return;
      }
      const t: TLSSocket = tlsConnect({ socket: s, servername: "localhost", ca });
      t.once("secureConnect", () => {
        resolve({ status, issuer: String(t.getPeerCertificate().issuer.CN) });
        t.destroy();
      });
      t.once("error", reject);
    };
    s.on("data", onData);
  });
}

describe("tenants", () => {
  it("a client in a tenant's address range gets that tenant's leaves", async () => {
    expect(await viaProxy("127.0.0.2", h.agent.rootPem("globex"))).toEqual({ status: 200, issuer: "globex MITM CA v1" });
  });

  it("a client outside every range gets the default tenant", async () => {
    expect(await viaProxy("127.0.0.3", h.agent.rootPem("acme"))).toEqual({ status: 200, issuer: "acme MITM CA v1" });
    const rec = await h.log.waitFor((r) => r.tenant === "acme" && r.client.startsWith("127.0.0.3:"));
    expect(rec.tenant).toBe("acme");
  });

  it("proxy credentials pick the tenant, whatever the address", async () => {
    expect(await viaProxy("127.0.0.2", h.agent.rootPem("initech"), "carol:other-token")).toEqual({ status: 200, issuer: "initech MITM CA v1" });
  });

  it.each([
    ["wrong password", "bob:guess"],
    ["unknown user", "mallory:s3cret-token"],
    ["no password", "bob"],
  ])("%s: 407 with a Basic challenge", async (_n, auth) => {
    expect(await viaProxy("127.0.0.1", h.agent.rootPem("acme"), auth)).toEqual({ status: 407 });
  });

  it("curl with --proxy-user reaches the origin under its tenant", async () => {
    const root = await h.rootFile("globex");
    const r = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--proxy-user", "bob:s3cret-token", "--cacert", root, `https://localhost:${good.port}/hello`]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("hello from origin");
    const rec = await h.log.waitFor((x) => x.path === "/hello" && x.tenant === "globex");
    expect(rec.decision).toBe("allow");
  });
});

describe("scrypt proxy users (passwordHash)", () => {
  it("the right password picks the user's tenant; curl --proxy-user gets that tenant's leaf", async () => {
    expect(await viaProxy("127.0.0.3", h.agent.rootPem("umbrella"), `dave:${DAVE_TOKEN}`)).toEqual({ status: 200, issuer: "umbrella MITM CA v1" });
    const root = await h.rootFile("umbrella");
    const r = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--proxy-user", `dave:${DAVE_TOKEN}`, "--cacert", root, `https://localhost:${good.port}/hello?dave`]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("hello from origin");
    const rec = await h.log.waitFor((x) => x.path.startsWith("/hello") && x.tenant === "umbrella");
    expect(rec.decision).toBe("allow");
    // The same leaf does not verify under another tenant's root.
    const other = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--proxy-user", `dave:${DAVE_TOKEN}`, "--cacert", await h.rootFile("acme"), `https://localhost:${good.port}/hello`]);
    expect(other.code).not.toBe(0);
  });

  it("a wrong password is 407 with a Basic challenge, for CONNECT, plain requests and upgrades", async () => {
    const r = await run("curl", ["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--proxy-user", "dave:wrong", "--interface", "127.0.0.4", `http://127.0.0.1:${plainPort}/`]);
    expect(r.stdout).toBe("407");
    const connect = await rawRequest("127.0.0.4", `CONNECT localhost:${good.port} HTTP/1.1\r\nHost: localhost\r\nProxy-Authorization: ${basic("dave:wrong2")}\r\n\r\n`);
    expect(connect.status).toBe(407);
    expect(connect.head.toLowerCase()).toContain('proxy-authenticate: basic realm="kmi proxy"');
    const upgrade = await rawRequest(
      "127.0.0.4",
      `GET http://127.0.0.1:${plainPort}/ws HTTP/1.1\r\nHost: 127.0.0.1:${plainPort}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nProxy-Authorization: ${basic("dave:wrong3")}\r\n\r\n`,
    );
    expect(upgrade.status).toBe(407);
    expect(await viaProxy("127.0.0.4", h.agent.rootPem("acme"), `nobody:${DAVE_TOKEN}`)).toEqual({ status: 407 });
  });

  it("plain http:// requests with the right password are forwarded under the user's tenant", async () => {
    // frank's first request: the scrypt check runs while the request waits.
    for (const path of ["/plain-1", "/plain-2"]) {
      const r = await run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${h.port}`, "--proxy-user", `frank:${FRANK_TOKEN}`, `http://127.0.0.1:${plainPort}${path}`]);
      expect(r.stdout).toBe("plain hello\n");
      const rec = await h.log.waitFor((x) => x.path === path);
      expect(rec.tenant).toBe("umbrella");
    }
  });

  it("past 5 failures in 10 s from one address, new credentials are refused at once; other addresses and remembered successes are not", async () => {
    // A success the proxy remembers (from another address).
    expect(await viaProxy("127.0.0.6", h.agent.rootPem("umbrella"), `dave:${DAVE_TOKEN}`)).toEqual({ status: 200, issuer: "umbrella MITM CA v1" });
    for (let i = 0; i < 5; i++) {
      expect(await viaProxy("127.0.0.5", h.agent.rootPem("acme"), `dave:guess${i}`)).toEqual({ status: 407 });
    }
    const refused = await rawRequest("127.0.0.5", `CONNECT localhost:${good.port} HTTP/1.1\r\nHost: localhost\r\nProxy-Authorization: ${basic("dave:guess5")}\r\n\r\n`);
    expect(refused.status).toBe(407);
    expect(refused.head.toLowerCase()).toContain("x-kmi-reason: too many failed proxy logins from this address");
    // Another address is unaffected.
    const other = await rawRequest("127.0.0.6", `CONNECT localhost:${good.port} HTTP/1.1\r\nHost: localhost\r\nProxy-Authorization: ${basic("dave:guess5")}\r\n\r\n`);
    expect(other.head.toLowerCase()).toContain("x-kmi-reason: unknown proxy user or wrong password");
    // A success remembered from earlier still works from the refused address (one HMAC, no scrypt).
    expect(await viaProxy("127.0.0.5", h.agent.rootPem("umbrella"), `dave:${DAVE_TOKEN}`)).toEqual({ status: 200, issuer: "umbrella MITM CA v1" });
  });

  it("warns at start once per passwordSha256 user, and not for passwordHash users", () => {
    const warned = logLines.filter((l) => l["level"] === "warn" && String(l["msg"]).includes("passwordSha256"));
    expect(warned.map((l) => l["user"]).sort()).toEqual(["bob", "carol"]);
    expect(String(warned[0]!["msg"])).toContain("kmi proxy hash-password");
  });
});
