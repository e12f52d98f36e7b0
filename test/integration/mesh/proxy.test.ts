/**
 * Issue 6 with the real agent: `kmi proxy` in front of a local HTTPS origin (under a test CA
 * given with --extra-ca), its leaves certified by `kmi agent`, which holds what `kmi kdc`
 * released to it after `kmi audit` attested it (test/fixtures/mesh). Clients are curl and
 * `openssl s_client -proxy`; certificates are judged by openssl.
 *
 * In order on one mesh: KMI-signed intermediate (over h2, the protocol the origin chose) →
 * refusals (a self-signed origin, EICAR, a policy block rule) with their access log records →
 * rotation → an intermediate signed by a private CA made with openssl → the proxy's memory and
 * open files searched for every intermediate key (unsealed from the stopped KDC's store), with
 * the agent as positive control.
 */
import { X509Certificate } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Mesh } from "../../fixtures/mesh/mesh.js";
import { runTool, spawnKmi, until } from "../../fixtures/mesh/processes.js";
import { findInFiles, keyNeedles, openFiles, PEM_PRIVATE_KEY, readOpenRegularFiles, scanMemory, unsealIntermediates, type Needle } from "../../fixtures/mesh/secrets.js";
import { makeOriginPki, startOrigin, type Origin, type OriginPki } from "../../fixtures/proxy/origins.js";
import { makePrivateCa } from "../kdc/harness.js";

let mesh: Mesh;
let pki: OriginPki;
let origin: Origin;
let kmiRoot: string;
/** The private CA's root (test "private CA"). */
let privateRoot = "";
let n = 0;

beforeAll(async () => {
  pki = makeOriginPki();
  [mesh, origin] = await Promise.all([Mesh.start({ proxyExtraCaPem: pki.caPem }), startOrigin({ cert: pki.good })]);
  kmiRoot = await mesh.download("root");
}, 90_000);

afterAll(async () => {
  await Promise.all([mesh?.close(), origin?.close()]);
});

/** curl through the proxy, trusting only `caFile`. */
function curl(caFile: string, path = "/hello", ...extra: string[]) {
  return curlVia(mesh.proxyPort, caFile, `https://localhost:${origin.port}${path}`, ...extra);
}

/** curl through the proxy on `proxyPort` to `url`, trusting only `caFile`. */
function curlVia(proxyPort: number, caFile: string, url: string, ...extra: string[]) {
  return runTool("curl", ["-sS", "--suppress-connect-headers", "--max-time", "10", "-x", `http://127.0.0.1:${proxyPort}`, "--cacert", caFile, ...extra, url]);
}

/** An access log record as the proxy writes it to its file (one JSON object a line). */
type AccessLine = { time: string; tenant: string; host: string; method: string; path: string; status: number; decision: string; rule?: string; proto?: string; error?: string };

/** The records of the access log `logFile` that `pred` accepts, in order. */
async function accessRecords(logFile: string, pred: (r: AccessLine) => boolean): Promise<AccessLine[]> {
  const text = await readFile(logFile, "utf8").catch(() => "");
  return text
    .split("\n")
    .slice(0, -1) // complete lines only: a write may be under way
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as AccessLine)
    .filter(pred);
}

/** Waits until the access log `logFile` holds `count` records that `pred` accepts (the proxy batches its writes). */
function awaitAccessRecords(logFile: string, pred: (r: AccessLine) => boolean, count = 1): Promise<AccessLine[]> {
  return until(
    `${count} access log record(s) in ${logFile}`,
    async () => {
      const found = await accessRecords(logFile, pred);
      return found.length >= count ? found : undefined;
    },
    5_000,
    () => `${mesh.proxy!.log().slice(-2000)}\n--- access log:\n${existsSync(logFile) ? readFileSync(logFile, "utf8").slice(-2000) : "(none)"}`,
  );
}

/** What curl's TLS peer sent, as `openssl s_client -proxy … -showcerts` saw it: PEMs, leaf first. */
async function servedChain(): Promise<{ leaf: X509Certificate; leafPem: string; chain: string[] }> {
  const r = await runTool("openssl", ["s_client", "-proxy", `127.0.0.1:${mesh.proxyPort}`, "-connect", `localhost:${origin.port}`, "-servername", "localhost", "-showcerts"]);
  const chain = r.stdout.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (chain.length === 0) throw new Error(`s_client saw no certificate (exit ${r.code}): ${r.stderr}`);
  return { leaf: new X509Certificate(chain[0]!), leafPem: chain[0]!, chain };
}

