/**
 * The one validation layer of KeyAgentService: each request becomes a validated domain
 * value, or an InvalidArgument naming the field and saying how to fix it. The rules are the
 * ones written in proto/kmi/agent/v1/agent.proto.
 */
import { isIP } from "node:net";
import { timestampMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import { InvalidArgument } from "../common/errors.js";
import { SignatureAlgorithm, type IssueLeafCertificateRequest, type SignRequest } from "../gen/kmi/agent/v1/agent_pb.js";
import { unusableAddress, wildcardPublicSuffix } from "../pki/name-policy.js";
import { encodeIpAddress } from "../pki/san.js";

/** Tenant ids as the KDC makes them. */
const TENANT_ID = /^[a-z][a-z0-9-]{0,62}$/;
/** One DNS label: letters, digits and '-', not at either end. */
const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;
const KEY_ID = /^[0-9a-f]{64}$/;
/** Signing key names as the KDC makes them (SigningKey.name). */
const SIGNING_NAME = /^[a-z0-9-]{1,63}$/;

/** Most names in one leaf, DNS and IP together (the leaf builder's MAX_SAN_NAMES). */
export const MAX_NAMES = 100;
/** Longest subject CN (RFC 5280 ub-common-name). */
export const MAX_COMMON_NAME = 64;
/** Largest message Sign takes. */
export const MAX_SIGN_MESSAGE = 64 * 1024;
/** Largest SubjectPublicKeyInfo accepted (RSA-4096 is about 550 bytes). */
const MAX_SPKI_BYTES = 2048;

function count(n: number, one: string, many: string): string {
  return `${n} ${n === 1 ? one : many}`;
}

function clip(value: string): string {
  return value.length > 64 ? value.slice(0, 61) + "..." : value;
}

/** A required tenant id. */
export function tenantId(value: string, field = "tenant_id"): string {
  if (value === "") throw new InvalidArgument(`${field}: required; give the tenant id`);
  if (!TENANT_ID.test(value)) {
    throw new InvalidArgument(`${field}: "${clip(value)}" is not a tenant id; use 1 to 63 lowercase letters, digits and '-', starting with a letter`);
  }
  return value;
}

/** An optional tenant id filter ("" = all). */
export function tenantFilter(value: string): string {
  return value === "" ? "" : tenantId(value);
}

/** A validated leaf request. */
export interface LeafRequest {
  tenantId: string;
  publicKeySpkiDer: Uint8Array;
  /** "ec-p256" or "rsa-<bits>", for the log line. */
  publicKeyType: string;
  dnsNames: string[];
  ipAddresses: string[];
  commonName: string | undefined;
  /** Requested notAfter (epoch ms), undefined for the agent's maximum. */
  notAfter: number | undefined;
}

/** True for a hostname, or "*.<hostname>" with at least two labels after the wildcard. */
export function isDnsName(name: string): boolean {
  if (name.length === 0 || name.length > 253) return false;
  const labels = name.split(".");
  const wildcard = labels[0] === "*";
  const rest = wildcard ? labels.slice(1) : labels;
  if (wildcard && rest.length < 2) return false;
  return rest.length > 0 && rest.every((l) => LABEL.test(l));
}

/** Validates IssueLeafCertificateRequest (everything except the not_after cap, which needs the clock). */
export function parseLeafRequest(req: IssueLeafCertificateRequest): LeafRequest {
  const tenant = tenantId(req.tenantId);
  if (req.ca) throw new InvalidArgument("ca: the agent never issues CA certificates; set ca to false");
  const { der, type } = leafPublicKey(req.publicKey);
  const names = req.dnsNames.length + req.ipAddresses.length;
  if (names > MAX_NAMES) {
    throw new InvalidArgument(
      `dns_names: ${count(req.dnsNames.length, "DNS name", "DNS names")} and ${count(req.ipAddresses.length, "IP address", "IP addresses")}, ${names} in all; at most ${MAX_NAMES} names (DNS and IP together) fit one leaf`,
    );
  }
  const dnsNames: string[] = [];
  req.dnsNames.forEach((raw, i) => {
    const name = raw.toLowerCase();
    if (!isDnsName(name)) {
      throw new InvalidArgument(`dns_names[${i}]: "${clip(raw)}" is not a hostname or "*.<hostname>"; use letters, digits, '-' and '.', without a trailing dot`);
    }
    const suffix = wildcardPublicSuffix(name);
    if (suffix !== undefined) {
      throw new InvalidArgument(`dns_names[${i}]: "${clip(raw)}" is a wildcard on the public suffix "${suffix}", which would cover every domain under it; name the host or *.<its domain>`);
    }
    if (!dnsNames.includes(name)) dnsNames.push(name);
  });
  const ipAddresses: string[] = [];
  req.ipAddresses.forEach((raw, i) => {
    if (isIP(raw) === 0) throw new InvalidArgument(`ip_addresses[${i}]: "${clip(raw)}" is not an IPv4 or IPv6 address in text form`);
    const unusable = unusableAddress(encodeIpAddress(raw, `ip_addresses[${i}]`));
    if (unusable !== undefined) throw new InvalidArgument(`ip_addresses[${i}]: "${clip(raw)}" is ${unusable}, which names no server; give the server's own address`);
    if (!ipAddresses.includes(raw)) ipAddresses.push(raw);
  });
  if (dnsNames.length === 0 && ipAddresses.length === 0) {
    throw new InvalidArgument("dns_names: a leaf needs at least one name; give dns_names or ip_addresses");
  }
  let commonName: string | undefined;
  if (req.commonName !== "") {
    if (req.commonName.length > MAX_COMMON_NAME) throw new InvalidArgument(`common_name: ${req.commonName.length} characters, at most ${MAX_COMMON_NAME}`);
    const cn = req.commonName.toLowerCase();
    if (!dnsNames.includes(cn) && !ipAddresses.includes(req.commonName)) {
      throw new InvalidArgument(`common_name: "${clip(req.commonName)}" is not one of dns_names or ip_addresses; use one of the names or leave it empty`);
    }
    commonName = dnsNames.includes(cn) ? cn : req.commonName;
  } else {
    const first = dnsNames[0] ?? ipAddresses[0]!;
    commonName = first.length < MAX_COMMON_NAME ? first : undefined;
  }
  return {
    tenantId: tenant,
    publicKeySpkiDer: der,
    publicKeyType: type,
    dnsNames,
    ipAddresses,
    commonName,
    notAfter: req.notAfter === undefined ? undefined : timestamp(req.notAfter, "not_after"),
  };
}

/**
 * The leaf key's bytes. Why only a size check here: the leaf builder (pki/leaf.ts) checks the
 * key structurally (P-256 point on the curve, RSA 2048..4096) without OpenSSL's decoder, which
 * would cost ~130 us per call on the hot path; its refusal is renamed to this field.
 */
function leafPublicKey(bytes: Uint8Array): { der: Uint8Array; type: string } {
  if (bytes.length === 0) throw new InvalidArgument("public_key: required; give the leaf's public key as DER SubjectPublicKeyInfo");
  if (bytes.length > MAX_SPKI_BYTES) throw new InvalidArgument(`public_key: ${bytes.length} bytes, at most ${MAX_SPKI_BYTES}`);
  // 91 bytes is exactly an uncompressed P-256 SubjectPublicKeyInfo; anything else the builder accepts is RSA.
  return { der: bytes, type: bytes.length === 91 ? "ec-p256" : "rsa" };
}

function timestamp(ts: Timestamp, field: string): number {
  if (ts.nanos < 0 || ts.nanos > 999_999_999) throw new InvalidArgument(`${field}: nanos out of range`);
  const ms = timestampMs(ts);
  if (!Number.isFinite(ms) || ms < 0 || ms > 253402300799000) throw new InvalidArgument(`${field}: out of range; give a time between 1970 and 9999`);
  return ms;
}

/** A validated Sign request. */
export interface SignInput {
  /** Key id (64 hex) or "<tenant_id>/<name>". */
  keyRef: string;
  message: Uint8Array;
  algorithm: SignatureAlgorithm;
}

/** Validates SignRequest. */
export function parseSignRequest(req: SignRequest): SignInput {
  const ref = req.keyId;
  if (ref === "") throw new InvalidArgument('key_id: required; give a key id or "<tenant_id>/<name>"');
  const slash = ref.indexOf("/");
  if (slash >= 0) {
    tenantId(ref.slice(0, slash), "key_id");
    if (!SIGNING_NAME.test(ref.slice(slash + 1))) {
      throw new InvalidArgument(`key_id: "${clip(ref)}": the name after the tenant is 1 to 63 lowercase letters, digits or '-'`);
    }
  } else if (!KEY_ID.test(ref)) {
    throw new InvalidArgument(`key_id: "${clip(ref)}" is neither a key id (64 lowercase hex characters) nor "<tenant_id>/<name>"`);
  }
  if (req.message.length === 0) throw new InvalidArgument("message: required; give the message itself (1 byte to 64 KiB), not a digest");
  if (req.message.length > MAX_SIGN_MESSAGE) throw new InvalidArgument(`message: ${req.message.length} bytes, at most ${MAX_SIGN_MESSAGE} (64 KiB)`);
  if (req.algorithm === SignatureAlgorithm.UNSPECIFIED) throw new InvalidArgument("algorithm: required; give SIGNATURE_ALGORITHM_ECDSA_SHA256 for P-256 keys or an RSA one for RSA keys");
  if (SignatureAlgorithm[req.algorithm] === undefined) throw new InvalidArgument(`algorithm: ${req.algorithm} is not a SignatureAlgorithm`);
  return { keyRef: ref, message: req.message, algorithm: req.algorithm };
}
