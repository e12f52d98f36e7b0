/**
 * The key agent as a server: create → start → destroy.
 *
 * start(): opens the state dir (0700) and the sealing key (0600, made on first start);
 * enrolls with the join token if this machine has no identity yet, else loads it; loads the
 * sealed cache into the key holder (so the agent serves at once, even with the KDC down);
 * serves KeyAgentService on the Unix socket; then, in the background, attests and keeps the
 * KDC link up, renews the machine certificate at 2/3 of its life and expires leases.
 */
import { chmod, mkdir } from "node:fs/promises";
import { dirname } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { jittered } from "../common/backoff.js";
import { ConfigError } from "../common/config.js";
import { FailedPrecondition, Unavailable } from "../common/errors.js";
import { GrpcServer, type BoundAddresses } from "../common/grpc-server.js";
import { parseListenAddress } from "../common/listen.js";
import type { Logger } from "../common/logger.js";
import { createMetricsRegistry, startMetricsServer, type MetricsServer } from "../common/metrics.js";
import { serviceRegistration } from "../common/rpc.js";
import { VERSION } from "../common/version.js";
import { KeyAgentService } from "../gen/kmi/agent/v1/agent_pb.js";
import { AuditService } from "../gen/kmi/audit/v1/audit_pb.js";
import { createKeyAgentService } from "./agent-service.js";
import { Attestor } from "./attestor.js";
import { createPeerClient } from "./client.js";
import type { AgentConfig } from "./config.js";
import { systemClock, type AgentRuntimeStatus, type AgentServiceContext, type Clock } from "./context.js";
import { enroll, IdentityStore, renew, renewalTime, type MachineIdentity } from "./identity.js";
import { KdcLink } from "./kdc-link.js";
import { KeyHolder } from "./key-holder.js";
import { pkiLeafIssuerFactory } from "./leaf-issuer.js";
import { SealedCache } from "./sealed-cache.js";
import { loadSealingKey } from "./sealing-key.js";
import { StateDir } from "./state-dir.js";
import { callWithFailover, Endpoints } from "../clients/endpoints.js";
import { WORKLOAD_HEADER, WORKLOAD_HEADER_VALUE } from "../clients/workload-header.js";

/** The largest request the socket takes: a leaf request with 200 names is a few KiB. */
const MAX_MESSAGE_BYTES = 1024 * 1024;
/** setTimeout's longest delay. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** What start() bound. */
export interface AgentBound extends BoundAddresses {
  /** The machine id. */
  machineId: string;
  /** The metrics endpoint, when on. */
  metrics?: string;
}

/** Injected dependencies (tests). */
export interface AgentServerDeps {
  /** Logger. */
  logger: Logger;
  /** Time; default the system clock. */
  clock?: Clock;
}

/** The key agent. */
export class AgentServer {
  private readonly clock: Clock;
  private readonly logger: Logger;
  private readonly stopping = new AbortController();
  private identity: MachineIdentity | undefined;
  /** The sealing key, loaded once at start from its provider (a token need not stay open). */
  private sealingKey: Buffer | undefined;
  private holderInstance: KeyHolder | undefined;
  private link: KdcLink | undefined;
  private cache: SealedCache | undefined;
  private attestor: Attestor | undefined;
  private grpc: GrpcServer | undefined;
  private metrics: MetricsServer | undefined;
  private renewTimer: NodeJS.Timeout | undefined;
  private leaseTimer: NodeJS.Timeout | undefined;
  private cacheLastSync: number | undefined;
  private loadedFromCache = false;
  private bound: AgentBound | undefined;

  private constructor(
    readonly config: AgentConfig,
    deps: AgentServerDeps,
  ) {
    this.clock = deps.clock ?? systemClock;
    this.logger = deps.logger;
  }

  /** Checks the configuration; nothing is opened or bound yet. */
  static create(config: AgentConfig, deps: AgentServerDeps): AgentServer {
    if (config.metricsListen !== undefined) parseListenAddress(config.metricsListen);
    return new AgentServer(config, deps);
  }

  /** The key holder (for tests and the status line). */
  get holder(): KeyHolder {
    if (this.holderInstance === undefined) throw new Error("agent: not started");
    return this.holderInstance;
  }

