/**
 * Row 4: rotation propagation. N WatchSecrets sessions (N = 1, 50, 200) are open on the real
 * KDC, each on a mutual-TLS connection of its own, as one enrolled and attested machine; a
 * tenant admin makes a new KMI-signed version and activates it; the time from the moment the
 * ActivateVersion call is sent until each session has received the ACTIVATED event carrying
 * the new version is recorded, per session.
 */
import type { ClientReadableStream } from "@grpc/grpc-js";
import { Role, KdcAdminService } from "../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KeyAlgorithm } from "../../src/gen/kmi/common/v1/common_pb.js";
import { DistributionService, WatchEventType, type WatchSecretsResponse } from "../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { KdcService, Signer } from "../../src/gen/kmi/kdc/v1/kdc_pb.js";
import type { Env } from "../lib/env.js";
import { ROW_TITLES } from "./titles.js";
import type { LeanClient } from "../../src/clients/grpc-client.js";
import { nowMs } from "../lib/loop.js";
import type { Machine, Mesh } from "../lib/mesh.js";
import { RowBuilder, type Figure } from "../lib/results.js";
import { fmt, percentiles } from "../lib/stats.js";
import { isUnimplemented, KDC_TENANT, machineOf, meshOf } from "./kdc.js";

const SESSIONS = [1, 50, 200] as const;

/** One WatchSecrets session of the bench (rows 4 and 8). */
export interface Session {
  client: LeanClient;
  call: ClientReadableStream<WatchSecretsResponse>;
  /** Called with each event. */
  onEvent: ((e: WatchSecretsResponse, at: number) => void) | undefined;
  ended: string | undefined;
}

/**
 * Opens `n` sessions and waits for each one's SNAPSHOT. Session `i` goes to KDC replica
 * `i % replicas` (default 1 replica); with `wave`, at most that many are opened before their
 * snapshots arrive (thousands at once would overflow the servers' listen backlogs).
 */
export async function openSessions(mesh: Mesh, m: Machine, n: number, opts: { replicas?: number; wave?: number; waveTimeoutMs?: number; log?: (line: string) => void } = {}): Promise<Session[]> {
  const all: Session[] = [];
  const wave = opts.wave ?? n;
  try {
    for (let from = 0; from < n; from += wave) {
      if (from > 0) opts.log?.(`${from} of ${n} sessions open`);
      all.push(...(await openWave(mesh, m, from, Math.min(n, from + wave), opts.replicas ?? 1, opts.waveTimeoutMs ?? 30_000)));
    }
  } catch (err) {
    closeSessions(all);
    throw err;
  }
  return all;
}

async function openWave(mesh: Mesh, m: Machine, from: number, to: number, replicas: number, timeoutMs: number): Promise<Session[]> {
  const n = to - from;
  const sessions: Session[] = [];
  const snapshots: Promise<void>[] = [];
  for (let i = from; i < to; i++) {
    const client = mesh.machineKdcClient(m, true, i % replicas);
    let resolveSnap!: () => void;
    let rejectSnap!: (e: Error) => void;
    snapshots.push(
      new Promise<void>((res, rej) => {
        resolveSnap = res;
        rejectSnap = rej;
      }),
    );
    const s: Session = { client, call: undefined as never, onEvent: undefined, ended: undefined };
    s.call = client.serverStream(
      DistributionService.method.watchSecrets,
      { attestationToken: m.token },
      (e) => {
        const at = nowMs();
        if (e.type === WatchEventType.SNAPSHOT) resolveSnap();
        s.onEvent?.(e, at);
      },
      (err) => {
        s.ended = err === undefined ? "ended" : err.message;
        rejectSnap(err ?? new Error("stream ended before its snapshot"));
      },
    );
    sessions.push(s);
  }
  const timeout = new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`not every one of ${n} sessions got its snapshot within ${timeoutMs / 1000} s`)), timeoutMs).unref());
  await Promise.race([Promise.all(snapshots), timeout]);
  return sessions;
}

/** Cancels every session and closes its connection. */
export function closeSessions(sessions: Session[]): void {
  for (const s of sessions) {
    s.onEvent = undefined;
    s.call.cancel();
    s.client.close();
  }
}

/** Per rotation: p50, p99 and max (ms) over the sessions, and the ActivateVersion call's own time. */
export interface RotationSample {
  p50: number;
  p99: number;
  max: number;
  activateMs: number;
}

/**
 * One rotation made through `admin`: a new version (not timed), then ActivateVersion timed until
 * every session holds it; throws, naming `label`, when some session has not after `waitMs`.
 */
