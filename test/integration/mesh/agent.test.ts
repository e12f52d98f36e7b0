/**
 * Issue 5 with real processes: `kmi kdc`, `kmi audit` and `kmi agent`, set up by an operator
 * with `kmi ctl` (test/fixtures/mesh). A local process talks to the agent's socket with
 * @grpc/grpc-js and the workload header; certificates are judged by openssl.
 *
 * The tests run in order on one mesh: the operator's printed next steps → leaf and refusals →
 * rotation → KDC down (the intermediate keys are unsealed then, in-process, from the stopped
 * KDC's store with its master key) → quarantine and release → both audit logs → the state dir
 * searched for every unsealed key.
 */
import { execFile } from "node:child_process";
import { generateKeyPairSync, X509Certificate } from "node:crypto";
import { chmod, stat, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SealedCache } from "../../../src/agent/sealed-cache.js";
import { StateDir } from "../../../src/agent/state-dir.js";
import { createNopLogger } from "../../../src/common/logger.js";
import { KeyEventType, type WatchKeysResponse } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { failure } from "../../fixtures/agent/grpc-client.js";
import { Mesh } from "../../fixtures/mesh/mesh.js";
import { runCtl, runTool, until } from "../../fixtures/mesh/processes.js";
import { findInFiles, keyNeedles, PEM_PRIVATE_KEY, readTree, unsealIntermediates, type UnsealedKey } from "../../fixtures/mesh/secrets.js";

const DAY = 86_400_000;
const execFileP = promisify(execFile);
const socketClientScript = new URL("../../fixtures/agent/socket-client.mjs", import.meta.url).pathname;
const grpcModule = createRequire(import.meta.url).resolve("@grpc/grpc-js");
const PEM_CERT = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;
let mesh: Mesh;
/** Every intermediate key of the tenant, unsealed while the KDC is down (test "KDC down"). */
let unsealed: UnsealedKey[] = [];
/** The state dir's files right after the quarantine, searched once the keys are known. */
let quarantinedFiles: { path: string; bytes: Buffer }[] = [];
let n = 0;

beforeAll(async () => {
  mesh = await Mesh.start();
}, 90_000);

afterAll(async () => {
  await mesh?.close();
});

/** A P-256 leaf key the caller keeps; the agent sees only its public half. */
function leafKey(): Buffer {
  return generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ type: "spki", format: "der" });
}

function issue(extra: Record<string, unknown> = {}) {
  return mesh.agentClient().unary("issueLeafCertificate", { tenantId: mesh.tenant, publicKey: leafKey(), dnsNames: ["www.example.test"], ipAddresses: ["192.0.2.7"], ...extra });
}

async function opensslVerify(leafPem: string, rootFile: string, intermediateFile: string): Promise<string> {
  const leafFile = join(mesh.dir, `leaf-${++n}.pem`);
  await writeFile(leafFile, leafPem);
  const r = await runTool("openssl", ["verify", "-CAfile", rootFile, "-untrusted", intermediateFile, "-purpose", "sslserver", leafFile]);
  return `${r.code} ${r.stdout}${r.stderr}`.trim();
}

function ski(pem: string): string {
  return /X509v3 Subject Key Identifier:\s*\n\s*([0-9A-F:]+)/.exec(pem)?.[1] ?? "none";
}

async function text(pem: string): Promise<string> {
  const f = join(mesh.dir, `cert-${++n}.pem`);
  await writeFile(f, pem);
  return (await runTool("openssl", ["x509", "-in", f, "-noout", "-text"])).stdout;
}

/** GetStatus over `socketPath` from another process, run as `user` (this process's user when undefined); its JSON verdict. */
async function socketClientAs(user: string | undefined, socketPath: string): Promise<{ ok: boolean; code?: number; details?: string }> {
  const cmd = user === undefined ? [process.execPath, socketClientScript, socketPath, grpcModule] : ["runuser", "-u", user, "--", process.execPath, socketClientScript, socketPath, grpcModule];
  const { stdout } = await execFileP(cmd[0]!, cmd.slice(1), { encoding: "utf8", timeout: 20_000 });
  return JSON.parse(stdout.trim()) as { ok: boolean; code?: number; details?: string };
}

