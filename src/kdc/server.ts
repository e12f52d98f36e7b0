/**
 * The KDC server: opens the data directory, unseals its TLS key into memory (never to disk),
 * serves the KDC's services over TLS with optional mutual TLS (client certificates from the
 * infrastructure CA), and on destroy drains calls and closes the store.
 */
import { createPrivateKey } from "node:crypto";
import { ConnectServer, type BoundAddresses } from "../common/connect-server.js";
import type { Logger } from "../common/logger.js";
import { createMetricsRegistry, startMetricsServer, type MetricsServer } from "../common/metrics.js";
import { parseListenAddress } from "../common/listen.js";
import type { LevelStore } from "../storage/level-store.js";
import type { Clock, KdcContext } from "./context.js";
import { allTlsNames, issueKdcTlsCredential, openKdc, type MasterKeyOptions, type TlsNames } from "./init.js";
import { CREDENTIAL, credentialAad, put } from "./kdc-store.js";
import { KdcOperations } from "./operations.js";
import { services } from "./routes.js";

/** Re-issue the KDC's TLS certificate when less than this is left. */
const TLS_RENEW_BEFORE_MS = 30 * 24 * 3600 * 1000;

/** Options of `KdcServer.create`. */
export interface KdcServerOptions extends MasterKeyOptions {
  dataDir: string;
  /** host:port; port 0 picks a free port. */
  listen: string;
  /** Extra names for the TLS certificate (re-issued at start when they change). */
  tls?: TlsNames;
  logger: Logger;
  clock?: Clock;
  metricsListen?: string | undefined;
  shutdownTimeoutMs?: number;
}

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
    private readonly store: LevelStore,
    private readonly server: ConnectServer,
    private readonly opts: KdcServerOptions,
    private readonly metrics: ReturnType<typeof createMetricsRegistry>,
  ) {}

  /** Opens the data directory and builds the server (nothing listens yet). */
  static async create(opts: KdcServerOptions): Promise<KdcServer> {
    const { ctx, store } = await openKdc(opts);
    try {
      const tls = await KdcServer.tlsMaterial(ctx, opts.tls);
      const metrics = createMetricsRegistry();
      const server = ConnectServer.create({
        name: "kdc",
        services: services(ctx, new KdcOperations(ctx)),
        tcp: { listen: opts.listen, tls, mtls: "optional" },
        logger: opts.logger,
        metrics,
        ...(opts.shutdownTimeoutMs !== undefined ? { shutdownTimeoutMs: opts.shutdownTimeoutMs } : {}),
      });
      return new KdcServer(ctx, store, server, opts, metrics);
    } catch (err) {
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
    if (tls?.privateKey === undefined || infra?.privateKey === undefined) throw new Error("the KDC's TLS or infrastructure CA credential is missing; restore the store from a backup");
    const info = ctx.pki.summarize(tls.certificateDer);
    const now = ctx.clock.now();
    const wanted = names === undefined ? undefined : allTlsNames(names);
    const reasons: string[] = [];
    if (info.notAfter.getTime() - now.getTime() < TLS_RENEW_BEFORE_MS) reasons.push("expiring");
    if (wanted !== undefined && (names!.dnsNames.length > 0 || names!.ipAddresses.length > 0)) {
      if (!sameSet(wanted.dnsNames, info.dnsNames) || !sameSet(wanted.ipAddresses, info.ipAddresses)) reasons.push("names changed");
    }
    if (reasons.length > 0) {
      const pkcs8 = ctx.sealer.open(infra.privateKey, credentialAad(CREDENTIAL.infraCa));
      try {
        tls = await issueKdcTlsCredential(ctx.pki, ctx.sealer, { certificateDer: infra.certificateDer, pkcs8 }, names ?? { dnsNames: info.dnsNames, ipAddresses: info.ipAddresses }, now);
      } finally {
        pkcs8.fill(0);
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
    if (this.opts.metricsListen !== undefined) {
      this.metricsServer = await startMetricsServer(this.metrics, parseListenAddress(this.opts.metricsListen), this.opts.logger);
    }
    this.opts.logger.info("kdc serving", { address: bound.tcp, data_dir: this.opts.dataDir });
    return bound;
  }

  /** Drains calls, stops listening and closes the store. Idempotent. */
  async destroy(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.server.destroy();
      await this.metricsServer?.close();
    } finally {
      await this.store.close();
      this.opts.logger.info("store closed");
    }
  }
}
