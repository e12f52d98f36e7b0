/**
 * A token of another machine, end to end: the real Auditserver and KDC as processes (`kmi
 * audit`, `kmi kdc`, set up as in real-audit.test.ts), two machines X and Y enrolled in one
 * group and attested at the Auditserver. Y's mutual-TLS connection with X's token is refused by
 * the KDC as UNAUTHENTICATED naming both machines (src/kdc/machine-auth.ts checks the token's
 * `sub` against the certificate's machine id), on every DistributionService RPC, and the refusal
 * is in the KDC's audit log under Y; each machine with its own token is served.
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
const GROUP = "edge";
const TENANT = "acme";
let data: DataDir;
let caPem: string;
let kdc: KdcProcess;
let auditProc: ChildProcess | undefined;
let auditUrl: string;
let auditLog = "";
const closers: (() => void)[] = [];

interface Attested {
  machine: Machine;
  token: string;
}
let x: Attested;
let y: Attested;

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

/** Enrolls a machine in GROUP at the real Auditserver and attests it (measurement agent.code = `digest`). */
async function enrollAndAttest(digest: string, hostname: string): Promise<Attested> {
  const joinToken = await auditClients({ token: data.token }).admin.createJoinToken({ group: GROUP, ttlSeconds: 600 });
  const pending = new Machine("pending");
  const enrolled = await auditClients().audit.enroll({ joinToken: joinToken.secret, csrPem: pending.csrPem(), hostname });
  const machine = Object.assign(new Machine(enrolled.machineId, GROUP), { certPem: enrolled.certificatePem });
  // The enrolled certificate is for the pending machine's key.
  Object.defineProperty(machine, "key", { value: pending.key });
  const c = auditClients({ m: machine }).audit;
  const nonce = (await c.getAttestationNonce({})).nonce;
  const res = await c.attest(
    createAttestRequest({ machineId: machine.machineId, nonce, measurements: [{ name: "agent.code", sha256: digest }], softwareVersion: "0.1.0", time: new Date() }, machine.key),
  );
  return { machine, token: res.attestationToken };
}

/** DistributionService over mutual TLS with `m`'s machine certificate. */
function dist(m: Machine) {
  const c = distributionClient(kdc.url, caPem, m);
  closers.push(c.close);
  return c.client;
}

async function refusal(p: Promise<unknown>): Promise<ConnectError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, "the call should have been refused").toBeInstanceOf(ConnectError);
  return err as ConnectError;
}

beforeAll(async () => {
  data = await initDataDir();
  caPem = await readFile(data.caFile, "utf8");
  const auditPort = await freePort();
  auditUrl = `https://127.0.0.1:${auditPort}`;
  kdc = await startKdc(data.dataDir, ["--audit-url", auditUrl]);
  const auditDir = join(data.dir, "audit");
  await run(process.execPath, [KMI, "audit", "init", "--data-dir", auditDir, "--kdc", kdc.url, "--kdc-ca-file", data.caFile, "--token-file", data.tokenFile], { env: cleanEnv() });
  auditProc = spawn(process.execPath, [KMI, "audit", "--data-dir", auditDir, "--listen", `127.0.0.1:${auditPort}`, "--kdc", kdc.url], { env: cleanEnv(), stdio: ["ignore", "ignore", "pipe"] });
  auditProc.stderr!.on("data", (b: Buffer) => (auditLog += b.toString()));
  await until("the Auditserver serves", async () => /"msg":"audit serving"/.test(auditLog), 20_000);

  const ops = operator(kdc.url, caPem, data.token);
  await ops.admin.createTenant({ tenantId: TENANT, bootstrapKmiSigned: true });
  await until("the KDC loaded the Auditserver's key", async () => (await ops.admin.getKdcStatus({})).attestationKeyLoaded, 20_000);
  const admin = auditClients({ token: data.token }).admin;
  const digest = createHash("sha256").update("agent code").digest("hex");
  await admin.createGroup({ name: GROUP, tenantIds: [TENANT] });
  await admin.approveMeasurements({ group: GROUP, approved: [{ name: "agent.code", sha256: [digest] }] });
  x = await enrollAndAttest(digest, "proxy-x");
  y = await enrollAndAttest(digest, "proxy-y");
}, 90_000);

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