function watch(): { events: { ev: WatchKeysResponse; at: number }[]; cancel(): void } {
  const events: { ev: WatchKeysResponse; at: number }[] = [];
  const call = mesh.agentClient().watchKeys(mesh.tenant, (ev) => events.push({ ev, at: Date.now() }));
  return { events, cancel: () => call.cancel() };
}

describe("the operator's set-up", () => {
  it("can follow the next steps that `kmi audit init` printed", async () => {
    const next = mesh.auditInitOutput.split("\nnext:\n")[1]!.split("\n").map((l) => l.trim()).filter((l) => l !== "");
    const exported = next.find((l) => l.startsWith("export "));
    expect(exported).toBeDefined();
    const env = Object.fromEntries(exported!.slice("export ".length).split(/\s+/).map((kv) => kv.split("=", 2) as [string, string]));
    expect(env).toMatchObject({ KMI_CTL_CA_FILE: join(mesh.auditDir, "infra-ca.pem"), KMI_CTL_TOKEN_FILE: mesh.tokenFile });
    expect(env.KMI_CTL_AUDIT).toMatch(/^https:\/\//);
    const command = next.find((l) => l.startsWith("kmi ctl "))!.split(/\s+/).slice(2);
    expect(command.slice(0, 2)).toEqual(["group", "create"]);
    // As printed, but with a group name of its own (the mesh made "edge") and the mesh's Auditserver address.
    const r = await runCtl(command.map((w) => (w === "edge" ? "edge-next" : w)), { ...env, KMI_CTL_AUDIT: mesh.auditUrl });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^group:\s+edge-next$/m);
  });
});

