/**
 * The KDC with the real Auditserver, both as processes (`kmi kdc`, `kmi audit`): the KDC
 * fetches the attestation key with GetAttestationKey (--audit-url, retried until the
 * Auditserver is up) and follows WatchMachineStatus with its kmi://service/kdc certificate. A
 * machine enrolls and attests at the Auditserver, fetches its secrets from the KDC with the
 * token, watches, and is quarantined by an operator at the Auditserver: the KDC pushes
 * QUARANTINED and refuses it; released, it is served again.
 */
import { createHash, generateKeyPairSync, type KeyObject } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, expect, it } from "vitest";
import { base64url, bindEncryptionKey, decodeAttestationTokenUnverified, generateEncryptionKey, spkiDer } from "../../../src/attest/index.js";
import { WatchEventType, type WatchSecretsResponse } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { keyIdOf, unwrapKey } from "../../../src/keywrap/index.js";
import { Machine } from "../../fixtures/kdc/machines.js";
import { operator } from "../../fixtures/kdc/mesh.js";
import { startRealAudit, type RealAudit } from "../../fixtures/kdc/real-audit.js";

let ra: RealAudit;
const until = (what: string, cond: () => Promise<boolean>, timeoutMs: number) => ra.until(what, cond, timeoutMs);
const auditClients = (opts: { token?: string; m?: Machine } = {}) => ra.auditClients(opts);
const enrolledMachine = (group: string, digest: string, hostname?: string, encryptionKey?: KeyObject) => ra.enrolledMachine(group, digest, hostname, encryptionKey);
const dist = (m: Machine) => ra.dist(m);

beforeAll(async () => {
  ra = await startRealAudit();
}, 60_000);

afterAll(async () => {
  await ra?.stop();
});

it("a machine attested by the real Auditserver gets its secrets; quarantine at the Auditserver reaches the KDC; release restores", async () => {
  const ops = operator(ra.kdc.url, ra.caPem, ra.data.token);
  await ops.admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  await until("the KDC loaded the Auditserver's key", async () => (await ops.admin.getKdcStatus({})).attestationKeyLoaded, 20_000);

  const admin = auditClients({ token: ra.data.token }).admin;
  const digest = createHash("sha256").update("agent code").digest("hex");
  await admin.createGroup({ name: "edge", tenantIds: ["acme"] });
  await admin.approveMeasurements({ group: "edge", approved: [{ name: "agent.code", sha256: [digest] }] });
  const { machine, attest } = await enrolledMachine("edge", digest);
  const token = await attest();
  expect(decodeAttestationTokenUnverified(token)?.claims["ten"]).toEqual(["acme"]);

  const res = await dist(machine).fetchSecrets({ attestationToken: token });
  expect(res.secrets.map((s) => s.tenantId)).toEqual(["acme"]);
  // Enrolled without an encryption key (an older agent): the legacy path wraps to the machine key.
  expect(res.secrets[0]!.wrappedKey!.recipientKeyId).toBe(keyIdOf(machine.key));
  expect(decodeAttestationTokenUnverified(token)?.claims["enc"]).toBeUndefined();
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

  await admin.quarantineMachine({ machineId: machine.machineId, reason: "lost in transit" });
  // Pushed on the open stream (how fast is for the bench, not a test on a shared machine).
  await until("QUARANTINED pushed", async () => events.some((e) => e.type === WatchEventType.QUARANTINED), 30_000);
  await done;
  expect((streamError as ConnectError).code).toBe(Code.PermissionDenied);
  const refused = await dist(machine).fetchSecrets({ attestationToken: token }).then(() => undefined, (e: unknown) => e as ConnectError);
  expect(refused?.code).toBe(Code.PermissionDenied);
  expect(refused?.rawMessage).toMatch(/quarantined \(lost in transit\)/);

  await admin.releaseMachine({ machineId: machine.machineId, reason: "found again" });
  await until("served again", async () => dist(machine).fetchSecrets({ attestationToken: await attest() }).then(() => true, () => false), 5000);
});

