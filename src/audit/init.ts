/**
 * `kmi audit init` and opening an initialized data directory.
 *
 * Files in the data directory (0700):
 *   store/               LevelDB (owner "audit"; both private keys in it sealed under the master key)
 *   master.key           the master key, base64, 0600 (absent when the key comes from the environment)
 *   infra-ca.pem         the infrastructure CA certificate (public): what machines and kmi ctl trust
 *   attestation-key.pem  the attestation-token public key (public): what the KDC verifies tokens with
 *
 * Init talks to the KDC twice, before anything is written: GetTrustBundle (checked against
 * the given infra-ca.pem) and IssueServiceCertificate with an operator token. Then one batch
 * stores both credentials and the meta record with the audit entry, so a crash leaves either
 * nothing or a whole Auditserver.
 */
import { X509Certificate, createPublicKey, randomBytes, type KeyObject } from "node:crypto";
import { chmod, mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { attestationKeyId, generateP256KeyPair, publicKeyPem } from "../attest/index.js";
import { AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable } from "../common/errors.js";
import { transportForUrls } from "../clients/failover-transport.js";
import { createGrpcClientTransport } from "../common/http2-client.js";
import { KdcAdminService } from "../gen/kmi/kdc/v1/admin_pb.js";
import { AuditCredentialRecordSchema, AuditMetaRecordSchema, type AuditCredentialRecord, type AuditMetaRecord } from "../gen/kmi/store/v1/audit_pb.js";
import { createCsr, csrToPem } from "../pki/csr.js";
import { AuditLog, deriveAuditKey, keyedHash } from "../storage/audit-log.js";
import { openStoreBackend, type StoreBackend } from "../storage/backend.js";
import type { Store } from "../storage/store.js";
import { loadMasterKeyring, type MasterKeyring } from "../storage/keyring.js";
import { initServerMasterKey, loadServerMasterKey, type MasterKeyOptions } from "../storage/master-key.js";
import { open as unseal, seal } from "../storage/seal.js";
import { putOp } from "../storage/store.js";
import type { Clock } from "./context.js";
import { ATTESTATION_KEY, AUDIT_SCHEMA_VERSION, AUDIT_STORE_OWNER, META_KEY, RECORD_VERSION, SERVICE_TLS_KEY, Tables } from "./store.js";
import { bearerAuthorization } from "../common/bearer.js";

/** Paths inside a data directory. */
export function dataPaths(dataDir: string, masterKeyFile?: string) {
  return {
    store: join(dataDir, "store"),
    masterKey: masterKeyFile ?? join(dataDir, "master.key"),
    infraCaPem: join(dataDir, "infra-ca.pem"),
    attestationKeyPem: join(dataDir, "attestation-key.pem"),
  };
}

/** Where the master key comes from. */
export type { MasterKeyOptions };

/** AAD of a sealed credential. */
export function credentialAad(name: string): string {
  return `audit/credential/${name}`;
}


/** Opens the Auditserver's store where `backend` says: LevelDB in `dataDir` (default) or etcd. */
export async function openAuditStore(dataDir: string, createIfMissing: boolean, backend: StoreBackend = { kind: "level" }): Promise<Store> {
  return openStoreBackend(backend, dataPaths(dataDir).store, { owner: AUDIT_STORE_OWNER, schemaVersion: AUDIT_SCHEMA_VERSION, create: createIfMissing });
}

/** Loads the master key of an initialized data directory. */
export async function loadAuditMasterKey(dataDir: string, opts: MasterKeyOptions): Promise<Buffer> {
  return loadServerMasterKey(opts, "KMI_AUDIT_MASTER_KEY", dataPaths(dataDir).masterKey);
}

/** Loads the master keyring (the key, and the next one while a rekey is under way) of an initialized data directory. */
export async function loadAuditKeyring(dataDir: string, opts: MasterKeyOptions): Promise<MasterKeyring> {
  return loadMasterKeyring(opts, "KMI_AUDIT_MASTER_KEY", dataPaths(dataDir).masterKey);
}

/** Names of the Auditserver's TLS certificate beyond localhost, 127.0.0.1 and ::1. */
export interface TlsNames {
  dnsNames: string[];
  ipAddresses: string[];
}

/** Options of `initAudit`. */
export interface InitOptions extends MasterKeyOptions {
  dataDir: string;
  /** Where the store lives (default LevelDB in the data dir); the files stay in the data dir. */
  store?: StoreBackend;
  kdcUrl: string;
  /** The KDC's infra-ca.pem contents. */
  kdcCaPem: string;
  /** An operator token. */
  token: string;
  tls: TlsNames;
  validityDays: number;
  /** Replace the TLS identity of an initialized directory instead of refusing it. */
  reissueCertificate?: boolean;
  clock?: Clock;
}

/** What init made. */
export interface InitResult {
  auditId: string;
  masterKeyFile: string | undefined;
  infraCaPem: string;
  attestationKeyId: string;
  certificateSha256: string;
  certificateNotAfter: Date;
  reissued: boolean;
}

function kdcError(err: unknown, what: string, url: string): Error {
  const ce = ConnectError.from(err);
  const msg = `kdc ${url}: ${what}: ${ce.rawMessage}`;
  switch (ce.code) {
    case Code.Unauthenticated:
    case Code.PermissionDenied:
      return new FailedPrecondition(`${msg}; give an operator token with --token-file`);
    case Code.InvalidArgument:
      return new InvalidArgument(msg);
    default:
      return new Unavailable(`${msg}; check --kdc and --kdc-ca-file, and that the KDC runs`);
  }
}

/** Asks the KDC for a kmi://service/audit certificate for a fresh P-256 key. */
async function issueServiceIdentity(opts: InitOptions): Promise<{ key: KeyObject; certDer: Uint8Array; caDer: Uint8Array }> {
  const auth: Interceptor = (next) => async (req) => {
    req.header.set("authorization", bearerAuthorization(opts.token));
    return next(req);
  };
  const admin = createClient(KdcAdminService, transportForUrls(opts.kdcUrl, (url) => createGrpcClientTransport({ baseUrl: url, interceptors: [auth], defaultTimeoutMs: 15_000, tls: { ca: opts.kdcCaPem }, expectedService: "kdc" })).transport);
  let bundle;
  try {
    bundle = await admin.getTrustBundle({});
  } catch (err) {
    throw kdcError(err, "trust bundle", opts.kdcUrl);
  }
  const given = new X509Certificate(opts.kdcCaPem);
  const infra = new X509Certificate(bundle.infrastructureCaPem);
  // Why compare: the CA the operator pinned is what every machine will trust; a KDC that
  // reports another one is not the KDC the operator meant.
  if (!Buffer.from(given.raw).equals(Buffer.from(infra.raw))) {
    throw new FailedPrecondition(`kdc ${opts.kdcUrl}: its infrastructure CA is not the one in --kdc-ca-file; give the KDC's infra-ca.pem`);
  }
  const { privateKey } = generateP256KeyPair();
  const csrPem = csrToPem(createCsr({ subject: { commonName: "audit", organization: "kmi" }, privateKey }));
  const dnsNames = [...new Set(["localhost", ...opts.tls.dnsNames.map((d) => d.toLowerCase())])];
  const ipAddresses = [...new Set(["127.0.0.1", "::1", ...opts.tls.ipAddresses])];
  let res;
  try {
    res = await admin.issueServiceCertificate({ csrPem, serviceName: "audit", dnsNames, ipAddresses, validityDays: opts.validityDays });
  } catch (err) {
    throw kdcError(err, "service certificate", opts.kdcUrl);
  }
  const cert = new X509Certificate(res.certificatePem);
  if (!cert.verify(infra.publicKey)) throw new FailedPrecondition(`kdc ${opts.kdcUrl}: the service certificate is not signed by its infrastructure CA`);
  return { key: privateKey, certDer: new Uint8Array(cert.raw), caDer: new Uint8Array(infra.raw) };
}

function credentialRecord(masterKey: Uint8Array, name: string, key: KeyObject, now: Date, cert?: { certDer: Uint8Array; caDer: Uint8Array }): AuditCredentialRecord {
  const pkcs8 = key.export({ format: "der", type: "pkcs8" });
  try {
    const publicDer = new Uint8Array(createPublicKey(key).export({ type: "spki", format: "der" }));
    return create(AuditCredentialRecordSchema, {
      recordVersion: RECORD_VERSION,
      name,
      privateKey: seal(masterKey, pkcs8, credentialAad(name)),
      publicKeyDer: publicDer,
      keyId: name === ATTESTATION_KEY ? attestationKeyId(key) : new X509Certificate(cert!.certDer).fingerprint256.replaceAll(":", "").toLowerCase(),
      certificateDer: cert?.certDer ?? new Uint8Array(),
      caCertificateDer: cert?.caDer ?? new Uint8Array(),
      createdAt: timestampFromDate(now),
    });
  } finally {
    pkcs8.fill(0);
  }
}

/**
 * `kmi audit init`. Refuses an initialized directory unless `reissueCertificate`, which
 * replaces only the TLS identity.
 */
export async function initAudit(opts: InitOptions): Promise<InitResult> {
  const clock = opts.clock ?? { now: () => new Date() };
  const paths = dataPaths(opts.dataDir, opts.masterKeyFile);
  if (!Number.isInteger(opts.validityDays) || opts.validityDays < 1 || opts.validityDays > 825) {
    throw new InvalidArgument(`--validity-days: ${opts.validityDays} is out of range; give 1 to 825`);
  }
  // Why 0700: the data dir holds the store and, usually, the master key file.
  await mkdir(opts.dataDir, { recursive: true, mode: 0o700 });
  await chmod(opts.dataDir, 0o700);
  const store = await openAuditStore(opts.dataDir, true, opts.store);
  try {
    const meta = await store.get(Tables.meta, META_KEY);
    if (meta !== undefined && opts.reissueCertificate !== true) {
      throw new AlreadyExists(`data dir ${opts.dataDir} is initialized already; run \`kmi audit --data-dir ${opts.dataDir}\`, or give --reissue-certificate to replace only its TLS certificate`);
    }
    if (meta === undefined && opts.reissueCertificate === true) {
      throw new FailedPrecondition(`data dir ${opts.dataDir} is not initialized; run \`kmi audit init\` without --reissue-certificate`);
    }
    // An initialized directory's key, or one left by an init that stopped before its batch.
    const { key, keyFile } = await initServerMasterKey(opts.masterKey, "KMI_AUDIT_MASTER_KEY", paths.masterKey);
    try {
      const now = clock.now();
      const identity = await issueServiceIdentity(opts);
      const tls = credentialRecord(key, SERVICE_TLS_KEY, identity.key, now, identity);
      const audit = new AuditLog(store, { clock });
      const cert = new X509Certificate(identity.certDer);
      const certSha256 = cert.fingerprint256.replaceAll(":", "").toLowerCase();
      const infraCaPem = new X509Certificate(identity.caDer).toString();
      let auditId: string;
      let attestationKid: string;
      let attestationPub: string;
      if (meta !== undefined) {
        const existing = await store.get(Tables.credentials, ATTESTATION_KEY);
        if (existing === undefined) throw new FailedPrecondition(`data dir ${opts.dataDir}: the attestation key is missing; restore the store from a backup`);
        // Fail before writing when the master key is not this store's.
        unseal(key, existing.privateKey!, credentialAad(ATTESTATION_KEY)).fill(0);
        auditId = meta.auditId;
        attestationKid = existing.keyId;
        attestationPub = publicKeyPem(existing.publicKeyDer);
        await audit.append(
          { actor: "system", action: "audit.tls.reissue", target: "audit/tls", outcome: "ok", details: { certificate_sha256: certSha256, not_after: new Date(cert.validTo).toISOString() } },
          [putOp(Tables.credentials, SERVICE_TLS_KEY, tls)],
        );
      } else {
        const attestation = generateP256KeyPair();
        const att = credentialRecord(key, ATTESTATION_KEY, attestation.privateKey, now);
        auditId = randomBytes(8).toString("hex");
        attestationKid = att.keyId;
        attestationPub = publicKeyPem(attestation.publicKey);
        const newMeta: AuditMetaRecord = create(AuditMetaRecordSchema, { recordVersion: RECORD_VERSION, initializedAt: timestampFromDate(now), auditId, kdcUrl: opts.kdcUrl });
        await audit.append(
          {
            actor: "system",
            action: "audit.init",
            target: "audit",
            outcome: "ok",
            details: { audit_id: auditId, kdc: opts.kdcUrl, attestation_key_id: att.keyId, certificate_sha256: certSha256, operator_token: keyedHash(deriveAuditKey(key), opts.token) },
          },
          // The meta record marks the store initialized; it is in the same batch as everything else.
          [putOp(Tables.credentials, ATTESTATION_KEY, att), putOp(Tables.credentials, SERVICE_TLS_KEY, tls), putOp(Tables.meta, META_KEY, newMeta)],
        );
      }
      // Public, but under the data dir every file is 0600 (the folder is 0700 anyway).
      await writeFile(paths.infraCaPem, infraCaPem, { mode: 0o600 });
      await writeFile(paths.attestationKeyPem, attestationPub, { mode: 0o600 });
      return {
        auditId,
        masterKeyFile: keyFile,
        infraCaPem,
        attestationKeyId: attestationKid,
        certificateSha256: certSha256,
        certificateNotAfter: new Date(cert.validTo),
        reissued: meta !== undefined,
      };
    } finally {
      key.fill(0);
    }
  } finally {
    await store.close();
  }
}

/** Reads a PEM file for init, with a message naming the flag. */
export async function readPemFile(path: string, flag: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    throw new InvalidArgument(`${flag}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"}); check the path`);
  }
  if (!text.includes("-----BEGIN CERTIFICATE-----")) throw new InvalidArgument(`${flag}: ${path} holds no PEM certificate`);
  return text;
}
