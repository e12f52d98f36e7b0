/**
 * Operator actions on machine groups and join tokens. Each validates, reads, and writes the
 * change and its audit entry in one batch conditional on what it read (the group's revision,
 * or the absence of the new name); on a Conflict it runs again on fresh reads.
 */
import { createHash } from "node:crypto";
import { clone, create } from "@bufbuild/protobuf";
import { AlreadyExists } from "../common/errors.js";
import { ApprovedDigestsRecordSchema, JoinTokenRecordSchema, MachineGroupRecordSchema, type MachineGroupRecord } from "../gen/kmi/store/v1/audit_pb.js";
import { retryOnConflict } from "../storage/retry.js";
import { putOp } from "../storage/store.js";
import type { AuditContext } from "./context.js";
import { mintJoinToken } from "./join-token.js";
import { guard, readGroup, ts } from "./records.js";
import { RECORD_VERSION, Tables } from "./store.js";
import type { ApprovedDigests, NewGroup } from "./validate.js";

/** Makes a group; AlreadyExists when the name is taken. */
export async function createGroup(ctx: AuditContext, actor: string, g: NewGroup): Promise<MachineGroupRecord> {
  return retryOnConflict(async () => {
    if (await ctx.store.has(Tables.groups, g.name)) {
      throw new AlreadyExists(`name: group "${g.name}" exists; choose another name or use \`kmi ctl group approve-measurements\` to change it`);
    }
    const record = create(MachineGroupRecordSchema, {
      recordVersion: RECORD_VERSION,
      name: g.name,
      tenantIds: g.tenantIds,
      allTenants: g.allTenants,
      approved: [],
      quarantineOnMismatch: g.quarantineOnMismatch,
      certificateTtlSeconds: g.certificateTtlSeconds,
      tokenTtlSeconds: g.tokenTtlSeconds,
      createdAt: ts(ctx.clock.now()),
    });
    await ctx.audit.append(
      {
        actor,
        action: "group.create",
        target: `group/${g.name}`,
        outcome: "ok",
        details: {
          tenants: g.allTenants ? "*" : g.tenantIds.join(","),
          quarantine_on_mismatch: String(g.quarantineOnMismatch),
          certificate_ttl_seconds: String(g.certificateTtlSeconds),
          token_ttl_seconds: String(g.tokenTtlSeconds),
        },
      },
      [putOp(Tables.groups, g.name, record)],
      [guard.group(g.name, 0n)],
    );
    return record;
  });
}

/** Every group, by name. */
export async function listGroups(ctx: AuditContext): Promise<MachineGroupRecord[]> {
  const out: MachineGroupRecord[] = [];
  for await (const [, g] of ctx.store.iterate(Tables.groups)) out.push(g);
  return out;
}

/** A digest of an approved set, so the audit log pins exactly which set was approved. */
export function approvedSetDigest(approved: readonly ApprovedDigests[]): string {
  const h = createHash("sha256");
  for (const a of approved) h.update(`${a.name}\n${a.sha256.join(",")}\n`);
  return h.digest("hex");
}

/** Replaces a group's approved measurements. */
export async function approveMeasurements(ctx: AuditContext, actor: string, group: string, approved: ApprovedDigests[]): Promise<MachineGroupRecord> {
  return retryOnConflict(async () => {
    const { group: current, modRevision } = await readGroup(ctx, group);
    const next = clone(MachineGroupRecordSchema, current);
    next.recordVersion = RECORD_VERSION;
    next.approved = approved.map((a) => create(ApprovedDigestsRecordSchema, { name: a.name, sha256: a.sha256 }));
    next.approvedAt = ts(ctx.clock.now());
    const details: Record<string, string> = {
      measurements: approved.map((a) => `${a.name}(${a.sha256.length})`).join(",").slice(0, 4096),
      set_sha256: approvedSetDigest(approved),
      previous_set_sha256: approvedSetDigest(current.approved),
    };
    await ctx.audit.append({ actor, action: "group.approve_measurements", target: `group/${group}`, outcome: "ok", details }, [putOp(Tables.groups, group, next)], [guard.group(group, modRevision)]);
    return next;
  });
}

/** A new join token: the record as stored and the secret (returned once). */
export async function createJoinToken(
  ctx: AuditContext,
  actor: string,
  p: { group: string; ttlSeconds: number; description: string },
): Promise<{ tokenId: string; secret: string; expiresAt: Date }> {
  return retryOnConflict(async () => {
    const { modRevision } = await readGroup(ctx, p.group);
    let minted = mintJoinToken();
    while (await ctx.store.has(Tables.joinTokens, minted.tokenId)) minted = mintJoinToken();
    const now = ctx.clock.now();
    const expiresAt = new Date(now.getTime() + p.ttlSeconds * 1000);
    const record = create(JoinTokenRecordSchema, {
      recordVersion: RECORD_VERSION,
      tokenId: minted.tokenId,
      secretSha256: minted.secretSha256,
      group: p.group,
      description: p.description,
      createdBy: actor,
      createdAt: ts(now),
      expiresAt: ts(expiresAt),
    });
    await ctx.audit.append(
      {
        actor,
        action: "join_token.create",
        target: `join_token/${minted.tokenId}`,
        outcome: "ok",
        // Why a keyed hash: the log may be read by more people than may enroll machines.
        details: { group: p.group, expires_at: expiresAt.toISOString(), secret: ctx.keyedHash(minted.secret) },
      },
      [putOp(Tables.joinTokens, minted.tokenId, record)],
      [guard.group(p.group, modRevision), guard.joinToken(minted.tokenId, 0n)],
    );
    return { tokenId: minted.tokenId, secret: minted.secret, expiresAt };
  });
}
