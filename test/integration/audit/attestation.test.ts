/**
 * Attestation and quarantine against a real KDC and a real Auditserver over mutual TLS:
 * measurements of real files (approved with `kmi ctl … --measure`), the token checked with
 * verifyAttestationToken and the key from GetAttestationKey, refusals that change no state
 * (the store read byte for byte while the Auditserver is stopped) and are all in its audit
 * log, which `kmi ctl audit verify --server audit` passes; quarantine and release seen on
 * WatchMachineStatus by a kmi://service/ peer.
 */
import { generateKeyPairSync } from "node:crypto";
import { cp, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AttestationTokenError, measureFiles, verifyAttestationToken, type MeasurementValue } from "../../../src/attest/index.js";
import { MachineStatus, type WatchMachineStatusResponse } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { auditClients, ctl, readAuditState, ROOT, sh, startMesh, TestMachine, type Mesh } from "./harness.js";

let mesh: Mesh;
let files: string;
let good: MeasurementValue[];
const sources = () => ({ "agent.code": join(files, "agent"), "proxy.config": join(files, "proxy.json") });

beforeAll(async () => {
  mesh = await startMesh();
  files = join(mesh.dir, "machine");
  await cp(join(ROOT, "test/fixtures/audit/machine"), files, { recursive: true });
  good = await measureFiles(sources());
  expect((await ctl(mesh, ["group", "create", "edge", "--tenant", "acme", "--tenant", "globex"])).code).toBe(0);
  const approve = await ctl(mesh, ["group", "approve-measurements", "edge", "--measure", `agent.code=${join(files, "agent")}`, "--measure", `proxy.config=${join(files, "proxy.json")}`]);
  expect(approve, approve.stderr).toMatchObject({ code: 0 });
  expect(approve.stdout).toContain(good[1]!.sha256);
});
afterAll(async () => mesh?.close());

async function enrolled(): Promise<TestMachine> {
  const t = JSON.parse((await ctl(mesh, ["join-token", "create", "edge", "--json"])).stdout).secret as string;
  const m = new TestMachine(mesh);
  await m.enroll(t);
  return m;
}

async function refusal(p: Promise<unknown>): Promise<{ code: number; message: string }> {
  try {
    await p;
  } catch (err) {
    const ce = ConnectError.from(err);
    return { code: ce.code, message: ce.rawMessage };
  }
  throw new Error("expected a refusal, but the call succeeded");
}

const UNAUTHENTICATED = 16;
const PERMISSION_DENIED = 7;
const FAILED_PRECONDITION = 9;