it('a group must name its tenants or say all_tenants; an all_tenants group\'s token says ten ["*"] and the KDC releases every tenant to it', async () => {
  const ops = operator(ra.kdc.url, ra.caPem, ra.data.token);
  await until("the KDC loaded the Auditserver's key", async () => (await ops.admin.getKdcStatus({})).attestationKeyLoaded, 20_000);
  const admin = auditClients({ token: ra.data.token }).admin;
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

it("a machine enrolled with an encryption key: the Auditserver records it, its token carries it, and the KDC wraps its secrets to it (the machine key cannot unwrap them)", async () => {
  const ops = operator(ra.kdc.url, ra.caPem, ra.data.token);
  await ops.admin.createTenant({ tenantId: "encco", bootstrapKmiSigned: true });
  await until("the KDC loaded the Auditserver's key", async () => (await ops.admin.getKdcStatus({})).attestationKeyLoaded, 20_000);
  const admin = auditClients({ token: ra.data.token }).admin;
  const digest = createHash("sha256").update("agent code").digest("hex");
  await admin.createGroup({ name: "enc", tenantIds: ["encco"] });
  await admin.approveMeasurements({ group: "enc", approved: [{ name: "agent.code", sha256: [digest] }] });

  const encryptionKey = generateEncryptionKey();
  const { machine, attest } = await enrolledMachine("enc", digest, "proxy-9", encryptionKey);
  expect((await admin.getMachine({ machineId: machine.machineId })).machine?.encryptionKeyId).toBe(keyIdOf(encryptionKey));
  const token = await attest();
  expect(decodeAttestationTokenUnverified(token)?.claims["enc"]).toBe(base64url(spkiDer(encryptionKey)));

  const [secret] = (await dist(machine).fetchSecrets({ attestationToken: token })).secrets;
  expect(secret?.tenantId).toBe("encco");
  expect(secret!.wrappedKey!.recipientKeyId).toBe(keyIdOf(encryptionKey));
  expect(keyIdOf(unwrapKey(secret!.wrappedKey!, encryptionKey))).toBe(secret!.keyId);
  // One key, one purpose: the mutual-TLS/evidence key does not open what is wrapped to the encryption key.
  expect(() => unwrapKey(secret!.wrappedKey!, machine.key)).toThrow(/does not open|tag|authenticate/i);
});

it.each([
  ["the CSR's own key as the encryption key", "csr-key", /encryption_public_key: is the CSR's key/],
  ["a binding signed by another key", "other-signer", /encryption_key_signature: does not verify with the CSR's key/],
  ["a signature without a key", "no-key", /encryption_key_signature: given without encryption_public_key/],
  ["a key without a signature", "no-signature", /encryption_key_signature: required with encryption_public_key/],
  ["a key that is not P-256", "p384", /encryption_public_key: must be a P-256 key/],
])("enrollment refuses %s as INVALID_ARGUMENT and leaves the join token unused", async (_name, kind, message) => {
  const admin = auditClients({ token: ra.data.token }).admin;
  if ((await admin.listGroups({})).groups.every((g) => g.name !== "enc-refusals")) await admin.createGroup({ name: "enc-refusals", tenantIds: ["acme"] });
  const joinToken = await admin.createJoinToken({ group: "enc-refusals", ttlSeconds: 600 });
  const pending = new Machine("pending");
  const good = bindEncryptionKey(pending.key, generateEncryptionKey());
  const fields = {
    "csr-key": { encryptionPublicKey: spkiDer(pending.key), encryptionKeySignature: good.signature },
    "other-signer": { encryptionPublicKey: good.publicKeyDer, encryptionKeySignature: bindEncryptionKey(new Machine("x").key, generateEncryptionKey()).signature },
    "no-key": { encryptionKeySignature: good.signature },
    "no-signature": { encryptionPublicKey: good.publicKeyDer },
    p384: { encryptionPublicKey: spkiDer(generateKeyPairSync("ec", { namedCurve: "secp384r1" }).publicKey), encryptionKeySignature: good.signature },
  }[kind]!;
  const err = await auditClients()
    .audit.enroll({ joinToken: joinToken.secret, csrPem: pending.csrPem(), hostname: "proxy-x", ...fields })
    .then(() => undefined, (e: unknown) => e as ConnectError);
  expect(err?.code).toBe(Code.InvalidArgument);
  expect(err?.rawMessage).toMatch(message);
  // Nothing changed: the same token still enrolls, with a good binding.
  const ok = await auditClients().audit.enroll({ joinToken: joinToken.secret, csrPem: pending.csrPem(), hostname: "proxy-x", encryptionPublicKey: good.publicKeyDer, encryptionKeySignature: good.signature });
  expect(ok.machineId).toMatch(/^m-[0-9a-f]{16}$/);
});
