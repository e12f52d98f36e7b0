/**
 * The KDC's validation layer: every request is parsed here into a validated domain type
 * before anything is authorized or changed. The rules are the ones written in the proto
 * comments of proto/kmi/kdc/v1; a broken rule is an InvalidArgument that names the field and
 * says how to fix it.
 */
import { isIP } from "node:net";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { InvalidArgument } from "../common/errors.js";
import { KeyAlgorithm } from "../gen/kmi/common/v1/common_pb.js";
import { Role, type CreateTenantRequest, type CreateTokenRequest, type IssueServiceCertificateRequest, type TailAuditLogRequest } from "../gen/kmi/kdc/v1/admin_pb.js";
import {
  CertificateFormat,
  KeyCustody,
  Signer,
  type ActivateVersionRequest,
  type CreateSigningKeyRequest,
  type CreateVersionRequest,
  type GetCaCertificatesRequest,
  type RenewVersionRequest,
  type RevokeSigningKeyRequest,
  type RevokeVersionRequest,
  type SetRotationPolicyRequest,
  type Subject,
  type UploadIntermediateRequest,
} from "../gen/kmi/kdc/v1/kdc_pb.js";
import type { ReportHeldVersionsRequest, SignLeafRequest } from "../gen/kmi/kdc/v1/distribution_pb.js";
import type { IssueMachineCertificateRequest } from "../gen/kmi/kdc/v1/peer_pb.js";
import { MAX_SAN_NAMES } from "../pki/san.js";
import { hasControlChars } from "../common/control-chars.js";

const TENANT_ID = /^[a-z][a-z0-9-]{0,62}$/;
const NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;
const TOKEN_ID = /^[0-9a-f]{16}$/;
const KEY_ID = /^[0-9a-f]{64}$/;
/** Most entries in one ReportHeldVersions. */
export const MAX_HELD_VERSIONS = 10_000;
const DNS_LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;
/** Largest certificate (or customer root) accepted by an upload. */
export const MAX_UPLOAD_BYTES = 64 * 1024;
/** Largest CSR accepted. */
export const MAX_CSR_CHARS = 16 * 1024;
const TEN_YEARS_SECONDS = 10 * 365 * 24 * 3600;

/** A free-text field may not carry control characters (they would forge log lines and tables). */
function freeText(field: string, value: string, max: number, required: boolean): string {
  if (required && value.length === 0) throw new InvalidArgument(`${field}: required; give 1 to ${max} characters`);
  if ([...value].length > max) throw new InvalidArgument(`${field}: too long (${[...value].length} characters); at most ${max}`);
  // eslint-disable-next-line no-control-regex
  if (hasControlChars(value)) throw new InvalidArgument(`${field}: contains control characters; use printable text`);
  return value;
}

/** Tenant id: lowercase letters, digits and '-', 1 to 63 characters, starting with a letter. */
export function tenantId(value: string, field = "tenant_id"): string {
  if (value === "") throw new InvalidArgument(`${field}: required; e.g. "acme"`);
  if (!TENANT_ID.test(value)) {
    throw new InvalidArgument(`${field}: "${clip(value)}" is not a tenant id; use 1 to 63 lowercase letters, digits and '-', starting with a letter`);
  }
  return value;
}

/** A name (signing key, machine, service, group): lowercase letters, digits and '-', 1 to 63 characters. */
export function name(field: string, value: string): string {
  if (value === "") throw new InvalidArgument(`${field}: required; use 1 to 63 lowercase letters, digits and '-'`);
  if (!NAME.test(value)) throw new InvalidArgument(`${field}: "${clip(value)}" is invalid; use 1 to 63 lowercase letters, digits and '-'`);
  return value;
}

/** A required version number (> 0). */
export function versionNumber(value: number, field = "version"): number {
  if (value === 0) throw new InvalidArgument(`${field}: required; give a version number from \`ca history\``);
  return value;
}

