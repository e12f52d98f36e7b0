/**
 * The rollout of a tenant (GetRolloutStatus: which version each machine reported holding,
 * against the active one, and whether its watch stream is open here), and its stream
 * (WatchRolloutStatus): the status at once, then each time it changes.
 *
 * The stream re-reads the status every second and sends it only when it differs: the reports
 * and the streams may be on any replica (`connected` is this replica's streams and the other
 * replicas' presence records, ./watch-presence.ts), so a re-read is what sees every change. Each turn also re-checks the caller, so a revoked token or ended session
 * stops the stream.
 */
import { create, equals } from "@bufbuild/protobuf";
import { ResourceExhausted } from "../common/errors.js";
import {
  GetRolloutStatusResponseSchema,
  MachineRolloutSchema,
  WatchRolloutStatusResponseSchema,
  type GetRolloutStatusResponse,
  type WatchRolloutStatusResponse,
} from "../gen/kmi/kdc/v1/kdc_pb.js";
import { sleep } from "../common/backoff.js";
import type { KdcContext } from "./context.js";
import type { KdcOperations } from "./operations.js";
import { RotationPolicies } from "./rotation-policy.js";

/** How often a rollout stream re-reads the status, ms. */
export const ROLLOUT_POLL_MS = 1000;

/** At most this many rollout streams at once per KDC (each re-reads a tenant's rollout every second). */
export const MAX_ROLLOUT_STREAMS = 64;

/** GetRolloutStatus's answer for a tenant. */
export async function rolloutStatus(ctx: KdcContext, ops: KdcOperations, tenantId: string): Promise<GetRolloutStatusResponse> {
  const tenant = await ops.requireTenant(tenantId);
  const [reports, elsewhere] = await Promise.all([ctx.store.listRollout(tenantId), ctx.watches.connectedElsewhere()]);
  const machines = reports.map((m) =>
    create(MachineRolloutSchema, {
      machineId: m.machineId,
      group: m.group,
      heldVersion: m.heldVersion,
      upToDate: tenant.activeVersion !== 0 && m.heldVersion === tenant.activeVersion,
      connected: ctx.watches.isConnected(m.machineId) || elsewhere.has(m.machineId),
      ...(m.lastReport ? { lastReport: m.lastReport } : {}),
    }),
  );
  return create(GetRolloutStatusResponseSchema, {
    activeVersion: tenant.activeVersion,
    machines,
    upToDateCount: machines.filter((m) => m.upToDate).length,
    connectedCount: machines.filter((m) => m.connected).length,
    rotation: await new RotationPolicies(ctx, ops).status(tenantId),
  });
}

/** Counts open rollout streams, refusing past the limit. */
export class RolloutStreams {
  private open = 0;

  constructor(private readonly max = MAX_ROLLOUT_STREAMS) {}

  /** Takes a slot (ResourceExhausted when none is left); call the returned function to give it back. */
  take(): () => void {
    if (this.open >= this.max) throw new ResourceExhausted(`too many rollout streams open (${this.max}); close a portal tab or use GetRolloutStatus`);
    this.open++;
    let given = false;
    return () => {
      if (!given) this.open--;
      given = true;
    };
  }
}

/**
 * The stream: `read()` now, then again every `intervalMs`, sending only what changed; `check()`
 * before each read (it throws to end the stream). Ends without error when `signal` aborts.
 */
export async function* watchRollout(p: {
  read: () => Promise<GetRolloutStatusResponse>;
  check: () => Promise<void>;
  signal: AbortSignal;
  release: () => void;
  intervalMs?: number;
}): AsyncGenerator<WatchRolloutStatusResponse> {
  let last: GetRolloutStatusResponse | undefined;
  try {
    while (!p.signal.aborted) {
      await p.check();
      const status = await p.read();
      if (last === undefined || !equals(GetRolloutStatusResponseSchema, last, status)) {
        last = status;
        yield create(WatchRolloutStatusResponseSchema, { status });
      }
      await sleep(p.intervalMs ?? ROLLOUT_POLL_MS, p.signal);
    }
  } finally {
    p.release();
  }
}
