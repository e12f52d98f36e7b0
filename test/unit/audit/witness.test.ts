import { createPublicKey, randomBytes } from "node:crypto";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { issueServiceCertificate } from "../../../src/pki/issue.js";
import { exportPublicKeySpkiDer } from "../../../src/pki/keys.js";
import { CheckpointWitness, deriveCheckpointKey, signCheckpoint } from "../../../src/storage/audit-checkpoint.js";
import { asPeer, makeHarness, newMachineKey, type Harness } from "./harness.js";
import { enrollMachine, expectCode, lastEntry, makeGroup } from "./flows.js";

let h: Harness;
beforeEach(async () => {
  h = await makeHarness();
  h.ctx.witness = new CheckpointWitness(h.store, h.clock);
});
afterEach(async () => h.close());

/** A service certificate kmi://service/<name> from the test CA. */
function serviceCert(name: string): Uint8Array {
  return issueServiceCertificate({
    issuer: { certificateDer: h.kdc.caDer, privateKey: h.kdc.caKey },
    serviceName: name,
    publicKeySpkiDer: exportPublicKeySpkiDer(createPublicKey(newMachineKey().key)),
    dnsNames: ["localhost"],
    now: h.clock.now(),
    validitySeconds: 3600,
  });
}

const key = deriveCheckpointKey(randomBytes(32));
const at = (seq: bigint, fill = Number(seq)) => {
  const hash = new Uint8Array(32).fill(fill);
  return signCheckpoint(key, { origin: "kdc/0011223344556677", seq, hash, fromSeq: seq - 1n, entryHashes: [hash], time: h.clock.now() });
};

describe("the Auditserver as the KDC's witness", () => {
  it("keeps the KDC's newest checkpoint and gives it back to the KDC only", async () => {
    const kdc = asPeer(serviceCert("kdc"));
    expect((await h.audit.getWitnessedCheckpoint({ keyId: key.keyId }, kdc)).witnessed).toBeUndefined();
    expect((await h.audit.witnessCheckpoint({ checkpoint: at(4n) }, kdc)).witnessed?.seq).toBe(4n);
    expect((await h.audit.witnessCheckpoint({ checkpoint: at(9n) }, kdc)).witnessed?.seq).toBe(9n);
    expect((await h.audit.getWitnessedCheckpoint({ keyId: key.keyId }, kdc)).witnessed?.seq).toBe(9n);
  });

  it.each([
    ["an older seq", () => at(3n), /^checkpoint: seq 3 is older than the witnessed seq 5: the kdc's audit log was truncated or rolled back/],
    ["the same seq with another hash", () => at(5n, 77), /^checkpoint: seq 5 has another hash than the witnessed one/],
  ])("refuses %s as FAILED_PRECONDITION, writes the refusal to its audit log and keeps its copy", async (_name, cp, message) => {
    const kdc = asPeer(serviceCert("kdc"));
    await h.audit.witnessCheckpoint({ checkpoint: at(5n) }, kdc);
    await expectCode(h.audit.witnessCheckpoint({ checkpoint: cp() }, kdc), "failed_precondition", message);
    expect(await lastEntry(h)).toMatchObject({ actor: "service:kdc", action: "audit.checkpoint.witness", outcome: "refused: failed_precondition" });
    expect((await h.audit.getWitnessedCheckpoint({ keyId: key.keyId }, kdc)).witnessed?.seq).toBe(5n);
  });

  it("refuses a forged checkpoint as INVALID_ARGUMENT naming the field", async () => {
    const forged = at(5n);
    forged.seq = 50n;
    await expectCode(h.audit.witnessCheckpoint({ checkpoint: forged }, asPeer(serviceCert("kdc"))), "invalid_argument", /^checkpoint: signature does not verify/);
    await expectCode(h.audit.witnessCheckpoint({}, asPeer(serviceCert("kdc"))), "invalid_argument", /^checkpoint: missing/);
  });

  it.each([
    ["no client certificate", () => ({ headers: {} }), "unauthenticated", /client certificate required/],
    ["another service", () => asPeer(serviceCert("proxy")), "permission_denied", /only the KDC \(kmi:\/\/service\/kdc\)/],
  ])("refuses %s on both calls", async (_name, opts, code, message) => {
    await expectCode(h.audit.witnessCheckpoint({ checkpoint: at(5n) }, opts()), code, message);
    await expectCode(h.audit.getWitnessedCheckpoint({ keyId: key.keyId }, opts()), code, message);
  });

  it("refuses a machine's certificate", async () => {
    await makeGroup(h);
    const m = await enrollMachine(h);
    await expectCode(h.audit.witnessCheckpoint({ checkpoint: at(5n) }, asPeer(m.certificateDer)), "permission_denied", /not a service certificate/);
  });
});
