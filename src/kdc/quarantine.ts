/**
 * The machines the KDC refuses as quarantined, as the Auditserver reports them on its
 * WatchMachineStatus stream (./machine-status-feed.ts). Kept in memory for the per-call check
 * and in the store (table `quarantine`) so that a restarted KDC refuses them before the
 * Auditserver is reachable again.
 *
 * A release keeps the record (with `released_at`): its `quarantined_at` is the time before
 * which the machine's attestation tokens are refused (./machine-auth.ts). Why: a token lives
 * up to its group's token lifetime, and one the machine got before its quarantine vouches for
 * the machine as it was then; a compromised agent must not reuse it right after a release.
 *
 * Why the order differs: a quarantine takes effect in memory (refusals, QUARANTINED pushed on
 * the machine's streams) before it is written, because refusing is the safe side; a release is
 * written with its audit entry first and takes effect only once that succeeded (fail-closed).
 *
 * KDC replicas each follow the feed; each write is conditional on the stored record as read, so
 * the first replica records a quarantine or a release (with its audit entry) and the others,
 * finding it recorded, only update their memory.
 */
import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { QuarantinedMachineRecordSchema, type QuarantinedMachineRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import type { KdcContext, QuarantineList } from "./context.js";
import { guard, put } from "./kdc-store.js";
import { retryOnConflict } from "../storage/retry.js";
import { KeyedMutex } from "./mutex.js";

/** Longest reason kept (the Auditserver's text is not ours to trust in size). */
const MAX_REASON = 1024;

/** One machine's status as the feed reports it. */
export interface MachineStatusUpdate {
  machineId: string;
  quarantined: boolean;
  reason: string;
  time: Date;
}

/** Told when a machine is quarantined (the watch hub pushes QUARANTINED). */
export interface QuarantineListener {
  quarantined(machineId: string, reason: string): void;
}

/** The quarantine set. */
export class QuarantineRegistry implements QuarantineList {
  private readonly machines = new Map<string, QuarantinedMachineRecord>();
  private readonly lock = new KeyedMutex();
  private listener: QuarantineListener | undefined;

  private constructor(private readonly ctx: Pick<KdcContext, "store" | "audit" | "clock" | "logger">) {}

  /** Loads the persisted set. */
  static async load(ctx: Pick<KdcContext, "store" | "audit" | "clock" | "logger">): Promise<QuarantineRegistry> {
    const r = new QuarantineRegistry(ctx);
    for (const m of await ctx.store.listQuarantined()) r.machines.set(m.machineId, m);
    return r;
  }

  /** Sets who hears of new quarantines. */
  setListener(listener: QuarantineListener): void {
    this.listener = listener;
  }

  /** Why the machine is quarantined, or undefined. */
  reasonFor(machineId: string): string | undefined {
    const m = this.machines.get(machineId);
    return m === undefined || m.releasedAt !== undefined ? undefined : m.reason;
  }

  /** When the machine was last quarantined (the Auditserver's time), also once released; or undefined. */
  lastQuarantinedAt(machineId: string): Date | undefined {
    const at = this.machines.get(machineId)?.quarantinedAt;
    return at === undefined ? undefined : timestampDate(at);
  }

  /** Quarantined machine ids, sorted. */
  list(): string[] {
    return this.quarantinedIds().sort();
  }

  private quarantinedIds(): string[] {
    return [...this.machines.values()].filter((m) => m.releasedAt === undefined).map((m) => m.machineId);
  }

  /** Applies one change from the feed. */
  apply(update: MachineStatusUpdate, actor: string): Promise<void> {
    return this.lock.run("quarantine", () => this.applyLocked(update, actor));
  }

  /**
   * Applies a snapshot (every quarantined machine): quarantines the ones listed, releases the
   * ones no longer listed.
   */
  replaceAll(quarantined: readonly MachineStatusUpdate[], actor: string): Promise<void> {
    return this.lock.run("quarantine", async () => {
      const listed = new Set(quarantined.map((u) => u.machineId));
      for (const u of quarantined) await this.applyLocked({ ...u, quarantined: true }, actor);
      for (const id of this.quarantinedIds()) {
        if (!listed.has(id)) await this.applyLocked({ machineId: id, quarantined: false, reason: "not quarantined in the Auditserver's snapshot", time: this.ctx.clock.now() }, actor);
      }
    });
  }

  private async applyLocked(u: MachineStatusUpdate, actor: string): Promise<void> {
    const current = this.machines.get(u.machineId);
    const reason = (u.reason === "" ? "quarantined by the Auditserver" : u.reason).slice(0, MAX_REASON);
    const active = current !== undefined && current.releasedAt === undefined;
    if (u.quarantined) {
      if (active && current.reason === reason) return;
      // The later of the two: a change replayed out of order must not move the cutoff back.
      const previous = current?.quarantinedAt === undefined ? undefined : timestampDate(current.quarantinedAt);
      const at = previous !== undefined && previous > u.time ? previous : u.time;
      const record = create(QuarantinedMachineRecordSchema, {
        recordVersion: 1,
        machineId: u.machineId,
        reason,
        quarantinedAt: timestampFromDate(at),
        recordedAt: timestampFromDate(this.ctx.clock.now()),
      });
      this.machines.set(u.machineId, record);
      this.listener?.quarantined(u.machineId, reason);
      try {
        await retryOnConflict(async () => {
          const stored = await this.ctx.store.readQuarantined(u.machineId);
          // Recorded already (by another replica): nothing to write.
          if (stored.value !== undefined && stored.value.releasedAt === undefined && stored.value.reason === reason) return;
          await this.ctx.audit.append(
            { actor, action: "machine.quarantine", target: `machine/${u.machineId}`, outcome: "ok", details: { reason, quarantined_at: u.time.toISOString() } },
            [put.quarantined(record)],
            [guard.quarantine(u.machineId, stored.modRevision)],
          );
        });
      } catch (err) {
        // Still refused in memory; the next snapshot of the feed writes it again.
        this.ctx.logger.error("cannot persist a quarantine; refusing the machine in memory only", { machine: u.machineId, err });
      }
      return;
    }
    if (!active) return;
    const released: QuarantinedMachineRecord = { ...current, releasedAt: timestampFromDate(this.ctx.clock.now()) };
    const recorded = await retryOnConflict(async () => {
      const stored = await this.ctx.store.readQuarantined(u.machineId);
      // Released already (by another replica): take its record.
      if (stored.value !== undefined && stored.value.releasedAt !== undefined) return stored.value;
      await this.ctx.audit.append(
        { actor, action: "machine.release", target: `machine/${u.machineId}`, outcome: "ok", details: { reason: u.reason.slice(0, MAX_REASON), was: current.reason } },
        [put.quarantined(released)],
        [guard.quarantine(u.machineId, stored.modRevision)],
      );
      return released;
    });
    this.machines.set(u.machineId, recorded);
  }
}