async function file(name: string, content: string): Promise<string> {
  const f = join(mesh.dir, `${++n}-${name}`);
  await writeFile(f, content);
  return f;
}

/** openssl's verdict on a leaf under `rootFile` with `intermediatePem` as the untrusted chain. */
async function verify(leafPem: string, rootFile: string, intermediatePem: string): Promise<string> {
  const r = await runTool("openssl", ["verify", "-CAfile", rootFile, "-untrusted", await file("inter.pem", intermediatePem), "-purpose", "sslserver", await file("leaf.pem", leafPem)]);
  return `${r.code} ${r.stdout}${r.stderr}`.trim();
}

async function x509Text(pem: string): Promise<string> {
  return (await runTool("openssl", ["x509", "-noout", "-text", "-in", await file("cert.pem", pem)])).stdout;
}

/** Activates with `activate`, then waits until the proxy has dropped the tenant's leaves (WatchKeys ROTATED). */
async function activated<T>(activate: () => Promise<T>): Promise<T> {
  const before = mesh.proxy!.entries("leaves dropped after a key event").length;
  const out = await activate();
  await until("the proxy drops its leaves", () => (mesh.proxy!.entries("leaves dropped after a key event").length > before ? true : undefined), 3_000, () => mesh.proxy!.log().slice(-2000));
  return out;
}

type VersionJson = { version: { version: number; certificatePem: string } };

/** The proxy's processes: the one started and, with workers, its children. */
function proxyProcesses(pid: number): number[] {
  const children = readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter((c) => c !== "").map(Number);
  return [pid, ...children];
}

