/**
 * The watch hub: every open WatchSecrets stream, and the fan-out of committed changes to them.
 *
 * Each stream gets, in order:
 *   SNAPSHOT     first: every secret the machine may hold, wrapped to its certificate's key,
 *                with the store revision read before the secrets (everything committed up to
 *                it is in the snapshot)
 *   RESUMED      first instead of SNAPSHOT when the agent asks to resume from a revision R
 *                and the store still keeps the history after R: the tenants served now, and
 *                the current set of each whose records changed after R (none: nothing sent)
 *   ACTIVATED    a tenant's active intermediate changed: the tenant's whole new set (active
 *                intermediate + non-revoked signing keys), wrapped per machine
 *   REVOKED      an intermediate version or a signing key was revoked: `key_id`
 *   KEY_ADDED    a signing key was made: that key, wrapped per machine
 *   QUARANTINED  the machine was quarantined; the stream then ends with PERMISSION_DENIED
 *   HEARTBEAT    every `heartbeatMs` (15 s) while nothing else is queued
 * and ends with OK when the attestation token expires (the agent re-attests and reopens) or the
 * KDC shuts down.
 *
 * Why a queue per stream: a fan-out wraps the key once per machine (ECDH + HKDF + AES-GCM,
 * ~0.2 ms) and appends the event to each stream's queue without waiting for any client, so one
 * slow consumer delays only itself. A queue longer than `maxQueue` ends its stream with
 * RESOURCE_EXHAUSTED (the agent reconnects and gets a fresh SNAPSHOT) instead of growing.
 * Every release is in the audit log before it is queued (fail-closed: no entry, no send).
 *
 * Why resuming is safe: the stream is registered before the revision N is read, so every
 * change committed after N is announced to it as an event; every change up to R is in what the
 * agent holds; a change between R and N moved its tenant's records past R, so the tenant is in
 * RESUMED with its current set (read after N). A revision the store no longer keeps the history
 * of (compacted), newer than the store, or 0 gets a SNAPSHOT.
 * Changes of one tenant are fanned out one after the other, each reading the state after its
 * commit, so the last event a stream gets for a tenant is the tenant's current set.
 */
import { performance } from "node:perf_hooks";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { PermissionDenied, ResourceExhausted, Unavailable } from "../common/errors.js";
import { KeyPurpose } from "../gen/kmi/common/v1/common_pb.js";
import { WatchEventType, WatchSecretsResponseSchema, type WatchSecretsResponse } from "../gen/kmi/kdc/v1/distribution_pb.js";
import type { AttestedMachine } from "./authz.js";
import type { KdcContext, SecretEvents, WatchStreams } from "./context.js";
import { KeyedMutex } from "./mutex.js";
import { recipientOf, SecretRelease, wipe, type Recipient, type SecretMaterial } from "./release.js";
import { SOLE_REPLICA, type WatchPresence } from "./watch-presence.js";

/** Refuses a machine quarantined since its call was authorized (a quarantine may arrive while secrets are read). */
export function requireNotQuarantined(quarantine: Pick<KdcContext["quarantine"], "reasonFor">, machineId: string): void {
  const reason = quarantine.reasonFor(machineId);
  if (reason !== undefined) throw new PermissionDenied(`machine ${machineId} is quarantined (${reason}); it gets no secrets until an operator releases it`);
}

/** The proto's keep-alive period. */
export const DEFAULT_HEARTBEAT_MS = 15_000;
/** Events queued for one stream before it is cut off. */
export const DEFAULT_MAX_QUEUE = 1024;
/** Watch streams one replica holds before it sheds new ones (~150 KB each). */
export const DEFAULT_MAX_STREAMS = 20_000;
/**
 * Stream opens and fetches (attestation check, read, audit entry, wrap) in progress at once
 * before new ones are shed: about the listen backlog (511). Each costs ~8-10 ms of CPU and an
 * audit append; more at once only queue CPU work and audit-head conflicts.
 */
export const DEFAULT_MAX_OPENING = 512;
/** The wait a replica asks for when it sheds an open (it frees up fast): ms, before the client's jitter. */
const OPENING_RETRY_MS = 1_000;
/** The wait it asks for when it holds as many streams as it may (another replica should take the agent). */
const STREAMS_RETRY_MS = 10_000;
/** Recipients wrapped per turn of the event loop during a fan-out (streams start sending meanwhile). */
const WRAP_BATCH = 32;