export async function rotateOnce(admin: LeanClient, sessions: Session[], label: string, waitMs = 60_000): Promise<RotationSample> {
  const v = (await admin.unary(KdcService.method.createVersion, { tenantId: KDC_TENANT, signer: Signer.KMI_ROOT, keyAlgorithm: KeyAlgorithm.ECDSA_P256, subject: { commonName: `acme ${label}` }, validityDays: 365 })).version!;
  const n = sessions.length;
  const lat = new Float64Array(n).fill(NaN);
  let got = 0;
  let allDone!: () => void;
  const done = new Promise<void>((res) => (allDone = res));
  const t0 = nowMs();
  sessions.forEach((s, i) => {
    s.onEvent = (e, at) => {
      if (!Number.isNaN(lat[i]!) || e.type !== WatchEventType.ACTIVATED || e.tenantId !== KDC_TENANT) return;
      if (e.keyId !== v.keyId && !e.secrets.some((x) => x.keyId === v.keyId)) return;
      lat[i] = at - t0;
      if (++got === n) allDone();
    };
  });
  await admin.unary(KdcService.method.activateVersion, { tenantId: KDC_TENANT, version: v.version });
  const activateMs = nowMs() - t0;
  await Promise.race([done, new Promise((res) => setTimeout(res, waitMs).unref())]);
  for (const s of sessions) s.onEvent = undefined;
  if (got < n) {
    const ended = sessions.filter((s) => s.ended !== undefined).map((s) => s.ended);
    throw new Error(`${label}: ${n - got} of ${n} sessions had not received the new version after ${waitMs / 1000} s${ended.length > 0 ? ` (${ended.length} streams ended: ${ended[0]})` : ""}`);
  }
  const [p50, p99, max] = percentiles(lat, [0.5, 0.99, 1]);
  return { p50: p50!, p99: p99!, max: max!, activateMs };
}

/** Runs row 4. */
export async function runRotation(env: Env): Promise<RowBuilder> {
  const row = new RowBuilder(
    "4",
    ROW_TITLES["4"]!,
    "The real KDC and Auditserver as processes (see row 5). One machine is enrolled with a join token and attested; N = 1, 50 and 200 DistributionService.WatchSecrets sessions are opened with its certificate and token, each on a mutual-TLS connection of its own, from the bench process. For each rotation a tenant admin creates a KMI-signed version (not timed), then the clock starts as the ActivateVersion call is sent; each session's time is when its ACTIVATED event naming the new key arrives (as received by the client, before any unwrapping). Per rotation: p50, p99 and max over the N sessions; figures are the medians over the rotations.",
  );
  const b = env.budget;
  const mesh = await meshOf(env);
  const m = await machineOf(env, mesh);
  await mesh.attest(m);
  const op = mesh.kdcClient();
  let admin: LeanClient | undefined;
  try {
    // Is WatchSecrets served by this build?
    try {
      const probe = await openSessions(mesh, m, 1);
      closeSessions(probe);
    } catch (err) {
      if (isUnimplemented(err)) throw new Error("the KDC's DistributionService.WatchSecrets answers UNIMPLEMENTED in this build", { cause: err });
      throw err;
    }
    const tok = await op.unary(KdcAdminService.method.createToken, { role: Role.TENANT_ADMIN, tenantId: KDC_TENANT, description: "bench rotation", ttlSeconds: 3600n });
    admin = mesh.kdcClient(tok.secret);
    const rotations = b.repeats === 1 ? 2 : 5;
    const figures: Record<number, Figure> = {};
    for (const n of SESSIONS) {
      env.log(`rotation: opening ${n} watch sessions`);
      const sessions = await openSessions(mesh, m, n);
      const p50: number[] = [];
      const p99: number[] = [];
      const max: number[] = [];
      const activateMs: number[] = [];
      try {
        for (let r = 0; r < rotations; r++) {
          const s = await rotateOnce(admin, sessions, `N=${n}, rotation ${r + 1}`, 10_000);
          p50.push(s.p50);
          p99.push(s.p99);
          max.push(s.max);
          activateMs.push(s.activateMs);
        }
      } finally {
        closeSessions(sessions);
      }
      const f = row.figure(`rotation.n${n}`, `N=${n} watch sessions: until the last one holds the new version (max)`, "ms", max, { p50, p99 }, n === 1);
      figures[n] = f;
      row.note(`N=${n}: the ActivateVersion call itself returned after ${fmt(percentiles(activateMs, [0.5])[0]!)} ms (median over ${rotations} rotations).`);
    }
    for (const n of SESSIONS) if (n !== 1) row.ratio(figures[n]!, figures[1]!, "of N=1");
    const f200 = figures[200]!;
    row.target(f200, "< 1 s p99 at N=200", f200.p99!.median < 1000);
  } finally {
    op.close();
    admin?.close();
  }
  return row;
}
