/**
 * The one validation layer of the Auditserver: every request is parsed here into a checked
 * domain value before anything else happens, following the rules written in the comments of
 * proto/kmi/audit/v1/*.proto. A broken rule is InvalidArgument naming the field and saying
 * how to fix it; nothing has been read or changed at that point.
 */
import {
  checkMeasurementName,
  checkSha256Hex,
  MACHINE_ID_PATTERN,
  MAX_EVIDENCE_BYTES,
  MAX_MEASUREMENTS,
  parseEncryptionPublicKey,
  type EncryptionKeyBinding,
} from "../attest/index.js";
import { InvalidArgument } from "../common/errors.js";
import type {
  ApproveMeasurementsRequest,
  CreateGroupRequest,
  CreateJoinTokenRequest,
  GetMachineRequest,
  ListMachinesRequest,
  QuarantineMachineRequest,
  ReleaseMachineRequest,
  TailAuditLogRequest,
} from "../gen/kmi/audit/v1/admin_pb.js";
import type { AttestRequest, EnrollRequest, RenewMachineCertificateRequest } from "../gen/kmi/audit/v1/audit_pb.js";
import { parseJoinToken } from "./join-token.js";
import { hasControlChars } from "../common/control-chars.js";

/** Group names and tenant ids: lowercase letters, digits and '-', 1 to 63, starting with a letter. */
export const NAME_PATTERN = /^[a-z][a-z0-9-]{0,62}$/;
/** Hostnames as machines report them: letters, digits, '.', '-' and '_', 1 to 253. */
const HOSTNAME = /^[A-Za-z0-9._-]{1,253}$/;
/** Largest CSR accepted, PEM characters. */
export const MAX_CSR_PEM_CHARS = 16 * 1024;
/** Largest DER ECDSA P-256 signature (two 33-byte integers with headers). */
const MAX_EVIDENCE_SIGNATURE_BYTES = 72;

/** Certificate lifetime bounds and default, seconds. */
export const CERT_TTL = { min: 300, max: 2_592_000, default: 86_400 } as const;
/** Attestation token lifetime bounds and default, seconds. */
export const TOKEN_TTL = { min: 60, max: 3_600, default: 300 } as const;
/** Join token lifetime bounds and default, seconds. */
export const JOIN_TOKEN_TTL = { min: 60, max: 604_800, default: 3_600 } as const;
/** Most digests approved for one measurement name. */
export const MAX_APPROVED_DIGESTS = 16;

function name(value: string, field: string, what: string): string {
  if (value === "") throw new InvalidArgument(`${field}: required`);
  if (!NAME_PATTERN.test(value)) {
    throw new InvalidArgument(`${field}: "${value.slice(0, 64)}" is not a valid ${what} (lowercase letters, digits and '-', 1 to 63 characters, starting with a letter)`);
  }
  return value;
}

/** A group name. */
export function parseGroupName(value: string, field = "group"): string {
  return name(value, field, "group name");
}

/** A machine id. */
export function parseMachineId(value: string, field = "machine_id"): string {
  if (value === "") throw new InvalidArgument(`${field}: required`);
  if (!MACHINE_ID_PATTERN.test(value)) throw new InvalidArgument(`${field}: "${value.slice(0, 64)}" is not a machine id ("m-" and 16 lowercase hex characters)`);
  return value;
}

function ttl(value: number, field: string, bounds: { min: number; max: number; default: number }): number {
  if (value === 0) return bounds.default;
  if (value < bounds.min || value > bounds.max) {
    throw new InvalidArgument(`${field}: ${value} is out of range; give ${bounds.min} to ${bounds.max} seconds, or 0 for ${bounds.default}`);
  }
  return value;
}

function reason(value: string, field: string): string {
  if (value.trim() === "") throw new InvalidArgument(`${field}: required; say why (1 to 256 characters)`);
  if ([...value].length > 256) throw new InvalidArgument(`${field}: longer than 256 characters`);
  if (hasControlChars(value)) throw new InvalidArgument(`${field}: must not contain control characters`);
  return value;
}

/** A validated CreateGroupRequest, defaults resolved. */
export interface NewGroup {
  name: string;
  /** Sorted, unique; empty exactly when `allTenants`. */
  tenantIds: string[];
  /** Serve every tenant. */
  allTenants: boolean;
  quarantineOnMismatch: boolean;
  certificateTtlSeconds: number;
  tokenTtlSeconds: number;
}

