/**
 * The KDC's rotation scheduler: a singleton job. Every KDC replica campaigns in the election
 * "scheduler" (src/storage/election.ts); the one that leads runs the job every interval, and
 * every write of a run carries the election's fence, so a replica that lost the election
 * without knowing it (paused past its lease) is refused at its first write and steps down.
 *
 * A run, in stages:
 * 1. `recordRun`: the run is recorded (`scheduler_runs/rotation`), fenced: a stale leader stops here.
 * 2. For each tenant with a policy (`rotation_policies`), one of:
 *    - `advanceStaged`: a version staged earlier is activated once every machine that reports
 *      for the tenant holds it (MachineRolloutRecord.newest_held_version), or at the latest
 *      `activation_timeout_hours` after it was staged (counted and logged: the fleet did not
 *      follow); a staged version activated or revoked by hand meanwhile ends the stage.
 *    - `stage`: a KMI-signed active version whose `next_rotation_at` has come gets a successor:
 *      a new key and KMI-signed certificate (same algorithm, subject and lifetime), READY, not
 *      active, recorded as the policy's `staged_version`, and sent to the agents (STAGED).
 *    - `csrIfDue`: a private-CA active version within `csr_before_expiry_days` of its end gets
 *      a new CSR (a PENDING version) once; the tenant's admins see it in the audit log (actor
 *      system:scheduler, detail scheduled=csr-due), the metric and `kmi ctl ca status`.
 *    Each change is one batch with its audit entry, conditional on the tenant record, the
 *    policy record and the fence.
 *
 * Time comes from the context's clock, so tests move it instead of waiting days; the interval
 * is `kmi kdc --scheduler-interval` (values under a second are for tests).
 */
