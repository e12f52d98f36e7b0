/**
 * Issue 17, end to end: a tenant whose intermediate is held in the KDC's PKCS#11 token
 * (SoftHSM2), with the real programs as an operator starts them (test/fixtures/mesh, `kmi kdc
 * init --pkcs11-*`), `kmi proxy` in front of a local HTTPS origin, curl and openssl as clients.
 *
 * In order on one mesh: `kmi ctl ca rotate --key-custody token --activate` → the proxy serves
 * leaves the KDC signed through the token, judged by `openssl verify` → a private-CA version
 * (its CSR signed by the token key, the upload checked with it) → the KDC killed with SIGKILL:
 * a host with a leaf already is still served, a new host is refused with the reason, and after
 * the KDC is back the new host is served with nothing else restarted.
 */
import { X509Certificate } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Mesh } from "../../fixtures/mesh/mesh.js";
import { runTool, until } from "../../fixtures/mesh/processes.js";
import { makeOriginPki, startOrigin, type Origin, type OriginPki } from "../../fixtures/proxy/origins.js";
import { softHsmToken, type SoftHsmToken } from "../../fixtures/pkcs11/softhsm.js";
import { cleanup, makePrivateCa, tempDir } from "../kdc/harness.js";

let hsmDir: string;
let hsm: SoftHsmToken;
let mesh: Mesh;
let pki: OriginPki;
let origin: Origin;
/** A second origin, under another certificate (127.0.0.1 only): a host the proxy has no leaf for. */
let origin2: Origin;
let kmiRoot: string;
let n = 0;

type VersionJson = { version: { version: number; certificatePem: string; keyCustody: string } };

beforeAll(async () => {
  hsmDir = await tempDir("kmi-mesh-hsm-");
  hsm = await softHsmToken(hsmDir, "kmi-mesh-token", "1357-user");
  // The mesh's programs inherit SOFTHSM2_CONF (its fixture drops only KMI_*).
  process.env["SOFTHSM2_CONF"] = hsm.env["SOFTHSM2_CONF"];
  pki = makeOriginPki();
  [mesh, origin, origin2] = await Promise.all([
    Mesh.start({ proxyExtraCaPem: pki.caPem, kdcInitFlags: hsm.flags, kdcFlags: hsm.flags }),
    startOrigin({ cert: pki.good }),
    startOrigin({ cert: pki.issue([], ["127.0.0.1"]) }),
  ]);
  kmiRoot = await mesh.download("root");
}, 120_000);

afterAll(async () => {
  await Promise.all([mesh?.close(), origin?.close(), origin2?.close()]);
  if (hsmDir !== undefined) await cleanup(hsmDir);
});

/** curl through the proxy to the origin (or `to`, by IP), trusting only `caFile`. */
function curl(caFile: string, to?: Origin) {
  const url = to === undefined ? `https://localhost:${origin.port}/hello` : `https://127.0.0.1:${to.port}/hello`;
  return runTool("curl", ["-sS", "--suppress-connect-headers", "--max-time", "15", "-x", `http://127.0.0.1:${mesh.proxyPort}`, "--cacert", caFile, url]);
}

/** The chain the proxy serves for `host`, as `openssl s_client -proxy -showcerts` saw it. */
async function servedChain(host = "localhost"): Promise<string[]> {
  const r = await runTool("openssl", ["s_client", "-proxy", `127.0.0.1:${mesh.proxyPort}`, "-connect", `${host}:${origin.port}`, "-servername", host, "-showcerts"]);
  const chain = r.stdout.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (chain.length === 0) throw new Error(`s_client saw no certificate (exit ${r.code}): ${r.stderr}`);
  return chain;
}

async function file(name: string, content: string): Promise<string> {
  const f = join(mesh.dir, `${++n}-${name}`);
  await writeFile(f, content);
  return f;
}

/** openssl's verdict on a leaf under `rootFile` with `intermediatePem` as the untrusted chain. */
async function verify(leafPem: string, rootFile: string, intermediatePem: string): Promise<string> {
  const r = await runTool("openssl", ["verify", "-purpose", "sslserver", "-CAfile", rootFile, "-untrusted", await file("inter.pem", intermediatePem), await file("leaf.pem", leafPem)]);
  return `${r.code} ${r.stdout}${r.stderr}`.trim();
}

