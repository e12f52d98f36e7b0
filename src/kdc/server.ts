/**
 * The KDC server: opens the data directory, unseals its TLS key into memory (never to disk),
 * serves the KDC's services over TLS with optional mutual TLS (client certificates from the
 * infrastructure CA), loads the Auditserver's attestation key (a file, or fetched from the
 * Auditserver in the background), follows the Auditserver's machine status stream for
 * quarantines (as a client with its own kmi://service/kdc certificate), and on destroy ends the
 * watch streams, drains calls and closes the store.
 */
import { createPrivateKey, X509Certificate } from "node:crypto";
import type { RateLimit } from "../common/rate-limit.js";
import { ConnectServer, type BoundAddresses } from "../common/connect-server.js";
import { checkDataDirModes } from "../common/data-dir.js";
import type { Logger } from "../common/logger.js";
import { createMetricsRegistry, startMetricsServer, type MetricsServer } from "../common/metrics.js";
import { parseListenAddress } from "../common/listen.js";
import { describeBackend, type StoreBackend } from "../storage/backend.js";
import type { Store } from "../storage/store.js";
import type { Clock, KdcContext } from "./context.js";
import { allTlsNames, issueKdcTlsCredential, openKdc, type MasterKeyOptions, type OpenedKdc, type TlsNames } from "./init.js";
import { FetchedAttestationKey, FileAttestationKey } from "./attestation-key.js";
import { createAuditClient, type AuditClient } from "./audit-client.js";
import type { AttestationKeyProvider } from "./context.js";
import { MachineStatusFeed } from "./machine-status-feed.js";
import type { WatchHubOptions } from "./watch-hub.js";
import { CREDENTIAL, credentialAad, put } from "./kdc-store.js";
import { sealedRootKeys, type Pkcs11Settings } from "./root-keys.js";
import { KdcOperations } from "./operations.js";
import { DEFAULT_SCHEDULER_INTERVAL_MS, RotationScheduler } from "./scheduler.js";
import { Election } from "../storage/election.js";
import { defaultPortalDir, PortalSite } from "./portal-static.js";
import { services } from "./routes.js";

/** Re-issue the KDC's TLS certificate when less than this is left. */
const TLS_RENEW_BEFORE_MS = 30 * 24 * 3600 * 1000;

/** Options of `KdcServer.create`. */
export interface KdcServerOptions extends MasterKeyOptions {
  dataDir: string;
  /** Where the store lives (default LevelDB in the data dir). */
  store?: StoreBackend | undefined;
  /** host:port; port 0 picks a free port. */
  listen: string;
  /** Extra names for the TLS certificate (re-issued at start when they change). */
  tls?: TlsNames;
  logger: Logger;
  clock?: Clock;
  metricsListen?: string | undefined;
  shutdownTimeoutMs?: number;
  /** The Auditserver ("https://host:port"): attestation key (unless a file is given) and machine status. */
  auditUrl?: string | undefined;
  /** The Auditserver's attestation public key, PEM file. */
  attestationKeyFile?: string | undefined;
  /** Lease of released secrets, ms (default one day). */
  leaseMs?: number | undefined;
  /** Folder of the portal's bundle; default dist/web when it is built (else no portal). */
  portalDir?: string | undefined;
  /** How long a PENDING version waits for its certificate, ms (default 30 days). */
  pendingTtlMs?: number | undefined;
  /** Leaves one machine may have signed through token-held intermediates, per second and in a burst (default 50 and 500). */
  signLeafRate?: RateLimit | undefined;
  /** Watch stream tuning (tests). */
  watch?: WatchHubOptions;
  /** The PKCS#11 token holding the roots' keys (when `kmi kdc init` made them there). */
  pkcs11?: Pkcs11Settings | undefined;
  /** The rotation scheduler: run interval and election lease (defaults 60 s and 10 s). */
  scheduler?: { intervalMs?: number; electionTtlSeconds?: number };
}

/** The extended key usage OID a certificate needs to be presented as a TLS client. */
const CLIENT_AUTH = "1.3.6.1.5.5.7.3.2";

function sameSet(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && [...a].sort().join(",") === [...b].sort().join(",");
}

