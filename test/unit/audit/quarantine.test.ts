import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MachineStatus, type WatchMachineStatusResponse } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { Tables } from "../../../src/audit/store.js";
import { asPeer, makeHarness, newMachineKey, type Harness, type TestMachine } from "./harness.js";
import { attestWith, enrollMachine, expectCode, lastEntry, makeGroup } from "./flows.js";

let h: Harness;
let m: TestMachine;
beforeEach(async () => {
  h = await makeHarness();
  await makeGroup(h);
  m = await enrollMachine(h);
});
afterEach(async () => h.close());

/** A service certificate (kmi://service/kdc) from the test CA, for the watch. */
async function serviceCert(): Promise<Uint8Array> {
  const { issueServiceCertificate } = await import("../../../src/pki/issue.js");
  const { createPublicKey } = await import("node:crypto");
  const { exportPublicKeySpkiDer } = await import("../../../src/pki/keys.js");
  const key = newMachineKey().key;
  return issueServiceCertificate({
    issuer: { certificateDer: h.kdc.caDer, privateKey: h.kdc.caKey },
    serviceName: "kdc",
    publicKeySpkiDer: exportPublicKeySpkiDer(createPublicKey(key)),
    dnsNames: ["localhost"],
    now: h.clock.now(),
    validitySeconds: 3600,
  });
}

describe("quarantine", () => {
  it("refuses the next attestation and renewal; release makes both work again; the watch sees both changes", async () => {
    const ac = new AbortController();
    const stream = h.audit.watchMachineStatus({}, { ...asPeer(await serviceCert()), signal: ac.signal });
    const it = stream[Symbol.asyncIterator]();
    const first = (await it.next()).value as WatchMachineStatusResponse;
    expect(first).toMatchObject({ snapshot: true, changes: [] });

    await attestWith(h, m);
    const q = await h.admin.quarantineMachine({ machineId: m.machineId, reason: "stolen laptop" }, h.operator);
    expect(q.machine).toMatchObject({ status: MachineStatus.QUARANTINED, statusReason: "stolen laptop" });
    await expectCode(attestWith(h, m), "permission_denied", new RegExp(`^machine ${m.machineId}: quarantined \\(stolen laptop\\)`));
    await expectCode(h.audit.renewMachineCertificate({ csrPem: m.csrPem }, asPeer(m.certificateDer)), "permission_denied", /quarantined \(stolen laptop\); its certificate is not renewed/);

    await h.admin.releaseMachine({ machineId: m.machineId, reason: "laptop found" }, h.operator);
    await expect(attestWith(h, m)).resolves.toBeTruthy();
    await expect(h.audit.renewMachineCertificate({ csrPem: m.csrPem }, asPeer(m.certificateDer))).resolves.toBeTruthy();

    const changes: { status: MachineStatus; reason: string }[] = [];
    while (changes.length < 2) {
      const msg = (await it.next()).value as WatchMachineStatusResponse;
      expect(msg.snapshot).toBe(false);
      for (const c of msg.changes) changes.push({ status: c.status, reason: c.reason });
    }
    expect(changes).toEqual([
      { status: MachineStatus.QUARANTINED, reason: "stolen laptop" },
      { status: MachineStatus.ACTIVE, reason: "laptop found" },
    ]);
    ac.abort();
  });

  it("lists quarantined machines in the first message of a new watch, then sends keep-alives", async () => {
    await h.admin.quarantineMachine({ machineId: m.machineId, reason: "suspicious" }, h.operator);
    const ac = new AbortController();
    const it = h.audit.watchMachineStatus({}, { ...asPeer(await serviceCert()), signal: ac.signal })[Symbol.asyncIterator]();
    const first = (await it.next()).value as WatchMachineStatusResponse;
    expect(first.snapshot).toBe(true);
    expect(first.changes.map((c) => [c.machineId, c.status, c.reason])).toEqual([[m.machineId, MachineStatus.QUARANTINED, "suspicious"]]);
    const keepalive = (await it.next()).value as WatchMachineStatusResponse;
    expect(keepalive).toMatchObject({ snapshot: false, changes: [] });
    ac.abort();
  });

  it("refuses the watch to a machine and to a caller without a certificate", async () => {
    await expectCode(drain(h.audit.watchMachineStatus({}, asPeer(m.certificateDer))), "permission_denied", /not a service certificate/);
    await expectCode(drain(h.audit.watchMachineStatus({})), "unauthenticated", /client certificate required/);
    expect(await lastEntry(h)).toMatchObject({ action: "machine.watch_status", outcome: "refused: unauthenticated" });
  });

  const none = async () => undefined;
  it.each<[string, () => Promise<unknown>, () => Promise<unknown>, string, RegExp]>([
    [
      "quarantining a quarantined machine",
      () => h.admin.quarantineMachine({ machineId: m.machineId, reason: "one" }, h.operator),
      () => h.admin.quarantineMachine({ machineId: m.machineId, reason: "two" }, h.operator),
      "failed_precondition",
      /is already quarantined \(since .*: one\)/,
    ],
    ["releasing an active machine", none, () => h.admin.releaseMachine({ machineId: m.machineId, reason: "why not" }, h.operator), "failed_precondition", /is not quarantined/],
    ["an unknown machine", none, () => h.admin.quarantineMachine({ machineId: "m-0000000000000000", reason: "x" }, h.operator), "not_found", /^machine_id: no machine "m-0000000000000000"/],
    ["no reason", none, () => h.admin.quarantineMachine({ machineId: m.machineId, reason: " " }, h.operator), "invalid_argument", /^reason: required/],
    ["a reason over 256 characters", none, () => h.admin.quarantineMachine({ machineId: m.machineId, reason: "x".repeat(257) }, h.operator), "invalid_argument", /^reason: longer than 256/],
    ["a malformed machine id", none, () => h.admin.releaseMachine({ machineId: "M-1", reason: "x" }, h.operator), "invalid_argument", /^machine_id: "M-1" is not a machine id/],
  ])("refuses %s, audited, with nothing changed", async (_name, setup, call, code, message) => {
    await setup();
    const before = await h.snapshot();
    await expectCode(call(), code, message);
    expect(await h.snapshot()).toEqual(before);
    expect((await lastEntry(h)).outcome).toBe(`refused: ${code}`);
  });

  it("keeps the machine record byte-identical when a refused attestation happens", async () => {
    const before = (await h.snapshot()).get(`machines/${m.machineId}`);
    await expectCode(attestWith(h, m, [{ name: "agent.code", sha256: "0".repeat(64) }, { name: "proxy.config", sha256: "b".repeat(64) }]), "failed_precondition");
    expect((await h.snapshot()).get(`machines/${m.machineId}`)).toBe(before);
    const shown = await h.admin.getMachine({ machineId: m.machineId }, h.operator);
    expect(shown.machine?.lastAttestation).toMatchObject({ ok: false, problem: expect.stringMatching(/^measurement agent\.code/), softwareVersion: "0.1.0" });
    expect((await h.store.get(Tables.machines, m.machineId))!.status).toBe(MachineStatus.ACTIVE);
  });
});

async function drain(stream: AsyncIterable<unknown>): Promise<void> {
  for await (const _ of stream) break;
}