it("the Auditserver gave X and Y distinct identities and tokens, each naming its own machine", () => {
  expect(x.machine.machineId).not.toBe(y.machine.machineId);
  expect(decodeAttestationTokenUnverified(x.token)?.claims).toMatchObject({ sub: x.machine.machineId, grp: GROUP, ten: [TENANT] });
  expect(decodeAttestationTokenUnverified(y.token)?.claims).toMatchObject({ sub: y.machine.machineId, grp: GROUP, ten: [TENANT] });
});

it("FetchSecrets over Y's mutual TLS with X's token is UNAUTHENTICATED, naming both machines, and no secret is released", async () => {
  const err = await refusal(dist(y.machine).fetchSecrets({ attestationToken: x.token }));
  expect(Code[err.code]).toBe(Code[Code.Unauthenticated]);
  expect(err.rawMessage).toBe(
    `attestation token: issued to machine ${x.machine.machineId}, not to ${y.machine.machineId}; each machine presents its own token`,
  );
  // The KDC's audit log has the refusal under Y (named by its certificate), the token only as a keyed hash.
  const tail = await operator(kdc.url, caPem, data.token).admin.tailAuditLog({ last: true, limit: 1 });
  const e = tail.entries[0]!;
  expect(e).toMatchObject({ actor: `machine:${y.machine.machineId}`, action: "secret.release", target: `machine/${y.machine.machineId}`, outcome: "refused: unauthenticated" });
  expect(e.details["error"]).toContain(`issued to machine ${x.machine.machineId}`);
  expect(e.details["attestation_token"]).toMatch(/^hmac:[0-9a-f]+$/);
  expect(JSON.stringify(e.details)).not.toContain(x.token.split(".")[2]!);
});

it("WatchSecrets and ReportHeldVersions refuse X's token on Y's connection the same way; the stream sends nothing", async () => {
  const want = `attestation token: issued to machine ${x.machine.machineId}, not to ${y.machine.machineId}; each machine presents its own token`;
  const events: unknown[] = [];
  const watchErr = await refusal(
    (async () => {
      for await (const ev of dist(y.machine).watchSecrets({ attestationToken: x.token })) events.push(ev);
    })(),
  );
  expect(events).toEqual([]);
  expect([Code[watchErr.code], watchErr.rawMessage]).toEqual([Code[Code.Unauthenticated], want]);
  const reportErr = await refusal(dist(y.machine).reportHeldVersions({ attestationToken: x.token, held: [] }));
  expect([Code[reportErr.code], reportErr.rawMessage]).toEqual([Code[Code.Unauthenticated], want]);
});

it("control: each machine with its own token is served, its secrets wrapped to its own key only", async () => {
  const ry = await dist(y.machine).fetchSecrets({ attestationToken: y.token });
  expect(ry.secrets.map((s) => s.tenantId)).toEqual([TENANT]);
  expect(unwrapKey(ry.secrets[0]!.wrappedKey!, y.machine.key).asymmetricKeyType).toBe("ec");
  expect(() => unwrapKey(ry.secrets[0]!.wrappedKey!, x.machine.key)).toThrow(/does not open with this machine's key/);

  const rx = await dist(x.machine).fetchSecrets({ attestationToken: x.token });
  expect(rx.secrets.map((s) => s.tenantId)).toEqual([TENANT]);
  expect(unwrapKey(rx.secrets[0]!.wrappedKey!, x.machine.key).asymmetricKeyType).toBe("ec");

  // Y's own token also opens a watch: the refusal above was about the token, not Y.
  const abort = new AbortController();
  const stream = dist(y.machine).watchSecrets({ attestationToken: y.token }, { signal: abort.signal })[Symbol.asyncIterator]();
  const first = await stream.next();
  abort.abort();
  expect(first.done).toBe(false);
  const snapshot = first.value as WatchSecretsResponse;
  expect(snapshot.type).toBe(WatchEventType.SNAPSHOT);
  expect(snapshot.secrets.map((s) => s.tenantId)).toEqual([TENANT]);
});
