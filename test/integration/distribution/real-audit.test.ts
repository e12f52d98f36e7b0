/**
 * The KDC with the real Auditserver, both as processes (`kmi kdc`, `kmi audit`): the KDC
 * fetches the attestation key with GetAttestationKey (--audit-url, retried until the
 * Auditserver is up) and follows WatchMachineStatus with its kmi://service/kdc certificate. A
 * machine enrolls and attests at the Auditserver, fetches its secrets from the KDC with the
 * token, watches, and is quarantined by an operator at the Auditserver: the KDC pushes
 * QUARANTINED and refuses it; released, it is served again.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { createServer } from "node:net";
import { join } from "node:path";
import { promisify } from "node:util";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, expect, it } from "vitest";
import { createAttestRequest, decodeAttestationTokenUnverified } from "../../../src/attest/index.js";
import { AuditAdminService } from "../../../src/gen/kmi/audit/v1/admin_pb.js";
import { AuditService } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { WatchEventType, type WatchSecretsResponse } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { unwrapKey } from "../../../src/keywrap/index.js";
import { Machine } from "../../fixtures/kdc/machines.js";
import { distributionClient, operator } from "../../fixtures/kdc/mesh.js";
import { cleanEnv, cleanup, initDataDir, KMI, startKdc, type DataDir, type KdcProcess } from "../kdc/harness.js";

const run = promisify(execFile);
let data: DataDir;
let caPem: string;
let kdc: KdcProcess;
let auditProc: ChildProcess | undefined;
let auditUrl: string;
let auditLog = "";
const closers: (() => void)[] = [];

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

async function until(what: string, cond: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms; audit log:\n${auditLog.slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function auditClients(opts: { token?: string; m?: Machine } = {}) {
  const auth: Interceptor = (next) => async (req) => {
    if (opts.token !== undefined) req.header.set("authorization", `Bearer ${opts.token}`);
    return next(req);
  };
  const transport = createGrpcTransport({
    baseUrl: auditUrl,
    interceptors: [auth],
    nodeOptions: { ca: caPem, ...(opts.m !== undefined && opts.m.certPem !== "" ? { cert: opts.m.certPem, key: opts.m.keyPem } : {}) },
  });
  return { audit: createClient(AuditService, transport), admin: createClient(AuditAdminService, transport) };
}

/** Enrolls a machine in `group` at the real Auditserver; `attest` gets it a token for measurement agent.code = `digest`. */
async function enrolledMachine(group: string, digest: string): Promise<{ machine: Machine; attest: () => Promise<string> }> {
  const join = await auditClients({ token: data.token }).admin.createJoinToken({ group, ttlSeconds: 600 });
  const m = new Machine("pending");
  const enrolled = await auditClients().audit.enroll({ joinToken: join.secret, csrPem: m.csrPem(), hostname: "proxy-1" });
  const machine = Object.assign(new Machine(enrolled.machineId, group), { certPem: enrolled.certificatePem });
  Object.defineProperty(machine, "key", { value: m.key });
  const attest = async () => {
    const c = auditClients({ m: machine }).audit;
    const nonce = (await c.getAttestationNonce({})).nonce;
    return (await c.attest(createAttestRequest({ machineId: machine.machineId, nonce, measurements: [{ name: "agent.code", sha256: digest }], softwareVersion: "0.1.0", time: new Date() }, machine.key))).attestationToken;
  };
  return { machine, attest };
}

function dist(machine: Machine) {
  const c = distributionClient(kdc.url, caPem, machine);
  closers.push(c.close);
  return c.client;
}

beforeAll(async () => {
  data = await initDataDir();
  caPem = await readFile(data.caFile, "utf8");
  const auditPort = await freePort();
  auditUrl = `https://127.0.0.1:${auditPort}`;
  // The KDC starts first and keeps asking for the key until the Auditserver is up.
  kdc = await startKdc(data.dataDir, ["--audit-url", auditUrl]);
  const auditDir = join(data.dir, "audit");
  await run(process.execPath, [KMI, "audit", "init", "--data-dir", auditDir, "--kdc", kdc.url, "--kdc-ca-file", data.caFile, "--token-file", data.tokenFile], { env: cleanEnv() });
  auditProc = spawn(process.execPath, [KMI, "audit", "--data-dir", auditDir, "--listen", `127.0.0.1:${auditPort}`, "--kdc", kdc.url], { env: cleanEnv(), stdio: ["ignore", "ignore", "pipe"] });
  auditProc.stderr!.on("data", (b: Buffer) => (auditLog += b.toString()));
  await until("the Auditserver serves", async () => /"msg":"audit serving"/.test(auditLog), 20_000);
}, 60_000);

