/**
 * What the KDC's services need, as small interfaces declared here (the store, the audit log,
 * sealing, certificate making, a clock, the attestation key, the quarantine list, the watch
 * streams) and the context object that carries them. The real server fills it from storage/
 * and pki/ (see ./pki-adapter.ts, ./init.ts); tests may fill it with fakes.
 */
import type { KeyObject } from "node:crypto";
import type { RateLimit } from "../common/rate-limit.js";
import type { WatchSecretsResponse } from "../gen/kmi/kdc/v1/distribution_pb.js";
import type { SealedBlob } from "../gen/kmi/store/v1/envelope_pb.js";
import type { KeyAlgorithm } from "../gen/kmi/common/v1/common_pb.js";
import type { Logger } from "../common/logger.js";
import type { AuditEntry, AuditEntryInput, AuditTailOptions, AuditVerifyResult } from "../storage/audit-log.js";
import type { AuditCheckpoint } from "../storage/audit-checkpoint.js";
import type { CheckpointedVerifyResult } from "../storage/audit-checkpointer.js";
import type { BatchOp, Compare } from "../storage/store.js";
import type { AttestedMachine } from "./authz.js";
import type { KdcStore } from "./kdc-store.js";
import type { SubjectInput } from "./validate.js";
import type { Signer } from "../pki/signer.js";
import type { RootKeys } from "./root-keys.js";

/** A source of the current time. */
export interface Clock {
  now(): Date;
}

/** The audit log as the KDC uses it: append with the change in one batch, read, verify. */
export interface AuditSink {
  /**
   * Appends `entry` and applies `changeOps` in one batch, if every one of `compares` holds
   * (else `Conflict`, for the caller's `retryOnConflict`).
   */
  append(entry: AuditEntryInput, changeOps?: readonly BatchOp[], compares?: readonly Compare[]): Promise<AuditEntry>;
  /** Appends the refusal of an unauthenticated caller within its address's budget (undefined: only counted). */
  appendUnauthenticated(entry: AuditEntryInput, source: string): Promise<AuditEntry | undefined>;
  /** Refusals counted past their budget, not written, since start. */
  readonly suppressedRefusals: number;
  tail(options?: AuditTailOptions): Promise<AuditEntry[]>;
  verify(): Promise<AuditVerifyResult>;
  head(): Promise<{ seq: bigint; hash: string }>;
}

/** Signed checkpoints of this server's audit log (src/storage/audit-checkpointer.ts). */
export interface AuditCheckpoints {
  /** Checks the chain and the signed checkpoints (stored, witnessed, and `exported` when given). */
  verify(exported?: AuditCheckpoint): Promise<CheckpointedVerifyResult>;
  /** Signs the head now (when it moved) and returns the newest checkpoint; undefined for an empty log. */
  checkpoint(): Promise<AuditCheckpoint | undefined>;
  /** Waits for the checkpoints handed to the witness so far, then says what it holds. */
  witnessed(): Promise<string>;
}

/** The other server's checkpoints that this server keeps as its witness. */
export interface CheckpointWitnessKeeper {
  /** Checks and keeps `cp` for `peer`; FAILED_PRECONDITION when it does not extend the one held. */
  accept(peer: string, cp: AuditCheckpoint | undefined): Promise<AuditCheckpoint>;
  /** The latest checkpoint held for `peer`'s checkpoint key `keyId`. */
  get(peer: string, keyId: string): Promise<AuditCheckpoint | undefined>;
}

/** Envelope encryption under the master key. */
export interface Sealer {
  seal(plaintext: Uint8Array, aad: string): SealedBlob;
  open(blob: SealedBlob, aad: string): Uint8Array;
  /** "hmac:<hex>" keyed hash of a sensitive value, for audit details. */
  keyedHash(value: string | Uint8Array): string;
}

/** A freshly generated key pair: the private key as PKCS#8 DER (seal it at once). */
export interface GeneratedKey {
  algorithm: KeyAlgorithm;
  pkcs8: Uint8Array;
  spki: Uint8Array;
  /** Lowercase hex SHA-256 of the SPKI. */
  keyId: string;
}