describe("attestation with a real Auditserver", () => {
  it("issues a token that verifies with the key from GetAttestationKey (the same as attestation-key.pem), bound to this machine", async () => {
    const m = await enrolled();
    const res = await m.attest(await measureFiles(sources()));
    const key = await auditClients(mesh).audit.getAttestationKey({});
    expect(key.publicKeyPem.trim()).toBe((await readFile(join(mesh.auditDataDir, "attestation-key.pem"), "utf8")).trim());
    const claims = verifyAttestationToken(res.attestationToken, key.publicKeyPem, { now: new Date(), expectedMachineId: m.machineId, expectedCertSha256: m.certSha256 });
    expect(claims).toMatchObject({ iss: "kmi-audit", sub: m.machineId, grp: "edge", ten: ["acme", "globex"] });
    expect(claims.exp - claims.iat).toBe(300);
    expect(Number(res.expiresAt!.seconds)).toBe(claims.exp);
    // Expired five minutes later, as the KDC will judge it.
    expect(() => verifyAttestationToken(res.attestationToken, key.publicKeyPem, { now: (claims.exp + 1) * 1000, expectedMachineId: m.machineId, expectedCertSha256: m.certSha256 })).toThrow(/expired/);
  });

  it("refuses a token of another machine presented as this one's (what the KDC will call)", async () => {
    const mine = await enrolled();
    const theirs = await enrolled();
    const token = (await theirs.attest(good)).attestationToken;
    const key = (await auditClients(mesh).audit.getAttestationKey({})).publicKeyPem;
    let err: unknown;
    try {
      verifyAttestationToken(token, key, { now: new Date(), expectedMachineId: mine.machineId, expectedCertSha256: mine.certSha256 });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(AttestationTokenError);
    expect((err as AttestationTokenError).problem).toBe("wrong_machine");
    // And a machine that lies about its id still cannot use it over its own certificate.
    expect(() => verifyAttestationToken(token, key, { now: new Date(), expectedMachineId: theirs.machineId, expectedCertSha256: mine.certSha256 })).toThrow(/another certificate/);
  });

  it("refuses one changed file, naming the measurement", async () => {
    const m = await enrolled();
    const copy = join(mesh.dir, "changed");
    await cp(files, copy, { recursive: true });
    await writeFile(join(copy, "proxy.json"), '{ "listen": "0.0.0.0:8080", "tenant": "acme", "inspect": false }\n');
    const measured = await measureFiles({ "agent.code": join(copy, "agent"), "proxy.config": join(copy, "proxy.json") });
    const r = await refusal(m.attest(measured));
    expect(r.code).toBe(FAILED_PRECONDITION);
    expect(r.message).toBe(`measurement proxy.config: sha256 ${measured[1]!.sha256} is not approved for group edge (approved: ${good[1]!.sha256.slice(0, 16)}…)`);
    const shown = await ctl(mesh, ["machine", "show", m.machineId]);
    expect(shown.stdout).toMatch(/last attestation:\s+\S+ REFUSED/);
    expect(shown.stdout).toContain("measurement proxy.config");
  });

  it("refuses a replayed nonce and evidence signed by another key", async () => {
    const m = await enrolled();
    const c = m.mtls().audit;
    const { nonce } = await c.getAttestationNonce({});
    await m.attest(good, { replay: { nonce } });
    const replay = await refusal(m.attest(good, { replay: { nonce } }));
    expect(replay).toMatchObject({ code: UNAUTHENTICATED, message: expect.stringMatching(/^evidence\.nonce: already used at .*\(a replay\)/) });
    const forged = await refusal(m.attest(good, { signer: generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey }));
    expect(forged).toMatchObject({ code: UNAUTHENTICATED, message: expect.stringMatching(/^signature: does not verify/) });
  });

  it("quarantine refuses the next attestation and renewal; release restores both; a kmi service watching sees both changes", async () => {
    // A watcher with a kmi://service/ certificate from the infrastructure CA, made through the KDC.
    const key = join(mesh.dir, "watcher.key");
    const csr = join(mesh.dir, "watcher.csr");
    const crt = join(mesh.dir, "watcher.pem");
    expect((await sh("openssl", ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-subj", "/CN=watcher", "-out", csr])).code).toBe(0);
    const issued = await ctl(mesh, ["service-cert", "issue", "--name", "watcher", "--csr", csr, "--dns", "localhost", "--out", crt]);
    expect(issued, issued.stderr).toMatchObject({ code: 0 });
    const watcher = auditClients(mesh, { cert: await readFile(crt, "utf8"), key: await readFile(key, "utf8") }).audit;
    const ac = new AbortController();
    const stream = watcher.watchMachineStatus({}, { signal: ac.signal })[Symbol.asyncIterator]();
    const first = (await stream.next()).value as WatchMachineStatusResponse;
    expect(first.snapshot).toBe(true);

    const m = await enrolled();
    await m.attest(good);
    const q = await ctl(mesh, ["machine", "quarantine", m.machineId, "--reason", "disk image differs"]);
    expect(q, q.stderr).toMatchObject({ code: 0 });
    expect(q.stdout).toMatch(/status:\s+QUARANTINED/);
    expect(await refusal(m.attest(good))).toMatchObject({ code: PERMISSION_DENIED, message: expect.stringMatching(/quarantined \(disk image differs\)/) });
    expect(await refusal(m.mtls().audit.renewMachineCertificate({ csrPem: m.csrPem() }))).toMatchObject({ code: PERMISSION_DENIED, message: expect.stringMatching(/not renewed/) });

    const r = await ctl(mesh, ["machine", "release", m.machineId, "--reason", "re-imaged"]);
    expect(r, r.stderr).toMatchObject({ code: 0 });
    await expect(m.attest(good)).resolves.toMatchObject({ attestationToken: expect.any(String) });
    await expect(m.mtls().audit.renewMachineCertificate({ csrPem: m.csrPem() })).resolves.toMatchObject({ certificatePem: expect.stringContaining("BEGIN CERTIFICATE") });

    const seen: [string, MachineStatus, string][] = [];
    while (seen.length < 2) {
      const msg = (await stream.next()).value as WatchMachineStatusResponse;
      for (const ch of msg.changes) seen.push([ch.machineId, ch.status, ch.reason]);
    }
    expect(seen).toEqual([
      [m.machineId, MachineStatus.QUARANTINED, "disk image differs"],
      [m.machineId, MachineStatus.ACTIVE, "re-imaged"],
    ]);
    ac.abort();
    // A machine certificate is not a service certificate.
    const wrong = m.mtls().audit.watchMachineStatus({});
    expect(await refusal((async () => {
      for await (const _ of wrong) break;
    })())).toMatchObject({ code: PERMISSION_DENIED });
  });

  it("leaves every record byte-identical after a series of refusals, logs each one, and the log verifies", async () => {
    const m = await enrolled();
    const used = JSON.parse((await ctl(mesh, ["join-token", "create", "edge", "--json"])).stdout).secret as string;
    await new TestMachine(mesh).enroll(used);
    const { nonce } = await m.mtls().audit.getAttestationNonce({});
    await m.attest(good, { replay: { nonce } });
    const headBefore = JSON.parse((await ctl(mesh, ["audit", "tail", "--server", "audit", "--limit", "1", "--json"])).stdout).headSeq as string;

    await mesh.stopAudit();
    const before = await readAuditState(mesh);
    await mesh.restartAudit();

    const changed = [good[0]!, { name: "proxy.config", sha256: "0".repeat(64) }];
    // Run one after the other, so the log has them in this order.
    const refusals: [string, () => Promise<unknown>, number][] = [
      ["a used join token", () => new TestMachine(mesh).enroll(used), UNAUTHENTICATED],
      ["an unknown join token", () => new TestMachine(mesh).enroll(used.replace(/_[^_]{16}_/, "_0123456789abcdef_")), UNAUTHENTICATED],
      ["a changed measurement", () => m.attest(changed), FAILED_PRECONDITION],
      ["a replayed nonce", () => m.attest(good, { replay: { nonce } }), UNAUTHENTICATED],
      ["evidence by another key", () => m.attest(good, { signer: generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey }), UNAUTHENTICATED],
      ["renewal without a certificate", () => auditClients(mesh).audit.renewMachineCertificate({ csrPem: m.csrPem() }), UNAUTHENTICATED],
      ["an operator call without a token", () => auditClients(mesh).admin.quarantineMachine({ machineId: m.machineId, reason: "x" }), UNAUTHENTICATED],
    ];
    for (const [what, call, code] of refusals) expect((await refusal(call())).code, what).toBe(code);

    const tail = JSON.parse((await ctl(mesh, ["audit", "tail", "--server", "audit", "--after", headBefore, "--json"])).stdout);
    const outcomes = tail.entries.map((e: { action: string; outcome: string }) => `${e.action} ${e.outcome}`);
    expect(outcomes).toEqual([
      "machine.enroll refused: unauthenticated",
      "machine.enroll refused: unauthenticated",
      "machine.attest refused: failed_precondition",
      "machine.attest refused: unauthenticated",
      "machine.attest refused: unauthenticated",
      "machine.renew refused: unauthenticated",
      "machine.quarantine refused: unauthenticated",
    ]);
    for (const e of tail.entries) expect(e.details.reason).toBeTruthy();

    await mesh.stopAudit();
    const after = await readAuditState(mesh);
    await mesh.restartAudit();
    const strip = (s: Map<string, string>) => {
      const out = new Map<string, string>();
      for (const [k, v] of s) {
        if (k.startsWith("attestations/")) continue; // the observation of the last attempt, by design
        if (k.startsWith("nonces/") && !before.has(k)) continue; // nonces handed out for the refused attempts, unused
        out.set(k, v);
      }
      return out;
    };
    expect(strip(after)).toEqual(strip(before));
    for (const [k, v] of after) if (k.startsWith("nonces/") && before.has(k)) expect(v, k).toBe(before.get(k));
    expect([...after.keys()].filter((k) => k.startsWith("machines/") || k.startsWith("join_tokens/"))).toEqual([...before.keys()].filter((k) => k.startsWith("machines/") || k.startsWith("join_tokens/")));

    const verify = await ctl(mesh, ["audit", "verify", "--server", "audit"]);
    expect(verify, verify.stderr).toMatchObject({ code: 0, stdout: expect.stringMatching(/^audit log ok: \d+ entries, head [0-9a-f]{64}/) });
  });
});