afterAll(async () => {
  for (const c of closers) c();
  if (auditProc !== undefined && auditProc.exitCode === null) {
    const exited = new Promise((r) => auditProc!.once("exit", r));
    auditProc.kill("SIGTERM");
    await exited;
  }
  await kdc?.stop();
  if (data !== undefined) await cleanup(data.dir);
});

it("a machine attested by the real Auditserver gets its secrets; quarantine at the Auditserver reaches the KDC; release restores", async () => {
  const ops = operator(kdc.url, caPem, data.token);
  await ops.admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  await until("the KDC loaded the Auditserver's key", async () => (await ops.admin.getKdcStatus({})).attestationKeyLoaded, 20_000);

  const admin = auditClients({ token: data.token }).admin;
  const digest = createHash("sha256").update("agent code").digest("hex");
  await admin.createGroup({ name: "edge", tenantIds: ["acme"] });
  await admin.approveMeasurements({ group: "edge", approved: [{ name: "agent.code", sha256: [digest] }] });
  const { machine, attest } = await enrolledMachine("edge", digest);
  const token = await attest();
  expect(decodeAttestationTokenUnverified(token)?.claims["ten"]).toEqual(["acme"]);

  const res = await dist(machine).fetchSecrets({ attestationToken: token });
  expect(res.secrets.map((s) => s.tenantId)).toEqual(["acme"]);
  expect(unwrapKey(res.secrets[0]!.wrappedKey!, machine.key).asymmetricKeyType).toBe("ec");

  const events: WatchSecretsResponse[] = [];
  let streamError: unknown;
  const abort = new AbortController();
  const done = (async () => {
    try {
      for await (const ev of dist(machine).watchSecrets({ attestationToken: token }, { signal: abort.signal })) events.push(ev);
    } catch (err) {
      streamError = err;
    }
  })();
  await until("snapshot", async () => events.some((e) => e.type === WatchEventType.SNAPSHOT), 5000);

  const t0 = Date.now();
  await admin.quarantineMachine({ machineId: machine.machineId, reason: "lost in transit" });
  await until("QUARANTINED pushed", async () => events.some((e) => e.type === WatchEventType.QUARANTINED), 5000);
  const pushedMs = Date.now() - t0;
  expect(pushedMs).toBeLessThan(2000);
  await done;
  expect((streamError as ConnectError).code).toBe(Code.PermissionDenied);
  const refused = await dist(machine).fetchSecrets({ attestationToken: token }).then(() => undefined, (e: unknown) => e as ConnectError);
  expect(refused?.code).toBe(Code.PermissionDenied);
  expect(refused?.rawMessage).toMatch(/quarantined \(lost in transit\)/);

  await admin.releaseMachine({ machineId: machine.machineId, reason: "found again" });
  await until("served again", async () => dist(machine).fetchSecrets({ attestationToken: await attest() }).then(() => true, () => false), 5000);
});

it('a group must name its tenants or say all_tenants; an all_tenants group\'s token says ten ["*"] and the KDC releases every tenant to it', async () => {
  const ops = operator(kdc.url, caPem, data.token);
  await until("the KDC loaded the Auditserver's key", async () => (await ops.admin.getKdcStatus({})).attestationKeyLoaded, 20_000);
  const admin = auditClients({ token: data.token }).admin;
  const refused = await admin.createGroup({ name: "core" }).then(() => undefined, (e: unknown) => ConnectError.from(e));
  expect(refused?.code).toBe(Code.InvalidArgument);
  expect(refused?.rawMessage).toBe("tenant_ids: give the tenants this group's machines serve, or all_tenants to serve every tenant");
  expect((await admin.listGroups({})).groups.map((g) => g.name)).not.toContain("core");

  await ops.admin.createTenant({ tenantId: "globex", bootstrapKmiSigned: true });
  const digest = createHash("sha256").update("core agent code").digest("hex");
  const { group } = await admin.createGroup({ name: "core", allTenants: true });
  expect(group).toMatchObject({ name: "core", tenantIds: [], allTenants: true });
  await admin.approveMeasurements({ group: "core", approved: [{ name: "agent.code", sha256: [digest] }] });
  const { machine, attest } = await enrolledMachine("core", digest);
  const token = await attest();
  expect(decodeAttestationTokenUnverified(token)?.claims).toMatchObject({ grp: "core", ten: ["*"] });
  const all = (await ops.admin.listTenants({})).tenants.map((t) => t.tenantId).sort();
  expect(all).toEqual(["acme", "globex"]);
  const res = await dist(machine).fetchSecrets({ attestationToken: token });
  expect([...new Set(res.secrets.map((s) => s.tenantId))].sort()).toEqual(all);
});