/** A parsed, signature-checked CSR. */
export interface CheckedCsr {
  spki: Uint8Array;
  algorithm: KeyAlgorithm;
}

/** A summary of one certificate (what CertificateInfo carries). */
export interface CertSummary {
  subject: string;
  issuer: string;
  serialHex: string;
  notBefore: Date;
  notAfter: Date;
  /** Uppercase hex pairs joined by ':'. */
  sha256Fingerprint: string;
  isCa: boolean;
  dnsNames: string[];
  ipAddresses: string[];
  uris: string[];
  algorithm: KeyAlgorithm;
  subjectKeyIdHex: string;
  authorityKeyIdHex: string;
  pathLenConstraint: number;
  spki: Uint8Array;
}

/** An issuer: its certificate and private key (PKCS#8 DER, unsealed just for this call), or a signer for a key held elsewhere (a PKCS#11 token; pkcs8 is then empty). */
export interface Issuer {
  certificateDer: Uint8Array;
  pkcs8: Uint8Array;
  signer?: Signer;
}

/** What the KDC asks of the PKI layer. Times are `now` plus a lifetime; issuers clamp to their own notAfter. */
export interface CertificateFactory {
  /** A new key pair, generated off the event loop. */
  generateKey(algorithm: KeyAlgorithm): Promise<GeneratedKey>;
  /** A self-signed CA certificate (a root), signed with `signer` (or `pkcs8`). */
  selfSignedCa(p: { pkcs8: Uint8Array; signer?: Signer; subject: SubjectInput; now: Date; validitySeconds: number }): Uint8Array;
  /** An intermediate CA certificate (pathLen 0, keyCertSign+cRLSign, SKI/AKI) for `spki`. */
  issueIntermediate(p: { issuer: Issuer; spki: Uint8Array; subject: SubjectInput; now: Date; validitySeconds: number }): Uint8Array;
  /** A PKCS#10 CSR for an intermediate CA, signed by `signer` (the version's key), requesting the CA extensions. */
  createCsr(p: { signer: Signer; subject: SubjectInput }): Uint8Array;
  /** A kmi service's certificate (serverAuth+clientAuth, kmi://service/<name>). */
  issueServiceCertificate(p: { issuer: Issuer; serviceName: string; spki: Uint8Array; dnsNames: string[]; ipAddresses: string[]; now: Date; validitySeconds: number }): Uint8Array;
  /** A machine's client certificate (clientAuth, kmi://machine/<id>, OU=<group>). */
  issueMachineCertificate(p: { issuer: Issuer; machineId: string; group: string; spki: Uint8Array; now: Date; validitySeconds: number }): Uint8Array;
  /** Parses a PEM CSR and checks its signature; InvalidArgument naming `field` otherwise. */
  checkCsr(pem: string, field: string): CheckedCsr;
  /** A summary of a DER certificate. */
  summarize(der: Uint8Array): CertSummary;
  /**
   * Every check of an uploaded intermediate, before anything changes (pki/upload.ts): it
   * parses (exactly one certificate); is a CA with basicConstraints critical and pathlen 0,
   * keyCertSign, serverAuth or no EKU, no nameConstraints; has the CSR's subject and
   * `expectedSpki`; is valid at `now` for a week or more and at most 10 years, ending before
   * `customerRoot`; its signature verifies against `customerRoot` (required); and a leaf issued
   * with `signer` (the pending key) verifies for serverAuth. Returns the DERs; throws
   * InvalidArgument/FailedPrecondition.
   */
  checkUpload(p: {
    certificate: Uint8Array;
    customerRoot: Uint8Array | undefined;
    expectedSpki: Uint8Array;
    csr: Uint8Array;
    signer: Signer;
    now: Date;
    pendingVersion?: number;
  }): { certificateDer: Uint8Array; customerRootDer: Uint8Array };
  /** PEM of a DER certificate. */
  certificatePem(der: Uint8Array): string;
  /** PEM of a DER CSR. */
  csrPem(der: Uint8Array): string;
}

