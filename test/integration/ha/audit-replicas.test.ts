/**
 * Two Auditserver replicas (`kmi audit --store etcd`) on one 3-member etcd cluster, with two
 * KDC replicas on it too, KDC 0 following Auditserver 0's WatchMachineStatus and KDC 1
 * following Auditserver 1's. A quarantine made on Auditserver 0 reaches KDC 1 through
 * Auditserver 1's stream (which follows the store's change feed, not its own writes), and KDC 1
 * refuses the machine; a release made on Auditserver 1 reaches KDC 0 the same way. Entries
 * written on both Auditservers form one linear chain whose checkpoints verify on either.
 */
import { createHash } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createAttestRequest } from "../../../src/attest/index.js";
import { AuditAdminService } from "../../../src/gen/kmi/audit/v1/admin_pb.js";
import { AuditService } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { HaMesh } from "../../fixtures/ha/ha-mesh.js";
import { Machine } from "../../fixtures/kdc/machines.js";
import { distributionClient } from "../../fixtures/kdc/mesh.js";
import { until } from "../../fixtures/mesh/processes.js";
import { clients } from "../kdc/harness.js";

let mesh: HaMesh;
let caPem: string;
let token: string;
const closers: (() => void)[] = [];
/** What the machines of group "ha" measure as agent.code. */
const DIGEST = createHash("sha256").update("agent code").digest("hex");

beforeAll(async () => {
  mesh = await HaMesh.start({ kdcs: 2, audits: 2 });
  [caPem, token] = await Promise.all([mesh.caPem(), mesh.token()]);
  await auditAdmin(0).createGroup({ name: "ha", tenantIds: [mesh.tenant] });
  await auditAdmin(1).approveMeasurements({ group: "ha", approved: [{ name: "agent.code", sha256: [DIGEST] }] });
}, 120_000);

afterAll(async () => {
  for (const c of closers) c();
  await mesh?.close();
});

const auditAdmin = (i: number) => clients(mesh.auditUrl(i), caPem, { token })(AuditAdminService);
const auditAs = (i: number, m: Machine) => clients(mesh.auditUrl(i), caPem, { cert: m.certPem, key: m.keyPem })(AuditService);
const kdcAdmin = (i: number) => clients(mesh.kdcUrl(i), caPem, { token })(KdcAdminService);

/** Enrolls a machine of group "ha" at Auditserver `at` (join token made there) with a key of its own. */
async function enroll(at: number): Promise<Machine> {
  const join = await auditAdmin(at).createJoinToken({ group: "ha", ttlSeconds: 600 });
  const pending = new Machine("pending");
  const enrolled = await clients(mesh.auditUrl(at), caPem)(AuditService).enroll({ joinToken: join.secret, csrPem: pending.csrPem(), hostname: "proxy-ha" });
  const machine = Object.assign(new Machine(enrolled.machineId, "ha"), { certPem: enrolled.certificatePem });
  Object.defineProperty(machine, "key", { value: pending.key });
  return machine;
}

/** An attestation token for `m` from Auditserver `at`. */
async function attest(at: number, m: Machine): Promise<string> {
  const c = auditAs(at, m);
  const nonce = (await c.getAttestationNonce({})).nonce;
  const req = createAttestRequest({ machineId: m.machineId, nonce, measurements: [{ name: "agent.code", sha256: DIGEST }], softwareVersion: "0.1.0", time: new Date() }, m.key);
  return (await c.attest(req)).attestationToken;
}

/** FetchSecrets on KDC `kdc` as `m` with `attestationToken`: undefined when served, else the error. */
async function fetchAs(kdc: number, m: Machine, attestationToken: string): Promise<ConnectError | undefined> {
  const c = distributionClient(mesh.kdcUrl(kdc), caPem, m);
  closers.push(c.close);
  return c.client.fetchSecrets({ attestationToken }).then(() => undefined, (e: unknown) => ConnectError.from(e));
}

