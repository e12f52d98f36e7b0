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
 * ReportHeldVersions. A STAGED version (the rotation scheduler's next one) is held beside the
 * active one and reported, so that the KDC activates it once the fleet holds it. A failure
 * reconnects with jittered exponential backoff (the first retry too); a stream silent for
 * longer than the heartbeat timeout counts as dead. PERMISSION_DENIED
 * from the KDC means the machine is quarantined: every key is dropped. stop() always wins:
 * whatever a session awaits (attestation included) is abandoned at once, and no stream is
 * opened after it.
 *
 * Failover (src/clients/endpoints.ts): the link starts at the KDC replica (and Auditserver
 * replica) a hash of the machine id picks, so a fleet spreads over the replicas; a session that
 * fails because of the replica (connection failed or reset, UNAVAILABLE, a silent stream)
 * moves to the next one. A replica that sheds load names a wait (`retry-after-ms`): the link
 * leaves it alone that long (jittered) and tries another. A stream the KDC ended cleanly is
 * reopened after a small random spread, so a replica's restart does not bring the fleet back
 * at one instant. After a failure the link resumes from the revision of its last SNAPSHOT or
 * RESUMED (`resume_from_revision`): a replica that can tell what changed since sends only that.
 */
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { callWithFailover, Endpoints, isFailover, retryAfterMs } from "../clients/endpoints.js";
import { backoffMs, jittered, sleep, spreadMs } from "../common/backoff.js";
import { FailedPrecondition, Unavailable } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { AuditService } from "../gen/kmi/audit/v1/audit_pb.js";
import { DistributionService, WatchEventType, type ReleasedSecret, type WatchSecretsResponse } from "../gen/kmi/kdc/v1/distribution_pb.js";
import { MachineQuarantined, tokenRefreshTime, type AttestationToken, type Attestor } from "./attestor.js";
import { createPeerClient, type PeerClient } from "./client.js";
import type { Clock } from "./context.js";
import { privateKeyPem, type MachineIdentity } from "./identity.js";
import type { KeyHolder, SecretInput } from "./key-holder.js";
import type { LeafSpec } from "./leaf-issuer.js";
import { openReleasedSecret } from "./released-secret.js";

/** Tuning of the link. */
export interface KdcLinkTiming {
  /** First reconnect delay, ms (default 500). */
  reconnectInitialMs: number;
  /** Longest reconnect delay, ms (default 30 000). */
  reconnectMaxMs: number;
  /** A stream with no message for this long is dead, ms (default 45 000: three missed heartbeats). */
  heartbeatTimeoutMs: number;
  /** A stream the KDC ended cleanly is reopened after a random pause in [0, this], ms (default 1 000). */
  reopenSpreadMs?: number;
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

/** A failure of the Auditserver (attestation), as opposed to the KDC session. */
class AuditFailure extends Error {
  constructor(readonly error: unknown) {
    super("auditserver");
  }
}

/** Codes that are about this machine or this stream, not the replica: another replica would answer the same. */
const NOT_THE_REPLICA = new Set([Code.PermissionDenied, Code.Unauthenticated, Code.ResourceExhausted, Code.InvalidArgument, Code.FailedPrecondition]);

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
  /** Times the link moved to another KDC replica. */
  failovers = 0;
  /** The store revision the held keys are up to date with (of the last SNAPSHOT or RESUMED); 0n before. */
  revision = 0n;

  private stopped = false;
  private running: Promise<void> | undefined;
  private streamAbort: AbortController | undefined;
  private sleepAbort: AbortController | undefined;
  private kdc: PeerClient<typeof DistributionService> | undefined;
  private audit: PeerClient<typeof AuditService> | undefined;
  private clientsFor: MachineIdentity | undefined;
  private kdcAt = "";
  private auditAt = "";
  private readonly kdcEps: Endpoints;
  private readonly auditEps: Endpoints;
  /** SignLeaf's own replica order (it moves without moving the watch stream), and its clients of the other replicas. */
  private readonly signEps: Endpoints;
  private readonly signClients = new Map<string, PeerClient<typeof DistributionService>>();
  private needFetch = true;
  /** The next session resumes from {@link revision} (after a failure) rather than asking for a SNAPSHOT. */
  private resumeNext = false;
  private reportState: "idle" | "running" | "again" = "idle";
  private readonly o: KdcLinkOptions;

  constructor(options: KdcLinkOptions) {
    this.o = options;
    // Why a hash of the machine id: every agent of a fleet starts at a different replica, and
    // the same agent at the same one after a restart.
    const spread = options.identity().machineId;
    this.kdcEps = new Endpoints(options.kdcUrls, spread);
    this.signEps = new Endpoints(options.kdcUrls, spread);
    this.auditEps = new Endpoints(options.auditUrls, spread);
  }

  /** The KDC replica the link is attached to (or trying, while down). */
  get kdcUrl(): string {
    return this.kdcEps.current;
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
    this.resumeNext = false;
    this.streamAbort?.abort(new Planned("restart"));
    this.sleepAbort?.abort();
  }

  /**
   * Runs `call` with the Auditserver client for the current identity (mutual TLS), on the
   * replica in use, then on the others while they fail with a connection failure or
   * UNAVAILABLE (the server did not act). For the runtime's calls (certificate renewal).
   */
  async withAudit<T>(call: (client: PeerClient<typeof AuditService>["client"]) => Promise<T>): Promise<T> {
    for (let tried = 1; ; tried++) {
      this.ensureClients();
      const url = this.auditEps.current;
      try {
        return await call(this.audit!.client);
      } catch (err) {
        if (!isFailover(err) || tried >= this.auditEps.urls.length) throw err;
        this.moveAudit(url, err);
      }
    }
  }

  /**
   * Has the KDC sign a leaf with a tenant intermediate it keeps in its token (SignLeaf), with the
   * current attestation token (a new one when it is due): on the replica the link uses, then on
   * the others while one cannot be reached or answers UNAVAILABLE (a signature is safe to ask
   * for again). The watch stream stays where it is. The KDC's refusals keep their code; when no
   * replica could sign, UNAVAILABLE says why.
   */
  async signLeaf(tenantId: string, version: number, spec: LeafSpec): Promise<Uint8Array> {
    this.ensureClients();
    let last = this.kdcEps.current;
    try {
      const token = await this.o.attestor.fresh(this.audit!.client, this.o.identity());
      const req = {
        attestationToken: token.token,
        tenantId,
        version,
        publicKeyDer: spec.publicKeySpkiDer,
        dnsNames: spec.dnsNames,
        ipAddresses: spec.ipAddresses,
        commonName: spec.commonName ?? "",
        notBefore: timestampFromMs(spec.notBefore.getTime()),
        notAfter: timestampFromMs(spec.notAfter.getTime()),
      };
      const res = await callWithFailover(this.signEps, (url) => ((last = url), this.signingClient(url).signLeaf(req, { timeoutMs: SIGN_LEAF_TIMEOUT_MS })));
      // Its serial and end are read from the certificate by the caller, which checks it (leaf-issuer.ts).
      return res.certificateDer;
    } catch (err) {
      throw signLeafError(err, tenantId, last);
    }
  }

  /** The DistributionService client of replica `url` for SignLeaf: the watch's own when it is that replica. */
  private signingClient(url: string): PeerClient<typeof DistributionService>["client"] {
    if (url === this.kdcAt && this.kdc !== undefined) return this.kdc.client;
    let c = this.signClients.get(url);
    if (c === undefined) {
      const id = this.o.identity();
      c = createPeerClient(DistributionService, url, { caPem: this.o.caPem, certPem: id.certificatePem, keyPem: privateKeyPem(id) });
      this.signClients.set(url, c);
    }
    return c.client;
  }

  /** Makes the clients for the current identity and the replicas in use (each side on its own: moving one leaves the other's streams alone). */
  private ensureClients(): void {
    const id = this.o.identity();
    if (this.clientsFor !== id) this.closeClients();
    const tls = { caPem: this.o.caPem, certPem: id.certificatePem, keyPem: privateKeyPem(id) };
    if (this.kdc === undefined || this.kdcAt !== this.kdcEps.current) {
      this.kdc?.close();
      this.kdc = createPeerClient(DistributionService, this.kdcEps.current, tls);
      this.kdcAt = this.kdcEps.current;
    }
    if (this.audit === undefined || this.auditAt !== this.auditEps.current) {
      this.audit?.close();
      this.audit = createPeerClient(AuditService, this.auditEps.current, tls);
      this.auditAt = this.auditEps.current;
    }
    this.clientsFor = id;
  }

  /** Leaves the Auditserver replica `url` for the next one (honouring its retry hint). */
  private moveAudit(url: string, err: unknown): void {
    if (this.auditEps.urls.length < 2) return;
    const hint = retryAfterMs(err);
    if (hint !== undefined) this.auditEps.avoid(url, jittered(hint));
    const next = this.auditEps.advance();
    this.o.logger.warn("auditserver replica failed; moving to the next", { audit: url, next, error: describe(err) });
  }

  /** Leaves the KDC replica in use for the next one when the failure is the replica's. */
  private moveKdc(err: unknown): void {
    const url = this.kdcEps.current;
    const hint = retryAfterMs(err);
    if (hint !== undefined) this.kdcEps.avoid(url, jittered(hint));
    const replicaFault = (err instanceof Planned && err.why === "silent") || !(err instanceof ConnectError && NOT_THE_REPLICA.has(err.code));
    if (!replicaFault || err instanceof MachineQuarantined || this.kdcEps.urls.length < 2) return;
    const next = this.kdcEps.advance();
    if (next === url) return;
    this.failovers++;
    this.o.logger.warn("kdc replica failed; moving to the next", { kdc: url, next, error: describe(err), ...(hint !== undefined ? { retry_after_ms: hint } : {}) });
  }

  private closeClients(): void {
    for (const c of this.signClients.values()) c.close();
    this.signClients.clear();
    this.kdc?.close();
    this.audit?.close();
    this.kdc = undefined;
    this.audit = undefined;
    this.clientsFor = undefined;
  }

  private async loop(): Promise<void> {
    let failures = 0;
    while (!this.stopped) {
      let delay: number;
      try {
        await this.session(() => (failures = 0));
        // The KDC ended the stream (token expiry, or the replica is draining): reopen after a
        // small random spread, so that a fleet whose streams ended together does not come back together.
        this.resumeNext = this.revision > 0n;
        await this.sleep(spreadMs(this.o.timing.reopenSpreadMs ?? 1000));
        continue;
      } catch (caught) {
        if (this.stopped) break;
        if (caught instanceof Planned && caught.why !== "silent") continue;
        const err = caught instanceof AuditFailure ? caught.error : caught;
        this.connected = false;
        failures++;
        this.lastError = describe(err);
        this.resumeNext = this.revision > 0n;
        await this.onFailure(err);
        if (caught instanceof AuditFailure) {
          if (isFailover(err)) this.moveAudit(this.auditEps.current, err);
        } else {
          this.moveKdc(err);
        }
        // Never sooner than the replica now in use asked (it may be the one that shed us).
        delay = Math.max(backoffMs(failures, this.o.timing.reconnectInitialMs, this.o.timing.reconnectMaxMs), this.kdcEps.waitMs());
      }
      this.o.logger.warn("kdc link down; retrying", { error: this.lastError, retry_in_ms: delay, attempt: failures, kdc: this.kdcEps.current });
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
      throw abort.signal.reason instanceof Planned ? abort.signal.reason : new AuditFailure(err);
    }
    const refreshIn = Math.max(1000, tokenRefreshTime(token) - this.o.clock.now());
    const refresh = setTimeout(() => abort.abort(new Planned("refresh")), refreshIn);
    let watchdog: NodeJS.Timeout | undefined;
    const pet = () => {
      if (watchdog !== undefined) clearTimeout(watchdog);
      watchdog = setTimeout(() => abort.abort(new Planned("silent")), this.o.timing.heartbeatTimeoutMs);
    };
    // After a failure, resume from the last revision instead of fetching everything again; a
    // planned reopen (new token) asks for a SNAPSHOT, which also renews every lease.
    const resumeFrom = this.resumeNext && this.o.holder.quarantineReason === undefined ? this.revision : 0n;
    try {
      if (this.needFetch && resumeFrom === 0n) {
        const res = await this.kdc!.client.fetchSecrets({ attestationToken: token.token }, { signal: abort.signal });
        if (res.serverTime !== undefined) this.noteSkew(timestampMs(res.serverTime));
        await this.apply(WatchEventType.SNAPSHOT, "", res.secrets, "", "", identity, token);
      }
      this.needFetch = false;
      abort.signal.throwIfAborted();
      pet();
      const stream = this.kdc!.client.watchSecrets({ attestationToken: token.token, resumeFromRevision: resumeFrom }, { signal: abort.signal });
      let first = true;
      for await (const ev of stream) {
        pet();
        const opening = first;
        if (first) {
          if (ev.type !== WatchEventType.SNAPSHOT && ev.type !== WatchEventType.RESUMED) throw new Error("kdc: the watch stream did not start with a SNAPSHOT or RESUMED");
          first = false;
          this.resumeNext = false;
          onHealthy();
          this.o.logger.info("kdc watch open", { kdc: this.kdcEps.current, start: ev.type === WatchEventType.RESUMED ? "resumed" : "snapshot", from_revision: String(resumeFrom), revision: String(ev.revision), token_refresh_in_ms: refreshIn });
        }
        await this.handle(ev, identity, token);
        // Why connected only once the first message is applied: GetStatus then shows the keys
        // and the revision they are up to date with together, never the new keys beside the
        // revision of the stream before (the apply awaits the sealed-cache write).
        if (opening) {
          this.connected = true;
          this.lastError = "";
        }
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
    if (ev.type === WatchEventType.RESUMED) {
      await this.resumed(ev, identity, token);
    } else {
      await this.apply(ev.type, ev.tenantId, ev.secrets, ev.keyId, ev.reason, identity, token);
    }
    // A SNAPSHOT or RESUMED brings every tenant up to its revision: the next resume starts there.
    if ((ev.type === WatchEventType.SNAPSHOT || ev.type === WatchEventType.RESUMED) && ev.revision > 0n) this.revision = ev.revision;
    if (ev.type === WatchEventType.SNAPSHOT && ev.revision === 0n) this.revision = 0n;
  }

  /**
   * RESUMED: the tenants no longer served are dropped, those that changed since the resume
   * revision get their new set, the others keep what they hold (and their leases).
   */
  private async resumed(ev: WatchSecretsResponse, identity: MachineIdentity, token: AttestationToken): Promise<void> {
    const holder = this.o.holder;
    const served = new Set(ev.servedTenantIds);
    const replaced = new Set(ev.replacedTenantIds);
    const stray = ev.secrets.find((s) => !replaced.has(s.tenantId));
    if (stray !== undefined) throw new Error(`kdc: RESUMED carries a key of tenant "${stray.tenantId}", which it does not replace`);
    const kept = holder.keys().filter((k) => served.has(k.tenantId) && !replaced.has(k.tenantId));
    holder.replaceAll([...kept, ...this.open(ev.secrets, identity)]);
    this.lastSync = this.o.clock.now();
    this.o.logger.info("secrets resumed", { kept: kept.length, replaced_tenants: [...replaced], keys: holder.keys().length });
    await this.o.persist();
    this.report(token);
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
      case WatchEventType.STAGED:
        if (!this.stage(tenantId, released, identity)) return;
        break;
      case WatchEventType.REVOKED:
        holder.revoke(keyId, reason || "revoked on the KDC");
        log.warn("key revoked; dropped", { tenant: tenantId, key: keyId.slice(0, 16), reason });
        break;
      case WatchEventType.QUARANTINED:
        this.revision = 0n;
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

  /**
   * STAGED: holds the tenant's next version beside the active one (never signing with it), so
   * that the report tells the KDC the machine holds it. A version that cannot be held is logged
   * and left out; the KDC then activates it at the policy's timeout. False when nothing changed.
   */
  private stage(tenantId: string, released: readonly ReleasedSecret[], identity: MachineIdentity): boolean {
    const [secret] = this.open(released.filter((s) => s.tenantId === tenantId), identity);
    if (tenantId === "" || secret === undefined) {
      this.o.logger.warn("kdc: STAGED event without a usable secret ignored", { tenant: tenantId });
      return false;
    }
    try {
      this.o.holder.stage(secret);
    } catch (err) {
      this.o.logger.warn("staged version not held", { tenant: tenantId, version: secret.version, error: describe(err) });
      return false;
    }
    this.o.logger.info("staged version held; it signs nothing until the KDC activates it", { tenant: tenantId, version: secret.version, key: secret.keyId.slice(0, 16) });
    return true;
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
        // Staged versions too: the KDC activates a staged version once the fleet reports it.
        const now = this.o.clock.now();
        const held = [...this.o.holder.keys().filter((k) => !k.leaseExpired), ...this.o.holder.stagedKeys().filter((k) => k.leaseExpiresAt > now)]
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
      this.revision = 0n;
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

/** How long a leaf signed at the KDC may take before the caller is told it is unavailable. */
const SIGN_LEAF_TIMEOUT_MS = 10_000;

/** A SignLeaf failure as the agent's caller should see it: the KDC's own refusal, or UNAVAILABLE naming the KDC. */
function signLeafError(err: unknown, tenantId: string, kdcUrl: string): Error {
  if (err instanceof ConnectError && !isFailover(err) && err.code !== Code.DeadlineExceeded) return new ConnectError(`the KDC refused to sign: ${err.rawMessage}`, err.code);
  if (err instanceof MachineQuarantined) return new FailedPrecondition(`machine quarantined: ${err.message}`);
  const why = err instanceof ConnectError ? err.rawMessage : err instanceof Error ? err.message : String(err);
  return new Unavailable(`tenant "${tenantId}" has its key in the KDC's token, and the KDC (${kdcUrl}) could not sign: ${why}; retry shortly`);
}