/** The KDC server (create / start / destroy). */
export class KdcServer {
  private metricsServer: MetricsServer | undefined;
  private closed = false;

  private constructor(
    /** The services' context (tests read the store through it). */
    readonly ctx: KdcContext,
    private readonly opened: OpenedKdc,
    private readonly server: ConnectServer,
    private readonly opts: KdcServerOptions,
    private readonly metrics: ReturnType<typeof createMetricsRegistry>,
    private readonly audit: { client: AuditClient; key: FetchedAttestationKey | undefined; feed: MachineStatusFeed } | undefined,
    /** The rotation scheduler (tests look at whether it leads). */
    readonly scheduler: RotationScheduler,
  ) {}

  private get store(): Store {
    return this.opened.store;
  }

  /** Opens the data directory and builds the server (nothing listens yet). */
  static async create(opts: KdcServerOptions): Promise<KdcServer> {
    const tightened = await checkDataDirModes(opts.dataDir);
    if (tightened.length > 0) opts.logger.warn("tightened files under the data dir that other users could have read had the folder been open", { data_dir: opts.dataDir, files: tightened.slice(0, 20), count: tightened.length });
    const fileKey = opts.attestationKeyFile === undefined ? undefined : await FileAttestationKey.load(opts.attestationKeyFile);
    // The fetching key needs the KDC's TLS material, which needs the opened store: it is
    // created first and given its fetch function once the client exists.
    let fetcher: AuditClient | undefined;
    const fetchedKey =
      fileKey === undefined && opts.auditUrl !== undefined
        ? new FetchedAttestationKey({
            url: opts.auditUrl,
            logger: opts.logger,
            fetch: async (signal) => {
              if (fetcher === undefined) throw new Error("the Auditserver client is not ready");
              return fetcher.client.getAttestationKey({}, { signal, timeoutMs: 10_000 });
            },
          })
        : undefined;
    const attestationKey: AttestationKeyProvider | undefined = fileKey ?? fetchedKey;
    const opened = await openKdc({ ...opts, ...(attestationKey ? { attestationKey } : {}), ...(opts.leaseMs !== undefined ? { leaseMs: opts.leaseMs } : {}), ...(opts.pendingTtlMs !== undefined ? { pendingTtlMs: opts.pendingTtlMs } : {}) });
    const { ctx, store } = opened;
    try {
      const tls = await KdcServer.tlsMaterial(ctx, opts.tls);
      const metrics = createMetricsRegistry();
      metrics.gauge("kmi_kdc_watch_streams", "WatchSecrets streams open now.", [], (g) => g.set(opened.hub.streamCount));
      metrics.gauge("kmi_kdc_watch_opens", "WatchSecrets streams opened since start, by how they started (snapshot, or resumed from the agent's revision).", ["start"], (g) => {
        g.set({ start: "snapshot" }, opened.hub.opened.snapshot);
        g.set({ start: "resumed" }, opened.hub.opened.resumed);
      });
      metrics.gauge("kmi_kdc_watch_shed", "Stream opens and fetches shed with UNAVAILABLE and a retry hint since start, by the limit reached (streams: --max-watch-streams, opening: --max-concurrent-opens).", ["limit"], (g) => {
        g.set({ limit: "streams" }, opened.hub.shed.streams);
        g.set({ limit: "opening" }, opened.hub.shed.opening);
      });
      metrics.gauge("kmi_kdc_connected_machines", "Machines with a WatchSecrets stream open now.", [], (g) => g.set(opened.hub.connectedCount));
      metrics.gauge("kmi_kdc_quarantined_machines", "Machines the KDC refuses as quarantined.", [], (g) => g.set(opened.quarantine.list().length));
      metrics.gauge("kmi_kdc_attestation_key_loaded", "1 when the Auditserver's attestation key is loaded.", [], (g) => g.set(ctx.attestationKey.loaded ? 1 : 0));
      metrics.gauge("kmi_kdc_audit_refusals_suppressed", "Refusals of unauthenticated callers counted past their address's budget, not written to the audit log, since start.", [], (g) => g.set(ctx.audit.suppressedRefusals));
      const portalDir = opts.portalDir ?? defaultPortalDir();
      const portal = portalDir === undefined ? undefined : await PortalSite.load(portalDir);
      if (portal === undefined) opts.logger.warn("the portal is not built (run `npm run build:web`); the KDC serves its API only", {});
      metrics.gauge("kmi_kdc_audit_checkpoint_seq", "Seq of the newest signed checkpoint of the KDC's audit log.", [], (g) => g.set(Number(opened.checkpoints.lastSeq)));
      metrics.gauge("kmi_kdc_audit_checkpoints_stopped", "1 when the audit log does not extend its signed checkpoints and no more are signed (run kmi ctl audit verify).", [], (g) => g.set(opened.checkpoints.broken === undefined ? 0 : 1));
      const ops = new KdcOperations(ctx);
      const scheduler = new RotationScheduler(ctx, ops, {
        election: new Election(opened.backend, { name: "scheduler", ttlSeconds: opts.scheduler?.electionTtlSeconds ?? 10, logger: opts.logger, now: () => ctx.clock.now() }),
        intervalMs: opts.scheduler?.intervalMs ?? DEFAULT_SCHEDULER_INTERVAL_MS,
        logger: opts.logger,
        metrics,
      });
      const server = ConnectServer.create({
        name: "kdc",
        // The portal's operator pages reach the Auditserver through this KDC (when it knows one).
        services: services(ctx, ops, opts.auditUrl !== undefined ? () => fetcher?.admin : undefined),
        tcp: { listen: opts.listen, tls, mtls: "optional" },
        ...(portal !== undefined ? { fallback: (req, res) => portal.serve(req, res) } : {}),
        logger: opts.logger,
        metrics,
        ...(opts.shutdownTimeoutMs !== undefined ? { shutdownTimeoutMs: opts.shutdownTimeoutMs } : {}),
      });
      let audit: { client: AuditClient; key: FetchedAttestationKey | undefined; feed: MachineStatusFeed } | undefined;
      if (opts.auditUrl !== undefined) {
        const client = createAuditClient({ url: opts.auditUrl, caPem: tls.ca.toString(), certPem: tls.cert.toString(), keyPem: tls.key.toString() });
        fetcher = client;
        const feed = new MachineStatusFeed({
          url: opts.auditUrl,
          registry: opened.quarantine,
          logger: opts.logger,
          watch: (signal) => client.client.watchMachineStatus({}, { signal }),
        });
        audit = { client, key: fetchedKey, feed };
        // The Auditserver keeps the KDC's newest audit checkpoint (and the KDC the Auditserver's).
        opened.checkpoints.setWitness({
          name: "the Auditserver",
          submit: async (checkpoint) => (await client.client.witnessCheckpoint({ checkpoint }, { timeoutMs: 10_000 })).witnessed,
          fetch: async () => (await client.client.getWitnessedCheckpoint({ keyId: opened.checkpoints.identity.keyId }, { timeoutMs: 10_000 })).witnessed,
        });
      } else {
        opts.logger.warn("no --audit-url: quarantines are not received from the Auditserver (the ones stored still apply)", {
          quarantined: opened.quarantine.list().length,
        });
      }
      if (attestationKey === undefined) {
        opts.logger.warn("no attestation key: give --audit-url or --attestation-key-file; until then every distribution call is UNAVAILABLE", {});
      } else if (fileKey !== undefined) {
        opts.logger.info("attestation key loaded", { file: opts.attestationKeyFile, key_id: fileKey.keyId });
      }
      return new KdcServer(ctx, opened, server, opts, metrics, audit, scheduler);
    } catch (err) {
      ctx.rootKeys?.close();
      await store.close();
      throw err;
    }
  }

