/**
 * The agent's link to the KDC's DistributionService, over mutual TLS with the machine
 * certificate:
 *
 *   attest → FetchSecrets → WatchSecrets (SNAPSHOT, then events) → … → reopen with a fresh
 *   token at 2/3 of its life → …
 *
 * Each secret is unwrapped with the machine key (released-secret.ts). Every change is applied
 * to the key holder, written to the sealed cache before the next event is read (so a
 * REVOKED or QUARANTINED key leaves memory and disk at once), and reported with
 * ReportHeldVersions. A failure reconnects with exponential backoff and full jitter; a
 * stream silent for longer than the heartbeat timeout counts as dead. PERMISSION_DENIED
 * from the KDC means the machine is quarantined: every key is dropped. stop() always wins:
 * whatever a session awaits (attestation included) is abandoned at once, and no stream is
 * opened after it.
 */
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { backoffMs, sleep } from "../common/backoff.js";
import type { Logger } from "../common/logger.js";
import { AuditService } from "../gen/kmi/audit/v1/audit_pb.js";
import { DistributionService, WatchEventType, type ReleasedSecret, type WatchSecretsResponse } from "../gen/kmi/kdc/v1/distribution_pb.js";
import { MachineQuarantined, tokenRefreshTime, type AttestationToken, type Attestor } from "./attestor.js";
import { createPeerClient, type PeerClient } from "./client.js";
import type { Clock } from "./context.js";
import { privateKeyPem, type MachineIdentity } from "./identity.js";
import type { KeyHolder, SecretInput } from "./key-holder.js";
import { openReleasedSecret } from "./released-secret.js";

/** Tuning of the link. */
export interface KdcLinkTiming {
  /** First reconnect delay, ms (default 500). */
  reconnectInitialMs: number;
  /** Longest reconnect delay, ms (default 30 000). */
  reconnectMaxMs: number;
  /** A stream with no message for this long is dead, ms (default 45 000: three missed heartbeats). */
  heartbeatTimeoutMs: number;
}

/** What the link needs. */
export interface KdcLinkOptions {
  /** "https://host:port" of each KDC replica. */
  kdcUrls: readonly string[];
  /** "https://host:port" of each Auditserver replica. */
  auditUrls: readonly string[];
  /** Infrastructure CA, PEM. */
  caPem: string;
  /** The current machine identity. */
  identity: () => MachineIdentity;
  /** Attestation tokens. */
  attestor: Attestor;
  /** The keys. */
  holder: KeyHolder;
  /** Writes the sealed cache (awaited after every change). */
  persist: () => Promise<void>;
  /** Time. */
  clock: Clock;
  /** Logger. */
  logger: Logger;
  /** Timing. */
  timing: KdcLinkTiming;
}

/** Why a stream was ended on purpose. */
class Planned extends Error {
  constructor(readonly why: "refresh" | "restart" | "stop" | "silent") {
    super(why);
  }
}

/** A connection to the KDC that keeps itself up. */
export class KdcLink {
  /** True while the watch stream is open. */
  connected = false;
  /** Last error, while the link is down. */
  lastError = "";
  /** Last time secrets were received, epoch ms. */
  lastSync: number | undefined;
  /** KDC time minus local time, ms (from FetchSecrets). */
  clockSkewMs = 0;

  private stopped = false;
  private running: Promise<void> | undefined;
  private streamAbort: AbortController | undefined;
  private sleepAbort: AbortController | undefined;
  private kdc: PeerClient<typeof DistributionService> | undefined;
  private audit: PeerClient<typeof AuditService> | undefined;
  private clientsFor: MachineIdentity | undefined;
  private needFetch = true;
  private reportState: "idle" | "running" | "again" = "idle";
  private readonly o: KdcLinkOptions;

  constructor(options: KdcLinkOptions) {
    this.o = options;
  }

  /** Starts the loop in the background. */
  start(): void {
    this.running ??= this.loop();
  }

  /** Stops the loop and closes the connections. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.streamAbort?.abort(new Planned("stop"));
    this.sleepAbort?.abort();
    await this.running;
    this.closeClients();
  }

  /** Reconnects now with the current identity (after a certificate renewal). */
  restart(): void {
    this.closeClients();
    this.needFetch = true;
    this.streamAbort?.abort(new Planned("restart"));
    this.sleepAbort?.abort();
  }

  /** The Auditserver client for the current identity (mutual TLS), shared with the runtime. */
  auditClient(): PeerClient<typeof AuditService>["client"] {
    this.ensureClients();
    return this.audit!.client;
  }

