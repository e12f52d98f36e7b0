/**
 * Operator actions on machines: list, show, quarantine, release. A status change is one batch
 * (machine record + audit entry), conditional on the machine record as read. It reaches the
 * WatchMachineStatus streams through the store's change feed (./status-follower.ts), so only
 * once it committed, and on every replica.
 */
import { clone } from "@bufbuild/protobuf";
import { FailedPrecondition } from "../common/errors.js";
import type { Machine } from "../gen/kmi/audit/v1/admin_pb.js";
import { MachineStatus } from "../gen/kmi/audit/v1/audit_pb.js";
import { EnrolledMachineRecordSchema, type EnrolledMachineRecord } from "../gen/kmi/store/v1/audit_pb.js";
import { retryOnConflict } from "../storage/retry.js";
import { putOp, type BatchOp } from "../storage/store.js";
import type { AuditContext } from "./context.js";
import { dateOf, getMachine, guard, machineToProto, readMachine, ts } from "./records.js";
import type { StatusChange } from "./status-hub.js";
import { RECORD_VERSION, Tables } from "./store.js";

/** The batch ops that quarantine `machine`. */
export function quarantineOps(machine: EnrolledMachineRecord, reason: string, by: string, now: Date): BatchOp[] {
  return statusOps(machine, MachineStatus.QUARANTINED, reason, by, now);
}

function statusOps(
  machine: EnrolledMachineRecord,
  status: MachineStatus.ACTIVE | MachineStatus.QUARANTINED,
  reason: string,
  by: string,
  now: Date,
): BatchOp[] {
  const next = clone(EnrolledMachineRecordSchema, machine);
  next.recordVersion = RECORD_VERSION;
  next.status = status;
  next.statusReason = reason;
  next.statusChangedBy = by;
  next.statusChangedAt = ts(now);
  return [putOp(Tables.machines, machine.machineId, next)];
}

/** Quarantines a machine (FailedPrecondition when it already is). */
export async function quarantineMachine(ctx: AuditContext, actor: string, machineId: string, reason: string): Promise<Machine> {
  return changeStatus(ctx, actor, machineId, reason, MachineStatus.QUARANTINED);
}

/** Releases a quarantined machine (FailedPrecondition when it is not quarantined). */
export async function releaseMachine(ctx: AuditContext, actor: string, machineId: string, reason: string): Promise<Machine> {
  return changeStatus(ctx, actor, machineId, reason, MachineStatus.ACTIVE);
}

async function changeStatus(
  ctx: AuditContext,
  actor: string,
  machineId: string,
  reason: string,
  status: MachineStatus.ACTIVE | MachineStatus.QUARANTINED,
): Promise<Machine> {
  return retryOnConflict(async () => {
    const { machine, modRevision } = await readMachine(ctx, machineId);
    if (machine.status === status) {
      const since = dateOf(machine.statusChangedAt ?? machine.enrolledAt).toISOString();
      throw new FailedPrecondition(
        status === MachineStatus.QUARANTINED
          ? `machine_id: ${machineId} is already quarantined (since ${since}: ${machine.statusReason})`
          : `machine_id: ${machineId} is not quarantined; nothing to release`,
      );
    }
    const now = ctx.clock.now();
    const ops = statusOps(machine, status, reason, actor, now);
    const action = status === MachineStatus.QUARANTINED ? "machine.quarantine" : "machine.release";
    await ctx.audit.append({ actor, action, target: `machine/${machineId}`, outcome: "ok", details: { reason, group: machine.group } }, ops, [guard.machine(machineId, modRevision)]);
    const updated = await getMachine(ctx, machineId);
    return machineToProto(updated, await ctx.store.get(Tables.attestations, machineId));
  });
}

/** Machines by id, optionally of one group. */
export async function listMachines(ctx: AuditContext, group?: string): Promise<Machine[]> {
  const out: Machine[] = [];
  for await (const [id, m] of ctx.store.iterate(Tables.machines)) {
    if (group !== undefined && m.group !== group) continue;
    out.push(machineToProto(m, await ctx.store.get(Tables.attestations, id)));
  }
  return out;
}

/** One machine with its last attestation attempt. */
export async function showMachine(ctx: AuditContext, machineId: string): Promise<Machine> {
  const m = await getMachine(ctx, machineId);
  return machineToProto(m, await ctx.store.get(Tables.attestations, machineId));
}

/** Every quarantined machine, as the snapshot of a watch. */
export async function quarantinedMachines(ctx: AuditContext): Promise<StatusChange[]> {
  const out: StatusChange[] = [];
  for await (const [, m] of ctx.store.iterate(Tables.machines)) {
    if (m.status === MachineStatus.QUARANTINED) {
      out.push({ machineId: m.machineId, status: MachineStatus.QUARANTINED, reason: m.statusReason, time: dateOf(m.statusChangedAt) });
    }
  }
  return out;
}
