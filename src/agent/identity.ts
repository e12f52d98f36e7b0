/**
 * The machine identity: a P-256 key the agent generates itself (it never leaves the machine),
 * and the short-lived machine certificate the Auditserver issues for it at enrollment (with a
 * one-time join token) and at each renewal (over mutual TLS, at 2/3 of its life); plus the
 * machine's encryption key, a second P-256 key made at enrollment and used only to unwrap the
 * secrets the KDC releases (one key, one purpose: the machine key does mutual TLS and signs
 * evidence). Renewal keeps the encryption key. Kept in `identity.pb` in the state dir (0600),
 * both private keys sealed under the sealing key.
 */
import { generateKeyPairSync, X509Certificate, type KeyObject } from "node:crypto";
import { hostname as osHostname } from "node:os";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { bindEncryptionKey, generateEncryptionKey } from "../attest/index.js";
import { FailedPrecondition } from "../common/errors.js";
import type { AuditService, EnrollResponse, RenewMachineCertificateResponse } from "../gen/kmi/audit/v1/audit_pb.js";
import { AgentIdentityRecordSchema } from "../gen/kmi/store/v1/agent_pb.js";
import type { SealedBlob } from "../gen/kmi/store/v1/envelope_pb.js";
import { keyIdOf } from "../keywrap/index.js";
import { createCsr, csrToPem } from "../pki/csr.js";
import { importPrivateKeyPkcs8Der } from "../pki/keys.js";
import { open, seal } from "../storage/seal.js";
import type { Client } from "@connectrpc/connect";
import { STATE_FILES, type StateDir } from "./state-dir.js";

/** Format version of identity records written by this version. */
export const IDENTITY_RECORD_VERSION = 1;

const MACHINE_ID = /^m-[0-9a-f]{16}$/;

/** The machine's identity, in memory. */
export interface MachineIdentity {
  /** Machine id ("m-" and 16 hex characters). */
  readonly machineId: string;
  /** Machine group. */
  readonly group: string;
  /** The machine's private key. */
  readonly privateKey: KeyObject;
  /** Its key id (SHA-256 of the SPKI, hex). */
  readonly keyId: string;
  /**
   * The encryption key (ECDH P-256) released secrets are wrapped to; undefined for an identity
   * enrolled before encryption keys existed (its secrets come wrapped to the machine key).
   */
  readonly encryptionKey: KeyObject | undefined;
  /** The current machine certificate, PEM. */
  readonly certificatePem: string;
  /** The infrastructure CA the Auditserver returned, PEM. */
  readonly caPem: string;
  /** Certificate validity, epoch ms. */
  readonly notBefore: number;
  /** Certificate validity end, epoch ms. */
  readonly notAfter: number;
  /** When the machine enrolled, epoch ms. */
  readonly enrolledAt: number;
  /** When the certificate was last renewed, epoch ms. */
  readonly renewedAt: number | undefined;
}

/** When a certificate from `notBefore` to `notAfter` is due for renewal: at 2/3 of its life. */
export function renewalTime(identity: Pick<MachineIdentity, "notBefore" | "notAfter">): number {
  return identity.notBefore + ((identity.notAfter - identity.notBefore) * 2) / 3;
}

/** The machine private key as PEM, for the TLS client options (in memory only). */
export function privateKeyPem(identity: MachineIdentity): string {
  return identity.privateKey.export({ format: "pem", type: "pkcs8" }).toString();
}

function machineKeyAad(keyId: string): string {
  return `agent/machine-key/${keyId}`;
}

function encryptionKeyAad(keyId: string): string {
  return `agent/encryption-key/${keyId}`;
}

function openKey(sealingKey: Uint8Array, blob: SealedBlob, aad: string, field: string): KeyObject {
  const pkcs8 = open(sealingKey, blob, aad);
  try {
    return importPrivateKeyPkcs8Der(pkcs8, field);
  } finally {
    pkcs8.fill(0);
  }
}

function sealKey(sealingKey: Uint8Array, key: KeyObject, aad: string): SealedBlob {
  const pkcs8 = key.export({ format: "der", type: "pkcs8" });
  try {
    return seal(sealingKey, pkcs8, aad);
  } finally {
    pkcs8.fill(0);
  }
}

/** Reads and writes `identity.pb`. */
export class IdentityStore {
  constructor(
    private readonly dir: StateDir,
    private readonly sealingKey: Uint8Array,
  ) {}

  /** The stored identity, or undefined before enrollment. */
  async load(): Promise<MachineIdentity | undefined> {
    const bytes = await this.dir.read(STATE_FILES.identity);
    if (bytes === undefined) return undefined;
    const path = this.dir.file(STATE_FILES.identity);
    let record;
    try {
      record = fromBinary(AgentIdentityRecordSchema, bytes);
    } catch (err) {
      throw new FailedPrecondition(`identity file ${path}: does not parse; move it away to enroll again with a new join token`, { cause: err });
    }
    if (record.recordVersion > IDENTITY_RECORD_VERSION) {
      throw new FailedPrecondition(`identity file ${path}: record version ${record.recordVersion} is newer than this agent knows; upgrade kmi`);
    }
    if (record.machineKey === undefined) throw new FailedPrecondition(`identity file ${path}: holds no machine key; move it away to enroll again`);
    const privateKey = openKey(this.sealingKey, record.machineKey, machineKeyAad(record.machineKeyId), "machine_key");
    const encryptionKey = record.encryptionKey === undefined ? undefined : openKey(this.sealingKey, record.encryptionKey, encryptionKeyAad(record.encryptionKeyId), "encryption_key");
    if (encryptionKey !== undefined && keyIdOf(encryptionKey) !== record.encryptionKeyId) {
      throw new FailedPrecondition(`identity file ${path}: the encryption key is not encryption_key_id; move it away to enroll again`);
    }
    const cert = parseMachineCertificate(record.certificatePem, record.machineId, privateKey, `identity file ${path}`);
    return {
      machineId: record.machineId,
      group: record.group,
      privateKey,
      keyId: record.machineKeyId,
      encryptionKey,
      certificatePem: record.certificatePem,
      caPem: record.caPem,
      notBefore: cert.notBefore,
      notAfter: cert.notAfter,
      enrolledAt: record.enrolledAt === undefined ? 0 : timestampMs(record.enrolledAt),
      renewedAt: record.renewedAt === undefined ? undefined : timestampMs(record.renewedAt),
    };
  }