describe("the proxy in the real mesh", () => {
  it("serves curl through the proxy with a leaf the tenant's intermediate issued, carrying the origin's names", async () => {
    // curl offers h2 and http/1.1; the origin speaks h2, so the client must get h2 end to end.
    const r = await curl(kmiRoot, "/hello", "--http2", "-w", "%{http_version}");
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toBe("hello from origin over h2\n2");
    const [rec] = await awaitAccessRecords(mesh.accessLogFile, (x) => x.path === "/hello");
    expect(rec).toMatchObject({ tenant: mesh.tenant, host: "localhost", method: "GET", status: 200, decision: "allow", proto: "h2" });

    const intermediate = await mesh.read(await mesh.download("intermediate"));
    const { leaf, leafPem, chain } = await servedChain();
    expect(chain).toHaveLength(2);
    expect(new X509Certificate(chain[1]!).fingerprint256).toBe(new X509Certificate(intermediate).fingerprint256);
    expect(leaf.checkIssued(new X509Certificate(intermediate))).toBe(true);
    expect(await verify(leafPem, kmiRoot, intermediate)).toMatch(/^0 .*: OK$/);
    const t = await x509Text(leafPem);
    expect(t).toMatch(/X509v3 Subject Alternative Name:\s*\n\s*DNS:localhost, IP Address:127\.0\.0\.1, IP Address:0:0:0:0:0:0:0:1\s*\n/);
    expect(t).toMatch(/Subject: CN ?= ?localhost\n/);
    expect(t).toMatch(/CA:FALSE/);
    expect(t).toMatch(/TLS Web Server Authentication/);
    expect(mesh.agent.entries("leaf issued").some((e) => (e.names as string[]).includes("localhost"))).toBe(true);
  });

  it("a self-signed origin gets a 502 page naming the verification error, never a trusted leaf; the access log records it", async () => {
    const selfSigned = await startOrigin({ cert: pki.selfSigned });
    try {
      const url = `https://localhost:${selfSigned.port}/hello`;
      // A client that trusts only the tenant root refuses the page: nothing is passed off as trusted.
      const strict = await curlVia(mesh.proxyPort, kmiRoot, url);
      expect(strict.code).toBe(60);
      expect(strict.stdout).toBe("");
      const page = await curlVia(mesh.proxyPort, kmiRoot, url, "-k", "-i", "--http1.1");
      expect(page.code).toBe(0);
      expect(page.stdout).toMatch(/^HTTP\/1.1 502 /);
      expect(page.stdout).toContain("self-signed certificate");
      expect(page.stdout).toMatch(/^x-kmi-rule: origin-verify\r$/m);
      expect(selfSigned.requests).toBe(0);
      const [rec] = await awaitAccessRecords(mesh.accessLogFile, (x) => x.path === `localhost:${selfSigned.port}` && x.rule === "origin-verify");
      expect(rec).toMatchObject({ tenant: mesh.tenant, method: "CONNECT", status: 502, decision: "block" });
      expect(rec!.error).toContain("DEPTH_ZERO_SELF_SIGNED_CERT");
    } finally {
      await selfSigned.close();
    }
  });

  it("replaces a response carrying EICAR with a 403 page, over h2 and http/1.1", async () => {
    for (const v of ["--http2", "--http1.1"]) {
      const r = await curl(kmiRoot, "/eicar", v, "-i");
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/^HTTP\/(2|1\.1) 403/);
      expect(r.stdout).toContain("rule: <code>eicar</code>");
      expect(r.stdout).not.toContain("EICAR-STANDARD-ANTIVIRUS-TEST-FILE");
    }
    const recs = await awaitAccessRecords(mesh.accessLogFile, (x) => x.path === "/eicar", 2);
    expect(recs.map((x) => [x.proto, x.status, x.decision, x.rule])).toEqual([
      ["h2", 403, "block", "eicar"],
      ["http/1.1", 403, "block", "eicar"],
    ]);
  });

  it("a policy block rule gives a 403 page naming the rule, with leaves from the real agent for the rest", async () => {
    // The mesh's proxy runs without --policy, and its config file is one of the machine's
    // attested measurements (proxy.config): a second `kmi proxy` on the same agent socket takes the policy.
    const policyFile = await file("policy.json", JSON.stringify({ blockUrls: [{ name: "no-admin", pattern: "*/admin*" }] }));
    const logFile = join(mesh.dir, "policy-access.log");
    const proxy = await spawnKmi("policy-proxy", [
      "proxy", "--listen", "127.0.0.1:0", "--agent-socket", mesh.socketPath, "--default-tenant", mesh.tenant,
      "--extra-ca", await file("origin-ca.pem", pki.caPem), "--allow-private", "127.0.0.0/8",
      "--policy", policyFile, "--access-log", logFile, "--shutdown-grace-ms", "1000",
    ]);
    try {
      const port = ((proxy.entries("started")[0]?.bound ?? {}) as { port?: number }).port ?? 0;
      expect(port).toBeGreaterThan(0);
      const before = origin.requests;
      const blocked = await curlVia(port, kmiRoot, `https://localhost:${origin.port}/admin/panel`, "-i");
      expect(blocked.code, blocked.stderr).toBe(0);
      expect(blocked.stdout).toMatch(/^HTTP\/2 403/);
      expect(blocked.stdout).toContain("rule: <code>block-url:no-admin</code>");
      expect(origin.requests).toBe(before);
      const ok = await curlVia(port, kmiRoot, `https://localhost:${origin.port}/hello`);
      expect(ok.code, ok.stderr).toBe(0);
      expect(ok.stdout).toBe("hello from origin over h2\n");
      const [rec] = await awaitAccessRecords(logFile, (x) => x.path === "/admin/panel");
      expect(rec).toMatchObject({ tenant: mesh.tenant, status: 403, decision: "block", rule: "block-url:no-admin" });
    } finally {
      await proxy.stop("SIGTERM");
    }
  });

  it("after a rotation on the KDC the next new connection gets a leaf from the new intermediate, with nothing restarted", async () => {
    const pids = [mesh.proxy!.pid, mesh.agent.pid];
    const before = await servedChain();
    const v = await activated(() => mesh.ctlJson<VersionJson>(["ca", "rotate", "--tenant", mesh.tenant, "--activate"]));
    const next = await servedChain();
    const fresh = new X509Certificate(v.version.certificatePem);
    expect(next.leaf.fingerprint256).not.toBe(before.leaf.fingerprint256);
    expect(next.leaf.checkIssued(fresh)).toBe(true);
    expect(new X509Certificate(next.chain[1]!).fingerprint256).toBe(fresh.fingerprint256);
    expect(await verify(next.leafPem, kmiRoot, v.version.certificatePem)).toMatch(/^0 .*: OK$/);
    expect((await curl(kmiRoot)).code).toBe(0);
    expect([mesh.proxy!.pid, mesh.agent.pid]).toEqual(pids);
    expect([mesh.proxy!.running(), mesh.agent.running()]).toEqual([true, true]);
  });

  it("serves leaves under an intermediate signed by a private CA made with openssl, trusted with that root alone", async () => {
    const ca = await makePrivateCa(mesh.dir, "acme-private-root");
    privateRoot = ca.rootFile;
    const csrFile = join(mesh.dir, "acme-private.csr");
    await mesh.ctlOk(["ca", "csr", "--tenant", mesh.tenant, "--org", "ACME Corp", "--out", csrFile]);
    const signed = await ca.sign(await mesh.read(csrFile), { days: 20 } /* the root lives 30: an intermediate may not outlive it */);
    const certFile = await file("acme-private-intermediate.pem", signed);
    await activated(() => mesh.ctlOk(["ca", "upload", "--tenant", mesh.tenant, "--cert", certFile, "--root", ca.rootFile, "--activate"]));

    const r = await curl(ca.rootFile);
    expect(r.stderr).toBe("");
    expect(r.stdout).toMatch(/^hello from origin over /);
    // The KMI root no longer vouches for what the proxy serves: the leaf really is under the private CA.
    expect((await curl(kmiRoot)).code).toBe(60);
    const { leaf, leafPem, chain } = await servedChain();
    expect(new X509Certificate(chain[1]!).fingerprint256).toBe(new X509Certificate(signed).fingerprint256);
    expect(leaf.checkIssued(new X509Certificate(signed))).toBe(true);
    expect(leaf.issuer).toMatch(/O=ACME Corp/);
    expect(await verify(leafPem, ca.rootFile, signed)).toMatch(/^0 .*: OK$/);
    expect(await verify(leafPem, kmiRoot, signed)).not.toMatch(/^0 /);
  });

  it("keeps no KMI-managed private key in the proxy's memory or open files, while the same scan finds it in the agent's", async () => {
    // Traffic first, so that whatever the proxy would ever hold, it holds now.
    for (let i = 0; i < 3; i++) expect((await curl(privateRoot)).code).toBe(0);
    expect(await mesh.kdc.stop("SIGTERM")).toBe(0);
    const keys = await unsealIntermediates(mesh.kdcDir, mesh.tenant);
    expect(keys.map((k) => k.version).sort()).toEqual([1, 2, 3]);
    const active = keys.find((k) => k.version === 3)!;
    const needles: Needle[] = keys.flatMap((k) => [
      ...keyNeedles(k),
      // OpenSSL keeps the scalar as a BIGNUM: little-endian words, i.e. the bytes reversed on x86-64.
      { name: `v${k.version} ec scalar (reversed)`, bytes: Buffer.from(k.scalar).reverse() },
    ]);

    // The proxy runs with workers (--workers auto): its primary and each worker are scanned.
    const pids = proxyProcesses(mesh.proxy!.pid);
    expect(pids.length).toBeGreaterThan(1);
    for (const pid of pids) {
      const proxyScan = scanMemory(pid, needles);
      expect(proxyScan.regions).toBeGreaterThan(20);
      expect(proxyScan.bytes).toBeGreaterThan(20 << 20);
      expect(proxyScan.hits).toEqual([]);
    }

    const fds = pids.flatMap((pid) => openFiles(pid));
    expect(fds.length).toBeGreaterThan(3);
    expect(fds.filter((f) => f.target.startsWith(mesh.stateDir) || f.target.startsWith(mesh.kdcDir))).toEqual([]);
    const regular = readOpenRegularFiles(fds);
    expect(regular.some((f) => f.path === mesh.accessLogFile)).toBe(true);
    expect(findInFiles(regular, [...needles, PEM_PRIVATE_KEY])).toEqual([]);

    // Positive control: the agent signs with the active key, so the same scan must find it there.
    // The same needles as the proxy's scan (the active version's): the scalar as encoded, or as OpenSSL's BIGNUM holds it.
    const agentScan = scanMemory(mesh.agent.pid, needles.filter((n) => n.name.startsWith(`v${active.version} `)));
    expect(agentScan.hits.length).toBeGreaterThan(0);
  });

  it("stops cleanly: SIGTERM to the proxy, the agent and the Auditserver together, each exits 0", async () => {
    const procs = [mesh.proxy!, mesh.agent, mesh.audit];
    const codes = await Promise.all(procs.map((p) => p.stop("SIGTERM")));
    expect(Object.fromEntries(procs.map((p, i) => [p.name, codes[i]]))).toEqual({ proxy: 0, agent: 0, audit: 0 });
    await expect(stat(mesh.socketPath)).rejects.toThrow(/ENOENT/);
  });
});
