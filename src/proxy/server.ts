/**
 * The proxy server: one TCP listener that speaks HTTP/1.1 to clients (plain requests are
 * forwarded, CONNECT is intercepted or tunnelled), the agent client and its WatchKeys
 * subscription that keeps the leaf cache honest, the policy reloader, and the metrics.
 */
import { randomBytes } from "node:crypto";
import { Agent, createServer as createHttpServer, type IncomingMessage, type Server as HttpServer, type ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import type { Duplex } from "node:stream";
import { createMetricsRegistry, startMetricsServer, type MetricsRegistry, type MetricsServer } from "../common/metrics.js";
import { parseListenAddress } from "../common/listen.js";
import type { Logger } from "../common/logger.js";
import { KeyEventType, KeyState, type WatchKeysResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { KeyPurpose } from "../gen/kmi/common/v1/common_pb.js";
import { createAccessLog, type AccessLog } from "./access-log.js";
import { AgentClient, type KeyWatch, type LeafIssuer } from "../clients/agent-client.js";
import { BlockedCa } from "./blocked-ca.js";
import { rawHttpResponse, renderBlockPage } from "./block-page.js";
import type { ClientInfo, ProxyContext, ProxyCounters, ProxyLimits } from "./context.js";
import { Inspection } from "./icap/inspection.js";
import type { IcapCounters } from "./icap/service.js";
import { answerClientError, handleHttp1Request, handleHttp1Upgrade, type Http1Upstream } from "./http1.js";
import { Interceptor } from "./interceptor.js";
import { LeafCache, type CachedLeaf } from "./leaf-cache.js";
import { createLeafMinter, MAX_LEAF_LIFETIME_MS, TICKET_KEY_ROTATION_MS, type LeafMinter } from "./leaf-minter.js";
import { setTicketKeys } from "./secure-context-ticket-keys.js";
import { LearnedBypass } from "./learned-bypass.js";
import { DestinationGuard } from "./destinations.js";
import { KeyAvailability } from "./key-availability.js";
import { OriginConnector } from "./origin.js";
import { PolicyStore } from "./policy.js";
import { ClientRateLimiter } from "../common/rate-limit.js";
import { MemoryRelease, type MemoryReleaseOptions } from "./memory-release.js";
import { fullGc } from "./v8-gc.js";
import { createTenantResolver, normalizeClientAddress, type TenantConfig, type TenantMatch, type TenantResolver } from "./tenants.js";

/** The agent as the server uses it: leaf issuance and the key event stream. */
export interface ProxyAgent extends LeafIssuer {
  /** Opens WatchKeys (kept open and reopened by the implementation). */
  watchKeys(onEvent: (e: WatchKeysResponse) => void, onState?: (connected: boolean) => void): KeyWatch;
  /** Releases the connection. */
  close(): void;
}

/** Default limits: generous for real clients, short enough that a stalled one is dropped. */
export const DEFAULT_LIMITS: ProxyLimits = {
  clientHelloTimeoutMs: 10_000,
  handshakeTimeoutMs: 10_000,
  originTimeoutMs: 10_000,
  idleTimeoutMs: 120_000,
  headersTimeoutMs: 20_000,
  requestTimeoutMs: 300_000,
  keepAliveTimeoutMs: 5_000,
  originIdleTimeoutMs: 15_000,
  maxHeaderBytes: 16 * 1024,
};

/** Leaves not served for this long are dropped from the cache (minted again when asked for): memory goes back when the load falls. */
export const LEAF_IDLE_MS = 30 * 60_000;
/** How often the leaf cache is trimmed of idle leaves. */
const LEAF_TRIM_INTERVAL_MS = 60_000;

/** Everything the server needs. */
export interface ProxyServerOptions {
  /** Host to listen on. */
  readonly host: string;
  /** Port (0 picks one). */
  readonly port: number;
  /** The agent's Unix socket (when `agent` is not given). */
  readonly agentSocket?: string;
  /** An agent client (tests, or a shared one); the server closes it on destroy. */
  readonly agent?: ProxyAgent;
  /** Mints leaves (default: in this process, through `agent`); a worker's asks its primary. */
  readonly minter?: LeafMinter;
  /** Time between session ticket key rotations; default an hour; 0: only on revoke and quarantine (a worker's primary rotates them). */
  readonly ticketKeyRotationMs?: number;
  /** Tenants by address range and credentials, with their own policies. */
  readonly tenants?: readonly TenantConfig[];
  /** The tenants file: reread for the tenants' policies on every policy reload. */
  readonly tenantsFile?: string;
  /** Tenant of clients no rule matches. */
  readonly defaultTenant?: string;
  /** Refuse clients without proxy credentials (407). */
  readonly requireAuth?: boolean;
  /** Policy file (JSON); reloaded on SIGHUP (see {@link ProxyServer.reload}) and on change. */
  readonly policyFile?: string;
  /** Access log destination: a path, "-" (stdout) or "off"; or a ready sink. */
  readonly accessLog?: string | AccessLog;
  /** Log query strings (default false: `/a?b=c` is logged as `/a?`); for a path destination only. */
  readonly accessLogQuery?: boolean;
  /** Extra CAs trusted for origins, PEM texts. */
  readonly extraCaPem?: readonly string[];
  /** Trust Node's root store for origins; default true. */
  readonly systemRoots?: boolean;
  /**
   * Private and special-use address ranges (loopback, RFC 1918, link-local, ...) the proxy may
   * connect to; every other such address is refused. Default none.
   */
  readonly allowPrivate?: readonly string[];
  /** Most cached leaves; default 10,000. */
  readonly leafCacheSize?: number;
  /** Longest leaf lifetime asked for; default and ceiling 47 days. */
  readonly leafMaxLifetimeMs?: number;
  /** New-host issuances per second per client address; 0 disables; default 20. */
  readonly issueRatePerSecond?: number;
  /** Burst of new-host issuances per client; default 100. */
  readonly issueBurst?: number;
  /** Timeouts and sizes (defaults: {@link DEFAULT_LIMITS}). */
  readonly limits?: Partial<ProxyLimits>;
  /** Time in-flight requests get on shutdown; default 10 s. */
  readonly shutdownGraceMs?: number;
  /** Logger. */
  readonly logger: Logger;
  /** Metrics registry to record in (made when `metricsListen` is set and none is given). */
  readonly metrics?: MetricsRegistry;
  /** Address of the Prometheus `/metrics` endpoint; off when unset. */
  readonly metricsListen?: string;
  /**
   * A full V8 collection once the open connections fall to half their high-water mark (see
   * {@link MemoryRelease}); its thresholds, or false for none. Default on, with its defaults.
   */
  readonly memoryRelease?: Pick<MemoryReleaseOptions, "minDrop" | "delayMs" | "minIntervalMs"> | false;
}

/** The server's {@link MemoryRelease}, unless turned off or V8 does not hand over its collection. */
function memoryRelease(options: ProxyServerOptions, logger: Logger, open: () => number): MemoryRelease | undefined {
  if (options.memoryRelease === false) return undefined;
  const gc = fullGc();
  if (gc === undefined) {
    logger.debug("memory release off: this runtime does not expose a full garbage collection");
    return undefined;
  }
  return new MemoryRelease({ ...options.memoryRelease, gc, open, logger });
}

/** What {@link ProxyServer.start} bound. */
export interface ProxyAddress {
  /** Host. */
  readonly host: string;
  /** Port. */
  readonly port: number;
}

function createCounters(registry: MetricsRegistry | undefined): ProxyCounters {
  if (registry === undefined) return { decision() {}, leaf() {}, connect() {} };
  const decisions = registry.counter("kmi_proxy_decisions_total", "Requests and tunnels by decision and tenant.", ["decision", "tenant"]);
  const leaves = registry.counter("kmi_proxy_leaves_total", "Leaves served by source (cache, issued, joined).", ["source"]);
  const connects = registry.counter("kmi_proxy_connects_total", "CONNECT outcomes.", ["outcome"]);
  return {
    decision: (d, tenant) => decisions.labels(d, tenant).inc(),
    leaf: (s) => leaves.labels(s).inc(),
    connect: (o) => connects.labels(o).inc(),
  };
}

function createIcapCounters(registry: MetricsRegistry | undefined): IcapCounters {
  if (registry === undefined) return { request() {}, roundTrips() {} };
  const requests = registry.counter("kmi_proxy_icap_requests_total", "ICAP transactions by service, method and result (clean, infection, violation, modified, ignored, error).", ["service", "method", "result"]);
  const trips = registry.counter("kmi_proxy_icap_round_trips_total", "ICAP request/answer exchanges (OPTIONS, preview, final) by service.", ["service"]);
  return {
    request: (service, method, result) => requests.labels(service, method, result).inc(),
    roundTrips: (service, n) => trips.labels(service).inc(n),
  };
}

/**
 * Drops the leaves a key event makes stale, and the ticket keys of sessions that must not
 * resume (after a revoke or a quarantine). Used by the server, and by the primary of
 * `--workers` for its machine-wide cache of leaf material.
 */
export function dropStaleLeaves<E extends CachedLeaf>(e: WatchKeysResponse, leaves: LeafCache<E>, rotateTicketKeys: (tenant?: string) => void, log: Logger): void {
  switch (e.type) {
    case KeyEventType.ROTATED:
    case KeyEventType.REVOKED:
    case KeyEventType.LEASE_EXPIRED: {
      if (e.type === KeyEventType.REVOKED) rotateTicketKeys(e.tenantId);
      const n = e.tenantId === "" ? leaves.clear() : leaves.clearTenant(e.tenantId);
      log.info("leaves dropped after a key event", { event: KeyEventType[e.type], tenant: e.tenantId, dropped: n, reason: e.reason });
      break;
    }
    case KeyEventType.QUARANTINED: {
      rotateTicketKeys();
      const n = leaves.clear();
      log.warn("machine quarantined: every leaf dropped", { dropped: n, reason: e.reason });
      break;
    }
    case KeyEventType.SNAPSHOT: {
      // After a (re)connect: whatever changed while the stream was down.
      const active = new Map<string, string>();
      for (const k of e.keys) {
        if (k.purpose === KeyPurpose.INTERMEDIATE_CA && k.state === KeyState.ACTIVE) active.set(k.tenantId, k.keyId);
      }
      const n = leaves.retainActive(active);
      if (n > 0) log.info("leaves dropped after a watch snapshot", { dropped: n });
      break;
    }
    default:
      break;
  }
}

/** The forward proxy. */
export class ProxyServer {
  private readonly http: HttpServer;
  private readonly interceptor: Interceptor;
  private readonly plainAgent: Agent;
  private watch: KeyWatch | undefined;
  private address: ProxyAddress | undefined;
  private tenantResolver: TenantResolver;
  private readonly sockets = new Set<Socket>();
  private metricsServer: MetricsServer | undefined;
  private ticketTimer: NodeJS.Timeout | undefined;
  private leafTrim: NodeJS.Timeout | undefined;
  private readonly release: MemoryRelease | undefined;

  private constructor(
    private readonly options: ProxyServerOptions,
    readonly context: ProxyContext,
    private readonly agent: ProxyAgent,
    private readonly policy: PolicyStore,
    /** The leaf cache (tests read its counters). */
    readonly leaves: LeafCache,
    /** The untrusted CA of block pages after the CONNECT. */
    readonly blockedCa: BlockedCa,
    private readonly metrics: MetricsRegistry | undefined,
  ) {
    this.tenantResolver = context.tenants;
    const l = context.limits;
    this.interceptor = new Interceptor(context);
    this.plainAgent = new Agent({ keepAlive: true, maxSockets: 256, maxFreeSockets: 64, timeout: l.idleTimeoutMs, lookup: context.destinations.lookup });
    this.http = createHttpServer({
      maxHeaderSize: l.maxHeaderBytes,
      headersTimeout: l.headersTimeoutMs,
      requestTimeout: l.requestTimeoutMs,
      keepAliveTimeout: l.keepAliveTimeoutMs,
      connectionsCheckingInterval: 1000,
      noDelay: true,
    });
    this.http.timeout = l.idleTimeoutMs;
    this.release = memoryRelease(options, context.logger, () => this.sockets.size);
    this.http.on("connection", (s: Socket) => {
      this.sockets.add(s);
      this.release?.observe();
      s.once("close", () => {
        this.sockets.delete(s);
        this.release?.observe();
      });
    });
    this.http.on("request", (req: IncomingMessage, res: ServerResponse) => this.onRequest(req, res));
    this.http.on("connect", (req: IncomingMessage, socket: Socket, head: Buffer) => this.interceptor.handleConnect(req, socket, head));
    this.http.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => this.onUpgrade(req, socket, head));
    this.http.on("clientError", answerClientError);
  }

  /** Builds the server and its dependencies (nothing listens yet). Throws on bad config. */
  static async create(options: ProxyServerOptions): Promise<ProxyServer> {
    const logger = options.logger;
    const metrics = options.metrics ?? (options.metricsListen !== undefined ? createMetricsRegistry() : undefined);
    const tenants = createTenantResolver(options.tenants ?? [], options.defaultTenant, options.requireAuth ?? false, { logger });
    const reloadFailures = metrics?.counter("kmi_proxy_policy_reload_failures_total", "Policy reloads that failed (the previous policies stayed in force).", []);
    const policy = await PolicyStore.create(options.policyFile, logger, {
      tenants: options.tenants ?? [],
      ...(options.tenantsFile !== undefined ? { tenantsFile: options.tenantsFile } : {}),
      onReloadFailed: () => reloadFailures?.inc(),
    });
    const agent = options.agent ?? (options.agentSocket !== undefined ? new AgentClient({ socketPath: options.agentSocket, logger }) : undefined);
    if (agent === undefined) throw new Error("agent socket: not set; give --agent-socket with the key agent's Unix socket path");
    const accessLog = typeof options.accessLog === "object" ? options.accessLog : createAccessLog(options.accessLog ?? "-", logger, { query: options.accessLogQuery ?? false });
    const blockedCa = BlockedCa.create();
    const leaves = new LeafCache({ maxEntries: options.leafCacheSize ?? 10_000 });
    const limits: ProxyLimits = { ...DEFAULT_LIMITS, ...options.limits };
    const destinations = new DestinationGuard(options.allowPrivate ?? []);
    const ctx: ProxyContext = {
      logger,
      accessLog,
      policy,
      inspection: new Inspection(createIcapCounters(metrics), logger),
      tenants,
      leaves,
      minter: options.minter ?? createLeafMinter({ agent, maxLifetimeMs: options.leafMaxLifetimeMs ?? MAX_LEAF_LIFETIME_MS }),
      origins: new OriginConnector({
        extraCaPem: options.extraCaPem ?? [],
        systemRoots: options.systemRoots ?? true,
        timeoutMs: limits.originTimeoutMs,
        probeClientCert: blockedCa.probeClientCert,
        destinations,
      }),
      destinations,
      blockedCa,
      rateLimiter: new ClientRateLimiter({ perSecond: options.issueRatePerSecond ?? 20, burst: options.issueBurst ?? 100 }),
      keys: new KeyAvailability(),
      learned: new LearnedBypass(),
      limits,
      counters: createCounters(metrics),
    };
    metrics?.gauge("kmi_proxy_leaf_cache_entries", "Leaves in the cache.", [], (g) => g.set(leaves.size));
    metrics?.gauge("kmi_proxy_icap_connections", "Connections open to ICAP services (idle and busy).", [], (g) => g.set(ctx.inspection.openConnections));
    return new ProxyServer(options, ctx, agent, policy, leaves, blockedCa, metrics);
  }

  /** Starts listening and watching the agent; resolves with the bound address. */
  async start(): Promise<ProxyAddress> {
    if (this.address !== undefined) return this.address;
    this.watch = this.agent.watchKeys(
      (e) => this.onKeyEvent(e),
      (connected) => {
        this.context.keys.onWatchState(connected);
        this.context.logger.debug("agent watch", { connected });
      },
    );
    this.policy.watch();
    const rotation = this.options.ticketKeyRotationMs ?? TICKET_KEY_ROTATION_MS;
    if (rotation > 0) {
      this.ticketTimer = setInterval(() => this.rotateTicketKeys(), rotation);
      this.ticketTimer.unref();
    }
    this.leafTrim = setInterval(() => this.trimLeaves(), LEAF_TRIM_INTERVAL_MS);
    this.leafTrim.unref();
    await new Promise<void>((resolve, reject) => {
      this.http.once("error", reject);
      this.http.listen(this.options.port, this.options.host, () => {
        this.http.off("error", reject);
        resolve();
      });
    });
    const a = this.http.address() as AddressInfo;
    if (this.metrics !== undefined) {
      this.metrics.gauge("kmi_proxy_open_connections", "Client connections open (plain HTTP, tunnels and intercepted), each counted once.", [], (g) => g.set(this.openConnections));
    }
    if (this.options.metricsListen !== undefined && this.metrics !== undefined) {
      this.metricsServer = await startMetricsServer(this.metrics, parseListenAddress(this.options.metricsListen), this.context.logger);
    }
    this.address = { host: this.options.host, port: a.port };
    this.context.logger.info("proxy listening", { address: `${this.options.host}:${a.port}` });
    return this.address;
  }

  /** Drops the leaves nobody was served lately (see {@link LEAF_IDLE_MS}). */
  private trimLeaves(): void {
    const n = this.context.leaves.trimIdle(LEAF_IDLE_MS);
    if (n > 0) this.context.logger.debug("idle leaves dropped", { dropped: n, kept: this.context.leaves.size });
  }

  /** Rereads the policy file and this machine's addresses, and reopens the access log (SIGHUP). */
  async reload(): Promise<void> {
    await this.policy.reload();
    this.context.destinations.refreshOwnAddresses();
    this.context.accessLog.reopen();
  }

  /** Replaces every tenant's session ticket keys, in the cached leaves too: tickets issued so far no longer resume. */
  rotateTicketKeys(): void {
    const minter = this.context.minter;
    minter.rotateTicketKeys();
    for (const tenant of this.context.leaves.tenants()) this.replaceTicketKeys(tenant, minter.ticketKeysOf(tenant));
  }

  /** Gives `tenant`'s cached leaves `keys` as their session ticket keys (a worker gets them from its primary). */
  replaceTicketKeys(tenant: string, keys: Buffer): void {
    for (const e of this.context.leaves.entriesOf(tenant)) setTicketKeys(e.context, keys);
  }

  /**
   * Sets the view of `client`'s new-host bucket that the CONNECT check reads (a worker hears it
   * from its primary, which holds the limit: `kmi:issue-limited`).
   */
  assumeIssuanceTokens(client: string, tokens: number): void {
    this.context.rateLimiter.assume(client, tokens);
  }

  /**
   * Client connections open now, each once (a CONNECT's TCP connection, not also its
   * decrypted TLS socket and its origin connection); for metrics and tests.
   */
  get openConnections(): number {
    return this.sockets.size;
  }

  /** Every socket the proxy holds (client, decrypted and origin sides; some twice): zero once all is closed (leak tests). */
  get socketsHeld(): number {
    return this.sockets.size + this.interceptor.socketsHeld;
  }

  private onKeyEvent(e: WatchKeysResponse): void {
    this.context.keys.onEvent(e);
    dropStaleLeaves(e, this.context.leaves, (tenant) => this.context.minter.rotateTicketKeys(tenant), this.context.logger);
  }

  /**
   * Resolves the client's tenant, then calls `serve` with it, or answers 407/403 itself.
   * Synchronous unless a scrypt password has to be checked (the request body waits unread).
   */
  private withClient(req: IncomingMessage, res: ServerResponse | undefined, socket: Duplex, serve: (client: ClientInfo) => void): void {
    const resolving = this.tenantResolver.resolve(req.socket.remoteAddress, req.headers["proxy-authorization"]);
    if (!(resolving instanceof Promise)) {
      const client = this.clientOf(req, res, socket, resolving);
      if (client !== undefined) serve(client);
      return;
    }
    resolving.then(
      (match) => {
        if (socket.destroyed) return;
        const client = this.clientOf(req, res, socket, match);
        if (client !== undefined) serve(client);
      },
      (err: unknown) => {
        this.context.logger.error("tenant resolution failed", { error: err as Error });
        socket.destroy();
      },
    );
  }

  private clientOf(req: IncomingMessage, res: ServerResponse | undefined, socket: Duplex, match: TenantMatch): ClientInfo | undefined {
    const s = req.socket;
    const address = normalizeClientAddress(s.remoteAddress);
    if (match.kind === "tenant") return { tenant: match.tenant, client: `${address}:${s.remotePort ?? 0}`, address };
    const page =
      match.kind === "auth-required"
        ? renderBlockPage(407, req.headers.host ?? "", match.reason, undefined)
        : renderBlockPage(403, req.headers.host ?? "", "no tenant matches this client", undefined);
    const extra: Record<string, string> = match.kind === "auth-required" ? { "proxy-authenticate": 'Basic realm="kmi proxy"' } : {};
    this.context.accessLog.write({
      tenant: "",
      client: `${address}:${s.remotePort ?? 0}`,
      host: req.headers.host ?? "",
      method: req.method ?? "",
      path: req.url ?? "",
      status: page.status,
      bytes_up: 0,
      bytes_down: 0,
      decision: "block",
      rule: match.kind === "auth-required" ? "proxy-auth" : "no-tenant",
      duration_ms: 0,
      proto: "http/1.1",
    });
    // Logged before the answer goes out (a script that reads the log after its request finds the line).
    if (res !== undefined) {
      res.writeHead(page.status, { ...page.headers, ...extra });
      res.end(page.body);
      req.resume();
    } else {
      socket.end(rawHttpResponse(page, extra));
    }
    return undefined;
  }

  private upstream(): Http1Upstream {
    return { scheme: "http", agent: this.plainAgent };
  }

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    this.withClient(req, res, req.socket, (client) => handleHttp1Request(this.context, client, this.upstream(), req, res));
  }

  private onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    socket.on("error", () => {});
    this.withClient(req, undefined, socket, (client) => handleHttp1Upgrade(this.context, client, this.upstream(), req, socket, head));
  }

  /**
   * Stops accepting, lets in-flight requests finish (up to the grace period), then closes
   * every connection, the watch stream, the agent channel and the access log.
   */
  async destroy(): Promise<void> {
    const grace = this.options.shutdownGraceMs ?? 10_000;
    clearInterval(this.ticketTimer);
    clearInterval(this.leafTrim);
    this.leafTrim = undefined;
    this.release?.close();
    this.watch?.close();
    this.policy.close();
    if (this.address !== undefined) {
      const closed = new Promise<void>((resolve) => this.http.close(() => resolve()));
      this.http.closeIdleConnections();
      const timer = setTimeout(() => {
        this.interceptor.destroyAll();
        this.http.closeAllConnections();
        for (const s of this.sockets) s.destroy();
      }, grace);
      timer.unref();
      await Promise.race([closed, new Promise((r) => setTimeout(r, grace + 100).unref())]);
      clearTimeout(timer);
      this.interceptor.destroyAll();
      for (const s of this.sockets) s.destroy();
    }
    this.plainAgent.destroy();
    this.context.inspection.close();
    await this.metricsServer?.close();
    this.metricsServer = undefined;
    this.agent.close();
    await this.context.accessLog.close();
    this.address = undefined;
  }
}