import { clone, create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { sleep } from "../common/backoff.js";
import { FailedPrecondition, errorText } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import type { MetricsRegistry } from "../common/metrics.js";
import { Signer, VersionState } from "../gen/kmi/kdc/v1/kdc_pb.js";
import { RotationPolicyRecordSchema, SchedulerRunRecordSchema, type IntermediateVersionRecord, type RotationPolicyRecord, type TenantRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { isFencedConflict, notFenced, type Election, type Leadership } from "../storage/election.js";
import { retryOnConflict } from "../storage/retry.js";
import type { KdcContext } from "./context.js";
import { guard, put } from "./kdc-store.js";
import type { JointChange, KdcOperations, VersionChange } from "./operations.js";
import { plusDays } from "./rotation-policy.js";
import type { SubjectInput } from "./validate.js";

/** The audit actor of the scheduler's changes. */
export const SCHEDULER_ACTOR = "system:scheduler";
/** The job name in `scheduler_runs`. */
const JOB = "rotation";
/** Default interval between runs, ms. */
export const DEFAULT_SCHEDULER_INTERVAL_MS = 60_000;

/** Options of `RotationScheduler`. */
export interface SchedulerOptions {
  /** The election this replica campaigns in. */
  election: Election;
  /** Time between runs while leading, ms. */
  intervalMs: number;
  logger: Logger;
  /** Where its metrics go (none in in-process tests). */
  metrics?: MetricsRegistry;
}

/** What a run did, for tests and logs. */
export interface RunReport {
  staged: string[];
  activated: string[];
  csrs: string[];
  errors: number;
}

/** The rotation scheduler of one replica: `start`, then `stop` on shutdown. */
export class RotationScheduler {
  readonly #stop = new AbortController();
  #loop: Promise<void> | undefined;
  #leading: Leadership | undefined;
  readonly #fenced;
  readonly #steps;
  readonly #errors;

  constructor(
    private readonly ctx: KdcContext,
    private readonly ops: KdcOperations,
    private readonly o: SchedulerOptions,
  ) {
    const m = o.metrics;
    this.#fenced = m?.counter("kmi_kdc_fenced_writes_total", "Writes of a singleton job refused by its election fence: this replica had lost the election without knowing it.", ["job"]);
    this.#steps = m?.counter("kmi_kdc_scheduled_rotations_total", "Steps of scheduled rotations: stage, activate, activate-timeout (activated without the whole fleet), csr-due.", ["step"]);
    this.#errors = m?.counter("kmi_kdc_scheduler_errors_total", "Scheduler runs or tenants that failed (see the log); retried next run.", []);
    m?.gauge("kmi_kdc_scheduler_leader", "1 while this replica leads the scheduler election.", [], (g) => g.set(this.#leading === undefined ? 0 : 1));
  }

  /** True while this replica believes it leads (the fence has the last word). */
  get leading(): boolean {
    return this.#leading !== undefined && !this.#leading.lost.aborted;
  }

  /** Starts campaigning and, once leading, running. */
  start(): void {
    this.#loop ??= this.#campaignLoop();
  }

  /** Stops running and gives up the election. */
  async stop(): Promise<void> {
    this.#stop.abort(new Error("scheduler stopped"));
    await this.#loop;
  }

  async #campaignLoop(): Promise<void> {
    const stop = this.#stop.signal;
    while (!stop.aborted) {
      let leadership: Leadership;
      try {
        leadership = await this.o.election.campaign(stop);
      } catch (err) {
        if (!stop.aborted) this.o.logger.error("scheduler: campaign failed", { error: errorText(err) });
        await sleep(1000, stop);
        continue;
      }
      this.#leading = leadership;
      this.o.logger.info("scheduler: leading", { election: leadership.name, holder: leadership.holder, fence_revision: String(leadership.fence.modRevision) });
      try {
        await this.#lead(leadership);
      } finally {
        this.#leading = undefined;
        await leadership.step(stop.aborted ? "stopping" : "lost");
      }
    }
  }

  /** Runs every interval until leadership is lost. The sleep is cut short by a loss; a run never is. */
  async #lead(l: Leadership): Promise<void> {
    const stop = this.#stop.signal;
    while (!stop.aborted && !l.lost.aborted) {
      try {
        await this.runOnce(l);
      } catch (err) {
        if (isFencedConflict(err)) await this.#fencedOut(l, err);
        else {
          this.#errors?.inc();
          this.o.logger.error("scheduler: run failed; retrying next run", { error: errorText(err) });
        }
      }
      await sleep(this.o.intervalMs, AbortSignal.any([stop, l.lost]));
    }
  }

  /** A write was refused by the fence: count it, log it, audit it (unfenced: any replica may append), step down. */
  async #fencedOut(l: Leadership, err: unknown): Promise<void> {
    this.#fenced?.inc({ job: JOB });
    this.o.logger.warn("scheduler: write refused by the election fence; this replica no longer leads and steps down", {
      election: l.name,
      holder: l.holder,
      fence_revision: String(l.fence.modRevision),
      error: errorText(err),
    });
    try {
      await this.ctx.audit.append({
        actor: SCHEDULER_ACTOR,
        action: "scheduler.fenced",
        target: `kdc/scheduler/${JOB}`,
        outcome: "refused",
        details: { holder: l.holder, fence_revision: String(l.fence.modRevision) },
      });
    } catch (e) {
      this.o.logger.warn("scheduler: could not audit the fenced write", { error: errorText(e) });
    }
    await l.step("a write was refused by the election fence");
  }

  /** One run under `l` (exported for tests); a fenced refusal is thrown, other failures are per tenant. */
  async runOnce(l: Leadership): Promise<RunReport> {
    await this.#recordRun(l);
    const report: RunReport = { staged: [], activated: [], csrs: [], errors: 0 };
    for (const policy of await this.ctx.store.listRotationPolicies()) {
      try {
        await this.#tenantRun(l, policy, report);
      } catch (err) {
        if (isFencedConflict(err)) throw err;
        report.errors++;
        this.#errors?.inc();
        this.o.logger.error("scheduler: tenant run failed; retrying next run", { tenant: policy.tenantId, error: errorText(err) });
      }
    }
    return report;
  }

  async #recordRun(l: Leadership): Promise<void> {
    await retryOnConflict(
      async () => {
        const read = await this.ctx.store.readSchedulerRun(JOB);
        const run = create(SchedulerRunRecordSchema, { recordVersion: 1, job: JOB, holder: l.holder, ranAt: timestampFromDate(this.ctx.clock.now()), runs: (read.value?.runs ?? 0n) + 1n });
        await this.ctx.store.store.commit({ compares: [guard.schedulerRun(JOB, read.modRevision), l.fence], ops: [put.schedulerRun(run)] });
      },
      { retryIf: notFenced },
    );
  }

  async #tenantRun(l: Leadership, policy: RotationPolicyRecord, report: RunReport): Promise<void> {
    const tenant = await this.ctx.store.getTenant(policy.tenantId);
    if (tenant === undefined) return;
    const active = tenant.activeVersion === 0 ? undefined : await this.ctx.store.getVersion(tenant.tenantId, tenant.activeVersion);
    const now = this.ctx.clock.now();
    if (policy.stagedVersion !== 0) return this.#advanceStaged(l, policy, now, report);
    if (active === undefined) return;
    if (active.signer === Signer.KMI_ROOT && policy.rotateEveryDays > 0 && policy.nextRotationAt !== undefined && timestampDate(policy.nextRotationAt) <= now) {
      return this.#stage(l, tenant, active, report);
    }
    if (active.signer === Signer.PRIVATE_CA && policy.csrBeforeExpiryDays > 0) return this.#csrIfDue(l, policy, active, now, report);
  }

  /**
   * The policy record updated by `change`, with the compares that fence it: read fresh on each
   * attempt; `still` re-checks on that read the condition the decision was made on.
   */
  #policyJoint(l: Leadership, tenantId: string, still: (p: RotationPolicyRecord) => boolean, change: (p: RotationPolicyRecord, made: VersionChange) => void, details: Record<string, string>): JointChange {
    return async (made) => {
      const read = await this.ctx.store.readRotationPolicy(tenantId);
      if (read.value === undefined || !still(read.value)) throw new FailedPrecondition(`tenant "${tenantId}": the rotation policy changed meanwhile; the next run decides again`);
      const next = clone(RotationPolicyRecordSchema, read.value);
      change(next, made);
      return { ops: [put.rotationPolicy(next)], compares: [guard.rotationPolicy(tenantId, read.modRevision), l.fence], details: { ...details, scheduled_by: l.holder } };
    };
  }

  async #stage(l: Leadership, tenant: TenantRecord, active: IntermediateVersionRecord, report: RunReport): Promise<void> {
    const validity = this.ops.validityOf(active);
    const lifetimeDays = validity === undefined ? 365 : Math.round((validity.notAfter.getTime() - validity.notBefore.getTime()) / (24 * 3600 * 1000));
    const now = this.ctx.clock.now();
    const { version } = await this.ops.createVersion(
      SCHEDULER_ACTOR,
      { tenantId: tenant.tenantId, signer: Signer.KMI_ROOT, keyAlgorithm: active.keyAlgorithm, subject: successorSubject(active), validityDays: Math.min(1825, Math.max(1, lifetimeDays)), activate: false },
      this.#policyJoint(
        l,
        tenant.tenantId,
        (p) => p.stagedVersion === 0 && p.rotateEveryDays > 0,
        (p, made) => {
          p.stagedAt = timestampFromDate(now);
          p.stagedVersion = made.version.version;
        },
        { scheduled: "stage", replaces_version: String(active.version) },
      ),
    );
    this.#steps?.inc({ step: "stage" });
    // Agents hear of it once it is committed; the other replicas' followers announce it to theirs.
    this.ctx.events.staged(tenant.tenantId, version.version);
    report.staged.push(`${tenant.tenantId}/v${version.version}`);
    this.o.logger.info("scheduler: staged a new version; it is activated once the fleet holds it", { tenant: tenant.tenantId, version: version.version });
  }

  async #advanceStaged(l: Leadership, policy: RotationPolicyRecord, now: Date, report: RunReport): Promise<void> {
    const tenantId = policy.tenantId;
    const staged = await this.ctx.store.getVersion(tenantId, policy.stagedVersion);
    if (staged === undefined || staged.state !== VersionState.READY) return this.#endStage(l, policy, staged, now);
    const rollout = await this.ctx.store.listRollout(tenantId);
    const held = rollout.filter((m) => m.newestHeldVersion >= staged.version).length;
    const stagedAt = policy.stagedAt === undefined ? now : timestampDate(policy.stagedAt);
    const timedOut = now.getTime() >= stagedAt.getTime() + policy.activationTimeoutHours * 3600_000;
    if (held < rollout.length && !timedOut) return;
    const step = held < rollout.length ? "activate-timeout" : "activate";
    await this.ops.activateVersion(
      SCHEDULER_ACTOR,
      { tenantId, version: staged.version },
      this.#policyJoint(
        l,
        tenantId,
        (p) => p.stagedVersion === staged.version,
        (p) => {
          p.stagedVersion = 0;
          p.stagedAt = undefined;
          p.lastRotationAt = timestampFromDate(now);
          p.nextRotationAt = p.rotateEveryDays > 0 ? timestampFromDate(plusDays(now, p.rotateEveryDays)) : undefined;
        },
        { scheduled: step, fleet_held: `${held}/${rollout.length}` },
      ),
    );
    this.#steps?.inc({ step });
    report.activated.push(`${tenantId}/v${staged.version}`);
    const fields = { tenant: tenantId, version: staged.version, fleet_held: `${held}/${rollout.length}` };
    if (step === "activate") this.o.logger.info("scheduler: activated the staged version; the fleet holds it", fields);
    else this.o.logger.warn("scheduler: activated the staged version after the activation timeout; not every machine held it", { ...fields, timeout_hours: policy.activationTimeoutHours });
  }

  /** The staged version was activated, revoked or lost by other hands: the stage ends (audited), and a rotation by hand counts as the rotation. */
  async #endStage(l: Leadership, policy: RotationPolicyRecord, staged: IntermediateVersionRecord | undefined, now: Date): Promise<void> {
    const byHand = staged?.state === VersionState.ACTIVE;
    await retryOnConflict(
      async () => {
        const read = await this.ctx.store.readRotationPolicy(policy.tenantId);
        if (read.value === undefined || read.value.stagedVersion !== policy.stagedVersion) return;
        const next = clone(RotationPolicyRecordSchema, read.value);
        next.stagedVersion = 0;
        next.stagedAt = undefined;
        if (byHand) {
          next.lastRotationAt = timestampFromDate(now);
          if (next.rotateEveryDays > 0) next.nextRotationAt = timestampFromDate(plusDays(now, next.rotateEveryDays));
        }
        await this.ctx.audit.append(
          { actor: SCHEDULER_ACTOR, action: "ca.rotation.unstage", target: `tenant/${policy.tenantId}/version/${policy.stagedVersion}`, outcome: "ok", details: { state: staged === undefined ? "missing" : VersionState[staged.state].toLowerCase() } },
          [put.rotationPolicy(next)],
          [guard.rotationPolicy(policy.tenantId, read.modRevision), l.fence],
        );
      },
      { retryIf: notFenced },
    );
  }

  async #csrIfDue(l: Leadership, policy: RotationPolicyRecord, active: IntermediateVersionRecord, now: Date, report: RunReport): Promise<void> {
    const notAfter = this.ops.validityOf(active)?.notAfter;
    if (notAfter === undefined || now < plusDays(notAfter, -policy.csrBeforeExpiryDays)) return;
    if (policy.csrVersion > active.version) {
      const made = await this.ctx.store.getVersion(policy.tenantId, policy.csrVersion);
      // Made already: waiting for its upload (PENDING) or its activation (READY).
      if (made !== undefined && (made.state === VersionState.PENDING || made.state === VersionState.READY)) return;
    }
    const { version } = await this.ops.createVersion(
      SCHEDULER_ACTOR,
      { tenantId: policy.tenantId, signer: Signer.PRIVATE_CA, keyAlgorithm: active.keyAlgorithm, subject: successorSubject(active), validityDays: 365, activate: false },
      this.#policyJoint(
        l,
        policy.tenantId,
        (p) => p.csrVersion === policy.csrVersion && p.csrBeforeExpiryDays > 0,
        (p, made) => {
          p.csrVersion = made.version.version;
        },
        { scheduled: "csr-due", active_version: String(active.version), active_not_after: notAfter.toISOString() },
      ),
    );
    this.#steps?.inc({ step: "csr-due" });
    report.csrs.push(`${policy.tenantId}/v${version.version}`);
    this.o.logger.warn("scheduler: the private-CA intermediate nears its end; made a CSR for the tenant's admins to have signed", {
      tenant: policy.tenantId,
      version: version.version,
      active_version: active.version,
      active_not_after: notAfter.toISOString(),
    });
  }
}

/** The successor's subject: the active version's, with the common name left to the default ("<tenant> MITM CA <version>"). */
function successorSubject(active: IntermediateVersionRecord): SubjectInput {
  const s = active.subject;
  return { commonName: "", organization: s?.organization ?? "", organizationalUnit: s?.organizationalUnit ?? "", country: s?.country ?? "" };
}