/** Key algorithm; UNSPECIFIED means ECDSA P-256. */
export function keyAlgorithm(value: KeyAlgorithm, field = "key_algorithm"): KeyAlgorithm {
  switch (value) {
    case KeyAlgorithm.UNSPECIFIED:
      return KeyAlgorithm.ECDSA_P256;
    case KeyAlgorithm.ECDSA_P256:
    case KeyAlgorithm.RSA_2048:
    case KeyAlgorithm.RSA_3072:
      return value;
    default:
      throw new InvalidArgument(`${field}: unknown value ${String(value)}; use ECDSA_P256, RSA_2048 or RSA_3072`);
  }
}

/** Signer; required. */
export function signer(value: Signer, field = "signer"): Signer {
  if (value === Signer.KMI_ROOT || value === Signer.PRIVATE_CA) return value;
  if (value === Signer.UNSPECIFIED) throw new InvalidArgument(`${field}: required; use KMI_ROOT (signed by the KMI root now) or PRIVATE_CA (CSR for your own CA)`);
  throw new InvalidArgument(`${field}: unknown value ${String(value)}; use KMI_ROOT or PRIVATE_CA`);
}

/** Validity of a KMI-signed intermediate in days: 1 to 1825; 0 means 365. */
export function validityDays(value: number, field = "validity_days", max = 1825, dflt = 365): number {
  if (value === 0) return dflt;
  if (value < 1 || value > max) throw new InvalidArgument(`${field}: ${value} is out of range; use 1 to ${max} days (0 means ${dflt})`);
  return value;
}

/** Subject of a new intermediate, with the proto's limits. The default CN is filled in later. */
export interface SubjectInput {
  commonName: string;
  organization: string;
  organizationalUnit: string;
  country: string;
}

/** Parses a Subject message; absent means all defaults. */
export function subject(value: Subject | undefined): SubjectInput {
  const s = {
    commonName: freeText("subject.common_name", value?.commonName ?? "", 64, false),
    organization: freeText("subject.organization", value?.organization ?? "", 64, false),
    organizationalUnit: freeText("subject.organizational_unit", value?.organizationalUnit ?? "", 64, false),
    country: value?.country ?? "",
  };
  if (s.country !== "" && !/^[A-Z]{2}$/.test(s.country)) {
    throw new InvalidArgument(`subject.country: "${clip(s.country)}" is not a two-letter ISO 3166 code; use e.g. "US" or leave it empty`);
  }
  return s;
}

/** Why a version or key is revoked: required, 1 to 256 characters. */
export function reason(value: string, field = "reason"): string {
  return freeText(field, value, 256, true);
}

function bytesField(field: string, value: Uint8Array, required: boolean): Uint8Array {
  if (required && value.length === 0) throw new InvalidArgument(`${field}: required; give the certificate as PEM or DER`);
  if (value.length > MAX_UPLOAD_BYTES) throw new InvalidArgument(`${field}: ${value.length} bytes is too large; at most ${MAX_UPLOAD_BYTES} (one certificate)`);
  return value;
}

function csrPem(value: string, field = "csr_pem"): string {
  if (value.trim() === "") throw new InvalidArgument(`${field}: required; give a PKCS#10 CSR in PEM ("-----BEGIN CERTIFICATE REQUEST-----")`);
  if (value.length > MAX_CSR_CHARS) throw new InvalidArgument(`${field}: too large (${value.length} characters); at most ${MAX_CSR_CHARS}`);
  return value;
}

function dnsName(field: string, value: string): string {
  const v = value.toLowerCase();
  if (v.length === 0 || v.length > 253 || !v.split(".").every((l) => DNS_LABEL.test(l))) {
    throw new InvalidArgument(`${field}: "${clip(value)}" is not a DNS name; use letters, digits, '-' and '.' (no wildcards)`);
  }
  return v;
}

function ipAddress(field: string, value: string): string {
  if (isIP(value) === 0) throw new InvalidArgument(`${field}: "${clip(value)}" is not an IP address; use e.g. 10.0.0.7 or ::1`);
  return value;
}

/** Cuts an echoed value so a message never carries a long (or secret-looking) input. */
function clip(value: string): string {
  return value.length > 40 ? `${value.slice(0, 37)}...` : value;
}