  /**
   * The TLS certificate and key (PEM in memory) and the client CA. Re-issues the certificate,
   * in one batch with its audit entry, when it is about to expire or the configured names
   * changed.
   */
  private static async tlsMaterial(ctx: KdcContext, names: TlsNames | undefined): Promise<{ cert: Buffer; key: Buffer; ca: Buffer }> {
    let tls = await ctx.store.getCredential(CREDENTIAL.kdcTls);
    const infra = await ctx.store.getCredential(CREDENTIAL.infraCa);
    if (tls?.privateKey === undefined || infra === undefined) throw new Error("the KDC's TLS or infrastructure CA credential is missing; restore the store from a backup");
    const info = ctx.pki.summarize(tls.certificateDer);
    const now = ctx.clock.now();
    const wanted = names === undefined ? undefined : allTlsNames(names);
    const reasons: string[] = [];
    if (info.notAfter.getTime() - now.getTime() < TLS_RENEW_BEFORE_MS) reasons.push("expiring");
    // The same certificate is the KDC's client identity towards the Auditserver (WatchMachineStatus).
    if (!info.uris.includes("kmi://service/kdc") || !(new X509Certificate(tls.certificateDer).keyUsage ?? []).includes(CLIENT_AUTH)) {
      reasons.push("no kmi://service/kdc client identity");
    }
    if (wanted !== undefined && (names!.dnsNames.length > 0 || names!.ipAddresses.length > 0)) {
      if (!sameSet(wanted.dnsNames, info.dnsNames) || !sameSet(wanted.ipAddresses, info.ipAddresses)) reasons.push("names changed");
    }
    if (reasons.length > 0) {
      const issuer = (ctx.rootKeys ?? sealedRootKeys(ctx.pki, ctx.sealer)).issuer(infra);
      try {
        tls = await issueKdcTlsCredential(ctx.pki, ctx.sealer, issuer, names ?? { dnsNames: info.dnsNames, ipAddresses: info.ipAddresses }, now);
      } finally {
        issuer.wipe();
      }
      const s = ctx.pki.summarize(tls.certificateDer);
      await ctx.audit.append(
        { actor: "system", action: "kdc.tls.reissue", target: "kdc/tls", outcome: "ok", details: { reason: reasons.join(", "), sha256: s.sha256Fingerprint, not_after: s.notAfter.toISOString() } },
        [put.credential(tls)],
      );
      ctx.logger.info("re-issued the KDC's TLS certificate", { reason: reasons.join(", "), not_after: s.notAfter.toISOString() });
    }
    const pkcs8 = ctx.sealer.open(tls.privateKey!, credentialAad(CREDENTIAL.kdcTls));
    // The key stays in this process's memory only; node's TLS wants PEM.
    const keyPem = createPrivateKey({ key: Buffer.from(pkcs8), format: "der", type: "pkcs8" }).export({ format: "pem", type: "pkcs8" }) as string;
    pkcs8.fill(0);
    return {
      cert: Buffer.from(ctx.pki.certificatePem(tls.certificateDer)),
      key: Buffer.from(keyPem),
      ca: Buffer.from(ctx.pki.certificatePem(infra.certificateDer)),
    };
  }

