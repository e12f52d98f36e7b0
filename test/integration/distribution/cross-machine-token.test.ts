/**
 * A token of another machine, end to end: the real Auditserver and KDC as processes (`kmi
 * audit`, `kmi kdc`, set up as in real-audit.test.ts), two machines X and Y enrolled in one
 * group and attested at the Auditserver. Y's mutual-TLS connection with X's token is refused by
 * the KDC as UNAUTHENTICATED naming both machines (src/kdc/machine-auth.ts checks the token's
 * `sub` against the certificate's machine id), on every DistributionService RPC, and the refusal
 * is in the KDC's audit log under Y; each machine with its own token is served.
 */
import { createHash } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, expect, it } from "vitest";
import { decodeAttestationTokenUnverified } from "../../../src/attest/index.js";
import { WatchEventType, type WatchSecretsResponse } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { unwrapKey } from "../../../src/keywrap/index.js";
import type { Machine } from "../../fixtures/kdc/machines.js";
import { operator } from "../../fixtures/kdc/mesh.js";
import { startRealAudit, type RealAudit } from "../../fixtures/kdc/real-audit.js";

const GROUP = "edge";
const TENANT = "acme";
let ra: RealAudit;

interface Attested {
  machine: Machine;
  token: string;
}
let x: Attested;
let y: Attested;

const dist = (m: Machine) => ra.dist(m);

async function refusal(p: Promise<unknown>): Promise<ConnectError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, "the call should have been refused").toBeInstanceOf(ConnectError);
  return err as ConnectError;
}

beforeAll(async () => {
  ra = await startRealAudit();
  const ops = operator(ra.kdc.url, ra.caPem, ra.data.token);
  await ops.admin.createTenant({ tenantId: TENANT, bootstrapKmiSigned: true });
  await ra.until("the KDC loaded the Auditserver's key", async () => (await ops.admin.getKdcStatus({})).attestationKeyLoaded, 20_000);
  const admin = ra.auditClients({ token: ra.data.token }).admin;
  const digest = createHash("sha256").update("agent code").digest("hex");
  await admin.createGroup({ name: GROUP, tenantIds: [TENANT] });
  await admin.approveMeasurements({ group: GROUP, approved: [{ name: "agent.code", sha256: [digest] }] });
  const attested = async (hostname: string): Promise<Attested> => {
    const { machine, attest } = await ra.enrolledMachine(GROUP, digest, hostname);
    return { machine, token: await attest() };
  };
  x = await attested("proxy-x");
  y = await attested("proxy-y");
}, 90_000);

afterAll(async () => {
  await ra?.stop();
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
  const tail = await operator(ra.kdc.url, ra.caPem, ra.data.token).admin.tailAuditLog({ last: true, limit: 1 });
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