// ---- Requests -> validated inputs ----

/** GetCaCertificates, validated. */
export interface GetCaCertificatesInput { tenantId: string; version: number; format: CertificateFormat }
/** Parses GetCaCertificatesRequest. */
export function getCaCertificates(req: GetCaCertificatesRequest): GetCaCertificatesInput {
  const format = req.format === CertificateFormat.UNSPECIFIED ? CertificateFormat.PEM : req.format;
  if (format !== CertificateFormat.PEM && format !== CertificateFormat.DER) {
    throw new InvalidArgument(`format: unknown value ${String(req.format)}; use PEM or DER`);
  }
  return { tenantId: tenantId(req.tenantId), version: req.version, format };
}

/** CreateVersion, validated. */
export interface CreateVersionInput {
  tenantId: string;
  signer: Signer;
  keyAlgorithm: KeyAlgorithm;
  subject: SubjectInput;
  validityDays: number;
  activate: boolean;
  /** Where the key is held; UNSPECIFIED (or absent): as the tenant's active version. */
  keyCustody?: KeyCustody;
}
/** Parses CreateVersionRequest. */
export function createVersion(req: CreateVersionRequest): CreateVersionInput {
  const s = signer(req.signer);
  if (req.activate && s === Signer.PRIVATE_CA) {
    throw new InvalidArgument("activate: only for signer KMI_ROOT; a PRIVATE_CA version is activated after its upload (`ca upload --activate`)");
  }
  return {
    tenantId: tenantId(req.tenantId),
    signer: s,
    keyAlgorithm: keyAlgorithm(req.keyAlgorithm),
    subject: subject(req.subject),
    validityDays: validityDays(req.validityDays),
    activate: req.activate,
    keyCustody: keyCustody(req.keyCustody),
  };
}

/** A KeyCustody value the API knows. */
export function keyCustody(value: KeyCustody, field = "key_custody"): KeyCustody {
  if (value === KeyCustody.UNSPECIFIED || value === KeyCustody.ESCROW || value === KeyCustody.TOKEN) return value;
  throw new InvalidArgument(`${field}: ${value} is not a key custody; use ESCROW or TOKEN (or leave it unset)`);
}

/** RenewVersion, validated. */
export interface RenewVersionInput { tenantId: string; version: number; signer: Signer; validityDays: number; activate: boolean }
/** Parses RenewVersionRequest. */
export function renewVersion(req: RenewVersionRequest): RenewVersionInput {
  const s = signer(req.signer);
  if (req.activate && s === Signer.PRIVATE_CA) {
    throw new InvalidArgument("activate: only for signer KMI_ROOT; a PRIVATE_CA renewal is activated after its upload (`ca upload --activate`)");
  }
  return { tenantId: tenantId(req.tenantId), version: versionNumber(req.version), signer: s, validityDays: validityDays(req.validityDays), activate: req.activate };
}

/** A tenant and a required version. */
export interface TenantVersionInput { tenantId: string; version: number }
/** Parses a request that names a tenant and a required version. */
export function tenantVersion(req: { tenantId: string; version: number }): TenantVersionInput {
  return { tenantId: tenantId(req.tenantId), version: versionNumber(req.version) };
}

/** UploadIntermediate, validated (the certificate's content is checked by the PKI layer). */
export interface UploadInput { tenantId: string; version: number; certificate: Uint8Array; customerRoot: Uint8Array | undefined; activate: boolean }
/** Parses UploadIntermediateRequest. */
export function uploadIntermediate(req: UploadIntermediateRequest): UploadInput {
  const root = bytesField("customer_root", req.customerRoot, false);
  return {
    tenantId: tenantId(req.tenantId),
    version: req.version,
    certificate: bytesField("certificate", req.certificate, true),
    customerRoot: root.length > 0 ? root : undefined,
    activate: req.activate,
  };
}

