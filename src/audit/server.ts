/**
 * The Auditserver: opens its data directory, unseals its two keys into memory (never to
 * disk), serves AuditService and AuditAdminService over TLS with optional mutual TLS (client
 * certificates from the infrastructure CA), sweeps expired nonces, follows the store's change
 * feed for machine status changes made by any replica, and on destroy drains calls and closes
 * the store.
 */
import { X509Certificate, createPrivateKey, createPublicKey } from "node:crypto";
import { stat } from "node:fs/promises";
import { ConnectServer, type BoundAddresses } from "../common/connect-server.js";
import { FailedPrecondition } from "../common/errors.js";
import { checkDataDirModes } from "../common/data-dir.js";
import type { Logger } from "../common/logger.js";
import { parseListenAddress } from "../common/listen.js";
import { createMetricsRegistry, startMetricsServer, type MetricsServer } from "../common/metrics.js";
import { createAuditLog, keyedHash } from "../storage/audit-log.js";
import { CheckpointWitness } from "../storage/audit-checkpoint.js";
import { loadLogKeys } from "../storage/log-keys.js";
import { AuditCheckpointer } from "../storage/audit-checkpointer.js";
import { describeBackend, type StoreBackend } from "../storage/backend.js";
import type { Store } from "../storage/store.js";
import { sweepNonces } from "./attestation.js";
import type { AuditContext, Clock, KdcPeer } from "./context.js";
import { createCsrChecker } from "./csr.js";
import { credentialAad, dataPaths, loadAuditKeyring, openAuditStore, type MasterKeyOptions } from "./init.js";
import { createKdcPeer } from "./kdc-client.js";
import { services } from "./routes.js";
import { MachineStatusFollower } from "./status-follower.js";
import { MachineStatusHub } from "./status-hub.js";
import { ATTESTATION_KEY, META_KEY, SERVICE_TLS_KEY, Tables } from "./store.js";

/** How often expired nonces are deleted. */
const SWEEP_INTERVAL_MS = 60_000;
/** Warn at start when the TLS certificate has less than this left. */
const TLS_WARN_BEFORE_MS = 30 * 24 * 3600 * 1000;

/** Options of `AuditServer.create`. */
export interface AuditServerOptions extends MasterKeyOptions {
  dataDir: string;
  /** Where the store lives (default LevelDB in the data dir). */
  store?: StoreBackend | undefined;
  /** host:port; port 0 picks a free port. */
  listen: string;
  /** The KDC's URL; default the one recorded at init. */
  kdcUrl?: string | undefined;
  logger: Logger;
  clock?: Clock;
  metricsListen?: string | undefined;
  shutdownTimeoutMs?: number;
  /** Replaces the KDC client (tests). */
  kdc?: KdcPeer;
}

/** The Auditserver (create / start / destroy). */
export class AuditServer {
  private metricsServer: MetricsServer | undefined;
  private sweeper: NodeJS.Timeout | undefined;
  private closed = false;

  private constructor(
    /** The services' context (tests read the store through it). */
    readonly ctx: AuditContext,
    private readonly store: Store,
    private readonly server: ConnectServer,
    private readonly opts: AuditServerOptions,
    private readonly metrics: ReturnType<typeof createMetricsRegistry>,
    private readonly checkpoints: AuditCheckpointer,
    private readonly follower: MachineStatusFollower,
  ) {}