/** The Auditserver's token-signing public key, as the distribution API verifies tokens with it. */
export interface AttestationKeyProvider {
  /** The key; Unavailable saying what to do while it is not loaded. */
  current(): KeyObject;
  /** True once a key is loaded (GetKdcStatus.attestation_key_loaded). */
  readonly loaded: boolean;
  /** A token named another key id: the Auditserver may have a new key; fetch it again (rate-limited). */
  keyMismatch(): void;
}

/** The machines the Auditserver reported quarantined. */
export interface QuarantineList {
  /** The reason a machine is quarantined, or undefined when it is not. */
  reasonFor(machineId: string): string | undefined;
  /** When the machine was last quarantined (the Auditserver's time), also after a release; undefined if never. */
  lastQuarantinedAt(machineId: string): Date | undefined;
}

/**
 * Told of every committed change that agents must hear of; the watch hub pushes it on the open
 * WatchSecrets streams. Called after the change's batch committed, never before.
 */
export interface SecretEvents {
  /** The tenant's active intermediate changed (activation, rotation, bootstrap). */
  activeChanged(tenantId: string): void;
  /** A key of the tenant was revoked (an intermediate version's or a signing key's). */
  keyRevoked(tenantId: string, keyId: string, reason: string): void;
  /** A plain signing key was made. */
  signingKeyAdded(tenantId: string, name: string): void;
  /** The rotation scheduler staged `version` of the tenant (READY, to be activated once the fleet holds it). */
  staged(tenantId: string, version: number): void;
}

/** The open WatchSecrets streams (./watch-hub.ts). */
export interface WatchStreams {
  /**
   * Opens a stream for an attested machine: its SNAPSHOT first (or RESUMED, when `resumeFrom`
   * is a revision the store still keeps the history after), then events; `signal` ends it.
   * Rejects (nothing sent) when the first message's audit entry cannot be written.
   */
  open(caller: AttestedMachine, signal: AbortSignal, resumeFrom?: bigint): Promise<AsyncIterable<WatchSecretsResponse>>;
  /**
   * Admits a stream open (`stream` true) or a fetch, or throws UNAVAILABLE with a retry hint
   * when the replica sheds load; call the function returned once the first message is built.
   */
  admit(stream: boolean): () => void;
  /** True while the machine has a stream open here (GetRolloutStatus `connected`, with {@link WatchStreams.connectedElsewhere}). */
  isConnected(machineId: string): boolean;
  /** Machines with a stream open on another replica now. */
  connectedElsewhere(): Promise<ReadonlySet<string>>;
  /** Machines with a stream open now (GetKdcStatus `connected_agents`). */
  readonly connectedCount: number;
}

/** Everything the KDC's services use. */
export interface KdcContext {
  store: KdcStore;
  audit: AuditSink;
  sealer: Sealer;
  pki: CertificateFactory;
  clock: Clock;
  logger: Logger;
  /** When the server started (for uptime). */
  startedAt: Date;
  /** The Auditserver's attestation key. */
  attestationKey: AttestationKeyProvider;
  /** Quarantined machines. */
  quarantine: QuarantineList;
  /** Changes to push to agents (after commit). */
  events: SecretEvents;
  /** Open watch streams. */
  watches: WatchStreams;
  /** How long a released secret may be used without hearing from the KDC again, ms. */
  leaseMs: number;
  /** How long a PENDING version waits for its signed certificate, ms (then an upload is refused). */
  pendingTtlMs: number;
  /** Leaves one machine may have the KDC sign (token-held intermediates): per second and in a burst (default 50 and 500). */
  signLeafRate?: RateLimit;
  /** Signed checkpoints of `audit` (absent in tests that build a context by hand: verify walks the chain only). */
  checkpoints?: AuditCheckpoints;
  /** The Auditserver's checkpoints kept here as its witness. */
  witness?: CheckpointWitnessKeeper;
  /** Where the roots' keys are (default: sealed in the store). */
  rootKeys?: RootKeys;
}
