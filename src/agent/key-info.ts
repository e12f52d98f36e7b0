/** Maps held keys and holder events to the agent API's messages (public parts only). */
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { KeyEventType, KeyInfoSchema, KeyState, WatchKeysResponseSchema, type KeyInfo, type WatchKeysResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { CertificateInfoSchema, KeyAlgorithm, type CertificateInfo } from "../gen/kmi/common/v1/common_pb.js";
import { certificateInfo } from "../pki/inspect.js";
import type { HeldIntermediate, HeldKey, HolderEvent, HolderEventType } from "./key-holder.js";

const certificateInfoCache = new WeakMap<Uint8Array, CertificateInfo>();

const KEY_ALGORITHM_OF_LABEL: Record<string, KeyAlgorithm> = {
  "ecdsa-p256": KeyAlgorithm.ECDSA_P256,
  "rsa-2048": KeyAlgorithm.RSA_2048,
  "rsa-3072": KeyAlgorithm.RSA_3072,
};

/** The parsed summary of an intermediate, computed once per certificate. */
export function intermediateCertificateInfo(intermediate: HeldIntermediate): CertificateInfo {
  const cached = certificateInfoCache.get(intermediate.certificateDer);
  if (cached !== undefined) return cached;
  const info = certificateInfo(intermediate.certificateDer, "chain_pem");
  const msg = create(CertificateInfoSchema, {
    subject: info.subject,
    issuer: info.issuer,
    serialHex: info.serialHex,
    notBefore: timestampFromMs(info.notBefore.getTime()),
    notAfter: timestampFromMs(info.notAfter.getTime()),
    sha256Fingerprint: info.sha256Fingerprint,
    isCa: info.isCa,
    dnsNames: [...info.dnsNames],
    ipAddresses: [...info.ipAddresses],
    uris: [...info.uris],
    keyAlgorithm: KEY_ALGORITHM_OF_LABEL[info.keyAlgorithm] ?? KeyAlgorithm.UNSPECIFIED,
    subjectKeyIdHex: info.subjectKeyIdHex ?? "",
    authorityKeyIdHex: info.authorityKeyIdHex ?? "",
    pathLenConstraint: info.pathLenConstraint,
  });
  certificateInfoCache.set(intermediate.certificateDer, msg);
  return msg;
}

/** The public side of a held key. */
export function toKeyInfo(key: HeldKey, now: number, dropped = false): KeyInfo {
  return create(KeyInfoSchema, {
    keyId: key.keyId,
    tenantId: key.tenantId,
    purpose: key.purpose,
    keyAlgorithm: key.keyAlgorithm,
    version: key.version,
    name: key.name,
    state: dropped ? KeyState.DROPPED : key.leaseExpired || key.leaseExpiresAt <= now ? KeyState.LEASE_EXPIRED : KeyState.ACTIVE,
    leaseExpiresAt: timestampFromMs(key.leaseExpiresAt),
    publicKeyPem: key.publicKeyPem,
    certificate: key.intermediate === undefined ? undefined : intermediateCertificateInfo(key.intermediate),
  });
}

const EVENT_TYPE: Record<HolderEventType, KeyEventType> = {
  rotated: KeyEventType.ROTATED,
  revoked: KeyEventType.REVOKED,
  added: KeyEventType.ADDED,
  quarantined: KeyEventType.QUARANTINED,
  lease_expired: KeyEventType.LEASE_EXPIRED,
};

/** One holder event as a WatchKeys message. */
export function toWatchEvent(event: HolderEvent, now: number): WatchKeysResponse {
  return create(WatchKeysResponseSchema, {
    type: EVENT_TYPE[event.type],
    tenantId: event.tenantId,
    // The keys of a revoke or a quarantine are the ones dropped: say so, not their last state.
    keys: event.keys.map((k) => toKeyInfo(k, now, event.type === "revoked" || event.type === "quarantined")),
    reason: event.reason,
    time: timestampFromMs(event.time),
  });
}