  /** Starts listening; resolves with the bound addresses. */
  async start(): Promise<BoundAddresses> {
    const bound = await this.server.start();
    this.audit?.key?.start();
    this.audit?.feed.start();
    await this.opened.checkpoints.start();
    this.scheduler.start();
    if (this.opts.metricsListen !== undefined) {
      this.metricsServer = await startMetricsServer(this.metrics, parseListenAddress(this.opts.metricsListen), this.opts.logger);
    }
    this.opts.logger.info("kdc serving", { address: bound.tcp, data_dir: this.opts.dataDir, store: describeBackend(this.opts.store ?? { kind: "level" }, this.opts.dataDir) });
    return bound;
  }

  /** Drains calls, stops listening and closes the store. Idempotent. */
  async destroy(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.audit?.feed.close();
      await this.audit?.key?.close();
      // The election is given up first: another replica takes the scheduler over at once.
      await this.scheduler.stop();
      // Watch streams end now (OK): agents reconnect to another KDC or when this one is back.
      this.opened.hub.closeAll();
      await this.server.destroy();
      await this.opened.follower?.stop();
      await this.opened.hub.settled();
      await this.opened.hub.releasePresence();
      // The last entries get signed and handed to the witness before the store closes.
      await this.opened.checkpoints.close();
      this.audit?.client.close();
      await this.metricsServer?.close();
    } finally {
      this.ctx.rootKeys?.close();
      await this.store.close();
      this.opts.logger.info("store closed");
    }
  }
}