/** RevokeVersion, validated. */
export interface RevokeVersionInput { tenantId: string; version: number; reason: string; allowActive: boolean }
/** Parses RevokeVersionRequest. */
export function revokeVersion(req: RevokeVersionRequest): RevokeVersionInput {
  return { tenantId: tenantId(req.tenantId), version: versionNumber(req.version), reason: reason(req.reason), allowActive: req.allowActive };
}

/** DiscardPendingVersion, validated. */
export interface DiscardVersionInput { tenantId: string; version: number; reason: string }
/** Parses DiscardPendingVersionRequest (the reason is optional). */
export function discardPendingVersion(req: { tenantId: string; version: number; reason: string }): DiscardVersionInput {
  return { tenantId: tenantId(req.tenantId), version: versionNumber(req.version), reason: freeText("reason", req.reason, 256, false) };
}

/** ActivateVersion, validated. */
export function activateVersion(req: ActivateVersionRequest): TenantVersionInput {
  return tenantVersion(req);
}

/** CreateSigningKey, validated. */
export interface CreateSigningKeyInput { tenantId: string; name: string; keyAlgorithm: KeyAlgorithm }
/** Parses CreateSigningKeyRequest. */
export function createSigningKey(req: CreateSigningKeyRequest): CreateSigningKeyInput {
  return { tenantId: tenantId(req.tenantId), name: name("name", req.name), keyAlgorithm: keyAlgorithm(req.keyAlgorithm) };
}

/** RevokeSigningKey, validated. */
export interface RevokeSigningKeyInput { tenantId: string; name: string; reason: string }
/** Parses RevokeSigningKeyRequest. */
export function revokeSigningKey(req: RevokeSigningKeyRequest): RevokeSigningKeyInput {
  return { tenantId: tenantId(req.tenantId), name: name("name", req.name), reason: reason(req.reason) };
}

/** CreateTenant, validated. */
export interface CreateTenantInput { tenantId: string; displayName: string; bootstrapKmiSigned: boolean }
/** Parses CreateTenantRequest. */
export function createTenant(req: CreateTenantRequest): CreateTenantInput {
  const id = tenantId(req.tenantId);
  const display = freeText("display_name", req.displayName, 128, false);
  return { tenantId: id, displayName: display === "" ? id : display, bootstrapKmiSigned: req.bootstrapKmiSigned };
}

/** Role of a token, as the domain names it. */
export type RoleName = "operator" | "tenant-admin";

/** CreateToken, validated. */
export interface CreateTokenInput { role: RoleName; tenantId: string; description: string; ttlSeconds: number }
/** Parses CreateTokenRequest. */
export function createToken(req: CreateTokenRequest): CreateTokenInput {
  let role: RoleName;
  if (req.role === Role.OPERATOR) role = "operator";
  else if (req.role === Role.TENANT_ADMIN) role = "tenant-admin";
  else if (req.role === Role.UNSPECIFIED) throw new InvalidArgument("role: required; use OPERATOR or TENANT_ADMIN");
  else throw new InvalidArgument(`role: unknown value ${String(req.role)}; use OPERATOR or TENANT_ADMIN`);
  let tenant = "";
  if (role === "tenant-admin") tenant = tenantId(req.tenantId);
  else if (req.tenantId !== "") throw new InvalidArgument("tenant_id: must be empty for an OPERATOR token (operators act on every tenant)");
  const ttl = Number(req.ttlSeconds);
  if (ttl > TEN_YEARS_SECONDS) throw new InvalidArgument(`ttl_seconds: ${String(req.ttlSeconds)} is more than 10 years; use at most ${TEN_YEARS_SECONDS} (0 means no expiry)`);
  return { role, tenantId: tenant, description: freeText("description", req.description, 256, false), ttlSeconds: ttl };
}

/** A token id: 16 lowercase hex characters. */
export function tokenId(value: string, field = "token_id"): string {
  if (value === "") throw new InvalidArgument(`${field}: required; see \`kmi ctl token list\``);
  if (!TOKEN_ID.test(value)) throw new InvalidArgument(`${field}: "${clip(value)}" is not a token id; use the 16 hex characters shown by \`kmi ctl token list\``);
  return value;
}

