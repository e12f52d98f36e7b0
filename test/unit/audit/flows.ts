/**
 * Steps the unit tests share: make a group with an approved set, enroll a machine, attest.
 */
import { X509Certificate } from "node:crypto";
import { ConnectError } from "@connectrpc/connect";
import { expect } from "vitest";
import { createAttestRequest, type MeasurementValue } from "../../../src/attest/index.js";
import type { AttestResponse } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { asPeer, newMachineKey, type Harness, type TestMachine } from "./harness.js";

/** The approved measurements of the test group. */
export const GOOD: MeasurementValue[] = [
  { name: "agent.code", sha256: "a".repeat(64) },
  { name: "proxy.config", sha256: "b".repeat(64) },
];

/** Creates a group approving GOOD, serving `tenantIds` (default ["acme"]) or, with `allTenants`, every tenant. */
export async function makeGroup(h: Harness, name = "edge", opts: { quarantineOnMismatch?: boolean; tenantIds?: string[]; allTenants?: boolean } = {}): Promise<void> {
  const tenants = opts.allTenants === true ? { allTenants: true } : { tenantIds: opts.tenantIds ?? ["acme"] };
  await h.admin.createGroup({ name, ...tenants, quarantineOnMismatch: opts.quarantineOnMismatch ?? false }, h.operator);
  await h.admin.approveMeasurements({ group: name, approved: GOOD.map((m) => ({ name: m.name, sha256: [m.sha256] })) }, h.operator);
}

/** A join token for `group`. */
export async function joinToken(h: Harness, group = "edge", ttlSeconds = 0): Promise<string> {
  return (await h.admin.createJoinToken({ group, ttlSeconds }, h.operator)).secret;
}

/** Enrolls a new machine in `group`. */
export async function enrollMachine(h: Harness, group = "edge"): Promise<TestMachine> {
  const { key, csrPem } = newMachineKey();
  const res = await h.audit.enroll({ joinToken: await joinToken(h, group), csrPem, hostname: "proxy-1" });
  const cert = new X509Certificate(res.certificatePem);
  return { key, csrPem, machineId: res.machineId, certificateDer: new Uint8Array(cert.raw), certificatePem: res.certificatePem };
}

/** Gets a nonce and attests with `measurements`, signing with `signer` (default the machine key). */
export async function attestWith(h: Harness, m: TestMachine, measurements: MeasurementValue[] = GOOD, opts: { signer?: TestMachine["key"]; machineId?: string } = {}): Promise<AttestResponse> {
  const n = await h.audit.getAttestationNonce({}, asPeer(m.certificateDer));
  const req = createAttestRequest({ machineId: opts.machineId ?? m.machineId, nonce: n.nonce, measurements, softwareVersion: "0.1.0", time: h.clock.now() }, opts.signer ?? m.key);
  return h.audit.attest(req, asPeer(m.certificateDer));
}

/** Expects `p` to fail with `code` and a message matching `message`. */
export async function expectCode(p: Promise<unknown>, code: string, message?: RegExp): Promise<ConnectError> {
  try {
    await p;
  } catch (err) {
    const ce = ConnectError.from(err);
    expect({ code: codeName(ce.code), message: ce.rawMessage }).toMatchObject({ code, ...(message ? { message: expect.stringMatching(message) } : {}) });
    return ce;
  }
  throw new Error(`expected ${code}, but the call succeeded`);
}

const NAMES = ["ok", "canceled", "unknown", "invalid_argument", "deadline_exceeded", "not_found", "already_exists", "permission_denied", "resource_exhausted", "failed_precondition", "aborted", "out_of_range", "unimplemented", "internal", "unavailable", "data_loss", "unauthenticated"];

function codeName(code: number): string {
  return NAMES[code] ?? String(code);
}

/** The last audit entry. */
export async function lastEntry(h: Harness) {
  const [e] = await h.ctx.audit.tail({ last: true, limit: 1 });
  return e!;
}
