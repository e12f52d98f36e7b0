/**
 * The primary process of `kmi proxy --workers N`: it forks N workers (node:cluster) that share
 * the proxy's listening socket, replaces one that dies, and holds what the workers share:
 *
 * - the one agent connection: leaves are minted here, once per host per machine, concurrent
 *   requests from every worker joined to one issuance, and kept in a machine-wide cache of leaf
 *   material (bounded, expiry-aware, dropped on the agent's key events like the workers' own);
 * - the per-client new-host limit (`--issue-rate`/`--issue-burst`), one per machine: a token is
 *   taken here only when a leaf is really minted for that client, and every worker is told when
 *   a client's bucket is empty, so that it answers that client's next new host with the 429 on
 *   the CONNECT (after asking here whether another worker served that host lately);
 * - the session ticket keys, per tenant, handed to the workers with each leaf, so that a TLS
 *   session made on one worker resumes on any other, and rotated here (sent to every worker);
 * - the WatchKeys stream, relayed to every worker (and replayed to a new one);
 * - the Prometheus endpoint, which sums the workers' registries with its own.
 *
 * SIGHUP is relayed to every worker; SIGTERM tells every worker to drain (in-flight requests
 * finish within the grace period) and resolves once they all exited. What crosses the IPC
 * channel is listed in ./worker-ipc.ts.
 */
import cluster, { type Worker } from "node:cluster";
import { AggregatorRegistry } from "prom-client";
import { backoffMs } from "../common/backoff.js";
import type { Logger } from "../common/logger.js";
import { MetricsRegistry, createMetricsRegistry, startMetricsServer, type MetricsServer } from "../common/metrics.js";
import { parseListenAddress } from "../common/listen.js";
import { AgentClient, type KeyWatch } from "../clients/agent-client.js";
import { KeyEventType, type WatchKeysResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { LeafCache, leafCacheKey } from "./leaf-cache.js";
import { LeafHosts } from "./leaf-hosts.js";
import { errorText } from "../common/errors.js";
import { createLeafMaterialMinter, MAX_LEAF_LIFETIME_MS, TICKET_KEY_ROTATION_MS, TicketKeyRing, type LeafMaterial, type LeafMaterialMinter } from "./leaf-minter.js";
import { leafNames } from "./origin-cert.js";
import { ClientRateLimiter } from "../common/rate-limit.js";
import { dropStaleLeaves, type ProxyAddress, type ProxyAgent } from "./server.js";
import { encodeKeyEvent, isKmiMessage, leafFailureOf, type LeafRequestMessage, type PrimaryMessage, type WorkerMessage } from "./worker-ipc.js";

/** Options of {@link ProxyPrimary}. */
export interface ProxyPrimaryOptions {
  /** Workers to run (at least 1). */
  readonly workers: number;
  /** Script each worker runs (`dist/cmd/kmi.js`), and its arguments (`proxy …`, the primary's own). */
  readonly exec: string;
  readonly args: readonly string[];
  /** Variables added to each worker's environment (its allocator: see allocator.ts). */
  readonly workerEnv?: Readonly<Record<string, string>>;
  /** Host the workers listen on (for the address returned by start). */
  readonly host: string;
  /** The agent's Unix socket (when `agent` is not given). */
  readonly agentSocket?: string;
  /** An agent client; closed on destroy. */
  readonly agent?: ProxyAgent;
  /** Most leaves in the machine-wide cache; default 10,000. */
  readonly leafCacheSize?: number;
  /** Longest leaf lifetime asked for. */
  readonly leafMaxLifetimeMs?: number;
  /** New-host issuances per second per client address, for the whole machine; 0 disables; default 20. */
  readonly issueRatePerSecond?: number;
  /** Burst of new-host issuances per client address; default 100. */
  readonly issueBurst?: number;
  /** Address of the Prometheus `/metrics` endpoint (the workers' metrics summed); off when unset. */
  readonly metricsListen?: string;
  /** Time between session ticket key rotations; default an hour; 0: only on revoke and quarantine. */
  readonly ticketKeyRotationMs?: number;
  /** Time workers get to drain on shutdown; default 10 s. */
  readonly shutdownGraceMs?: number;
  readonly logger: Logger;
}

/** One running worker, as `kmi up status` and the metrics show it. */
export interface WorkerInfo {
  /** The cluster's worker id (a replacement gets a new one). */
  readonly id: number;
  readonly pid: number;
}

/** Key events kept for a new worker after the last snapshot (rotations are rare; this bounds a storm). */
const MAX_REPLAY = 10_000;
/** A worker that dies sooner than this after its start counts toward the respawn backoff. */
const QUICK_DEATH_MS = 10_000;
/** How long the primary waits for a worker's metrics before rendering without them. */
const METRICS_TIMEOUT_MS = 2_000;

/** The registry the primary serves: its own metrics plus every worker's, summed. */
class ClusterMetrics extends MetricsRegistry {
  private next = 1;
  private readonly waiting = new Map<number, (metrics: unknown[]) => void>();

  constructor(
    private readonly own: MetricsRegistry,
    private readonly workers: () => Worker[],
  ) {
    super();
  }

  /** Takes a worker's answer. */
  answer(id: number, metrics: unknown[]): void {
    this.waiting.get(id)?.(metrics);
  }

  private ask(w: Worker): Promise<unknown[] | undefined> {
    const id = this.next++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        resolve(undefined);
      }, METRICS_TIMEOUT_MS);
      this.waiting.set(id, (m) => {
        clearTimeout(timer);
        this.waiting.delete(id);
        resolve(m);
      });
      sendTo(w, { type: "kmi:metrics", id });
    });
  }

  override async render(): Promise<string> {
    const own = await this.own.prom.getMetricsAsJSON();
    const theirs = await Promise.all(this.workers().filter((w) => w.isConnected()).map((w) => this.ask(w)));
    const all = [own, ...theirs.filter((m): m is unknown[] => m !== undefined)];
    for (const list of all) {
      for (const m of list as { name: string; aggregator?: string }[]) {
        // One version per machine, not one per process.
        if (m.name === "kmi_build_info") m.aggregator = "first";
      }
    }
    return AggregatorRegistry.aggregate(all).metrics();
  }

  override get contentType(): string {
    return this.own.contentType;
  }
}