  /** The machine identity, once started. */
  get machine(): MachineIdentity | undefined {
    return this.identity;
  }

  /** Starts the agent; resolves with the socket path and machine id. */
  async start(): Promise<AgentBound> {
    if (this.bound !== undefined) return this.bound;
    const cfg = this.config;
    const dir = await StateDir.open(cfg.stateDir);
    const sealingKey = await loadSealingKey(dir, cfg.sealingKey);
    this.sealingKey = sealingKey;
    const identities = new IdentityStore(dir, sealingKey);
    let identity = await identities.load();
    if (identity === undefined) {
      if (cfg.joinToken === undefined) {
        throw new ConfigError(
          `this machine is not enrolled (no identity in ${cfg.stateDir}); give a join token for the first start with --join-token-file, KMI_AGENT_JOIN_TOKEN or --join-token (make one with \`kmi ctl join-token create\`)`,
        );
      }
      identity = await this.enroll(cfg.joinToken);
      await identities.save(identity);
      this.logger.info("enrolled", { machine: identity.machineId, group: identity.group, certificate_not_after: new Date(identity.notAfter).toISOString() });
    } else {
      this.logger.info("identity loaded", { machine: identity.machineId, group: identity.group, certificate_not_after: new Date(identity.notAfter).toISOString() });
      if (identity.notAfter <= this.clock.now()) {
        this.logger.error("the machine certificate has expired; the agent serves from its cache until the leases run out, then enroll again with a new join token", {
          certificate_not_after: new Date(identity.notAfter).toISOString(),
        });
      }
    }
    this.identity = identity;

    const attestor = new Attestor(cfg.measurements, this.clock, this.logger.child({ component: "attest" }));
    this.attestor = attestor;
    let link: KdcLink | undefined;
    const holder = new KeyHolder({
      clock: this.clock,
      createLeafIssuer: pkiLeafIssuerFactory,
      signAtKdc: (tenantId, version, spec) => (link === undefined ? Promise.reject(new Unavailable("the agent is starting; retry shortly")) : link.signLeaf(tenantId, version, spec)),
      describeLink: () => ({ connected: link?.connected ?? false, error: link?.lastError ?? "" }),
    });
    this.holderInstance = holder;
    // Why drop the token on quarantine: it vouches for the machine as it was before; after a
    // release the machine must prove its measurements again before the KDC releases anything.
    holder.subscribe((events) => {
      if (events.some((e) => e.type === "quarantined")) attestor.invalidate();
    });
    const cache = new SealedCache(dir, sealingKey, identity.machineId, this.logger.child({ component: "cache" }));
    this.cache = cache;
    const cached = await cache.load();
    if (cached !== undefined) {
      try {
        holder.replaceAll(cached.secrets, cached.quarantine, cached.staged);
        this.cacheLastSync = cached.lastSync;
        this.loadedFromCache = cached.secrets.length > 0;
        holder.expireLeases();
        this.logger.info("sealed cache loaded", {
          keys: cached.secrets.length,
          usable: holder.keys().filter((k) => !k.leaseExpired).length,
          quarantined: cached.quarantine !== undefined,
        });
      } catch (err) {
        this.logger.warn("sealed cache ignored: a cached secret is unusable", { error: err instanceof Error ? err.message : String(err) });
      }
    }

    link = new KdcLink({
      kdcUrls: cfg.kdcUrls,
      auditUrls: cfg.auditUrls,
      caPem: cfg.caPem,
      identity: () => this.identity!,
      attestor,
      holder,
      persist: () => this.persist(),
      clock: this.clock,
      logger: this.logger.child({ component: "kdc-link" }),
      timing: cfg.timing,
    });
    this.link = link;

    const registry = cfg.metricsListen !== undefined ? createMetricsRegistry() : undefined;
    registry?.gauge("kmi_agent_kdc_attached", "1 for the KDC replica the agent's watch stream is open on (label kdc: its URL).", ["kdc"], (g) => {
      g.reset();
      if (link?.connected === true) g.set({ kdc: link.kdcUrl }, 1);
    });
    registry?.gauge("kmi_agent_kdc_failovers", "Times the agent moved to another KDC replica since start.", [], (g) => g.set(link?.failovers ?? 0));
    registry?.gauge("kmi_agent_kdc_revision", "The store revision the agent's keys are up to date with (it resumes from it).", [], (g) => g.set(Number(link?.revision ?? 0n)));
    const ctx: AgentServiceContext = {
      holder,
      clock: this.clock,
      logger: this.logger.child({ component: "api" }),
      policy: cfg.policy,
      status: { status: () => this.status() },
      version: VERSION,
      stopping: this.stopping.signal,
    };
    const unix: { path: string; mode: 0o600 | 0o660; group?: string } = { path: cfg.socketPath, mode: cfg.socketGroup === undefined ? 0o600 : 0o660 };
    if (cfg.socketGroup !== undefined) unix.group = cfg.socketGroup;
    this.grpc = GrpcServer.create({
      name: "agent",
      services: [serviceRegistration(KeyAgentService, createKeyAgentService(ctx))],
      unix,
      logger: this.logger,
      requiredMetadata: { key: WORKLOAD_HEADER, value: WORKLOAD_HEADER_VALUE },
      maxMessageBytes: MAX_MESSAGE_BYTES,
      shutdownTimeoutMs: cfg.shutdownTimeoutMs,
      ...(registry !== undefined ? { metrics: registry } : {}),
    });
    // The socket's own mode is the access control; its directory only has to exist, reachable
    // by the socket's group: folders made here are chmod'ed 0755 (the process umask is 077).
    await makeReachableDirs(dirname(cfg.socketPath));
    const addresses = await this.grpc.start();
    if (registry !== undefined && cfg.metricsListen !== undefined) {
      this.metrics = await startMetricsServer(registry, parseListenAddress(cfg.metricsListen), this.logger);
    }

    this.scheduleLeaseCheck();
    this.scheduleRenewal();
    link.start();
    this.bound = { ...addresses, machineId: identity.machineId, ...(this.metrics !== undefined ? { metrics: this.metrics.address } : {}) };
    return this.bound;
  }