  private ensureClients(): void {
    const id = this.o.identity();
    if (this.clientsFor === id && this.kdc !== undefined && this.audit !== undefined) return;
    this.closeClients();
    const tls = { caPem: this.o.caPem, certPem: id.certificatePem, keyPem: privateKeyPem(id) };
    this.kdc = createPeerClient(DistributionService, this.o.kdcUrls[0]!, tls);
    this.audit = createPeerClient(AuditService, this.o.auditUrls[0]!, tls);
    this.clientsFor = id;
  }

  private closeClients(): void {
    this.kdc?.close();
    this.audit?.close();
    this.kdc = undefined;
    this.audit = undefined;
    this.clientsFor = undefined;
  }

  private async loop(): Promise<void> {
    let failures = 0;
    while (!this.stopped) {
      try {
        await this.session(() => (failures = 0));
        continue; // the KDC ended the stream (token expiry) or a planned reopen: go again at once
      } catch (err) {
        if (this.stopped) break;
        if (err instanceof Planned && err.why !== "silent") continue;
        this.connected = false;
        failures++;
        this.lastError = describe(err);
        await this.onFailure(err);
      }
      const delay = backoffMs(failures, this.o.timing.reconnectInitialMs, this.o.timing.reconnectMaxMs);
      this.o.logger.warn("kdc link down; retrying", { error: this.lastError, retry_in_ms: delay, attempt: failures });
      await this.sleep(delay);
    }
    this.connected = false;
  }

  /** One attested session: fetch (when needed), then watch until the stream ends. */
  private async session(onHealthy: () => void): Promise<void> {
    this.ensureClients();
    const identity = this.o.identity();
    // Why the controller comes before the first await: stop() and restart() abort whatever the
    // session is waiting for, attestation included. A stop() during attestation that left the
    // session to open its watch stream afterwards would keep the agent from ever exiting.
    const abort = new AbortController();
    this.streamAbort = abort;
    let token: AttestationToken;
    try {
      token = await untilAborted(this.o.attestor.fresh(this.audit!.client, identity), abort.signal);
    } catch (err) {
      if (this.streamAbort === abort) this.streamAbort = undefined;
      throw abort.signal.reason instanceof Planned ? abort.signal.reason : err;
    }
    const refreshIn = Math.max(1000, tokenRefreshTime(token) - this.o.clock.now());
    const refresh = setTimeout(() => abort.abort(new Planned("refresh")), refreshIn);
    let watchdog: NodeJS.Timeout | undefined;
    const pet = () => {
      if (watchdog !== undefined) clearTimeout(watchdog);
      watchdog = setTimeout(() => abort.abort(new Planned("silent")), this.o.timing.heartbeatTimeoutMs);
    };
    try {
      if (this.needFetch) {
        const res = await this.kdc!.client.fetchSecrets({ attestationToken: token.token }, { signal: abort.signal });
        if (res.serverTime !== undefined) this.noteSkew(timestampMs(res.serverTime));
        await this.apply(WatchEventType.SNAPSHOT, "", res.secrets, "", "", identity, token);
        this.needFetch = false;
      }
      abort.signal.throwIfAborted();
      pet();
      const stream = this.kdc!.client.watchSecrets({ attestationToken: token.token }, { signal: abort.signal });
      let first = true;
      for await (const ev of stream) {
        pet();
        if (first) {
          first = false;
          this.connected = true;
          this.lastError = "";
          onHealthy();
          this.o.logger.info("kdc watch open", { kdc: this.o.kdcUrls[0], token_refresh_in_ms: refreshIn });
        }
        await this.handle(ev, identity, token);
      }
      // The KDC ended the stream (it does when the token expires).
      this.connected = false;
      if (first) throw new Error("kdc: the watch stream ended without a SNAPSHOT");
    } catch (err) {
      this.connected = false;
      const reason = abort.signal.reason;
      if (reason instanceof Planned) {
        if (reason.why === "silent") this.needFetch = true;
        throw reason;
      }
      this.needFetch = true;
      throw err;
    } finally {
      clearTimeout(refresh);
      if (watchdog !== undefined) clearTimeout(watchdog);
      if (this.streamAbort === abort) this.streamAbort = undefined;
    }
  }

  private async handle(ev: WatchSecretsResponse, identity: MachineIdentity, token: AttestationToken): Promise<void> {
    if (ev.type === WatchEventType.HEARTBEAT) return;
    await this.apply(ev.type, ev.tenantId, ev.secrets, ev.keyId, ev.reason, identity, token);
  }