describe("the key agent in the real mesh", () => {
  it("issues a leaf over its socket that openssl verifies against `kmi ctl ca download`, with the policy's extensions", async () => {
    const st = await stat(mesh.socketPath);
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);

    const res = await issue();
    // The tenant's chain as a customer downloads it: the intermediate, then the KMI root.
    const chainFile = await mesh.download("chain");
    const [interPem, rootPem, ...rest] = (await mesh.read(chainFile)).match(PEM_CERT) ?? [];
    expect(rest).toEqual([]);
    expect(rootPem).toBe((await mesh.read(join(mesh.kdcDir, "kmi-root.pem"))).match(PEM_CERT)![0]);
    const root = join(mesh.dir, "kmi-root-from-chain.pem");
    await writeFile(root, rootPem!);
    expect(res.chainPem).toContain(interPem!);
    expect(await opensslVerify(res.certificatePem, root, chainFile)).toMatch(/^0 .*: OK$/);

    const t = await text(res.certificatePem);
    expect(t).toMatch(/X509v3 Basic Constraints: critical\s*\n\s*CA:FALSE/);
    expect(t).toMatch(/X509v3 Key Usage: critical\s*\n\s*Digital Signature\s*\n/);
    expect(t).toMatch(/X509v3 Extended Key Usage:\s*\n\s*TLS Web Server Authentication\s*\n/);
    expect(t).toMatch(/X509v3 Subject Alternative Name:\s*\n\s*DNS:www\.example\.test, IP Address:192\.0\.2\.7\s*\n/);
    expect(t).toMatch(/Subject: CN ?= ?www\.example\.test/);
    expect(t).toContain("ASN1 OID: prime256v1");
    const aki = /X509v3 Authority Key Identifier:\s*\n\s*(?:keyid:)?([0-9A-F:]+)/.exec(t)?.[1];
    expect(aki).toBe(ski(await text(interPem!)));
    const leaf = new X509Certificate(res.certificatePem);
    const life = Date.parse(leaf.validTo) - Date.parse(leaf.validFrom);
    expect(life).toBeLessThanOrEqual(47 * DAY);
    expect(life).toBeGreaterThan(46 * DAY);
    expect(leaf.serialNumber.length).toBeGreaterThanOrEqual(30); // 128 random bits or more
  });

  it("refuses another Unix user (nobody) at its socket's file mode, while its own user connects", async () => {
    expect(process.getuid?.()).toBe(0); // runuser needs root, as in CI (.ci/run)
    // The mesh's temp dir is 0700: open a way through the directories, so that only the socket's own mode keeps nobody out.
    const dirs = [mesh.dir, dirname(mesh.socketPath)];
    const modes = await Promise.all(dirs.map(async (d) => (await stat(d)).mode & 0o7777));
    try {
      await Promise.all(dirs.map((d, i) => chmod(d, modes[i]! | 0o001)));
      // nobody reaches the path (stat works through the directories) ...
      await expect(execFileP("runuser", ["-u", "nobody", "--", "test", "-S", mesh.socketPath])).resolves.toBeDefined();
      // ... but connecting is refused: connect(2) needs write permission on the socket, which 0600 gives only its owner.
      const asNobody = await socketClientAs("nobody", mesh.socketPath);
      expect(asNobody.ok).toBe(false);
      expect(asNobody.code).toBe(grpc.status.UNAVAILABLE);
      expect(asNobody.details).toMatch(/EACCES|[Pp]ermission denied/);
      // Control: the same client as the agent's own user gets an answer.
      expect(await socketClientAs(undefined, mesh.socketPath)).toMatchObject({ ok: true });
    } finally {
      await Promise.all(dirs.map((d, i) => chmod(d, modes[i]!)));
    }
    expect((await stat(mesh.socketPath)).mode & 0o777).toBe(0o600);
  });

  it.each([
    ["a CA certificate", { ca: true }, /^ca: the agent never issues CA certificates/],
    ["no names", { dnsNames: [], ipAddresses: [] }, /^dns_names: a leaf needs at least one name/],
    ["a validity beyond the cap", { notAfter: timestampFromMs(Date.now() + 48 * DAY) }, /^not_after: /],
  ])("refuses %s with INVALID_ARGUMENT", async (_name, extra, message) => {
    const f = await failure(issue(extra));
    expect(f.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(f.details).toMatch(message);
  });

  it("holds a version activated on the KDC within 2 s, WatchKeys says ROTATED, and `kmi ctl ca status` shows the machine up to date", async () => {
    const w = watch();
    try {
      await until("the WatchKeys snapshot", () => (w.events.some((e) => e.ev.type === KeyEventType.SNAPSHOT) ? true : undefined), 5_000);
      const pid = mesh.agent.pid;
      const before = await mesh.agentClient().unary("getCertificateChain", { tenantId: mesh.tenant });
      const rotated = (await mesh.ctlJson<{ version: { version: number } }>(["ca", "rotate", "--tenant", mesh.tenant, "--activate"])).version;
      const committed = Date.now();
      expect(rotated.version).toBe(before.version + 1);

      const ev = await until("ROTATED", () => w.events.find((e) => e.ev.type === KeyEventType.ROTATED), 2_000);
      expect(ev.at - committed).toBeLessThan(2_000);
      expect(ev.ev.keys.map((k) => k.version)).toEqual([rotated.version]);
      const chain = await mesh.agentClient().unary("getCertificateChain", { tenantId: mesh.tenant });
      expect(chain.version).toBe(rotated.version);

      const res = await issue();
      expect(res.intermediateVersion).toBe(rotated.version);
      const [root, inter] = await Promise.all([mesh.download("root"), mesh.download("intermediate", "acme-v2-intermediate.pem")]);
      expect(await opensslVerify(res.certificatePem, root, inter)).toMatch(/^0 .*: OK$/);

      type Rollout = { activeVersion: number; machines: { machineId: string; heldVersion: number; upToDate: boolean; connected: boolean }[] };
      const status = await until(
        "ca status shows the machine up to date",
        async () => {
          const s = await mesh.ctlJson<Rollout>(["ca", "status", "--tenant", mesh.tenant]);
          return s.machines.find((m) => m.machineId === mesh.machineId && m.upToDate) !== undefined ? s : undefined;
        },
        5_000,
      );
      expect(status.activeVersion).toBe(rotated.version);
      expect(status.machines).toEqual([expect.objectContaining({ machineId: mesh.machineId, heldVersion: rotated.version, upToDate: true, connected: true })]);
      // No restart: the same process did all of it.
      expect(mesh.agent.pid).toBe(pid);
      expect(mesh.agent.running()).toBe(true);
    } finally {
      w.cancel();
    }
  });

  it("keeps signing with the KDC down, signs again after a restart from its sealed cache, and resyncs by itself when the KDC is back", async () => {
    const synced = await mesh.agentClient().unary("getStatus", {});
    expect(synced.kdcConnected).toBe(true);
    const lastSync = timestampMs(synced.lastSync!);

    expect(await mesh.kdc.stop("SIGTERM")).toBe(0);
    // The KDC is down: what it would release, unsealed from its own store with its master key.
    unsealed = await unsealIntermediates(mesh.kdcDir, mesh.tenant);
    expect(unsealed.map((k) => k.version).sort()).toEqual([1, 2]);

    await until("the agent notices the KDC is gone", async () => ((await mesh.agentClient().unary("getStatus", {})).kdcConnected ? undefined : true), 5_000);
    expect((await issue()).intermediateVersion).toBe(2);

    expect(await mesh.agent.stop("SIGTERM")).toBe(0);
    await mesh.startAgent();
    const fromCache = await issue();
    expect(fromCache.intermediateVersion).toBe(2);
    const cold = await until(
      "GetStatus names the KDC error",
      async () => {
        const s = await mesh.agentClient().unary("getStatus", {});
        return s.kdcError !== "" ? s : undefined;
      },
      5_000,
    );
    expect(cold).toMatchObject({ kdcConnected: false, servingFromCache: true, machineId: mesh.machineId });
    expect(cold.kdcError).toMatch(/ECONNREFUSED/);
    expect(mesh.agent.entries("sealed cache loaded")[0]).toMatchObject({ keys: 1, usable: 1, quarantined: false });

    await mesh.startKdc();
    const back = await until(
      "the agent resyncs",
      async () => {
        const s = await mesh.agentClient().unary("getStatus", {});
        return s.kdcConnected && timestampMs(s.lastSync!) > lastSync ? s : undefined;
      },
      15_000,
      () => mesh.agent.log().slice(-3000),
    );
    expect(back.servingFromCache).toBe(false);
    expect((await issue()).intermediateVersion).toBe(2);
  });

  it("refuses to sign within 2 s of `kmi ctl machine quarantine`, with no key left in its cache, and signs again after release and re-attestation", async () => {
    const w = watch();
    try {
      await until("the WatchKeys snapshot", () => (w.events.some((e) => e.ev.type === KeyEventType.SNAPSHOT) ? true : undefined), 5_000);
      await mesh.ctlOk(["machine", "quarantine", mesh.machineId, "--reason", "mesh test: suspected compromise"]);
      const quarantinedAt = Date.now();
      const refused = await until(
        "the agent refuses to sign",
        async () => {
          const f = await failure(issue()).catch(() => undefined); // undefined while it still signs
          return f;
        },
        2_000,
      );
      expect(Date.now() - quarantinedAt).toBeLessThan(2_500);
      expect(refused.code).toBe(grpc.status.FAILED_PRECONDITION);
      expect(refused.details).toMatch(/^machine quarantined: .*mesh test: suspected compromise/);
      expect(w.events.some((e) => e.ev.type === KeyEventType.QUARANTINED)).toBe(true);
      expect((await mesh.agentClient().unary("listKeys", {})).keys).toEqual([]);

      // The cache was rewritten before the refusal: unsealed with the agent's own code, it holds nothing.
      const dir = await StateDir.open(mesh.stateDir);
      const cache = await new SealedCache(dir, await dir.sealingKey(), mesh.machineId, createNopLogger()).load();
      expect(cache?.secrets).toEqual([]);
      expect(cache?.quarantine?.reason).toMatch(/mesh test: suspected compromise/);
      quarantinedFiles = readTree(mesh.stateDir);
      expect(findInFiles(quarantinedFiles, [...unsealed.flatMap(keyNeedles), PEM_PRIVATE_KEY])).toEqual([]);

      const releaseStarted = Date.now();
      await mesh.ctlOk(["machine", "release", mesh.machineId, "--reason", "mesh test: re-imaged"]);
      const again = await until("the agent signs again", async () => issue().catch(() => undefined), 15_000, () => mesh.agent.log().slice(-3000));
      expect(again.intermediateVersion).toBe(2);
      // It attested again after the release: the Auditserver's record of its last attestation is newer.
      type Shown = { machine: { status: string; lastAttestation: { time: string; ok: boolean } } };
      const shown = await mesh.ctlJson<Shown>(["machine", "show", mesh.machineId]);
      expect(shown.machine.status).toBe("MACHINE_STATUS_ACTIVE");
      expect(shown.machine.lastAttestation.ok).toBe(true);
      expect(Date.parse(shown.machine.lastAttestation.time)).toBeGreaterThan(releaseStarted);
      expect(Date.parse(String(mesh.agent.entries("attested").at(-1)!.time))).toBeGreaterThan(releaseStarted);
    } finally {
      w.cancel();
    }
  });

  it("left both audit logs whole, with the quarantine and release on both sides and every release of a secret", async () => {
    for (const server of ["kdc", "audit"]) {
      const v = await mesh.ctl(["audit", "verify", "--server", server]);
      expect(v.code, v.stderr).toBe(0);
      expect(v.stdout).toMatch(/^audit log ok: \d+ entries/);
    }
    type Tail = { entries: { action: string; actor: string; target: string; outcome: string }[] };
    const [kdcLog, auditLog] = await Promise.all([
      mesh.ctlJson<Tail>(["audit", "tail", "--limit", "1000"]),
      mesh.ctlJson<Tail>(["audit", "tail", "--server", "audit", "--limit", "1000"]),
    ]);
    const machine = `machine/${mesh.machineId}`;
    const actions = (t: Tail) => t.entries.filter((e) => e.target === machine && e.outcome === "ok").map((e) => e.action);
    expect(actions(auditLog)).toEqual(expect.arrayContaining(["machine.enroll", "machine.attest", "machine.quarantine", "machine.release"]));
    expect(actions(kdcLog)).toEqual(expect.arrayContaining(["secret.release", "machine.quarantine", "machine.release"]));
    expect(kdcLog.entries.find((e) => e.action === "machine.quarantine")?.actor).toBe("service:audit");
  });

  it("keeps no private key in plaintext in its state dir or sealed cache", async () => {
    // Now, and as it was right after the quarantine.
    const files = readTree(mesh.stateDir);
    expect(files.map((f) => f.path.slice(mesh.stateDir.length + 1)).sort()).toEqual(["cache.pb", "identity.pb", "sealing.key"]);
    expect((await mesh.agentClient().unary("listKeys", {})).keys.length).toBe(1);
    const needles = [...unsealed.flatMap(keyNeedles), PEM_PRIVATE_KEY];
    expect(needles.length).toBe(7);
    expect(findInFiles(files, needles)).toEqual([]);
    expect(findInFiles(quarantinedFiles, needles)).toEqual([]);
    for (const f of files) expect((await stat(f.path)).mode & 0o777).toBe(0o600);
  });
});