/**
 * Parses CreateGroupRequest. Exactly one of a non-empty `tenant_ids` or `all_tenants` is
 * required. Why: a group made without tenants by mistake must not receive every tenant's keys.
 */
export function parseCreateGroup(req: CreateGroupRequest): NewGroup {
  const groupName = name(req.name, "name", "group name");
  const seen = new Set<string>();
  req.tenantIds.forEach((t, i) => {
    name(t, `tenant_ids[${i}]`, "tenant id");
    if (seen.has(t)) throw new InvalidArgument(`tenant_ids[${i}]: "${t}" given twice`);
    seen.add(t);
  });
  if (req.tenantIds.length > 1000) throw new InvalidArgument("tenant_ids: at most 1000");
  if (req.allTenants && req.tenantIds.length > 0) throw new InvalidArgument("all_tenants: give either tenant_ids or all_tenants, not both");
  if (!req.allTenants && req.tenantIds.length === 0) {
    throw new InvalidArgument("tenant_ids: give the tenants this group's machines serve, or all_tenants to serve every tenant");
  }
  return {
    name: groupName,
    tenantIds: [...seen].sort(),
    allTenants: req.allTenants,
    quarantineOnMismatch: req.quarantineOnMismatch,
    certificateTtlSeconds: ttl(req.certificateTtlSeconds, "certificate_ttl_seconds", CERT_TTL),
    tokenTtlSeconds: ttl(req.tokenTtlSeconds, "token_ttl_seconds", TOKEN_TTL),
  };
}

/** One approved measurement, validated. */
export interface ApprovedDigests {
  name: string;
  sha256: string[];
}

/** Parses ApproveMeasurementsRequest: entries sorted by name, digests sorted. */
export function parseApproveMeasurements(req: ApproveMeasurementsRequest): { group: string; approved: ApprovedDigests[] } {
  const group = parseGroupName(req.group);
  if (req.approved.length > MAX_MEASUREMENTS) throw new InvalidArgument(`approved: ${req.approved.length} entries, at most ${MAX_MEASUREMENTS}`);
  const names = new Set<string>();
  const approved = req.approved.map((a, i): ApprovedDigests => {
    checkMeasurementName(a.name, `approved[${i}].name`);
    if (names.has(a.name)) throw new InvalidArgument(`approved[${i}].name: "${a.name}" given twice; one entry per name with all its digests`);
    names.add(a.name);
    if (a.sha256.length === 0) throw new InvalidArgument(`approved[${i}].sha256: at least one digest for "${a.name}"`);
    if (a.sha256.length > MAX_APPROVED_DIGESTS) throw new InvalidArgument(`approved[${i}].sha256: ${a.sha256.length} digests, at most ${MAX_APPROVED_DIGESTS}`);
    const digests = new Set<string>();
    a.sha256.forEach((d, j) => {
      checkSha256Hex(d, `approved[${i}].sha256[${j}]`);
      if (digests.has(d)) throw new InvalidArgument(`approved[${i}].sha256[${j}]: given twice`);
      digests.add(d);
    });
    return { name: a.name, sha256: [...digests].sort() };
  });
  approved.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return { group, approved };
}

/** Parses CreateJoinTokenRequest. */
export function parseCreateJoinToken(req: CreateJoinTokenRequest): { group: string; ttlSeconds: number; description: string } {
  const group = parseGroupName(req.group);
  const ttlSeconds = ttl(req.ttlSeconds, "ttl_seconds", JOIN_TOKEN_TTL);
  if ([...req.description].length > 256) throw new InvalidArgument("description: longer than 256 characters");
  return { group, ttlSeconds, description: req.description };
}

/** Parses ListMachinesRequest: an optional group filter. */
export function parseListMachines(req: ListMachinesRequest): { group?: string } {
  return req.group === "" ? {} : { group: parseGroupName(req.group) };
}

/** Parses GetMachineRequest. */
export function parseGetMachine(req: GetMachineRequest): { machineId: string } {
  return { machineId: parseMachineId(req.machineId) };
}

/** Parses QuarantineMachineRequest and ReleaseMachineRequest. */
export function parseStatusChange(req: QuarantineMachineRequest | ReleaseMachineRequest): { machineId: string; reason: string } {
  return { machineId: parseMachineId(req.machineId), reason: reason(req.reason, "reason") };
}

/** Parses TailAuditLogRequest. */
export function parseTailAuditLog(req: TailAuditLogRequest): { afterSeq: bigint; limit: number; last: boolean } {
  if (req.limit > 1000) throw new InvalidArgument(`limit: ${req.limit} is out of range; give 1 to 1000, or 0 for 100`);
  return { afterSeq: req.afterSeq, limit: req.limit === 0 ? 100 : req.limit, last: req.last };
}