/** Options of the hub. */
export interface WatchHubOptions {
  /** Keep-alive period, ms (default 15 000). */
  heartbeatMs?: number;
  /** Longest queue of one stream (default 1024). */
  maxQueue?: number;
  /** Open streams before new ones are shed with UNAVAILABLE (default 20 000). */
  maxStreams?: number;
  /** Opens and fetches in progress at once before new ones are shed with UNAVAILABLE (default 64). */
  maxOpening?: number;
  /** Where the machines with a stream open here are told to the other replicas (default: none, one KDC). */
  presence?: WatchPresence;
}

interface Watcher {
  readonly id: number;
  readonly machineId: string;
  readonly recipient: Recipient;
  /** Tenants of the token's `ten` claim: `["*"]` means every tenant, `[]` none. */
  readonly tenantIds: readonly string[];
  readonly queue: WatchSecretsResponse[];
  /** Set once the stream is to end: OK (no error) or with `error`, after the queue drains. */
  ending: { error?: Error } | undefined;
  wake: (() => void) | undefined;
  started: boolean;
  registered: boolean;
  timers: NodeJS.Timeout[];
  onAbort: (() => void) | undefined;
  signal: AbortSignal;
}

/** The fan-out of secret changes to open WatchSecrets streams. */
export class WatchHub implements SecretEvents, WatchStreams {
  private readonly watchers = new Set<Watcher>();
  private readonly perMachine = new Map<string, number>();
  private readonly serial = new KeyedMutex();
  private readonly heartbeatMs: number;
  private readonly maxQueue: number;
  private readonly maxStreams: number;
  private readonly maxOpening: number;
  private opening = 0;
  private nextId = 1;
  private pending = new Set<Promise<void>>();
  private readonly presence: WatchPresence;

  constructor(
    private readonly ctx: Pick<KdcContext, "clock" | "logger" | "quarantine" | "store">,
    private readonly release: SecretRelease,
    options: WatchHubOptions = {},
  ) {
    this.heartbeatMs = options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
    this.maxQueue = options.maxQueue ?? DEFAULT_MAX_QUEUE;
    this.maxStreams = options.maxStreams ?? DEFAULT_MAX_STREAMS;
    this.maxOpening = options.maxOpening ?? DEFAULT_MAX_OPENING;
    this.presence = options.presence ?? SOLE_REPLICA;
  }

  // ---- presence ----

  /** True while the machine has a stream open. */
  isConnected(machineId: string): boolean {
    return (this.perMachine.get(machineId) ?? 0) > 0;
  }

  /** Machines with a stream open on another replica now (./watch-presence.ts). */
  connectedElsewhere(): Promise<ReadonlySet<string>> {
    return this.presence.elsewhere();
  }

  /** Takes this replica's presence records away (at shutdown, once the streams have ended). */
  releasePresence(): Promise<void> {
    return this.presence.close();
  }

  /** Machines with a stream open now. */
  get connectedCount(): number {
    return this.perMachine.size;
  }

  /** Open streams (several per machine are possible). */
  get streamCount(): number {
    return this.watchers.size;
  }

  /** Streams opened since start, by how they started. */
  readonly opened = { snapshot: 0, resumed: 0 };
  /** Opens and fetches shed since start, by the limit that was reached. */
  readonly shed = { streams: 0, opening: 0 };

