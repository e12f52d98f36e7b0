/**
 * A tenant's rotation policy (GetRotationPolicy, SetRotationPolicy, the `rotation` part of
 * GetRolloutStatus): how often a KMI-signed intermediate rotates by itself, how long before a
 * private-CA intermediate's end a CSR is made, and how long a staged version waits for the
 * fleet. The rotation scheduler (./scheduler.ts) acts on it; this file only reads and sets it.
 */
import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { InvalidArgument } from "../common/errors.js";
import { RotationPolicySchema, RotationStatusSchema, type RotationStatus } from "../gen/kmi/kdc/v1/kdc_pb.js";
import { RotationPolicyRecordSchema, type IntermediateVersionRecord, type RotationPolicyRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { retryOnConflict } from "../storage/retry.js";
import type { KdcContext } from "./context.js";
import { guard, put } from "./kdc-store.js";
import type { KdcOperations } from "./operations.js";
import type { SetRotationPolicyInput } from "./validate.js";

/** One day, ms. */
export const DAY_MS = 24 * 3600 * 1000;

/** `from` plus `days` days. */
export function plusDays(from: Date, days: number): Date {
  return new Date(from.getTime() + days * DAY_MS);
}

/**
 * When the next KMI-signed rotation is due for a policy set now: the time asked for (not later
 * than one period from now; a past time means now), or the active version's activation (now
 * without one) plus the period.
 */
export function firstRotationAt(input: SetRotationPolicyInput, active: IntermediateVersionRecord | undefined, now: Date): Date | undefined {
  if (input.rotateEveryDays === 0) return undefined;
  const latest = plusDays(now, input.rotateEveryDays);
  if (input.nextRotationAt !== undefined) {
    if (input.nextRotationAt > latest) {
      throw new InvalidArgument(`next_rotation_at: ${input.nextRotationAt.toISOString()} is more than ${input.rotateEveryDays} days (policy.rotate_every_days) from now; give an earlier time`);
    }
    return input.nextRotationAt < now ? now : input.nextRotationAt;
  }
  const base = active?.activatedAt !== undefined ? timestampDate(active.activatedAt) : now;
  return plusDays(base, input.rotateEveryDays);
}

/** Reads and sets rotation policies over the KDC's context. */
export class RotationPolicies {
  constructor(
    private readonly ctx: KdcContext,
    private readonly ops: KdcOperations,
  ) {}

  /** The tenant's policy and the scheduler's progress (all 0 without a policy). */
  async status(tenantId: string): Promise<RotationStatus> {
    const tenant = await this.ops.requireTenant(tenantId);
    const record = (await this.ctx.store.readRotationPolicy(tenantId)).value;
    const active = tenant.activeVersion === 0 ? undefined : await this.ctx.store.getVersion(tenantId, tenant.activeVersion);
    const notAfter = active === undefined ? undefined : this.ops.validityOf(active)?.notAfter;
    const status = create(RotationStatusSchema, { policy: create(RotationPolicySchema, {}) });
    if (notAfter !== undefined) status.activeNotAfter = timestampFromDate(notAfter);
    if (record === undefined) return status;
    status.policy = create(RotationPolicySchema, {
      rotateEveryDays: record.rotateEveryDays,
      csrBeforeExpiryDays: record.csrBeforeExpiryDays,
      activationTimeoutHours: record.activationTimeoutHours,
    });
    if (record.nextRotationAt !== undefined) status.nextRotationAt = record.nextRotationAt;
    if (record.lastRotationAt !== undefined) status.lastRotationAt = record.lastRotationAt;
    if (record.stagedVersion !== 0) {
      status.stagedVersion = record.stagedVersion;
      if (record.stagedAt !== undefined) status.stagedAt = record.stagedAt;
      status.stagedHeldCount = (await this.ctx.store.listRollout(tenantId)).filter((m) => m.newestHeldVersion >= record.stagedVersion).length;
    }
    status.csrDueVersion = await this.csrDue(record);
    return status;
  }

  /** The scheduler's CSR version while it still waits for its signed certificate (PENDING); else 0. */
  private async csrDue(record: RotationPolicyRecord): Promise<number> {
    if (record.csrVersion === 0) return 0;
    const v = await this.ctx.store.getVersion(record.tenantId, record.csrVersion);
    return v !== undefined && v.certificateDer.length === 0 && v.privateKey !== undefined ? v.version : 0;
  }

  /**
   * SetRotationPolicy: the policy fields replaced, the scheduler's progress (a staged version,
   * a due CSR) kept, the next rotation recomputed; audited "ca.policy.set" in the same batch.
   */
  async set(actor: string, input: SetRotationPolicyInput): Promise<RotationStatus> {
    await retryOnConflict(async () => {
      const tenant = await this.ops.requireTenant(input.tenantId);
      const read = await this.ctx.store.readRotationPolicy(input.tenantId);
      const active = tenant.activeVersion === 0 ? undefined : await this.ctx.store.getVersion(input.tenantId, tenant.activeVersion);
      const now = this.ctx.clock.now();
      const next = firstRotationAt(input, active, now);
      const record = create(RotationPolicyRecordSchema, {
        ...(read.value ?? { recordVersion: 1, tenantId: input.tenantId }),
        rotateEveryDays: input.rotateEveryDays,
        csrBeforeExpiryDays: input.csrBeforeExpiryDays,
        activationTimeoutHours: input.activationTimeoutHours,
        nextRotationAt: next === undefined ? undefined : timestampFromDate(next),
        updatedBy: actor,
        updatedAt: timestampFromDate(now),
      });
      await this.ctx.audit.append(
        {
          actor,
          action: "ca.policy.set",
          target: `tenant/${input.tenantId}`,
          outcome: "ok",
          details: {
            rotate_every_days: String(input.rotateEveryDays),
            csr_before_expiry_days: String(input.csrBeforeExpiryDays),
            activation_timeout_hours: String(input.activationTimeoutHours),
            next_rotation_at: next?.toISOString() ?? "",
          },
        },
        [put.rotationPolicy(record)],
        [guard.rotationPolicy(input.tenantId, read.modRevision)],
      );
    });
    return this.status(input.tenantId);
  }
}