/** The primary. */
export class ProxyPrimary {
  private readonly leaves: LeafCache<LeafMaterial>;
  private readonly tickets = new TicketKeyRing();
  /** Tenants whose ticket keys went to a worker (a rotation sends them their new ones). */
  private readonly ticketTenants = new Set<string>();
  private ticketTimer: NodeJS.Timeout | undefined;
  private readonly minter: LeafMaterialMinter;
  private readonly limiter: ClientRateLimiter;
  /** Tenant + CONNECT target pairs any worker got a leaf for lately (spared by the new-host limit). */
  private readonly leafHosts = new LeafHosts();
  private readonly metrics = createMetricsRegistry();
  private readonly clusterMetrics: ClusterMetrics;
  private readonly started = new Map<number, number>();
  private watch: KeyWatch | undefined;
  private watchConnected = false;
  private replay: Uint8Array[] = [];
  private metricsServer: MetricsServer | undefined;
  private address: ProxyAddress | undefined;
  private stopping = false;
  private quickDeaths = 0;
  private readonly mints;
  private readonly restarts;
  private readonly onMessage = (w: Worker, m: unknown): void => this.handle(w, m);
  private readonly onExit = (w: Worker, code: number | null, signal: string | null): void => this.exited(w, code, signal);

  private constructor(
    private readonly options: ProxyPrimaryOptions,
    private readonly agent: ProxyAgent,
  ) {
    this.leaves = new LeafCache<LeafMaterial>({ maxEntries: options.leafCacheSize ?? 10_000 });
    this.minter = createLeafMaterialMinter({ agent, maxLifetimeMs: options.leafMaxLifetimeMs ?? MAX_LEAF_LIFETIME_MS });
    this.limiter = new ClientRateLimiter({ perSecond: options.issueRatePerSecond ?? 20, burst: options.issueBurst ?? 100 });
    this.clusterMetrics = new ClusterMetrics(this.metrics, () => Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined));
    const m = this.metrics;
    m.gauge("kmi_proxy_workers", "Proxy worker processes running.", [], (g) => g.set(this.workers.length));
    m.gauge("kmi_proxy_worker_info", "One series per running worker: its cluster id and pid; always 1.", ["worker", "pid"], (g) => {
      g.reset();
      for (const w of this.workers) g.labels(String(w.id), String(w.pid)).set(1);
    });
    m.gauge("kmi_proxy_shared_leaf_cache_entries", "Leaves in the primary's machine-wide cache (each worker also keeps its TLS contexts).", [], (g) => g.set(this.leaves.size));
    this.mints = m.counter("kmi_proxy_leaf_mints_total", "Leaves minted by the primary (one IssueLeafCertificate each), once per host per machine.", []);
    this.restarts = m.counter("kmi_proxy_worker_restarts_total", "Workers that died and were replaced.", []);
  }

  /** Builds the primary (nothing is forked yet). */
  static create(options: ProxyPrimaryOptions): ProxyPrimary {
    if (!(options.workers >= 1)) throw new Error("workers: at least 1");
    const agent = options.agent ?? (options.agentSocket !== undefined ? new AgentClient({ socketPath: options.agentSocket, logger: options.logger }) : undefined);
    if (agent === undefined) throw new Error("agent socket: not set; give --agent-socket with the key agent's Unix socket path");
    return new ProxyPrimary(options, agent);
  }

  /** The workers running now. */
  get workers(): WorkerInfo[] {
    return Object.values(cluster.workers ?? {})
      .filter((w): w is Worker => w !== undefined && w.process.pid !== undefined && !w.isDead())
      .map((w) => ({ id: w.id, pid: w.process.pid! }));
  }

  /** Watches the agent, forks the workers, and resolves once every one listens. */
  async start(): Promise<ProxyAddress> {
    if (this.address !== undefined) return this.address;
    const log = this.options.logger;
    this.watch = this.agent.watchKeys(
      (e) => this.onKeyEvent(e),
      (connected) => {
        this.watchConnected = connected;
        this.broadcast({ type: "kmi:watch-state", connected });
      },
    );
    cluster.setupPrimary({ exec: this.options.exec, args: [...this.options.args], serialization: "advanced" });
    cluster.on("message", this.onMessage);
    const forks = Array.from({ length: this.options.workers }, () => this.fork());
    let port: number;
    try {
      const ports = await Promise.all(forks.map((w) => listening(w)));
      port = ports[0]!;
    } catch (err) {
      await this.destroy();
      throw err;
    }
    cluster.on("exit", this.onExit);
    const rotation = this.options.ticketKeyRotationMs ?? TICKET_KEY_ROTATION_MS;
    if (rotation > 0) {
      this.ticketTimer = setInterval(() => this.rotateTicketKeys(), rotation);
      this.ticketTimer.unref();
    }
    if (this.options.metricsListen !== undefined) {
      this.metricsServer = await startMetricsServer(this.clusterMetrics, parseListenAddress(this.options.metricsListen), log);
    }
    this.address = { host: this.options.host, port };
    log.info("proxy listening", { address: `${this.options.host}:${port}`, workers: this.workers.map((w) => w.pid) });
    return this.address;
  }

  /** Replaces every tenant's session ticket keys and sends the new ones to every worker (tickets issued so far no longer resume). */
  rotateTicketKeys(): void {
    this.tickets.rotate();
    for (const tenant of this.ticketTenants) this.broadcast({ type: "kmi:ticket-keys", tenant, keys: this.tickets.of(tenant) });
    this.options.logger.debug("session ticket keys rotated", { tenants: this.ticketTenants.size });
  }

  /** Relays a policy reload (SIGHUP) to every worker. */
  reload(): void {
    this.broadcast({ type: "kmi:reload" });
  }

  /** Tells every worker to drain, waits for them (SIGKILL after the grace period), and closes. */
  async destroy(): Promise<void> {
    this.stopping = true;
    clearInterval(this.ticketTimer);
    cluster.off("exit", this.onExit);
    const grace = this.options.shutdownGraceMs ?? 10_000;
    const alive = Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined && !w.isDead());
    await Promise.all(
      alive.map(
        (w) =>
          new Promise<void>((resolve) => {
            if (w.isDead()) return resolve();
            const kill = setTimeout(() => w.process.kill("SIGKILL"), grace + 5_000);
            w.once("exit", () => {
              clearTimeout(kill);
              resolve();
            });
            if (w.isConnected()) sendTo(w, { type: "kmi:shutdown" });
            else w.process.kill("SIGTERM");
          }),
      ),
    );
    cluster.off("message", this.onMessage);
    this.watch?.close();
    this.watch = undefined;
    await this.metricsServer?.close();
    this.metricsServer = undefined;
    this.agent.close();
    this.address = undefined;
  }

  private fork(): Worker {
    const w = cluster.fork({ ...this.options.workerEnv });
    this.started.set(w.id, Date.now());
    // A failed signal or IPC write to a dying worker: its exit handler replaces it; the primary goes on.
    w.on("error", (err) => this.options.logger.debug("proxy worker: IPC or signal failed", { worker: w.id, error: errorText(err) }));
    return w;
  }

  /** A worker died: replaced at once, unless workers keep dying soon after their start (then with backoff). */
  private exited(w: Worker, code: number | null, signal: string | null): void {
    const uptime = Date.now() - (this.started.get(w.id) ?? 0);
    this.started.delete(w.id);
    if (this.stopping) return;
    this.restarts.inc();
    this.quickDeaths = uptime < QUICK_DEATH_MS ? this.quickDeaths + 1 : 0;
    const delay = this.quickDeaths <= 1 ? 0 : backoffMs(this.quickDeaths - 1, 100, 30_000);
    this.options.logger.warn("proxy worker died; starting another", { worker: w.id, pid: w.process.pid, code, signal, uptimeMs: uptime, delayMs: delay });
    const t = setTimeout(() => {
      if (!this.stopping) this.fork();
    }, delay);
    t.unref();
  }

  private broadcast(m: PrimaryMessage): void {
    for (const w of Object.values(cluster.workers ?? {})) {
      if (w !== undefined) sendTo(w, m);
    }
  }

  private onKeyEvent(e: WatchKeysResponse): void {
    dropStaleLeaves(e, this.leaves, (tenant) => this.tickets.rotate(tenant), this.options.logger);
    const bytes = encodeKeyEvent(e);
    if (e.type === KeyEventType.SNAPSHOT) this.replay = [bytes];
    else if (this.replay.length < MAX_REPLAY) this.replay.push(bytes);
    this.broadcast({ type: "kmi:key-event", event: bytes });
  }

  private handle(w: Worker, m: unknown): void {
    if (!isKmiMessage(m)) return;
    const msg = m as WorkerMessage;
    switch (msg.type) {
      case "kmi:leaf":
        void this.leaf(w, msg);
        break;
      case "kmi:new-host":
        sendTo(w, { type: "kmi:new-host", id: msg.id, refused: this.limiter.exhausted(msg.client) && !this.leafHosts.has(msg.tenant, msg.target) });
        break;
      case "kmi:watch":
        // A new worker: the stream's state and what it said since its last snapshot.
        sendTo(w, { type: "kmi:watch-state", connected: this.watchConnected });
        for (const event of this.replay) sendTo(w, { type: "kmi:key-event", event });
        break;
      case "kmi:metrics":
        this.clusterMetrics.answer(msg.id, msg.metrics);
        break;
    }
  }

  /** A worker's leaf: from the machine-wide cache, joined to a running issuance, or minted. */
  private async leaf(w: Worker, r: LeafRequestMessage): Promise<void> {
    // The same key as the worker's cache (interceptor.ts): a truncated name list is per host.
    const key = leafCacheKey(r.tenant, r.origin.fingerprint, leafNames(r.origin, r.host).truncated ? r.host : "");
    let answer: PrimaryMessage;
    try {
      const { entry, source } = await this.leaves.obtain(
        r.tenant,
        key,
        () => this.minter.mint(r.tenant, r.origin, r.host),
        () => this.admit(r.client),
      );
      if (source === "issued") this.mints.inc();
      if (r.target !== "") this.leafHosts.remember(r.tenant, r.target);
      answer = { type: "kmi:leaf", id: r.id, ok: true, material: entry, ticketKeys: this.tickets.of(r.tenant) };
      this.ticketTenants.add(r.tenant);
    } catch (err) {
      answer = { type: "kmi:leaf", id: r.id, ok: false, error: leafFailureOf(err) };
    }
    sendTo(w, answer);
  }

  /**
   * Takes a token of `client`'s new-host bucket (asked only before a real issuance: a cached leaf
   * or a running issuance costs nothing). When the bucket is left empty, or was, every worker is
   * told before the answer goes out, so the next new host of that client is refused on the CONNECT.
   */
  private admit(client: string): boolean {
    const ok = this.limiter.take(client);
    if (this.limiter.exhausted(client)) this.broadcast({ type: "kmi:issue-limited", client, tokens: this.limiter.tokens(client) });
    return ok;
  }
}

/** Resolves with the port a new worker listens on; rejects if it exits first. */
function listening(w: Worker): Promise<number> {
  return new Promise((resolve, reject) => {
    const onListening = (a: { port: number }): void => {
      w.off("exit", onExit);
      resolve(a.port);
    };
    const onExit = (code: number | null, signal: string | null): void => {
      w.off("listening", onListening);
      reject(new Error(`proxy worker exited before listening (${signal ?? `code ${code}`}); see its log line above`));
    };
    w.once("listening", onListening);
    w.once("exit", onExit);
  });
}

/**
 * Sends `m` to a worker, quietly failing when the worker is gone. A worker killed an instant
 * before still looks connected; the write then fails with EPIPE, reported to the callback here
 * (without it, an 'error' event nobody listens to would end the primary). Its exit handler
 * starts the replacement.
 */
function sendTo(w: Worker, m: PrimaryMessage): void {
  if (!w.isConnected()) return;
  w.send(m, undefined, () => {});
}