function csrPem(value: string, field: string): string {
  if (value.trim() === "") throw new InvalidArgument(`${field}: required (a PEM PKCS#10 CSR for the machine's ECDSA P-256 key)`);
  if (value.length > MAX_CSR_PEM_CHARS) throw new InvalidArgument(`${field}: longer than ${MAX_CSR_PEM_CHARS} characters`);
  return value;
}

/** A validated EnrollRequest (the CSR's content is checked by ./csr.ts). */
export interface EnrollInput {
  tokenId: string;
  secretPart: string;
  csrPem: string;
  hostname: string;
  /** The encryption key and its binding signature; undefined from an agent without one (legacy). */
  encryption: EncryptionKeyBinding | undefined;
}

/** A DER SPKI of a P-256 key is 91 bytes; this bound only keeps garbage out. */
const MAX_ENCRYPTION_KEY_BYTES = 256;

/** Parses EnrollRequest. */
export function parseEnroll(req: EnrollRequest): EnrollInput {
  if (req.joinToken === "") throw new InvalidArgument("join_token: required (the kmij_… token from `kmi ctl join-token create`)");
  const token = parseJoinToken(req.joinToken);
  // Why the message does not echo the value: it is a secret, even when mistyped.
  if (token === undefined) throw new InvalidArgument('join_token: not a join token; want "kmij_<16 hex>_<43 base64url>" as `kmi ctl join-token create` prints it');
  if (req.hostname !== "" && !HOSTNAME.test(req.hostname)) {
    throw new InvalidArgument("hostname: want 1 to 253 letters, digits, '.', '-' or '_'");
  }
  return { tokenId: token.tokenId, secretPart: token.secretPart, csrPem: csrPem(req.csrPem, "csr_pem"), hostname: req.hostname, encryption: encryptionBinding(req) };
}

/** The enrollment's encryption key fields: both or neither; the signature is checked against the CSR later. */
function encryptionBinding(req: EnrollRequest): EncryptionKeyBinding | undefined {
  const key = req.encryptionPublicKey;
  const sig = req.encryptionKeySignature;
  if (key.byteLength === 0) {
    if (sig.byteLength > 0) throw new InvalidArgument("encryption_key_signature: given without encryption_public_key; send both or neither");
    return undefined;
  }
  if (key.byteLength > MAX_ENCRYPTION_KEY_BYTES) throw new InvalidArgument(`encryption_public_key: ${key.byteLength} bytes; a P-256 SubjectPublicKeyInfo is 91`);
  parseEncryptionPublicKey(key, "encryption_public_key");
  if (sig.byteLength === 0) throw new InvalidArgument("encryption_key_signature: required with encryption_public_key (the CSR's key signs the binding)");
  if (sig.byteLength > MAX_EVIDENCE_SIGNATURE_BYTES) throw new InvalidArgument(`encryption_key_signature: ${sig.byteLength} bytes; a DER ECDSA P-256 signature is at most ${MAX_EVIDENCE_SIGNATURE_BYTES}`);
  return { publicKeyDer: key, signature: sig };
}

/** Parses RenewMachineCertificateRequest. */
export function parseRenew(req: RenewMachineCertificateRequest): { csrPem: string } {
  return { csrPem: csrPem(req.csrPem, "csr_pem") };
}

/** Parses AttestRequest's envelope (the evidence itself is checked after its signature). */
export function parseAttest(req: AttestRequest): { evidence: Uint8Array; signature: Uint8Array } {
  if (req.evidence.byteLength === 0) throw new InvalidArgument("evidence: required (a serialized kmi.audit.v1.Evidence)");
  if (req.evidence.byteLength > MAX_EVIDENCE_BYTES) throw new InvalidArgument(`evidence: ${req.evidence.byteLength} bytes, at most ${MAX_EVIDENCE_BYTES}`);
  if (req.signature.byteLength === 0) throw new InvalidArgument("signature: required (DER ECDSA P-256 / SHA-256 over `evidence` by the machine key)");
  if (req.signature.byteLength > MAX_EVIDENCE_SIGNATURE_BYTES) {
    throw new InvalidArgument(`signature: ${req.signature.byteLength} bytes; a DER ECDSA P-256 signature is at most ${MAX_EVIDENCE_SIGNATURE_BYTES}`);
  }
  return { evidence: req.evidence, signature: req.signature };
}