describe("Auditserver replicas on etcd", () => {
  it("a quarantine made on replica 0 reaches the KDC that follows replica 1 (and a release on 1 the KDC on 0)", async () => {
    await until("both KDCs follow their Auditserver", async () => ((await kdcAdmin(0).getKdcStatus({})).attestationKeyLoaded && (await kdcAdmin(1).getKdcStatus({})).attestationKeyLoaded ? true : undefined), 30_000);
    const m = await enroll(0);
    const first = await attest(1, m);
    expect(await fetchAs(1, m, first)).toBeUndefined();

    await auditAdmin(0).quarantineMachine({ machineId: m.machineId, reason: "stolen from rack 7" });
    const refused = await until("KDC 1 refuses the machine quarantined on Auditserver 0", async () => {
      const e = await fetchAs(1, m, first);
      return e?.code === Code.PermissionDenied ? e : undefined;
    }, 15_000, () => mesh.kdcs[1]!.log().slice(-3000));
    expect(refused.rawMessage).toMatch(/quarantined \(stolen from rack 7\)/);
    // The replica it was not made on refuses attestation too (it reads the shared store).
    await expect(auditAs(1, m).getAttestationNonce({})).rejects.toMatchObject({ code: Code.PermissionDenied });

    // KDC 0 follows Auditserver 0, where the quarantine was made: it refuses too (once Auditserver
    // 0's stream, which follows the store's change feed, told it: KDC 1 may have heard first).
    await until("KDC 0 refuses the machine too", async () => ((await fetchAs(0, m, first))?.code === Code.PermissionDenied ? true : undefined), 15_000);

    await auditAdmin(1).releaseMachine({ machineId: m.machineId, reason: "found" });
    // A token from after the release, attested again on each refusal as the agent does: `iat` has
    // whole seconds, so one issued in the quarantine's own second is refused by design (docs/kdc.md).
    const again = await until("KDC 0 serves the machine released on Auditserver 1", async () => {
      const t = await attest(0, m).catch(() => undefined);
      return t !== undefined && (await fetchAs(0, m, t)) === undefined ? t : undefined;
    }, 15_000, () => mesh.kdcs[0]!.log().slice(-3000));
    await until("KDC 1 too", async () => ((await fetchAs(1, m, again)) === undefined ? true : undefined), 15_000);
    // The token from before the quarantine stays refused after the release.
    const stale = await fetchAs(0, m, first);
    expect(stale?.code).toBe(Code.Unauthenticated);
    expect(stale?.rawMessage).toMatch(/issued before the machine's quarantine/);
  });

  it("entries written on both replicas form one linear chain; its checkpoints verify on either replica", async () => {
    const made = await Promise.all(Array.from({ length: 8 }, (_, i) => auditAdmin(i % 2).createJoinToken({ group: "edge", ttlSeconds: 60 })));
    expect(new Set(made.map((t) => t.tokenId)).size).toBe(8);
    const tail = await auditAdmin(1).tailAuditLog({ limit: 1000 });
    const seqs = tail.entries.map((e) => Number(e.seq));
    expect(seqs).toEqual(Array.from({ length: seqs.length }, (_, i) => seqs[0]! + i));
    const targets = new Set(tail.entries.filter((e) => e.action === "join_token.create").map((e) => e.target));
    for (const t of made) expect(targets).toContain(`join_token/${t.tokenId}`);
    // A checkpoint follows every state change; wait until one covers the head, then verify on both.
    for (const i of [0, 1]) {
      const r = await until(`replica ${i}'s checkpoints cover the head`, async () => {
        const v = await auditAdmin(i).verifyAuditLog({});
        return v.ok && v.checkpointSeq === v.headSeq ? v : undefined;
      }, 15_000, () => mesh.audits[i]!.log().slice(-3000));
      expect(r.problem).toBe("");
      expect(r.headSeq).toBe(BigInt(seqs.at(-1)!));
    }
    const cli = await mesh.ctl(["audit", "verify", "--server", "audit", "--json"], { audit: 1 });
    expect(cli.code, cli.stderr).toBe(0);
    expect(JSON.parse(cli.stdout)).toMatchObject({ ok: true });
  });
});
