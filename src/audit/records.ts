/**
 * Stored records to API messages, and the small reads every operation shares.
 */
import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { sha256Hex } from "../attest/index.js";
import { NotFound } from "../common/errors.js";
import { AttestationSchema, GroupSchema, MachineSchema, type Group, type Machine } from "../gen/kmi/audit/v1/admin_pb.js";
import type { AttestationResultRecord, EnrolledMachineRecord, MachineGroupRecord } from "../gen/kmi/store/v1/audit_pb.js";
import type { Compare } from "../storage/store.js";
import type { AuditContext } from "./context.js";
import { Tables } from "./store.js";
import type { ApprovedDigests } from "./validate.js";

/** A stored time as a Date (epoch for an absent one). */
export function dateOf(ts: Timestamp | undefined): Date {
  return ts === undefined ? new Date(0) : timestampDate(ts);
}

/** A Date as a stored time. */
export function ts(date: Date): Timestamp {
  return timestampFromDate(date);
}

/** The API view of a group. */
export function groupToProto(g: MachineGroupRecord): Group {
  return create(GroupSchema, {
    name: g.name,
    tenantIds: [...g.tenantIds],
    allTenants: g.allTenants,
    approved: g.approved.map((a) => ({ name: a.name, sha256: [...a.sha256] })),
    quarantineOnMismatch: g.quarantineOnMismatch,
    certificateTtlSeconds: g.certificateTtlSeconds,
    tokenTtlSeconds: g.tokenTtlSeconds,
    ...(g.createdAt !== undefined ? { createdAt: g.createdAt } : {}),
  });
}

/** The approved set of a group as the policy reads it. */
export function approvedOf(g: MachineGroupRecord): ApprovedDigests[] {
  return g.approved.map((a) => ({ name: a.name, sha256: [...a.sha256] }));
}

/** The API view of a machine with its last attestation attempt. */
export function machineToProto(m: EnrolledMachineRecord, last: AttestationResultRecord | undefined): Machine {
  const machine = create(MachineSchema, {
    machineId: m.machineId,
    group: m.group,
    hostname: m.hostname,
    status: m.status,
    statusReason: m.statusReason,
    certificateSha256: m.certificateSha256,
    encryptionKeyId: m.encryptionPublicKey.length > 0 ? sha256Hex(m.encryptionPublicKey) : "",
    ...(m.enrolledAt !== undefined ? { enrolledAt: m.enrolledAt } : {}),
    ...(m.certificateNotAfter !== undefined ? { certificateNotAfter: m.certificateNotAfter } : {}),
  });
  if (last !== undefined) {
    machine.lastAttestation = create(AttestationSchema, {
      ok: last.ok,
      problem: last.problem,
      softwareVersion: last.softwareVersion,
      ...(last.time !== undefined ? { time: last.time } : {}),
    });
  }
  return machine;
}

/** The group, or NotFound naming `field`. */
export async function getGroup(ctx: AuditContext, name: string, field = "group"): Promise<MachineGroupRecord> {
  return (await readGroup(ctx, name, field)).group;
}

/** `getGroup` with the record's mod revision, for a change conditional on it. */
export async function readGroup(ctx: AuditContext, name: string, field = "group"): Promise<{ group: MachineGroupRecord; modRevision: bigint }> {
  const read = await ctx.store.read(Tables.groups, name);
  if (read.value === undefined) throw new NotFound(`${field}: no group "${name}"; list them with \`kmi ctl group list\``);
  return { group: read.value, modRevision: read.modRevision };
}

/** The machine, or NotFound. */
export async function getMachine(ctx: AuditContext, machineId: string): Promise<EnrolledMachineRecord> {
  return (await readMachine(ctx, machineId)).machine;
}

/** `getMachine` with the record's mod revision, for a change conditional on it. */
export async function readMachine(ctx: AuditContext, machineId: string): Promise<{ machine: EnrolledMachineRecord; modRevision: bigint }> {
  const read = await ctx.store.read(Tables.machines, machineId);
  if (read.value === undefined) throw new NotFound(`machine_id: no machine "${machineId}"; list them with \`kmi ctl machine list\``);
  return { machine: read.value, modRevision: read.modRevision };
}

/** Compares for conditional changes: the record is still at the mod revision read (`0n`: still absent). */
export const guard = {
  machine: (machineId: string, modRevision: bigint): Compare => ({ table: Tables.machines, key: machineId, modRevision }),
  group: (name: string, modRevision: bigint): Compare => ({ table: Tables.groups, key: name, modRevision }),
  joinToken: (tokenId: string, modRevision: bigint): Compare => ({ table: Tables.joinTokens, key: tokenId, modRevision }),
  nonce: (key: string, modRevision: bigint): Compare => ({ table: Tables.nonces, key, modRevision }),
};
