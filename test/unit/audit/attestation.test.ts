import { X509Certificate, generateKeyPairSync } from "node:crypto";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { AttestationTokenError, createAttestRequest, encodeEvidence, signEvidence, verifyAttestationToken } from "../../../src/attest/index.js";
import { MachineStatus } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { Tables } from "../../../src/audit/store.js";
import { putOp } from "../../../src/storage/store.js";
import { asPeer, makeHarness, type Harness, type TestMachine } from "./harness.js";
import { GOOD, attestWith, enrollMachine, expectCode, lastEntry, makeGroup } from "./flows.js";

let h: Harness;
let m: TestMachine;
beforeEach(async () => {
  h = await makeHarness();
  await makeGroup(h, "edge", { tenantIds: ["acme", "globex"] });
  await makeGroup(h, "strict", { quarantineOnMismatch: true });
  m = await enrollMachine(h);
});
afterEach(async () => h.close());

const sha = (der: Uint8Array) => new X509Certificate(der).fingerprint256;

describe("attestation", () => {
  it("issues a token that verifies with the key from GetAttestationKey, bound to the machine and its certificate", async () => {
    const res = await attestWith(h, m);
    const key = await h.audit.getAttestationKey({});
    const claims = verifyAttestationToken(res.attestationToken, key.publicKeyPem, { now: h.clock.now(), expectedMachineId: m.machineId, expectedCertSha256: sha(m.certificateDer) });
    expect(claims).toMatchObject({ iss: "kmi-audit", sub: m.machineId, grp: "edge", ten: ["acme", "globex"], exp: claims.iat + 300 });
    expect(JSON.parse(Buffer.from(res.attestationToken.split(".")[0]!, "base64url").toString()).kid).toBe(key.keyId);
    const result = await h.store.get(Tables.attestations, m.machineId);
    expect(result).toMatchObject({ ok: true, tokenId: claims.jti, softwareVersion: "0.1.0" });
    expect(await lastEntry(h)).toMatchObject({ action: "machine.attest", outcome: "ok", details: expect.objectContaining({ jti: claims.jti }) });
  });

  it('gives a machine of an all_tenants group a token with ten ["*"]', async () => {
    await makeGroup(h, "core", { allTenants: true });
    const c = await enrollMachine(h, "core");
    const res = await attestWith(h, c);
    const key = await h.audit.getAttestationKey({});
    const claims = verifyAttestationToken(res.attestationToken, key.publicKeyPem, { now: h.clock.now(), expectedMachineId: c.machineId, expectedCertSha256: sha(c.certificateDer) });
    expect(claims).toMatchObject({ grp: "core", ten: ["*"] });
  });

  it("gives a machine of a group stored without tenants and without all_tenants (before all_tenants existed) a token with ten [], serving no tenant", async () => {
    const old = (await h.store.get(Tables.groups, "edge"))!;
    old.tenantIds = [];
    old.allTenants = false;
    await h.store.batch([putOp(Tables.groups, "edge", old)]);
    expect((await h.admin.listGroups({}, h.operator)).groups.find((g) => g.name === "edge")).toMatchObject({ tenantIds: [], allTenants: false });
    const res = await attestWith(h, m);
    const key = await h.audit.getAttestationKey({});
    const claims = verifyAttestationToken(res.attestationToken, key.publicKeyPem, { now: h.clock.now(), expectedMachineId: m.machineId, expectedCertSha256: sha(m.certificateDer) });
    expect(claims.ten).toEqual([]);
  });

  it("gives a token that another machine cannot use (verifyAttestationToken refuses it)", async () => {
    const other = await enrollMachine(h);
    const theirs = await attestWith(h, other);
    const key = await h.audit.getAttestationKey({});
    const presented = () => verifyAttestationToken(theirs.attestationToken, key.publicKeyPem, { now: h.clock.now(), expectedMachineId: m.machineId, expectedCertSha256: sha(m.certificateDer) });
    expect(presented).toThrow(AttestationTokenError);
    expect(presented).toThrow(/issued to machine .* not to /);
  });

  it("never issues a token that outlives the machine certificate", async () => {
    h.clock.advance(86_400 - 120); // the certificate (24 h) has two minutes left
    const res = await attestWith(h, m);
    expect(res.expiresAt!.seconds).toBe(BigInt(Date.parse(new X509Certificate(m.certificateDer).validTo) / 1000));
    expect(Number(res.expiresAt!.seconds) - h.clock.now().getTime() / 1000).toBe(120);
  });

  it("binds a token to the previous certificate when that one is presented, and clamps it to that certificate's life", async () => {
    h.clock.advance(3600);
    await h.audit.renewMachineCertificate({ csrPem: m.csrPem }, asPeer(m.certificateDer));
    h.clock.advance(86_400 - 3600 - 60); // the previous certificate has one minute left
    const res = await attestWith(h, m); // still over the previous certificate
    const key = await h.audit.getAttestationKey({});
    const claims = verifyAttestationToken(res.attestationToken, key.publicKeyPem, { now: h.clock.now(), expectedMachineId: m.machineId, expectedCertSha256: sha(m.certificateDer) });
    expect(claims.exp).toBe(Math.floor(Date.parse(new X509Certificate(m.certificateDer).validTo) / 1000));
    expect(claims.exp - claims.iat).toBe(60);
  });

  it("refuses a changed file digest, naming the measurement, and changes no state", async () => {
    const before = await h.snapshot();
    const changed = [GOOD[0]!, { name: "proxy.config", sha256: "c".repeat(64) }];
    await expectCode(attestWith(h, m, changed), "failed_precondition", new RegExp(`^measurement proxy\\.config: sha256 ${"c".repeat(64)} is not approved for group edge \\(approved: bbbbbbbbbbbbbbbb…\\)$`));
    expect(await h.snapshot()).toEqual(await withNonces(before));
    expect(await h.store.get(Tables.attestations, m.machineId)).toMatchObject({ ok: false, problem: expect.stringMatching(/^measurement proxy\.config/) });
    expect(await lastEntry(h)).toMatchObject({ action: "machine.attest", outcome: "refused: failed_precondition", details: expect.objectContaining({ mismatched: "proxy.config" }) });
  });

  it.each<[string, () => { name: string; sha256: string }[], RegExp]>([
    ["a missing measurement", () => [GOOD[0]!], /^measurement proxy\.config: missing; group edge requires it$/],
    ["an extra measurement", () => [...GOOD, { name: "x.extra", sha256: "d".repeat(64) }], /^measurement x\.extra: not approved for group edge/],
    ["two differences", () => [{ name: "agent.code", sha256: "e".repeat(64) }, { name: "proxy.config", sha256: "f".repeat(64) }], /^measurement agent\.code: .*\(and 1 more: proxy\.config\)$/],
  ])("refuses %s", async (_name, make, message) => {
    await expectCode(attestWith(h, m, make()), "failed_precondition", message);
  });

  it("quarantines on a mismatch when the group says so, and tells the watchers", async () => {
    const s = await enrollMachine(h, "strict");
    const sub = h.ctx.statusHub.subscribe();
    await expectCode(attestWith(h, s, [GOOD[0]!, { name: "proxy.config", sha256: "c".repeat(64) }]), "failed_precondition", /proxy\.config/);
    const rec = await h.store.get(Tables.machines, s.machineId);
    expect(rec).toMatchObject({ status: MachineStatus.QUARANTINED, statusChangedBy: "system", statusReason: expect.stringMatching(/^attestation failed: measurement proxy\.config/) });
    expect(await sub.next(new AbortController().signal, 1000)).toMatchObject({ machineId: s.machineId, status: MachineStatus.QUARANTINED });
    const [q, r] = await h.ctx.audit.tail({ last: true, limit: 2 });
    expect(q).toMatchObject({ actor: "system", action: "machine.quarantine", outcome: "ok" });
    expect(r).toMatchObject({ action: "machine.attest", outcome: "refused: failed_precondition", details: expect.objectContaining({ quarantined: "true" }) });
    await expectCode(attestWith(h, s), "permission_denied", /quarantined/);
    sub.close();
  });

  it("refuses GetAttestationNonce to a quarantined machine with PERMISSION_DENIED naming the quarantine, storing nothing; serves it again after a release", async () => {
    await h.admin.quarantineMachine({ machineId: m.machineId, reason: "stolen laptop" }, h.operator);
    const before = await h.snapshot({ withAttestations: true });
    await expectCode(
      h.audit.getAttestationNonce({}, asPeer(m.certificateDer)),
      "permission_denied",
      new RegExp(`^machine ${m.machineId}: quarantined \\(stolen laptop\\); an operator must release it`),
    );
    expect(await h.snapshot({ withAttestations: true })).toEqual(before);
    await h.admin.releaseMachine({ machineId: m.machineId, reason: "laptop found" }, h.operator);
    expect((await h.audit.getAttestationNonce({}, asPeer(m.certificateDer))).nonce).toHaveLength(32);
  });

  it("refuses a replayed nonce (the same request twice)", async () => {
    const n = await h.audit.getAttestationNonce({}, asPeer(m.certificateDer));
    const req = createAttestRequest({ machineId: m.machineId, nonce: n.nonce, measurements: GOOD, softwareVersion: "0.1.0", time: h.clock.now() }, m.key);
    await h.audit.attest(req, asPeer(m.certificateDer));
    const before = await h.snapshot({ withAttestations: true });
    await expectCode(h.audit.attest(req, asPeer(m.certificateDer)), "unauthenticated", /^evidence\.nonce: already used at .* \(a replay\)/);
    const after = await h.snapshot({ withAttestations: true });
    after.delete(`attestations/${m.machineId}`);
    before.delete(`attestations/${m.machineId}`);
    expect(after).toEqual(before);
  });

  it("refuses an expired nonce, an unknown nonce, and another machine's nonce", async () => {
    const other = await enrollMachine(h);
    const n = await h.audit.getAttestationNonce({}, asPeer(m.certificateDer));
    const theirs = await h.audit.getAttestationNonce({}, asPeer(other.certificateDer));
    const send = (nonce: Uint8Array) => h.audit.attest(createAttestRequest({ machineId: m.machineId, nonce, measurements: GOOD, softwareVersion: "0.1.0", time: h.clock.now() }, m.key), asPeer(m.certificateDer));
    await expectCode(send(theirs.nonce), "unauthenticated", /^evidence\.nonce: unknown/);
    await expectCode(send(new Uint8Array(32)), "unauthenticated", /^evidence\.nonce: unknown/);
    h.clock.advance(60);
    await expectCode(send(n.nonce), "unauthenticated", /^evidence\.nonce: expired at 2030-01-01T00:01:00\.000Z/);
  });

  it("keeps a used nonce used across a restart of the services (it is in the store)", async () => {
    const n = await h.audit.getAttestationNonce({}, asPeer(m.certificateDer));
    const req = createAttestRequest({ machineId: m.machineId, nonce: n.nonce, measurements: GOOD, softwareVersion: "0.1.0", time: h.clock.now() }, m.key);
    await h.audit.attest(req, asPeer(m.certificateDer));
    const rec = [...(await h.snapshot())].find(([k]) => k.startsWith(`nonces/${m.machineId}/`));
    expect(rec).toBeDefined();
    expect((await h.store.get(Tables.nonces, rec![0].slice("nonces/".length)))!.usedAt).toBeDefined();
  });

  it("refuses evidence signed by another key, and changes nothing", async () => {
    const n = await h.audit.getAttestationNonce({}, asPeer(m.certificateDer));
    const before = await h.snapshot();
    const other = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
    const req = createAttestRequest({ machineId: m.machineId, nonce: n.nonce, measurements: GOOD, softwareVersion: "0.1.0", time: h.clock.now() }, other);
    await expectCode(h.audit.attest(req, asPeer(m.certificateDer)), "unauthenticated", /^signature: does not verify with the key of your machine certificate/);
    expect(await h.snapshot()).toEqual(before);
    // The nonce was not burnt by the forgery: the real machine still attests with it.
    const good = createAttestRequest({ machineId: m.machineId, nonce: n.nonce, measurements: GOOD, softwareVersion: "0.1.0", time: h.clock.now() }, m.key);
    await expect(h.audit.attest(good, asPeer(m.certificateDer))).resolves.toBeTruthy();
  });

  it("logs a refused attestation exactly once, with its observation in the same batch", async () => {
    const { seq } = await h.ctx.audit.head();
    await expectCode(attestWith(h, m, [GOOD[0]!]), "failed_precondition");
    expect((await h.ctx.audit.head()).seq).toBe(seq + 1n);
  });

  it("refuses evidence naming another machine", async () => {
    const other = await enrollMachine(h);
    await expectCode(attestWith(h, m, GOOD, { machineId: other.machineId }), "unauthenticated", /^evidence\.machine_id: .* is not the machine of the client certificate/);
  });

  it.each<[string, (nonce: Uint8Array) => { evidence: Uint8Array; signature: Uint8Array }, string, RegExp]>([
    ["no evidence", () => ({ evidence: new Uint8Array(), signature: new Uint8Array([1]) }), "invalid_argument", /^evidence: required/],
    ["no signature", (nonce) => ({ evidence: encodeEvidence({ machineId: m.machineId, nonce, measurements: GOOD, softwareVersion: "1", time: new Date() }), signature: new Uint8Array() }), "invalid_argument", /^signature: required/],
    ["evidence over 16 KiB", () => ({ evidence: new Uint8Array(16 * 1024 + 1), signature: new Uint8Array([1]) }), "invalid_argument", /^evidence: 16385 bytes/],
    ["signed garbage", () => {
      const evidence = Buffer.from("not protobuf \xff\xff\xff", "latin1");
      return { evidence, signature: signEvidence(evidence, m.key) };
    }, "invalid_argument", /^evidence: does not parse/],
  ])("refuses %s, naming the field", async (_name, make, code, message) => {
    const n = await h.audit.getAttestationNonce({}, asPeer(m.certificateDer));
    const before = await h.snapshot();
    await expectCode(h.audit.attest(make(n.nonce), asPeer(m.certificateDer)), code, message);
    expect(await h.snapshot()).toEqual(before);
  });

  it("refuses attestation without mutual TLS, and from a machine not enrolled here", async () => {
    await expectCode(h.audit.getAttestationNonce({}), "unauthenticated", /client certificate required/);
    const n = await h.audit.getAttestationNonce({}, asPeer(m.certificateDer));
    const req = createAttestRequest({ machineId: m.machineId, nonce: n.nonce, measurements: GOOD, softwareVersion: "0.1.0", time: h.clock.now() }, m.key);
    await expectCode(h.audit.attest(req), "unauthenticated", /client certificate required/);
    // A certificate the CA signed for a machine this Auditserver never enrolled.
    const stray = await h.kdc.issueMachineCertificate({ csrPem: m.csrPem, machineId: "m-0123456789abcdef", group: "edge", ttlSeconds: 3600 });
    const strayDer = new Uint8Array(new X509Certificate(stray.certificatePem).raw);
    await expectCode(h.audit.getAttestationNonce({}, asPeer(strayDer)), "unauthenticated", /^machine m-0123456789abcdef: not enrolled at this Auditserver/);
    expect(await lastEntry(h)).toMatchObject({ actor: "machine:m-0123456789abcdef", action: "machine.nonce", outcome: "refused: unauthenticated" });
  });

  it("bounds the nonces a machine may hold", async () => {
    for (let i = 0; i < 16; i++) await h.audit.getAttestationNonce({}, asPeer(m.certificateDer));
    await expectCode(h.audit.getAttestationNonce({}, asPeer(m.certificateDer)), "resource_exhausted", /16 unused nonces outstanding/);
    h.clock.advance(61);
    await expect(h.audit.getAttestationNonce({}, asPeer(m.certificateDer))).resolves.toBeTruthy();
    let left = 0;
    for await (const _ of h.store.iterate(Tables.nonces, { prefix: `${m.machineId}/` })) left++;
    expect(left).toBe(1); // the expired ones were swept
  });

  it("refuses every attestation of a group with no approved measurements", async () => {
    await h.admin.createGroup({ name: "empty", tenantIds: ["acme"] }, h.operator);
    const e = await enrollMachine(h, "empty");
    await expectCode(attestWith(h, e, []), "failed_precondition", /^group empty has no approved measurements/);
  });
});

/** Nonce records appear when a test asks for one; compare the rest. */
async function withNonces(before: Map<string, string>): Promise<Map<string, string>> {
  const now = await h.snapshot();
  const out = new Map(before);
  for (const [k, v] of now) if (k.startsWith("nonces/") && !before.has(k)) out.set(k, v);
  return out;
}