  private async apply(
    type: WatchEventType,
    tenantId: string,
    released: readonly ReleasedSecret[],
    keyId: string,
    reason: string,
    identity: MachineIdentity,
    token: AttestationToken,
  ): Promise<void> {
    const holder = this.o.holder;
    const log = this.o.logger;
    switch (type) {
      case WatchEventType.SNAPSHOT:
        holder.replaceAll(this.open(released, identity));
        this.lastSync = this.o.clock.now();
        log.info("secrets synced", { keys: holder.keys().length, tenants: new Set(holder.keys().map((k) => k.tenantId)).size });
        break;
      case WatchEventType.ACTIVATED:
        if (tenantId === "") throw new Error("kdc: ACTIVATED event without tenant_id");
        holder.replaceTenant(tenantId, this.open(released.filter((s) => s.tenantId === tenantId), identity));
        this.lastSync = this.o.clock.now();
        log.info("tenant keys replaced", { tenant: tenantId, versions: released.map((s) => s.version) });
        break;
      case WatchEventType.KEY_ADDED:
        holder.upsert(this.open(released, identity));
        this.lastSync = this.o.clock.now();
        log.info("keys added", { keys: released.map((s) => s.keyId.slice(0, 16)) });
        break;
      case WatchEventType.REVOKED:
        holder.revoke(keyId, reason || "revoked on the KDC");
        log.warn("key revoked; dropped", { tenant: tenantId, key: keyId.slice(0, 16), reason });
        break;
      case WatchEventType.QUARANTINED:
        holder.quarantineMachine(reason || "quarantined on the KDC");
        log.error("machine quarantined; every key dropped", { reason });
        break;
      default:
        log.warn("kdc: unknown watch event ignored", { type });
        return;
    }
    // Why await: a revoked or quarantined key must be gone from disk before anything else happens.
    await this.o.persist();
    this.report(token);
  }

  /** Opens each secret; one that fails is logged and left out (never half-used). */
  private open(released: readonly ReleasedSecret[], identity: MachineIdentity): SecretInput[] {
    const out: SecretInput[] = [];
    const now = this.o.clock.now();
    for (const s of released) {
      try {
        out.push(openReleasedSecret(s, { machineId: identity.machineId, machineKey: identity.privateKey, encryptionKey: identity.encryptionKey, now, clockSkewMs: this.clockSkewMs }));
      } catch (err) {
        this.o.logger.error("secret refused", { tenant: s.tenantId, key: s.keyId.slice(0, 16), error: err instanceof Error ? err.message : String(err) });
      }
    }
    return out;
  }

  private noteSkew(serverTime: number): void {
    const skew = serverTime - this.o.clock.now();
    // Small differences are network latency; only a real clock difference moves the leases.
    this.clockSkewMs = Math.abs(skew) > 5_000 ? skew : 0;
    if (Math.abs(skew) > 60_000) this.o.logger.warn("clock differs from the KDC's; leases are adjusted, fix NTP", { skew_ms: skew });
  }

  /** ReportHeldVersions, coalesced: at most one in flight, one more queued. */
  private report(token: AttestationToken): void {
    if (this.reportState !== "idle") {
      this.reportState = "again";
      return;
    }
    this.reportState = "running";
    void (async () => {
      do {
        this.reportState = "running";
        const held = this.o.holder
          .keys()
          .filter((k) => !k.leaseExpired)
          .map((k) => ({ tenantId: k.tenantId, keyId: k.keyId, version: k.version }));
        try {
          await this.kdc?.client.reportHeldVersions({ attestationToken: token.token, held });
        } catch (err) {
          this.o.logger.warn("report of held versions failed", { error: describe(err) });
        }
      } while ((this.reportState as string) === "again" && !this.stopped);
      this.reportState = "idle";
    })();
  }

  private async onFailure(err: unknown): Promise<void> {
    const quarantined =
      err instanceof MachineQuarantined || (err instanceof ConnectError && err.code === Code.PermissionDenied);
    if (quarantined) {
      if (this.o.holder.quarantineReason === undefined) {
        this.o.holder.quarantineMachine(err instanceof ConnectError ? err.rawMessage : (err as Error).message);
        this.o.logger.error("the KDC or Auditserver refuses this machine as quarantined; every key dropped", { error: describe(err) });
        await this.o.persist().catch((e: unknown) => this.o.logger.error("sealed cache write failed", { error: describe(e) }));
      }
      return;
    }
    if (err instanceof ConnectError && err.code === Code.Unauthenticated) {
      // The KDC refused the token (expired, or bound to an older certificate): attest again.
      this.o.attestor.invalidate();
    }
  }

  private sleep(ms: number): Promise<void> {
    if (this.stopped) return Promise.resolve();
    const abort = new AbortController();
    this.sleepAbort = abort;
    return sleep(ms, abort.signal);
  }
}

/** Settles as `p` does, or rejects with the signal's reason as soon as it aborts (`p` runs on). */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
    if (signal.aborted) onAbort();
  });
}

function describe(err: unknown): string {
  if (err instanceof ConnectError) return `${Code[err.code] ?? err.code}: ${err.rawMessage}`;
  return err instanceof Error ? err.message : String(err);
}
