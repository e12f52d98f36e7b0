/**
 * AuditAdminService: what an operator does on the Auditserver. Each handler authenticates
 * (operator token, checked by the KDC), parses the request in ./validate.ts, acts, and maps
 * to proto; any refusal is written to the audit log by `audited`.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import {
  ApproveMeasurementsResponseSchema,
  AuditAdminService,
  AuditLogEntrySchema,
  CreateGroupResponseSchema,
  CreateJoinTokenResponseSchema,
  GetMachineResponseSchema,
  ListGroupsResponseSchema,
  ListMachinesResponseSchema,
  QuarantineMachineResponseSchema,
  ReleaseMachineResponseSchema,
  TailAuditLogResponseSchema,
  VerifyAuditLogResponseSchema,
  GetAuditCheckpointResponseSchema,
} from "../gen/kmi/audit/v1/admin_pb.js";
import { FailedPrecondition } from "../common/errors.js";
import { verifyResponseFields } from "../storage/audit-checkpointer.js";
import { requireCheckpoint } from "../storage/audit-checkpoint.js";
import type { AuditEntry } from "../storage/audit-log.js";
import { kPeerAddress, peerSource } from "../common/rpc.js";
import { audited } from "./audited.js";
import type { AuditContext } from "./context.js";
import { approveMeasurements, createGroup, createJoinToken, listGroups } from "./group-ops.js";
import { listMachines, quarantineMachine, releaseMachine, showMachine } from "./machine-ops.js";
import { actorHint, authenticateOperator } from "./operator-auth.js";
import { groupToProto } from "./records.js";
import * as V from "./validate.js";

/**
 * Runs one operator call: authenticate, then `fn` with the actor; a refusal (including a
 * failed authentication) is audited under `action` and `target`.
 */
async function operatorCall<T>(ctx: AuditContext, hctx: HandlerContext, action: string, target: string, fn: (actor: string) => Promise<T>): Promise<T> {
  const authorization = hctx.requestHeader.get("authorization");
  let actor = actorHint(authorization);
  const source = peerSource(hctx.values.get(kPeerAddress));
  // Until the token checked out, the caller proved nothing (whatever the failure: a bad token,
  // or the KDC that checks tokens being unreachable).
  let proven = false;
  return audited(
    ctx,
    () => ({ actor, action, target, ...(proven ? {} : { source }) }),
    async () => {
      actor = await authenticateOperator(ctx, authorization);
      proven = true;
      return fn(actor);
    },
  );
}

/** A log entry as AuditAdminService returns it. */
export function auditEntryToProto(e: AuditEntry) {
  return create(AuditLogEntrySchema, {
    seq: e.seq,
    time: timestampFromDate(e.time),
    actor: e.actor,
    action: e.action,
    target: e.target,
    outcome: e.outcome,
    details: e.details,
    prevHash: e.prevHash,
    hash: e.hash,
  });
}

/** AuditAdminService over the Auditserver's context. */
export function createAuditAdminService(ctx: AuditContext): ServiceImpl<typeof AuditAdminService> {
  return {
    createGroup: (req, hctx) =>
      operatorCall(ctx, hctx, "group.create", `group/${req.name.slice(0, 63)}`, async (actor) => {
        const g = await createGroup(ctx, actor, V.parseCreateGroup(req));
        return create(CreateGroupResponseSchema, { group: groupToProto(g) });
      }),

    listGroups: (_req, hctx) =>
      operatorCall(ctx, hctx, "group.list", "groups", async () => create(ListGroupsResponseSchema, { groups: (await listGroups(ctx)).map(groupToProto) })),

    approveMeasurements: (req, hctx) =>
      operatorCall(ctx, hctx, "group.approve_measurements", `group/${req.group.slice(0, 63)}`, async (actor) => {
        const { group, approved } = V.parseApproveMeasurements(req);
        return create(ApproveMeasurementsResponseSchema, { group: groupToProto(await approveMeasurements(ctx, actor, group, approved)) });
      }),

    createJoinToken: (req, hctx) =>
      operatorCall(ctx, hctx, "join_token.create", `group/${req.group.slice(0, 63)}`, async (actor) => {
        const t = await createJoinToken(ctx, actor, V.parseCreateJoinToken(req));
        return create(CreateJoinTokenResponseSchema, { tokenId: t.tokenId, secret: t.secret, expiresAt: timestampFromDate(t.expiresAt) });
      }),

    listMachines: (req, hctx) =>
      operatorCall(ctx, hctx, "machine.list", "machines", async () => {
        const { group } = V.parseListMachines(req);
        return create(ListMachinesResponseSchema, { machines: await listMachines(ctx, group) });
      }),

    getMachine: (req, hctx) =>
      operatorCall(ctx, hctx, "machine.get", `machine/${req.machineId.slice(0, 64)}`, async () => {
        const { machineId } = V.parseGetMachine(req);
        return create(GetMachineResponseSchema, { machine: await showMachine(ctx, machineId) });
      }),

    quarantineMachine: (req, hctx) =>
      operatorCall(ctx, hctx, "machine.quarantine", `machine/${req.machineId.slice(0, 64)}`, async (actor) => {
        const { machineId, reason } = V.parseStatusChange(req);
        return create(QuarantineMachineResponseSchema, { machine: await quarantineMachine(ctx, actor, machineId, reason) });
      }),

    releaseMachine: (req, hctx) =>
      operatorCall(ctx, hctx, "machine.release", `machine/${req.machineId.slice(0, 64)}`, async (actor) => {
        const { machineId, reason } = V.parseStatusChange(req);
        return create(ReleaseMachineResponseSchema, { machine: await releaseMachine(ctx, actor, machineId, reason) });
      }),

    tailAuditLog: (req, hctx) =>
      operatorCall(ctx, hctx, "audit.tail", "audit_log", async () => {
        const { afterSeq, limit, last } = V.parseTailAuditLog(req);
        const entries = await ctx.audit.tail({ afterSeq, limit, last });
        const head = await ctx.audit.head();
        return create(TailAuditLogResponseSchema, { entries: entries.map(auditEntryToProto), headSeq: head.seq });
      }),

    verifyAuditLog: (req, hctx) =>
      operatorCall(ctx, hctx, "audit.verify", "audit_log", async () => {
        const exported = req.checkpoint === undefined ? undefined : requireCheckpoint(req.checkpoint, "checkpoint");
        if (ctx.checkpoints === undefined) {
          if (exported !== undefined) throw new FailedPrecondition("checkpoint: this Auditserver keeps no checkpoints");
          const r = await ctx.audit.verify();
          return create(VerifyAuditLogResponseSchema, verifyResponseFields(r));
        }
        const r = await ctx.checkpoints.verify(exported);
        return create(VerifyAuditLogResponseSchema, verifyResponseFields(r));
      }),

    getAuditCheckpoint: (_req, hctx) =>
      operatorCall(ctx, hctx, "audit.checkpoint", "audit_log", async () => {
        const checkpoint = await ctx.checkpoints?.checkpoint();
        if (checkpoint === undefined) throw new FailedPrecondition("audit log: no checkpoint to export (the log is empty, or this Auditserver keeps none)");
        return create(GetAuditCheckpointResponseSchema, { checkpoint, witness: await ctx.checkpoints!.witnessed() });
      }),
  };
}