  /**
   * Enrolls with the join token at the Auditserver replicas, from the one the host name's hash
   * picks on; the next is tried only when one could not be reached or answered UNAVAILABLE
   * (it did not act, so the one-use token is still unused).
   */
  private async enroll(joinToken: string): Promise<MachineIdentity> {
    const cfg = this.config;
    const endpoints = new Endpoints(cfg.auditUrls, cfg.hostname);
    let lastUrl = endpoints.current;
    try {
      return await callWithFailover(
        endpoints,
        async (url) => {
          lastUrl = url;
          const audit = createPeerClient(AuditService, url, { caPem: cfg.caPem });
          try {
            return await enroll(audit.client, joinToken, this.clock.now(), cfg.hostname);
          } finally {
            audit.close();
          }
        },
        { onFailover: (url, err, next) => this.logger.warn("auditserver replica failed; enrolling at the next", { audit: url, next, error: err instanceof Error ? err.message : String(err) }) },
      );
    } catch (err) {
      const why = err instanceof ConnectError ? err.rawMessage : err instanceof Error ? err.message : String(err);
      throw new FailedPrecondition(`enrollment with ${lastUrl} failed: ${why}`, { cause: err });
    }
  }

  /** The runtime status for GetStatus. */
  status(): AgentRuntimeStatus {
    const id = this.identity;
    const link = this.link;
    const token = this.attestor?.token;
    const s: AgentRuntimeStatus = {
      machineId: id?.machineId ?? "",
      group: id?.group ?? "",
      attestation: this.attestor?.state === "attested" && token === undefined ? "not_attested" : (this.attestor?.state ?? "not_attested"),
      attestationProblem: this.attestor?.problem ?? "",
      kdcConnected: link?.connected ?? false,
      kdcError: link?.lastError ?? "",
      kdcUrl: link?.kdcUrl ?? "",
      kdcRevision: link?.revision ?? 0n,
      kdcFailovers: link?.failovers ?? 0,
      servingFromCache: this.loadedFromCache && link?.lastSync === undefined,
    };
    if (token !== undefined) s.attestationExpiresAt = token.expiresAt;
    if (id !== undefined) s.certificateNotAfter = id.notAfter;
    const lastSync = link?.lastSync ?? this.cacheLastSync;
    if (lastSync !== undefined) s.lastSync = lastSync;
    return s;
  }