  /**
   * Admission of a stream open or a fetch, before anything costly (the attestation check, the
   * reads, the audit entry, the wraps): a slot, released by calling the function returned once
   * the first message is built (or the call failed). Throws UNAVAILABLE with a retry hint when
   * this replica holds `maxStreams` streams (`stream`: true) or has `maxOpening` opens in
   * progress. Why not audited: it refuses no one, it is capacity, and a storm of audit writes is
   * the last thing a loaded replica needs.
   */
  admit(stream: boolean): () => void {
    if (stream && this.watchers.size >= this.maxStreams) {
      this.shed.streams++;
      throw new Unavailable(`this kdc replica holds ${this.maxStreams} watch streams, its limit; retry in ${STREAMS_RETRY_MS} ms or at another replica`, { retryAfterMs: STREAMS_RETRY_MS });
    }
    if (this.opening >= this.maxOpening) {
      this.shed.opening++;
      throw new Unavailable(`this kdc replica is opening ${this.maxOpening} streams already; retry in ${OPENING_RETRY_MS} ms or at another replica`, { retryAfterMs: OPENING_RETRY_MS });
    }
    this.opening++;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.opening--;
    };
  }

  // ---- streams ----

  /**
   * Opens a stream for an attested machine: registers it (so no change committed from now on
   * is missed), builds and audits its SNAPSHOT, and returns the stream. `signal` ends it (the
   * client went away, or the server drains).
   */
  async open(caller: AttestedMachine, signal: AbortSignal, resumeFrom = 0n): Promise<AsyncIterable<WatchSecretsResponse>> {
    const a = caller.attestation;
    const w: Watcher = {
      id: this.nextId++,
      machineId: caller.machineId,
      recipient: recipientOf(caller.machineId, a),
      tenantIds: a.tenantIds,
      queue: [],
      ending: undefined,
      wake: undefined,
      started: false,
      registered: false,
      timers: [],
      onAbort: undefined,
      signal,
    };
    this.register(w, a.expiresAt);
    let first: WatchSecretsResponse;
    try {
      first = (resumeFrom > 0n ? await this.resume(caller, w, resumeFrom) : undefined) ?? (await this.snapshot(caller, w));
      await this.pushStaged(caller, w);
    } catch (err) {
      this.unregister(w);
      throw err;
    }
    if (first.type === WatchEventType.RESUMED) this.opened.resumed++;
    else this.opened.snapshot++;
    return this.run(w, first);
  }

  /**
   * The versions the rotation scheduler staged for the machine's tenants, queued right after the
   * first message (SNAPSHOT or RESUMED) of a stream: STAGED events, audited.
   */
  private async pushStaged(caller: AttestedMachine, w: Watcher): Promise<void> {
    const a = caller.attestation;
    const staged = await this.release.stagedOf(await this.release.servedTenants(a.tenantIds));
    if (staged.length === 0) return;
    try {
      requireNotQuarantined(this.ctx.quarantine, caller.machineId);
      await this.release.auditToMachine(caller.machineId, "watch_staged", staged, { token_jti: a.jti, token_expires_at: a.expiresAt.toISOString() });
      const now = this.ctx.clock.now();
      for (const m of staged) this.push(w, create(WatchSecretsResponseSchema, { type: WatchEventType.STAGED, tenantId: m.tenantId, secrets: this.release.wrap([m], w.recipient, now), time: timestampFromDate(now) }));
    } finally {
      wipe(staged);
    }
  }

  /** The SNAPSHOT of a new stream: every secret, audited, wrapped; with the revision read first. */
  private async snapshot(caller: AttestedMachine, w: Watcher): Promise<WatchSecretsResponse> {
    const a = caller.attestation;
    const revision = await this.ctx.store.revision();
    const items = await this.release.secretsOf(await this.release.servedTenants(a.tenantIds));
    try {
      // Quarantined while the secrets were read: nothing leaves.
      requireNotQuarantined(this.ctx.quarantine, caller.machineId);
      await this.release.auditToMachine(caller.machineId, "watch_snapshot", items, { token_jti: a.jti, token_expires_at: a.expiresAt.toISOString() });
      const now = this.ctx.clock.now();
      return create(WatchSecretsResponseSchema, { type: WatchEventType.SNAPSHOT, secrets: this.release.wrap(items, w.recipient, now), time: timestampFromDate(now), revision });
    } finally {
      wipe(items);
    }
  }

  /**
   * The RESUMED of a stream that resumes from `from`, or undefined when the store cannot tell
   * what changed since (history compacted, or `from` newer than the store): then a SNAPSHOT.
   */
  private async resume(caller: AttestedMachine, w: Watcher, from: bigint): Promise<WatchSecretsResponse | undefined> {
    const a = caller.attestation;
    const revision = await this.ctx.store.revision();
    if (from > revision || !(await this.ctx.store.keepsHistorySince(from))) {
      this.ctx.logger.info("watch resume refused; sending a snapshot", { machine: caller.machineId, from_revision: String(from), store_revision: String(revision) });
      return undefined;
    }
    const served = await this.release.servedTenants(a.tenantIds);
    const changed = await this.ctx.store.tenantChangeRevisions();
    const replaced = served.filter((t) => (changed.get(t) ?? 0n) > from);
    const items = await this.release.secretsOf(replaced);
    try {
      requireNotQuarantined(this.ctx.quarantine, caller.machineId);
      await this.release.auditToMachine(caller.machineId, "watch_resume", items, { token_jti: a.jti, token_expires_at: a.expiresAt.toISOString(), resume_from: String(from) });
      const now = this.ctx.clock.now();
      return create(WatchSecretsResponseSchema, {
        type: WatchEventType.RESUMED,
        secrets: this.release.wrap(items, w.recipient, now),
        time: timestampFromDate(now),
        revision,
        servedTenantIds: served,
        replacedTenantIds: replaced,
      });
    } finally {
      wipe(items);
    }
  }

  private register(w: Watcher, expiresAt: Date): void {
    this.watchers.add(w);
    w.registered = true;
    const n = (this.perMachine.get(w.machineId) ?? 0) + 1;
    this.perMachine.set(w.machineId, n);
    if (n === 1) this.presence.opened(w.machineId);
    // The stream ends (OK) when the token expires: the agent re-attests and opens a new one.
    const ttl = Math.max(0, expiresAt.getTime() - this.ctx.clock.now().getTime());
    w.timers.push(
      setTimeout(() => {
        this.end(w);
        if (!w.started) this.unregister(w);
      }, Math.min(ttl, 2 ** 31 - 1)),
    );
    w.timers.push(
      setInterval(() => {
        if (w.queue.length === 0 && w.ending === undefined) this.push(w, create(WatchSecretsResponseSchema, { type: WatchEventType.HEARTBEAT, time: timestampFromDate(this.ctx.clock.now()) }));
      }, this.heartbeatMs),
    );
    w.onAbort = () => {
      this.end(w);
      if (!w.started) this.unregister(w);
    };
    if (w.signal.aborted) w.onAbort();
    else w.signal.addEventListener("abort", w.onAbort, { once: true });
  }

  private unregister(w: Watcher): void {
    if (!w.registered) return;
    w.registered = false;
    this.watchers.delete(w);
    const n = (this.perMachine.get(w.machineId) ?? 1) - 1;
    if (n <= 0) {
      this.perMachine.delete(w.machineId);
      this.presence.closed(w.machineId);
    } else this.perMachine.set(w.machineId, n);
    for (const t of w.timers) clearTimeout(t);
    w.timers = [];
    if (w.onAbort !== undefined) w.signal.removeEventListener("abort", w.onAbort);
    w.queue.length = 0;
  }

  private async *run(w: Watcher, first: WatchSecretsResponse): AsyncGenerator<WatchSecretsResponse> {
    w.started = true;
    try {
      if (!w.registered) return;
      yield first;
      for (;;) {
        const next = w.queue.shift();
        if (next !== undefined) {
          yield next;
          continue;
        }
        if (w.ending !== undefined) {
          if (w.ending.error !== undefined) throw w.ending.error;
          return;
        }
        await new Promise<void>((resolve) => (w.wake = resolve));
        w.wake = undefined;
      }
    } finally {
      this.unregister(w);
    }
  }

  private push(w: Watcher, ev: WatchSecretsResponse): void {
    if (w.ending !== undefined || !w.registered) return;
    if (w.queue.length >= this.maxQueue) {
      w.queue.length = 0;
      this.end(w, new ResourceExhausted(`watch: this stream fell ${this.maxQueue} events behind; reconnect for a fresh snapshot`));
      this.ctx.logger.warn("watch stream cut off: too slow", { machine: w.machineId, max_queue: this.maxQueue });
      return;
    }
    w.queue.push(ev);
    w.wake?.();
  }

  private end(w: Watcher, error?: Error): void {
    if (w.ending !== undefined) return;
    w.ending = error === undefined ? {} : { error };
    w.wake?.();
  }

  /** Ends every stream with OK (shutdown). */
  closeAll(): void {
    for (const w of this.watchers) this.end(w);
  }

  /** Resolves once every fan-out started so far has finished (tests, shutdown). */
  async settled(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }

  // ---- events ----

  private recipients(tenantId: string): Watcher[] {
    return [...this.watchers].filter((w) => w.ending === undefined && SecretRelease.serves(w.tenantIds, tenantId) && this.ctx.quarantine.reasonFor(w.machineId) === undefined);
  }

  /** Runs a fan-out after the earlier ones of the same tenant, in the background. */
  private schedule(tenantId: string, what: string, fn: () => Promise<void>): void {
    const p = this.serial
      .run(`tenant/${tenantId}`, fn)
      .catch((err: unknown) => this.ctx.logger.error("watch fan-out failed", { tenant: tenantId, event: what, err }))
      .finally(() => this.pending.delete(p));
    this.pending.add(p);
  }

  /** Pushes the tenant's new set (ACTIVATED) to every stream that serves the tenant. */
  activeChanged(tenantId: string): void {
    this.schedule(tenantId, "activated", async () => {
      const items = await this.release.tenantSecrets(tenantId);
      try {
        const active = items.find((m) => m.purpose === KeyPurpose.INTERMEDIATE_CA);
        if (active === undefined) return;
        await this.fanOut(tenantId, `tenant/${tenantId}/version/${active.version}`, "activated", WatchEventType.ACTIVATED, items);
      } finally {
        wipe(items);
      }
    });
  }

  /** Pushes the staged version (STAGED) to every stream that serves the tenant. */
  staged(tenantId: string, version: number): void {
    this.schedule(tenantId, "staged", async () => {
      const item = await this.release.stagedSecret(tenantId, version);
      if (item === undefined) return;
      try {
        await this.fanOut(tenantId, `tenant/${tenantId}/version/${version}`, "staged", WatchEventType.STAGED, [item]);
      } finally {
        wipe([item]);
      }
    });
  }

  /** Pushes REVOKED to every stream that serves the tenant. */
  keyRevoked(tenantId: string, keyId: string, reason: string): void {
    this.schedule(tenantId, "revoked", async () => {
      const time = timestampFromDate(this.ctx.clock.now());
      for (const w of this.recipients(tenantId)) this.push(w, create(WatchSecretsResponseSchema, { type: WatchEventType.REVOKED, tenantId, keyId, reason, time }));
    });
  }

  /** Pushes the new signing key (KEY_ADDED) to every stream that serves the tenant. */
  signingKeyAdded(tenantId: string, name: string): void {
    this.schedule(tenantId, "key_added", async () => {
      const item = await this.release.signingKeySecret(tenantId, name);
      if (item === undefined) return;
      try {
        await this.fanOut(tenantId, `tenant/${tenantId}/signing-key/${name}`, "key_added", WatchEventType.KEY_ADDED, [item]);
      } finally {
        wipe([item]);
      }
    });
  }

  /**
   * Pushes QUARANTINED to the machine's streams at once (dropping whatever they still had
   * queued: the machine drops every key anyway) and ends them with PERMISSION_DENIED.
   */
  quarantined(machineId: string, reason: string): void {
    const time = timestampFromDate(this.ctx.clock.now());
    for (const w of this.watchers) {
      if (w.machineId !== machineId || w.ending !== undefined) continue;
      w.queue.length = 0;
      this.push(w, create(WatchSecretsResponseSchema, { type: WatchEventType.QUARANTINED, reason, time }));
      this.end(w, new PermissionDenied(`machine ${machineId} is quarantined (${reason}); it gets no secrets until an operator releases it`));
    }
  }

  /** Audits, then wraps per machine and queues, a release of `items` to every stream serving the tenant. */
  private async fanOut(tenantId: string, target: string, event: string, type: WatchEventType, items: SecretMaterial[]): Promise<void> {
    const recipients = this.recipients(tenantId);
    if (recipients.length === 0) return;
    const t0 = performance.now();
    try {
      await this.release.auditToMachines(target, event, items, [...new Set(recipients.map((w) => w.machineId))]);
    } catch (err) {
      // Fail-closed: nothing is sent without its entry. The streams end so that the agents
      // reconnect and get the current set through a SNAPSHOT (which is audited too).
      this.ctx.logger.error("cannot write the audit entry of a release; ending the streams instead of sending", { tenant: tenantId, event, err });
      for (const w of recipients) this.end(w, new Unavailable("the KDC cannot write its audit log; reconnect later for the current secrets"));
      return;
    }
    const now = this.ctx.clock.now();
    const time = timestampFromDate(now);
    for (let i = 0; i < recipients.length; i++) {
      const w = recipients[i]!;
      if (w.ending === undefined) {
        try {
          this.push(w, create(WatchSecretsResponseSchema, { type, tenantId, secrets: this.release.wrap(items, w.recipient, now), time }));
        } catch (err) {
          this.ctx.logger.error("cannot wrap a secret for a machine; ending its stream", { machine: w.machineId, tenant: tenantId, err });
          this.end(w, new ConnectError("internal error while wrapping a secret (see the KDC's log)", Code.Internal));
        }
      }
      // Let the streams queued so far start sending while the rest are wrapped.
      if ((i + 1) % WRAP_BATCH === 0) await new Promise<void>((resolve) => setImmediate(resolve));
    }
    this.ctx.logger.info("watch fan-out", { tenant: tenantId, event, streams: recipients.length, keys: items.length, duration_ms: Math.round((performance.now() - t0) * 10) / 10 });
  }
}