/** Runs `activate`, then waits until the proxy has dropped the tenant's leaves (the agent's WatchKeys ROTATED). */
async function activated<T>(activate: () => Promise<T>): Promise<T> {
  const before = mesh.proxy!.entries("leaves dropped after a key event").length;
  const out = await activate();
  await until("the proxy drops its leaves", () => (mesh.proxy!.entries("leaves dropped after a key event").length > before ? true : undefined), 10_000, () => mesh.proxy!.log().slice(-2000));
  return out;
}

/** The agent's "leaf issued" log lines signed at the KDC. */
const kdcSignedLeaves = () => mesh.agent.entries("leaf issued").filter((e) => e["signed_by"] === "kdc");

describe("a tenant intermediate held in the KDC's token, behind the real proxy", () => {
  it("`ca rotate --key-custody token --activate`: the proxy serves leaves the KDC signed through the token, and openssl verifies them", async () => {
    const v = await activated(() => mesh.ctlJson<VersionJson>(["ca", "rotate", "--tenant", mesh.tenant, "--key-custody", "token", "--activate"]));
    expect(v.version.keyCustody).toBe("KEY_CUSTODY_TOKEN");
    const history = await mesh.ctlOk(["ca", "history", "--tenant", mesh.tenant]);
    expect(history.stdout).toMatch(new RegExp(`^${v.version.version}\\s.*\\stoken\\s`, "m"));
    expect(history.stdout).toMatch(/^1\s.*\sescrow\s/m);
    const r = await curl(kmiRoot);
    expect(r.stderr).toBe("");
    expect(r.stdout).toMatch(/^hello from origin over /);
    const chain = await servedChain();
    const inter = new X509Certificate(v.version.certificatePem);
    expect(new X509Certificate(chain[1]!).fingerprint256).toBe(inter.fingerprint256);
    expect(await verify(chain[0]!, kmiRoot, v.version.certificatePem)).toMatch(/^0 .*: OK$/);
    expect(kdcSignedLeaves().length).toBeGreaterThan(0);
    expect(mesh.kdc.entries("leaf signed with a token-held intermediate").some((e) => e["machine"] === mesh.machineId)).toBe(true);
  });

  it("a private-CA version follows the token custody: its CSR is signed by the token key, and the uploaded intermediate's leaves verify under the private root", async () => {
    const ca = await makePrivateCa(mesh.dir, "acme-private-root");
    const csrFile = join(mesh.dir, "acme-token.csr");
    await mesh.ctlOk(["ca", "csr", "--tenant", mesh.tenant, "--org", "ACME Corp", "--out", csrFile]);
    const csrCheck = await runTool("openssl", ["req", "-in", csrFile, "-noout", "-verify"]);
    expect(`${csrCheck.stdout}${csrCheck.stderr}`).toMatch(/verify OK/);
    const signed = await ca.sign(await readFile(csrFile, "utf8"), { days: 20 });
    const certFile = await file("acme-private-intermediate.pem", signed);
    const before = kdcSignedLeaves().length;
    await activated(() => mesh.ctlOk(["ca", "upload", "--tenant", mesh.tenant, "--cert", certFile, "--root", ca.rootFile, "--activate"]));
    const r = await curl(ca.rootFile);
    expect(r.stderr).toBe("");
    const chain = await servedChain();
    expect(new X509Certificate(chain[1]!).fingerprint256).toBe(new X509Certificate(signed).fingerprint256);
    expect(await verify(chain[0]!, ca.rootFile, signed)).toMatch(/^0 .*: OK$/);
    expect(kdcSignedLeaves().length).toBeGreaterThan(before);
  });

  it("with the KDC killed (SIGKILL), a host with a leaf is still served, a new host is refused saying why; with the KDC back, it is served", async () => {
    const root = join(mesh.dir, "acme-private-root.pem");
    expect((await curl(root)).code).toBe(0);
    const pids = [mesh.proxy!.pid, mesh.agent.pid];
    await mesh.kdc.stop("SIGKILL");
    expect((await curl(root)).code).toBe(0);
    const refused = await curl(root, origin2);
    expect(refused.code).not.toBe(0);
    await until(
      "the proxy logs why it had no leaf",
      () => (mesh.proxy!.entries("leaf issuance failed").some((e) => /KDC/.test(JSON.stringify(e))) ? true : undefined),
      5_000,
      () => mesh.proxy!.log().slice(-2000),
    );
    await mesh.startKdc();
    await until("the new host is served once the KDC is back", async () => ((await curl(root, origin2)).code === 0 ? true : undefined), 30_000, () => mesh.agent.log().slice(-2000));
    expect([mesh.proxy!.pid, mesh.agent.pid]).toEqual(pids);
  }, 60_000);
});
