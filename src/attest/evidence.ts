/**
 * Attestation evidence (kmi.audit.v1.Evidence): what a machine signs with its machine key.
 *
 * The machine serializes Evidence once and signs exactly those bytes (ECDSA P-256 / SHA-256,
 * DER signature); the Auditserver verifies the signature over the bytes it received and only
 * then decodes them, so no canonical re-encoding is ever needed and the two sides cannot
 * disagree on what was signed.
 */
import { X509Certificate, sign, verify, type KeyObject } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { InvalidArgument } from "../common/errors.js";
import { EvidenceSchema, type AttestRequest, AttestRequestSchema } from "../gen/kmi/audit/v1/audit_pb.js";
import { assertP256, toP256PublicKey, type PublicKeyInput } from "./keys.js";
import { checkMeasurementList, type MeasurementValue } from "./measurement.js";

/** Largest serialized Evidence accepted (AttestRequest.evidence). */
export const MAX_EVIDENCE_BYTES = 16 * 1024;
/** Length of an attestation nonce. */
export const NONCE_BYTES = 32;
/** A machine id: "m-" and 16 lowercase hex characters. */
export const MACHINE_ID_PATTERN = /^m-[0-9a-f]{16}$/;
const SOFTWARE_VERSION = /^[\x20-\x7e]{1,64}$/;

/** Evidence as a plain, validated value. */
export interface EvidenceValue {
  /** The machine's id. */
  machineId: string;
  /** The nonce from GetAttestationNonce, 32 bytes. */
  nonce: Uint8Array;
  /** Measurements, unique names. */
  measurements: MeasurementValue[];
  /** kmi software version. */
  softwareVersion: string;
  /** The machine's clock when it signed. */
  time: Date;
}

/** Serializes evidence (after checking it, so a machine never sends what the server refuses). */
export function encodeEvidence(evidence: EvidenceValue): Uint8Array {
  checkEvidence(evidence);
  return toBinary(
    EvidenceSchema,
    create(EvidenceSchema, {
      machineId: evidence.machineId,
      nonce: evidence.nonce,
      measurements: evidence.measurements.map((m) => ({ name: m.name, sha256: m.sha256 })),
      softwareVersion: evidence.softwareVersion,
      time: timestampFromDate(evidence.time),
    }),
  );
}

/**
 * Decodes and checks serialized evidence. Throws InvalidArgument naming the field
 * ("evidence.measurements[2].sha256: …") when it does not parse or breaks a rule of
 * audit.proto. Call it only on bytes whose signature has been verified.
 */
export function decodeEvidence(bytes: Uint8Array): EvidenceValue {
  if (bytes.byteLength === 0) throw new InvalidArgument("evidence: required (a serialized kmi.audit.v1.Evidence)");
  if (bytes.byteLength > MAX_EVIDENCE_BYTES) throw new InvalidArgument(`evidence: ${bytes.byteLength} bytes, at most ${MAX_EVIDENCE_BYTES}`);
  let message;
  try {
    message = fromBinary(EvidenceSchema, bytes);
  } catch {
    throw new InvalidArgument("evidence: does not parse as a serialized kmi.audit.v1.Evidence");
  }
  if (message.time === undefined) throw new InvalidArgument("evidence.time: required");
  const value: EvidenceValue = {
    machineId: message.machineId,
    nonce: message.nonce,
    measurements: message.measurements.map((m) => ({ name: m.name, sha256: m.sha256 })),
    softwareVersion: message.softwareVersion,
    time: timestampDate(message.time),
  };
  checkEvidence(value);
  return value;
}

/** Throws InvalidArgument naming the first field of `evidence` that breaks audit.proto's rules. */
export function checkEvidence(evidence: EvidenceValue): void {
  if (!MACHINE_ID_PATTERN.test(evidence.machineId)) {
    throw new InvalidArgument('evidence.machine_id: want "m-" and 16 lowercase hex characters, as in the machine certificate');
  }
  if (evidence.nonce.byteLength !== NONCE_BYTES) {
    throw new InvalidArgument(`evidence.nonce: ${evidence.nonce.byteLength} bytes, want the ${NONCE_BYTES} from GetAttestationNonce`);
  }
  checkMeasurementList(evidence.measurements, "evidence.measurements");
  if (!SOFTWARE_VERSION.test(evidence.softwareVersion)) {
    throw new InvalidArgument("evidence.software_version: want 1 to 64 printable ASCII characters");
  }
  if (Number.isNaN(evidence.time.getTime())) throw new InvalidArgument("evidence.time: not a valid time");
}

/** Signs serialized evidence with the machine key: ECDSA P-256 / SHA-256, DER signature. */
export function signEvidence(evidenceBytes: Uint8Array, machineKey: KeyObject): Uint8Array {
  if (machineKey.type !== "private") throw new InvalidArgument("machine key: not a private key");
  assertP256(machineKey, "machine key");
  return sign("sha256", evidenceBytes, { key: machineKey, dsaEncoding: "der" });
}

/**
 * Builds the AttestRequest a machine sends: the evidence serialized once and signed over
 * exactly those bytes.
 */
export function createAttestRequest(evidence: EvidenceValue, machineKey: KeyObject): AttestRequest {
  const bytes = encodeEvidence(evidence);
  return create(AttestRequestSchema, { evidence: bytes, signature: signEvidence(bytes, machineKey) });
}

/**
 * The public key that must have signed a machine's evidence: that of its certificate (an
 * X509Certificate, PEM or DER) or a public key.
 */
export type EvidenceSignerInput = PublicKeyInput | X509Certificate;

/**
 * True when `signature` (DER ECDSA P-256 / SHA-256) over `evidenceBytes` verifies with the
 * key of `signer` (the machine's mutual-TLS certificate, or its public key). A signature that
 * is not DER, or any other failure to verify, is false.
 */
export function verifyEvidenceSignature(evidenceBytes: Uint8Array, signature: Uint8Array, signer: EvidenceSignerInput): boolean {
  const key = signerKey(signer);
  try {
    return verify("sha256", evidenceBytes, { key, dsaEncoding: "der" }, signature);
  } catch {
    return false;
  }
}

function signerKey(signer: EvidenceSignerInput): KeyObject {
  if (signer instanceof X509Certificate) return toP256PublicKey(signer.publicKey, "machine certificate");
  if (typeof signer === "string" && signer.includes("-----BEGIN CERTIFICATE-----")) {
    return toP256PublicKey(new X509Certificate(signer).publicKey, "machine certificate");
  }
  if (signer instanceof Uint8Array) {
    // DER: a certificate or a SubjectPublicKeyInfo; try the certificate first.
    try {
      return toP256PublicKey(new X509Certificate(signer).publicKey, "machine certificate");
    } catch (err) {
      if (err instanceof InvalidArgument) throw err;
    }
  }
  return toP256PublicKey(signer, "machine public key");
}
