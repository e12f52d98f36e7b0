/**
 * `kmi kdc init` and opening an initialized data directory: the store, the master key, the
 * two roots, the KDC's TLS certificate and the first operator token.
 *
 * The roots' private keys are sealed in the store, or made and held in a PKCS#11 token with
 * `pkcs11` settings (./root-keys.ts); the store then keeps only their token labels.
 *
 * Files in the data directory (0700):
 *   store/          LevelDB (every private key in it sealed under the master key)
 *   master.key      the master key, base64, 0600 (absent when the key comes from the environment)
 *   kmi-root.pem    the KMI root CA certificate (public), for devices and tenants
 *   infra-ca.pem    the infrastructure CA certificate (public), for kmi ctl --ca-file and services
 */
import { randomBytes } from "node:crypto";
import type { RateLimit } from "../common/rate-limit.js";
import { chmod, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { AlreadyExists, FailedPrecondition } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { KeyAlgorithm } from "../gen/kmi/common/v1/common_pb.js";
import { Role } from "../gen/kmi/kdc/v1/admin_pb.js";
import { CredentialRecordSchema, KdcMetaRecordSchema, TokenRecordSchema, type CredentialRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { AuditLog } from "../storage/audit-log.js";
import { CheckpointWitness } from "../storage/audit-checkpoint.js";
import { AuditCheckpointer } from "../storage/audit-checkpointer.js";
import { openStoreBackend, type StoreBackend } from "../storage/backend.js";
import { openLevelStore, type LevelStore } from "../storage/level-store.js";
import { loadMasterKeyring, type MasterKeyring } from "../storage/keyring.js";
import { loadLogKeys } from "../storage/log-keys.js";
import { initServerMasterKey, loadServerMasterKey, type MasterKeyOptions } from "../storage/master-key.js";
import type { BatchOp, Store } from "../storage/store.js";
import type { AttestationKeyProvider, CertificateFactory, Clock, Issuer, KdcContext, Sealer } from "./context.js";
import { masterKeyWrap, openPkcs11Token, openRootKeys, type NewRootKey, type Pkcs11Settings, type RootKeys } from "./root-keys.js";
import type { Pkcs11Token } from "../common/keys/pkcs11-token.js";
import { wrappedKeyOf } from "../storage/master-key.js";
import { CREDENTIAL, credentialAad, KDC_SCHEMA_VERSION, KdcStore, put } from "./kdc-store.js";
import { createPkiAdapter } from "./pki-adapter.js";
import { createSealer } from "./sealer.js";
import { NoAttestationKey } from "./attestation-key.js";
import { ChangeFollower } from "./change-follower.js";
import { LocalCommits } from "./local-commits.js";
import { QuarantineRegistry } from "./quarantine.js";
import { SecretRelease } from "./release.js";
import { WatchHub, type WatchHubOptions } from "./watch-hub.js";
import { LeasedWatchPresence } from "./watch-presence.js";
import { isLeasing } from "../storage/election.js";
import { mintToken } from "./tokens.js";
import { pathExists } from "../common/fs.js";

const YEAR_S = 365 * 24 * 3600;
/** Lifetime of the two roots. */
export const ROOT_VALIDITY_SECONDS = 10 * YEAR_S;
/** Lifetime of the KDC's own TLS certificate; it is re-issued at start when less than 30 days are left. */
export const TLS_VALIDITY_SECONDS = YEAR_S;

/** Paths inside a data directory. */
export function dataPaths(dataDir: string, masterKeyFile?: string) {
  return {
    store: join(dataDir, "store"),
    masterKey: masterKeyFile ?? join(dataDir, "master.key"),
    kmiRootPem: join(dataDir, "kmi-root.pem"),
    infraCaPem: join(dataDir, "infra-ca.pem"),
  };
}

/** Where the master key comes from. */
export type { MasterKeyOptions };

/** Names for the KDC's TLS certificate beyond localhost, 127.0.0.1 and ::1. */
export interface TlsNames {
  dnsNames: string[];
  ipAddresses: string[];
}

/** Every name of the KDC's TLS certificate. */
export function allTlsNames(extra: TlsNames): TlsNames {
  return {
    dnsNames: [...new Set(["localhost", ...extra.dnsNames.map((d) => d.toLowerCase())])],
    ipAddresses: [...new Set(["127.0.0.1", "::1", ...extra.ipAddresses])],
  };
}

/** Options of `initKdc`. */
export interface InitOptions extends MasterKeyOptions {
  dataDir: string;
  /** Where the store lives (default LevelDB in the data dir); the files stay in the data dir. */
  store?: StoreBackend;
  tls: TlsNames;
  clock?: Clock;
  pki?: CertificateFactory;
  /** Make the roots' keys in this PKCS#11 token instead of sealing them in the store. */
  pkcs11?: Pkcs11Settings | undefined;
  /** Wrap the master key file with the token's AES key of this label (made when missing); needs `pkcs11`. */
  masterKeyWrapLabel?: string | undefined;
}

/** What init made. */
export interface InitResult {
  /** The operator token, shown once. */
  operatorToken: string;
  operatorTokenId: string;
  /** Path of the master key file, or undefined when the key came from the environment. */
  masterKeyFile: string | undefined;
  kmiRootPem: string;
  infraCaPem: string;
  kdcId: string;
  /** Where the roots' keys are: "sealed" in the store or in a "pkcs11" token. */
  rootKeys: RootKeys["kind"];
  /** The token key that wraps the master key file, when it is wrapped. */
  masterKeyWrappedBy: string | undefined;
}

/** Opens an existing (or, for init, new) KDC LevelDB store in `dataDir` (backup and restore work on it). */
export async function openKdcStore(dataDir: string, createIfMissing: boolean): Promise<LevelStore> {
  return openLevelStore(dataPaths(dataDir).store, { owner: "kdc", schemaVersion: KDC_SCHEMA_VERSION, create: createIfMissing });
}

/** Opens the KDC's store where `backend` says: LevelDB in `dataDir` (default) or etcd. */
export async function openKdcBackend(dataDir: string, createIfMissing: boolean, backend: StoreBackend = { kind: "level" }): Promise<Store> {
  return openStoreBackend(backend, dataPaths(dataDir).store, { owner: "kdc", schemaVersion: KDC_SCHEMA_VERSION, create: createIfMissing });
}


/** Loads the master key for an initialized data directory. */
export async function loadKdcMasterKey(dataDir: string, opts: MasterKeyOptions): Promise<Buffer> {
  return loadServerMasterKey(opts, "KMI_KDC_MASTER_KEY", dataPaths(dataDir).masterKey);
}

/** Loads the master keyring (the key, and the next one while a rekey is under way) for an initialized data directory. */
export async function loadKdcKeyring(dataDir: string, opts: MasterKeyOptions): Promise<MasterKeyring> {
  return loadMasterKeyring(opts, "KMI_KDC_MASTER_KEY", dataPaths(dataDir).masterKey);
}

/** Makes a certificate+sealed-key credential record. */
function credential(sealer: Sealer, name: string, der: Uint8Array, pkcs8: Uint8Array, now: Date): CredentialRecord {
  return create(CredentialRecordSchema, {
    recordVersion: 1,
    name,
    certificateDer: der,
    privateKey: sealer.seal(pkcs8, credentialAad(name)),
    keyAlgorithm: KeyAlgorithm.ECDSA_P256,
    createdAt: timestampFromDate(now),
  });
}

/** A root's credential record: its certificate, and its sealed key or its token label. */
function rootCredential(name: string, der: Uint8Array, key: NewRootKey, now: Date): CredentialRecord {
  return create(CredentialRecordSchema, {
    recordVersion: 1,
    name,
    certificateDer: der,
    ...(key.privateKey !== undefined ? { privateKey: key.privateKey } : {}),
    tokenKeyLabel: key.tokenKeyLabel,
    keyAlgorithm: KeyAlgorithm.ECDSA_P256,
    createdAt: timestampFromDate(now),
  });
}

/** Issues the KDC's TLS server certificate (kmi://service/kdc) with the infrastructure CA. */
export async function issueKdcTlsCredential(
  pki: CertificateFactory,
  sealer: Sealer,
  infra: Issuer,
  names: TlsNames,
  now: Date,
): Promise<CredentialRecord> {
  const key = await pki.generateKey(KeyAlgorithm.ECDSA_P256);
  try {
    const all = allTlsNames(names);
    const der = pki.issueServiceCertificate({ issuer: infra, serviceName: "kdc", spki: key.spki, dnsNames: all.dnsNames, ipAddresses: all.ipAddresses, now, validitySeconds: TLS_VALIDITY_SECONDS });
    return credential(sealer, CREDENTIAL.kdcTls, der, key.pkcs8, now);
  } finally {
    key.pkcs8.fill(0);
  }
}

/**
 * `kmi kdc init`: refuses an initialized data directory; otherwise makes everything in one
 * batch (with its audit entry), so a crash leaves either nothing or a whole KDC.
 */
export async function initKdc(opts: InitOptions): Promise<InitResult> {
  checkMasterKeyWrap(opts);
  const clock = opts.clock ?? { now: () => new Date() };
  const pki = opts.pki ?? createPkiAdapter();
  const paths = dataPaths(opts.dataDir, opts.masterKeyFile);
  // Why 0700: the data dir holds the store and, usually, the master key file.
  await mkdir(opts.dataDir, { recursive: true, mode: 0o700 });
  await chmod(opts.dataDir, 0o700);

  const backend = opts.store ?? { kind: "level" };
  if (backend.kind === "level" && (await pathExists(paths.store)) && (await pathExists(paths.infraCaPem))) {
    throw new AlreadyExists(`data dir ${opts.dataDir} is initialized already; run \`kmi kdc --data-dir ${opts.dataDir}\`, or init another directory`);
  }
  const store = await openKdcBackend(opts.dataDir, true, backend);
  let hsm: Pkcs11Token | undefined;
  let rootKeys: RootKeys | undefined;
  try {
    const kdcStore = new KdcStore(store);
    if ((await kdcStore.getMeta()) !== undefined) {
      throw new AlreadyExists(
        backend.kind === "level"
          ? `data dir ${opts.dataDir} is initialized already; run \`kmi kdc --data-dir ${opts.dataDir}\`, or init another directory`
          : `the etcd prefix ${backend.prefix} holds an initialized KDC already; run \`kmi kdc --store etcd\` with its master key, or init another prefix (--etcd-prefix)`,
      );
    }
    hsm = await openPkcs11Token(opts.pkcs11);
    // A key file left by an init that stopped before its batch sealed nothing yet: it is reused.
    const { key, keyFile } = await initServerMasterKey(opts.masterKey, "KMI_KDC_MASTER_KEY", paths.masterKey, masterKeyWrap(hsm, opts.masterKeyWrapLabel));
    const sealer = createSealer(key);
    key.fill(0);
    const now = clock.now();
    const kdcId = randomBytes(8).toString("hex");

    rootKeys = openRootKeys(pki, sealer, hsm, true);
    const rootKey = await rootKeys.generate(CREDENTIAL.kmiRoot, kdcId);
    const infraKey = await rootKeys.generate(CREDENTIAL.infraCa, kdcId);
    const noBytes = new Uint8Array(0);
    const rootDer = pki.selfSignedCa({ pkcs8: noBytes, signer: rootKey.signer, subject: { commonName: "KMI Root CA", organization: "kmi", organizationalUnit: "", country: "" }, now, validitySeconds: ROOT_VALIDITY_SECONDS });
    const infraDer = pki.selfSignedCa({
      pkcs8: noBytes,
      signer: infraKey.signer,
      subject: { commonName: "KMI Infrastructure CA", organization: "kmi", organizationalUnit: "", country: "" },
      now,
      validitySeconds: ROOT_VALIDITY_SECONDS,
    });
    const tls = await issueKdcTlsCredential(pki, sealer, { certificateDer: infraDer, pkcs8: noBytes, signer: infraKey.signer }, opts.tls, now);
    const token = mintToken();
    const ops: BatchOp[] = [
      put.credential(rootCredential(CREDENTIAL.kmiRoot, rootDer, rootKey, now)),
      put.credential(rootCredential(CREDENTIAL.infraCa, infraDer, infraKey, now)),
      put.credential(tls),
      put.token(
        create(TokenRecordSchema, {
          recordVersion: 1,
          tokenId: token.tokenId,
          secretSha256: token.secretSha256,
          role: Role.OPERATOR,
          description: "first operator token (kmi kdc init)",
          createdAt: timestampFromDate(now),
        }),
      ),
      // The meta record marks the store initialized; it is in the same batch as everything else.
      put.meta(create(KdcMetaRecordSchema, { recordVersion: 1, schemaVersion: KDC_SCHEMA_VERSION, initializedAt: timestampFromDate(now), kdcId })),
    ];
    rootKey.wipe();
    infraKey.wipe();
    const audit = new AuditLog(store, { clock });
    await audit.append(
      {
        actor: "system",
        action: "kdc.init",
        target: "kdc",
        outcome: "ok",
        details: {
          kdc_id: kdcId,
          kmi_root_sha256: pki.summarize(rootDer).sha256Fingerprint,
          infra_ca_sha256: pki.summarize(infraDer).sha256Fingerprint,
          operator_token_id: token.tokenId,
          operator_token: sealer.keyedHash(token.bearer),
        },
      },
      ops,
    );
    const kmiRootPem = pki.certificatePem(rootDer);
    const infraCaPem = pki.certificatePem(infraDer);
    // Public, but under the data dir every file is 0600 (the folder is 0700 anyway).
    await writeFile(paths.kmiRootPem, kmiRootPem, { mode: 0o600 });
    await writeFile(paths.infraCaPem, infraCaPem, { mode: 0o600 });
    return {
      operatorToken: token.bearer,
      operatorTokenId: token.tokenId,
      masterKeyFile: keyFile,
      kmiRootPem,
      infraCaPem,
      kdcId,
      rootKeys: rootKeys.kind,
      masterKeyWrappedBy: keyFile !== undefined ? (await wrappedKeyOf(keyFile))?.keyLabel : undefined,
    };
  } finally {
    if (rootKeys !== undefined) rootKeys.close();
    else hsm?.close();
    await store.close();
  }
}

/** `--master-key-wrap pkcs11` needs the token and a key init makes: refused before anything is made otherwise. */
function checkMasterKeyWrap(opts: InitOptions): void {
  if (opts.masterKeyWrapLabel === undefined) return;
  if (opts.pkcs11 === undefined) throw new FailedPrecondition("--master-key-wrap pkcs11 needs the token: give --pkcs11-module, --pkcs11-token and --pkcs11-pin-file");
  if ((opts.masterKey ?? "") !== "") throw new FailedPrecondition("--master-key-wrap pkcs11: a key given in KMI_KDC_MASTER_KEY (or --master-key) cannot be wrapped; leave it out and init makes a wrapped key file");
}

/** An opened, initialized KDC: its context, the store to close, and the distribution pieces. */
export interface OpenedKdc {
  ctx: KdcContext;
  store: Store;
  /** The backend itself, without the commit bookkeeping: what elections campaign on (their leases are the backend's). */
  backend: Store;
  /** On a shared store (etcd): the follower that announces other replicas' commits to this one's watch streams; stop it before closing the store. */
  follower: ChangeFollower | undefined;
  /** The watch streams (also `ctx.events` and `ctx.watches`). */
  hub: WatchHub;
  /** The quarantine set (also `ctx.quarantine`), fed by the Auditserver's status stream. */
  quarantine: QuarantineRegistry;
  /** Signed checkpoints of the audit log (also `ctx.checkpoints`); started by the server. */
  checkpoints: AuditCheckpointer;
}

/** Default lease of a released secret: one day. */
export const DEFAULT_LEASE_MS = 24 * 3600 * 1000;

/** Default time a PENDING version waits for its signed certificate: 30 days. */
export const DEFAULT_PENDING_TTL_MS = 30 * 86400 * 1000;

/** Options of `openKdc`. */
export interface OpenKdcOptions extends MasterKeyOptions {
  dataDir: string;
  /** Where the store lives (default LevelDB in the data dir). */
  store?: StoreBackend | undefined;
  logger: Logger;
  clock?: Clock;
  pki?: CertificateFactory;
  /** The Auditserver's attestation key (default: none configured; distribution calls are UNAVAILABLE). */
  attestationKey?: AttestationKeyProvider;
  /** Lease of released secrets, ms (default one day). */
  leaseMs?: number;
  /** How long a PENDING version waits for its certificate, ms (default 30 days). */
  pendingTtlMs?: number;
  /** Leaves one machine may have signed through token-held intermediates, per second and in a burst (default 50 and 500). */
  signLeafRate?: RateLimit | undefined;
  /** Watch stream tuning (heartbeat period, queue bound). */
  watch?: WatchHubOptions;
  /** The PKCS#11 token holding the roots' keys, when `kmi kdc init` put them there. */
  pkcs11?: Pkcs11Settings | undefined;
}

/** Opens an initialized data directory and builds the services' context. */
export async function openKdc(opts: OpenKdcOptions): Promise<OpenedKdc> {
  const backend = opts.store ?? { kind: "level" };
  if (backend.kind === "level" && !(await pathExists(dataPaths(opts.dataDir).store))) {
    throw new FailedPrecondition(`data dir ${opts.dataDir} is not initialized; run \`kmi kdc init --data-dir ${opts.dataDir}\` first`);
  }
  // The token (when configured) opens a wrapped master key file, then holds the roots' keys.
  const hsm = await openPkcs11Token(opts.pkcs11);
  let keyring: MasterKeyring;
  let opened: Store;
  try {
    keyring = await loadKdcKeyring(opts.dataDir, { ...opts, wrap: masterKeyWrap(hsm) });
  } catch (err) {
    hsm?.close();
    throw err;
  }
  try {
    opened = await openKdcBackend(opts.dataDir, false, backend);
  } catch (err) {
    keyring.wipe();
    hsm?.close();
    throw err;
  }
  // On a shared store other replicas commit too: remember which commits are this process's.
  const local = backend.kind === "etcd" ? new LocalCommits(opened) : undefined;
  const store: Store = local ?? opened;
  let rootKeys: RootKeys | undefined;
  try {
    const kdcStore = new KdcStore(store);
    const meta = await kdcStore.getMeta();
    if (meta === undefined) {
      throw new FailedPrecondition(`data dir ${opts.dataDir} is not initialized (an init did not finish); remove it and run \`kmi kdc init\` again`);
    }
    const clock = opts.clock ?? { now: () => new Date() };
    const logKeys = await loadLogKeys(store, keyring);
    const sealer = createSealer({ keyring, hmacKey: logKeys.hmacKey });
    const checkpointKey = logKeys.checkpointKey;
    logKeys.hmacKey.fill(0);
    // Fail at start, not on the first call, when the master key is not this store's.
    const root = await kdcStore.getCredential(CREDENTIAL.kmiRoot);
    if (root === undefined || (root.privateKey === undefined && root.tokenKeyLabel === "")) throw new FailedPrecondition(`data dir ${opts.dataDir}: the KMI root credential is missing; restore the store from a backup`);
    // With the roots in a token, the KDC's TLS key (always sealed) proves the master key.
    const sealed = root.privateKey !== undefined ? root : await kdcStore.getCredential(CREDENTIAL.kdcTls);
    if (sealed?.privateKey === undefined) throw new FailedPrecondition(`data dir ${opts.dataDir}: the KDC's TLS credential is missing; restore the store from a backup`);
    sealer.open(sealed.privateKey, credentialAad(sealed.name)).fill(0);
    const pki = opts.pki ?? createPkiAdapter();
    rootKeys = openRootKeys(pki, sealer, hsm, false);
    // A token-held root is looked up (and matched to its certificate) at start, not on the first call.
    rootKeys.issuer(root).wipe();
    const checkpoints = new AuditCheckpointer(store, new AuditLog(store, { clock }), { key: checkpointKey, origin: `kdc/${meta.kdcId}`, clock, logger: opts.logger });
    const base = {
      store: kdcStore,
      audit: checkpoints.log,
      checkpoints,
      witness: new CheckpointWitness(store, clock),
      sealer,
      pki,
      clock,
      logger: opts.logger,
      startedAt: clock.now(),
      attestationKey: opts.attestationKey ?? new NoAttestationKey(),
      leaseMs: opts.leaseMs ?? DEFAULT_LEASE_MS,
      pendingTtlMs: opts.pendingTtlMs ?? DEFAULT_PENDING_TTL_MS,
      ...(opts.signLeafRate !== undefined ? { signLeafRate: opts.signLeafRate } : {}),
      rootKeys,
    };
    // Quarantined machines are refused from the first call on, before the Auditserver answers.
    const quarantine = await QuarantineRegistry.load(base);
    // On etcd the other replicas learn which machines have a stream open here (GetRolloutStatus).
    const presence = isLeasing(opened) ? new LeasedWatchPresence(opened, opts.logger, () => clock.now()) : undefined;
    const hub = new WatchHub({ ...base, quarantine }, new SecretRelease(base), { ...opts.watch, ...(presence !== undefined ? { presence } : {}) });
    quarantine.setListener(hub);
    const ctx: KdcContext = { ...base, quarantine, events: hub, watches: hub };
    let follower: ChangeFollower | undefined;
    if (local !== undefined) {
      follower = new ChangeFollower(store, local, hub, opts.logger);
      await follower.start();
    }
    return { ctx, store, backend: opened, hub, quarantine, checkpoints, follower };
  } catch (err) {
    keyring.wipe();
    if (rootKeys !== undefined) rootKeys.close();
    else hsm?.close();
    await store.close();
    throw err;
  }
}