  /** Writes the identity (atomically, 0600), the machine key sealed. */
  async save(identity: MachineIdentity): Promise<void> {
    const sealed = sealKey(this.sealingKey, identity.privateKey, machineKeyAad(identity.keyId));
    const encryptionKeyId = identity.encryptionKey === undefined ? "" : keyIdOf(identity.encryptionKey);
    const record = create(AgentIdentityRecordSchema, {
      recordVersion: IDENTITY_RECORD_VERSION,
      machineId: identity.machineId,
      group: identity.group,
      machineKey: sealed,
      machineKeyId: identity.keyId,
      ...(identity.encryptionKey !== undefined
        ? { encryptionKey: sealKey(this.sealingKey, identity.encryptionKey, encryptionKeyAad(encryptionKeyId)), encryptionKeyId }
        : {}),
      certificatePem: identity.certificatePem,
      caPem: identity.caPem,
      certificateNotAfter: timestampFromMs(identity.notAfter),
      enrolledAt: timestampFromMs(identity.enrolledAt),
      renewedAt: identity.renewedAt === undefined ? undefined : timestampFromMs(identity.renewedAt),
    });
    await this.dir.write(STATE_FILES.identity, toBinary(AgentIdentityRecordSchema, record));
  }
}

/** Checks a machine certificate: parses, is for `privateKey`, names `machineId` in its URI SAN. */
export function parseMachineCertificate(pem: string, machineId: string, privateKey: KeyObject, where: string): { notBefore: number; notAfter: number } {
  if (!MACHINE_ID.test(machineId)) throw new FailedPrecondition(`${where}: machine id "${machineId}" is not "m-" and 16 hex characters`);
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(pem);
  } catch (err) {
    throw new FailedPrecondition(`${where}: the machine certificate does not parse`, { cause: err });
  }
  if (keyIdOf(cert.publicKey) !== keyIdOf(privateKey)) throw new FailedPrecondition(`${where}: the machine certificate is not for this machine's key`);
  const uris = (cert.subjectAltName ?? "").split(", ").filter((s) => s.startsWith("URI:")).map((s) => s.slice(4));
  if (!uris.includes(`kmi://machine/${machineId}`)) throw new FailedPrecondition(`${where}: the machine certificate does not name kmi://machine/${machineId}`);
  return { notBefore: Date.parse(cert.validFrom), notAfter: Date.parse(cert.validTo) };
}

/** A fresh machine key and its CSR (PEM). */
export function newMachineKey(hostname: string): { privateKey: KeyObject; csrPem: string } {
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  return { privateKey, csrPem: csrFor(privateKey, hostname) };
}

function csrFor(privateKey: KeyObject, hostname: string): string {
  const cn = (hostname || "kmi-agent").slice(0, 64);
  return csrToPem(createCsr({ subject: { commonName: cn }, privateKey }));
}

/** Enrolls with a join token: a new machine key and its CSR, a new encryption key bound to it, AuditService.Enroll. */
export async function enroll(
  audit: Client<typeof AuditService>,
  joinToken: string,
  now: number,
  hostname = osHostname(),
  signal?: AbortSignal,
): Promise<MachineIdentity> {
  const { privateKey, csrPem } = newMachineKey(hostname);
  const encryptionKey = generateEncryptionKey();
  const binding = bindEncryptionKey(privateKey, encryptionKey);
  const res: EnrollResponse = await audit.enroll(
    { joinToken, csrPem, hostname: hostname.slice(0, 253), encryptionPublicKey: binding.publicKeyDer, encryptionKeySignature: binding.signature },
    signal === undefined ? {} : { signal },
  );
  const cert = parseMachineCertificate(res.certificatePem, res.machineId, privateKey, "enrollment response");
  return {
    machineId: res.machineId,
    group: res.group,
    privateKey,
    keyId: keyIdOf(privateKey),
    encryptionKey,
    certificatePem: res.certificatePem,
    caPem: res.caPem,
    notBefore: cert.notBefore,
    notAfter: cert.notAfter,
    enrolledAt: now,
    renewedAt: undefined,
  };
}

/** Renews the machine certificate for the same key (AuditService.RenewMachineCertificate over mutual TLS). */
export async function renew(audit: Client<typeof AuditService>, identity: MachineIdentity, now: number, hostname = osHostname()): Promise<MachineIdentity> {
  const res: RenewMachineCertificateResponse = await audit.renewMachineCertificate({ csrPem: csrFor(identity.privateKey, hostname) });
  const cert = parseMachineCertificate(res.certificatePem, identity.machineId, identity.privateKey, "renewal response");
  return {
    ...identity,
    certificatePem: res.certificatePem,
    caPem: res.caPem || identity.caPem,
    notBefore: cert.notBefore,
    notAfter: cert.notAfter,
    renewedAt: now,
  };
}