/** IssueServiceCertificate, validated. */
export interface IssueServiceCertificateInput { csrPem: string; serviceName: string; dnsNames: string[]; ipAddresses: string[]; validityDays: number }
/** Parses IssueServiceCertificateRequest. */
export function issueServiceCertificate(req: IssueServiceCertificateRequest): IssueServiceCertificateInput {
  const csr = csrPem(req.csrPem);
  const serviceName = name("service_name", req.serviceName);
  const dnsNames = req.dnsNames.map((d, i) => dnsName(`dns_names[${i}]`, d));
  const ipAddresses = req.ipAddresses.map((a, i) => ipAddress(`ip_addresses[${i}]`, a));
  if (dnsNames.length + ipAddresses.length === 0) throw new InvalidArgument("dns_names: give at least one DNS name or IP address for the server certificate");
  if (dnsNames.length + ipAddresses.length > 100) throw new InvalidArgument("dns_names: at most 100 names and addresses in all");
  return { csrPem: csr, serviceName, dnsNames, ipAddresses, validityDays: validityDays(req.validityDays, "validity_days", 825, 90) };
}

/** IssueMachineCertificate, validated. */
export interface IssueMachineCertificateInput { csrPem: string; machineId: string; group: string; ttlSeconds: number }
/** Parses IssueMachineCertificateRequest. */
export function issueMachineCertificate(req: IssueMachineCertificateRequest): IssueMachineCertificateInput {
  const csr = csrPem(req.csrPem);
  const machineId = name("machine_id", req.machineId);
  const group = name("group", req.group);
  if (req.ttlSeconds < 300 || req.ttlSeconds > 2_592_000) {
    throw new InvalidArgument(`ttl_seconds: ${req.ttlSeconds} is out of range; use 300 to 2592000 (30 days)`);
  }
  return { csrPem: csr, machineId, group, ttlSeconds: req.ttlSeconds };
}

/** One key an agent holds. */
export interface HeldKeyInput { tenantId: string; keyId: string; version: number }
/** ReportHeldVersions, validated (the token is checked by authentication). */
export interface ReportHeldVersionsInput { held: HeldKeyInput[] }
/** Parses ReportHeldVersionsRequest: at most 10000 entries, each a tenant id and a key id. */
export function reportHeldVersions(req: ReportHeldVersionsRequest): ReportHeldVersionsInput {
  if (req.held.length > MAX_HELD_VERSIONS) throw new InvalidArgument(`held: ${req.held.length} entries; at most ${MAX_HELD_VERSIONS}`);
  const held = req.held.map((h, i) => {
    const t = tenantId(h.tenantId, `held[${i}].tenant_id`);
    if (!KEY_ID.test(h.keyId)) throw new InvalidArgument(`held[${i}].key_id: "${clip(h.keyId)}" is not a key id; use the 64 lowercase hex characters of ReleasedSecret.key_id`);
    return { tenantId: t, keyId: h.keyId, version: h.version };
  });
  return { held };
}

/** TailAuditLog, validated. */
export interface TailAuditLogInput { afterSeq: bigint; limit: number; last: boolean; tenantId: string }
/** Parses TailAuditLogRequest. */
export function tailAuditLog(req: TailAuditLogRequest): TailAuditLogInput {
  const limit = req.limit === 0 ? 100 : req.limit;
  if (limit < 1 || limit > 1000) throw new InvalidArgument(`limit: ${req.limit} is out of range; use 1 to 1000 (0 means 100)`);
  return { afterSeq: req.afterSeq, limit, last: req.last, tenantId: req.tenantId === "" ? "" : tenantId(req.tenantId) };
}

/** A DNS name or IP address given on a command line (for the KDC's own certificate). */
export function hostName(field: string, value: string): string {
  return dnsName(field, value);
}

/** An IP address given on a command line. */
export function hostIp(field: string, value: string): string {
  return ipAddress(field, value);
}

