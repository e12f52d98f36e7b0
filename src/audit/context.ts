/**
 * What the Auditserver's services need, as small interfaces declared where they are used
 * (the store, the audit log, the KDC peer, CSR checking, the token-signing key, a clock), and
 * the context object that carries them. The real server fills it from storage/, pki/ and a
 * KDC client (./server.ts); tests may fill parts of it with fakes.
 */
import type { KeyObject } from "node:crypto";
import type { Logger } from "../common/logger.js";
import type { TokenInfo } from "../gen/kmi/kdc/v1/admin_pb.js";
import type { AuditEntry, AuditEntryInput, AuditTailOptions, AuditVerifyResult } from "../storage/audit-log.js";
import type { AuditCheckpoint } from "../storage/audit-checkpoint.js";
import type { CheckpointedVerifyResult } from "../storage/audit-checkpointer.js";
import type { BatchOp, Compare, Store } from "../storage/store.js";
import type { MachineStatusHub } from "./status-hub.js";

/** A source of the current time. */
export interface Clock {
  /** The current time. */
  now(): Date;
}

/** The audit log as the Auditserver uses it: append with the change in one batch, read, verify. */
export interface AuditSink {
  /**
   * Appends `entry` and applies `changeOps` atomically, if every one of `compares` holds (else
   * `Conflict`, for the caller's `retryOnConflict`); if it rejects, nothing happened.
   */
  append(entry: AuditEntryInput, changeOps?: readonly BatchOp[], compares?: readonly Compare[]): Promise<AuditEntry>;
  /** Appends the refusal of an unauthenticated caller within its address's budget (undefined: only counted). */
  appendUnauthenticated(entry: AuditEntryInput, source: string): Promise<AuditEntry | undefined>;
  /** Refusals counted past their budget, not written, since start. */
  readonly suppressedRefusals: number;
  /** Entries in order. */
  tail(options?: AuditTailOptions): Promise<AuditEntry[]>;
  /** Walks the chain. */
  verify(): Promise<AuditVerifyResult>;
  /** Last seq and hash. */
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

/** A machine certificate as the KDC returns it. */
export interface IssuedMachineCertificate {
  /** The certificate, PEM. */
  certificatePem: string;
  /** The infrastructure CA, PEM. */
  caPem: string;
  /** End of validity. */
  notAfter: Date;
}

/**
 * What the Auditserver asks of the KDC (PeerService, over mutual TLS with its service
 * certificate). Errors are domain errors: Unauthenticated for a bad operator token,
 * InvalidArgument for a CSR the KDC refuses, Unavailable when the KDC cannot be reached.
 */
export interface KdcPeer {
  /** Checks an operator's bearer token; returns what the token is and who it acts as in audit logs. */
  authenticateToken(token: string): Promise<{ token: TokenInfo; actor: string }>;
  /** Has the infrastructure CA sign a machine certificate. */
  issueMachineCertificate(p: { csrPem: string; machineId: string; group: string; ttlSeconds: number }): Promise<IssuedMachineCertificate>;
}

/** A parsed CSR whose self-signature verified. */
export interface CheckedCsr {
  /** The requested public key, DER SubjectPublicKeyInfo. */
  spki: Uint8Array;
}

/** Parses and checks CSRs. */
export interface CsrChecker {
  /**
   * Parses a PEM PKCS#10 CSR, checks its signature and that its key is ECDSA P-256; throws
   * InvalidArgument naming `field` otherwise.
   */
  check(pem: string, field: string): CheckedCsr;
}

/** The key that signs attestation tokens. */
export interface AttestationKey {
  /** ECDSA P-256 private key. */
  privateKey: KeyObject;
  /** Its public key. */
  publicKey: KeyObject;
  /** JWK thumbprint: the tokens' `kid`. */
  keyId: string;
}

/** Tunables of the Auditserver's behaviour (defaults in ./config.ts). */
export interface AuditPolicy {
  /** Lifetime of an attestation nonce, ms (60 000: the proto says so). */
  nonceTtlMs: number;
  /** Most unused, unexpired nonces one machine may hold. */
  maxNoncesPerMachine: number;
}

/** Everything the Auditserver's services use. */
export interface AuditContext {
  /** The Auditserver's own store. */
  store: Store;
  /** Its hash-chained audit log (in the same store). */
  audit: AuditSink;
  /** "hmac:<hex>" of a sensitive value, for audit details. */
  keyedHash(value: string | Uint8Array): string;
  /** The KDC. */
  kdc: KdcPeer;
  /** CSR parsing and checking. */
  csr: CsrChecker;
  /** Token-signing key. */
  attestationKey: AttestationKey;
  /** The infrastructure CA, PEM (returned to machines at enrollment and renewal). */
  caPem: string;
  /** Status changes for WatchMachineStatus, published by the status follower (./status-follower.ts) from the store's change feed. */
  statusHub: MachineStatusHub;
  /** The clock. */
  clock: Clock;
  /** Logger. */
  logger: Logger;
  /** Tunables. */
  policy: AuditPolicy;
  /** Signed checkpoints of `audit` (absent in tests that build a context by hand: verify walks the chain only). */
  checkpoints?: AuditCheckpoints;
  /** The KDC's checkpoints kept here as its witness. */
  witness?: CheckpointWitnessKeeper;
}