  /** Opens the data directory and builds the server (nothing listens yet). */
  static async create(opts: AuditServerOptions): Promise<AuditServer> {
    const tightened = await checkDataDirModes(opts.dataDir);
    if (tightened.length > 0) opts.logger.warn("tightened files under the data dir that other users could have read had the folder been open", { data_dir: opts.dataDir, files: tightened.slice(0, 20), count: tightened.length });
    const paths = dataPaths(opts.dataDir, opts.masterKeyFile);
    const notInitialized = `data dir ${opts.dataDir} is not initialized; run \`kmi audit init --data-dir ${opts.dataDir} --kdc-ca-file <the KDC's infra-ca.pem> --token-file <operator token>\` first`;
    const backend = opts.store ?? { kind: "level" };
    if (backend.kind === "level" && !(await stat(paths.store).then(() => true, () => false))) throw new FailedPrecondition(notInitialized);
    const keyring = await loadAuditKeyring(opts.dataDir, opts);
    const store = await openAuditStore(opts.dataDir, false, backend).catch((err: unknown) => {
      keyring.wipe();
      throw err;
    });
    try {
      const meta = await store.get(Tables.meta, META_KEY);
      if (meta === undefined) throw new FailedPrecondition(`${notInitialized} (an init did not finish)`);
      const att = await store.get(Tables.credentials, ATTESTATION_KEY);
      const tls = await store.get(Tables.credentials, SERVICE_TLS_KEY);
      if (att?.privateKey === undefined || tls?.privateKey === undefined) {
        throw new FailedPrecondition(`data dir ${opts.dataDir}: a credential is missing; restore the store from a backup`);
      }
      // Both keys are opened here, so a wrong master key fails at start, not on the first call.
      // The Auditserver seals nothing after init: the keyring is needed only here.
      const attPkcs8 = keyring.open(att.privateKey, credentialAad(ATTESTATION_KEY));
      const tlsPkcs8 = keyring.open(tls.privateKey, credentialAad(SERVICE_TLS_KEY));
      const { hmacKey, checkpointKey } = await loadLogKeys(store, keyring);
      keyring.wipe();
      const attestationPrivate = createPrivateKey({ key: Buffer.from(attPkcs8), format: "der", type: "pkcs8" });
      // The TLS key stays in this process's memory only; node's TLS wants PEM.
      const tlsKeyPem = createPrivateKey({ key: Buffer.from(tlsPkcs8), format: "der", type: "pkcs8" }).export({ format: "pem", type: "pkcs8" }) as string;
      attPkcs8.fill(0);
      tlsPkcs8.fill(0);
      const certPem = new X509Certificate(tls.certificateDer).toString();
      const caPem = new X509Certificate(tls.caCertificateDer).toString();

      const clock = opts.clock ?? { now: () => new Date() };
      const logger = opts.logger;
      const notAfter = new Date(new X509Certificate(tls.certificateDer).validTo);
      if (notAfter.getTime() - clock.now().getTime() < TLS_WARN_BEFORE_MS) {
        logger.warn("the Auditserver's TLS certificate expires soon; run `kmi audit init --reissue-certificate` with an operator token", { not_after: notAfter.toISOString() });
      }
      const kdcUrl = opts.kdcUrl ?? meta.kdcUrl;
      const realKdc = opts.kdc === undefined ? createKdcPeer({ url: kdcUrl, caPem, certPem, keyPem: tlsKeyPem, logger }) : undefined;
      const kdc = opts.kdc ?? realKdc!;
      const checkpoints = new AuditCheckpointer(store, createAuditLog(store, { clock }), { key: checkpointKey, origin: `audit/${meta.auditId}`, clock, logger });
      if (realKdc !== undefined) {
        // The KDC keeps the Auditserver's newest audit checkpoint (and the Auditserver the KDC's).
        checkpoints.setWitness({
          name: "the KDC",
          submit: async (checkpoint) => (await realKdc.client.witnessCheckpoint({ checkpoint })).witnessed,
          fetch: async () => (await realKdc.client.getWitnessedCheckpoint({ keyId: checkpoints.identity.keyId })).witnessed,
        });
      }
      const ctx: AuditContext = {
        store,
        audit: checkpoints.log,
        checkpoints,
        witness: new CheckpointWitness(store, clock),
        keyedHash: (v) => keyedHash(hmacKey, v),
        kdc,
        csr: createCsrChecker(),
        attestationKey: { privateKey: attestationPrivate, publicKey: createPublicKey(attestationPrivate), keyId: att.keyId },
        caPem,
        statusHub: new MachineStatusHub(),
        clock,
        logger,
        policy: { nonceTtlMs: 60_000, maxNoncesPerMachine: 16 },
      };
      const metrics = createMetricsRegistry();
      metrics.gauge("kmi_audit_refusals_suppressed", "Refusals of unauthenticated callers counted past their address's budget, not written to the audit log, since start.", [], (g) => g.set(ctx.audit.suppressedRefusals));
      metrics.gauge("kmi_audit_audit_checkpoint_seq", "Seq of the newest signed checkpoint of the Auditserver's audit log.", [], (g) => g.set(Number(checkpoints.lastSeq)));
      metrics.gauge("kmi_audit_audit_checkpoints_stopped", "1 when the audit log does not extend its signed checkpoints and no more are signed (run kmi ctl audit verify --server audit).", [], (g) => g.set(checkpoints.broken === undefined ? 0 : 1));
      const server = ConnectServer.create({
        name: "audit",
        services: services(ctx),
        tcp: { listen: opts.listen, tls: { cert: Buffer.from(certPem), key: Buffer.from(tlsKeyPem), ca: Buffer.from(caPem) }, mtls: "optional" },
        logger,
        metrics,
        ...(opts.shutdownTimeoutMs !== undefined ? { shutdownTimeoutMs: opts.shutdownTimeoutMs } : {}),
      });
      logger.info("audit store opened", { data_dir: opts.dataDir, store: describeBackend(backend, opts.dataDir), audit_id: meta.auditId, kdc: kdcUrl, attestation_key_id: att.keyId });
      const follower = new MachineStatusFollower(store, ctx.statusHub, logger);
      return new AuditServer(ctx, store, server, opts, metrics, checkpoints, follower);
    } catch (err) {
      keyring.wipe();
      await store.close();
      throw err;
    }
  }

  /** Starts listening; resolves with the bound addresses. */
  async start(): Promise<BoundAddresses> {
    // Before serving: a WatchMachineStatus stream then hears of every change after its snapshot.
    await this.follower.start();
    const bound = await this.server.start();
    await this.checkpoints.start();
    if (this.opts.metricsListen !== undefined) {
      this.metricsServer = await startMetricsServer(this.metrics, parseListenAddress(this.opts.metricsListen), this.opts.logger);
    }
    const sweep = () => {
      sweepNonces(this.ctx).catch((err: unknown) => this.opts.logger.warn("nonce sweep failed", { err }));
    };
    sweep();
    this.sweeper = setInterval(sweep, SWEEP_INTERVAL_MS);
    this.sweeper.unref();
    this.opts.logger.info("audit serving", { address: bound.tcp, data_dir: this.opts.dataDir });
    return bound;
  }

  /** Drains calls, stops listening and closes the store. Idempotent. */
  async destroy(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.sweeper);
    try {
      await this.server.destroy();
      await this.follower.stop();
      // The last entries get signed and handed to the witness before the store closes.
      await this.checkpoints.close();
      await this.metricsServer?.close();
    } finally {
      await this.store.close();
      this.opts.logger.info("store closed");
    }
  }
}