  /** Stops: the KDC link, the timers, then the socket (in-flight calls finish, watches end). */
  async destroy(): Promise<void> {
    this.stopping.abort();
    if (this.renewTimer !== undefined) clearTimeout(this.renewTimer);
    if (this.leaseTimer !== undefined) clearTimeout(this.leaseTimer);
    await this.link?.stop();
    await this.grpc?.destroy();
    await this.metrics?.close();
    this.bound = undefined;
  }

  /** Writes the sealed cache and re-arms the lease timer. */
  private async persist(): Promise<void> {
    const holder = this.holderInstance;
    if (holder === undefined || this.cache === undefined) return;
    await this.cache.write(holder, this.clock.now(), this.link?.lastSync ?? this.cacheLastSync);
    this.scheduleLeaseCheck();
  }

  private scheduleLeaseCheck(): void {
    if (this.leaseTimer !== undefined) clearTimeout(this.leaseTimer);
    this.leaseTimer = undefined;
    if (this.stopping.signal.aborted) return;
    const next = this.holderInstance?.nextLeaseExpiry();
    if (next === undefined) return;
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, next - this.clock.now()) + 5);
    this.leaseTimer = setTimeout(() => {
      this.leaseTimer = undefined;
      const events = this.holderInstance?.expireLeases() ?? [];
      if (events.length > 0) {
        this.logger.warn("leases ran out", { keys: events.flatMap((e) => e.keys.map((k) => k.keyId.slice(0, 16))), kdc_connected: this.link?.connected ?? false });
        void this.persist().catch((err: unknown) => this.logger.error("sealed cache write failed", { error: err instanceof Error ? err.message : String(err) }));
      } else {
        this.scheduleLeaseCheck();
      }
    }, delay);
    this.leaseTimer.unref();
  }

  /** Renews the machine certificate at 2/3 of its life; retries on failure. */
  private scheduleRenewal(delayMs?: number): void {
    if (this.stopping.signal.aborted || this.identity === undefined) return;
    if (this.renewTimer !== undefined) clearTimeout(this.renewTimer);
    const due = delayMs ?? Math.max(0, renewalTime(this.identity) - this.clock.now());
    this.renewTimer = setTimeout(() => void this.renewNow(), Math.min(MAX_TIMER_MS, due));
    this.renewTimer.unref();
  }

  private async renewNow(): Promise<void> {
    const id = this.identity;
    const link = this.link;
    if (id === undefined || link === undefined || this.stopping.signal.aborted) return;
    try {
      const renewed = await link.withAudit((audit) => renew(audit, id, this.clock.now(), this.config.hostname));
      const dir = await StateDir.open(this.config.stateDir);
      await new IdentityStore(dir, this.sealingKey!).save(renewed);
      this.identity = renewed;
      // The attestation token is bound to the certificate (cnf x5t#S256): attest again with the new one.
      this.attestor?.invalidate();
      link.restart();
      this.logger.info("machine certificate renewed", { machine: renewed.machineId, certificate_not_after: new Date(renewed.notAfter).toISOString() });
      this.scheduleRenewal();
    } catch (err) {
      const ce = err instanceof ConnectError ? err : undefined;
      const left = id.notAfter - this.clock.now();
      const retry = jittered(Math.min(60_000, Math.max(5_000, left / 10)));
      this.logger.warn("machine certificate renewal failed; retrying", { error: ce?.rawMessage ?? (err instanceof Error ? err.message : String(err)), code: ce ? Code[ce.code] : undefined, retry_in_ms: retry });
      if (ce?.code === Code.PermissionDenied && this.holderInstance?.quarantineReason === undefined) {
        this.holderInstance?.quarantineMachine(ce.rawMessage);
        await this.persist().catch(() => undefined);
      }
      this.scheduleRenewal(retry);
    }
  }
}

/** Makes `dir` and any missing parents, each one it made 0755 whatever the umask. */
async function makeReachableDirs(dir: string): Promise<void> {
  const first = await mkdir(dir, { recursive: true, mode: 0o755 });
  if (first === undefined) return;
  for (let d = dir; d.length >= first.length; d = dirname(d)) {
    await chmod(d, 0o755);
    if (d === first) break;
  }
}