/** SetRotationPolicy, validated (activationTimeoutHours with its default filled in). */
export interface SetRotationPolicyInput {
  tenantId: string;
  rotateEveryDays: number;
  csrBeforeExpiryDays: number;
  activationTimeoutHours: number;
  nextRotationAt: Date | undefined;
}
/** Default wait for the fleet to hold a staged version, hours. */
export const DEFAULT_ACTIVATION_TIMEOUT_HOURS = 24;
/** Parses SetRotationPolicyRequest. */
export function setRotationPolicy(req: SetRotationPolicyRequest): SetRotationPolicyInput {
  const p = req.policy;
  if (p === undefined) throw new InvalidArgument("policy: required; all fields 0 turn automatic rotation off");
  const days = (field: string, v: number) => {
    if (!Number.isInteger(v) || v < 0 || v > 3650) throw new InvalidArgument(`${field}: ${v} is out of range; use 0 (never) or 1 to 3650 days`);
    return v;
  };
  const rotateEveryDays = days("policy.rotate_every_days", p.rotateEveryDays);
  const csrBeforeExpiryDays = days("policy.csr_before_expiry_days", p.csrBeforeExpiryDays);
  const hours = p.activationTimeoutHours === 0 ? DEFAULT_ACTIVATION_TIMEOUT_HOURS : p.activationTimeoutHours;
  if (hours > 720) throw new InvalidArgument(`policy.activation_timeout_hours: ${hours} is out of range; use 1 to 720 hours (0: ${DEFAULT_ACTIVATION_TIMEOUT_HOURS})`);
  let nextRotationAt: Date | undefined;
  if (req.nextRotationAt !== undefined) {
    if (rotateEveryDays === 0) throw new InvalidArgument("next_rotation_at: only with policy.rotate_every_days; set how often it rotates first");
    nextRotationAt = timestampDate(req.nextRotationAt);
    if (Number.isNaN(nextRotationAt.getTime())) throw new InvalidArgument("next_rotation_at: not a valid time");
  }
  return { tenantId: tenantId(req.tenantId), rotateEveryDays, csrBeforeExpiryDays, activationTimeoutHours: hours, nextRotationAt };
}

/** SignLeafRequest, validated (the leaf builder checks names, key and common name itself). */
export interface SignLeafInput {
  tenantId: string;
  version: number;
  publicKeyDer: Uint8Array;
  dnsNames: string[];
  ipAddresses: string[];
  commonName: string;
  notBefore: Date;
  notAfter: Date;
}
/** Largest leaf public key accepted (an RSA-4096 SPKI is 550 bytes). */
const MAX_LEAF_KEY_BYTES = 1024;
/** Parses SignLeafRequest. */
export function signLeaf(req: SignLeafRequest): SignLeafInput {
  if (req.version < 1) throw new InvalidArgument("version: required; give the intermediate version the agent holds (ReleasedSecret.version)");
  if (req.publicKeyDer.length === 0) throw new InvalidArgument("public_key_der: required; give the leaf's DER SubjectPublicKeyInfo");
  if (req.publicKeyDer.length > MAX_LEAF_KEY_BYTES) throw new InvalidArgument(`public_key_der: ${req.publicKeyDer.length} bytes; at most ${MAX_LEAF_KEY_BYTES}`);
  const names = req.dnsNames.length + req.ipAddresses.length;
  if (names > MAX_SAN_NAMES) throw new InvalidArgument(`dns_names: ${names} names with ip_addresses; at most ${MAX_SAN_NAMES}`);
  if (req.notBefore === undefined) throw new InvalidArgument("not_before: required");
  if (req.notAfter === undefined) throw new InvalidArgument("not_after: required");
  const notBefore = timestampDate(req.notBefore);
  const notAfter = timestampDate(req.notAfter);
  if (!(notAfter.getTime() > notBefore.getTime())) throw new InvalidArgument("not_after: must be after not_before");
  return { tenantId: tenantId(req.tenantId), version: req.version, publicKeyDer: req.publicKeyDer, dnsNames: req.dnsNames, ipAddresses: req.ipAddresses, commonName: req.commonName, notBefore, notAfter };
}
