/**
 * Where a tenant intermediate's private key is held (its custody), and the one home for making,
 * opening and retiring such a key:
 *
 *   ESCROW  (default) a PKCS#8 key made in this process, sealed under the master key in the
 *           version record (`private_key`), released to the tenant's machines wrapped to each
 *           one's encryption key; the agents sign leaves.
 *   TOKEN   an ECDSA P-256 key made inside the KDC's PKCS#11 token (sensitive, never
 *           extractable); the version record keeps only its label (`token_key_label`). Nothing
 *           is released: agents have each leaf signed through DistributionService.SignLeaf.
 */
import { randomBytes } from "node:crypto";
import { KeyAlgorithm } from "../gen/kmi/common/v1/common_pb.js";
import type { SealedBlob } from "../gen/kmi/store/v1/envelope_pb.js";
import { KeyCustody, VersionState } from "../gen/kmi/kdc/v1/kdc_pb.js";
import type { IntermediateVersionRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { FailedPrecondition, InvalidArgument, ResourceExhausted } from "../common/errors.js";
import type { Pkcs11Token } from "../common/keys/pkcs11-token.js";
import { importPrivateKeyPkcs8Der, keyId } from "../pki/keys.js";
import { keyObjectSigner, type Signer } from "../pki/signer.js";
import type { KdcContext } from "./context.js";
import { intermediateKeyAad } from "./kdc-store.js";

/** What the version-key functions need of the KDC. */
export type VersionKeyContext = Pick<KdcContext, "pki" | "sealer" | "rootKeys">;

/** A new intermediate key: what the version record keeps of it, and a signer for its CSR. */
export interface NewVersionKey {
  readonly algorithm: KeyAlgorithm;
  readonly keyId: string;
  /** SubjectPublicKeyInfo, DER. */
  readonly spki: Uint8Array;
  /** ESCROW: the sealed PKCS#8 key (`private_key`); undefined for TOKEN. */
  readonly sealed: SealedBlob | undefined;
  /** TOKEN: the key's label in the token (`token_key_label`); "" for ESCROW. */
  readonly tokenKeyLabel: string;
  /** Signs with the key (the CSR's proof of possession). */
  readonly signer: Signer;
  /** Wipes key bytes held in this process. */
  wipe(): void;
  /** Removes a TOKEN key from the token again (a version that was not written); nothing for ESCROW. */
  discard(): void;
}

/** A version key opened for signatures; call `wipe` when done. */
export interface OpenVersionKey {
  readonly signer: Signer;
  wipe(): void;
}

/** The custody of a stored version. */
export function custodyOf(v: Pick<IntermediateVersionRecord, "tokenKeyLabel">): KeyCustody {
  return v.tokenKeyLabel !== "" ? KeyCustody.TOKEN : KeyCustody.ESCROW;
}

/**
 * The custody a new version gets: the one asked for, else that of the tenant's active version,
 * else of its newest version not discarded (a tenant in the token stays there after its active
 * version was revoked), else ESCROW.
 */
export function resolveCustody(requested: KeyCustody, activeVersion: number, versions: readonly IntermediateVersionRecord[]): KeyCustody {
  if (requested !== KeyCustody.UNSPECIFIED) return requested;
  const active = versions.find((v) => v.version === activeVersion);
  const newest = versions.filter((v) => v.state !== VersionState.DISCARDED).sort((a, b) => b.version - a.version)[0];
  const from = active ?? newest;
  return from === undefined ? KeyCustody.ESCROW : custodyOf(from);
}

/**
 * At most this many token keys of one tenant wait in the KDC's token for their version to be
 * activated (PENDING or READY, a key no active or retired version shares): the token's room is
 * shared by every tenant, and a pending version lives `--pending-ttl` (30 days) by default.
 */
export const MAX_WAITING_TOKEN_KEYS = 8;

/** Refuses (RESOURCE_EXHAUSTED) a new token key for a tenant whose waiting ones are at {@link MAX_WAITING_TOKEN_KEYS}. */
export function checkTokenKeyRoom(tenantId: string, versions: readonly IntermediateVersionRecord[]): void {
  const waiting = (v: IntermediateVersionRecord) => v.state === VersionState.PENDING || v.state === VersionState.READY;
  const inUse = new Set(versions.filter((v) => v.tokenKeyLabel !== "" && (v.state === VersionState.ACTIVE || v.state === VersionState.RETIRED)).map((v) => v.tokenKeyLabel));
  const keys = new Set(versions.filter((v) => v.tokenKeyLabel !== "" && waiting(v) && !inUse.has(v.tokenKeyLabel)).map((v) => v.tokenKeyLabel));
  if (keys.size >= MAX_WAITING_TOKEN_KEYS) {
    throw new ResourceExhausted(
      `tenant ${tenantId} has ${keys.size} keys in the KDC's token for versions not activated yet, the most one tenant may have; activate one, discard a pending one (\`kmi ctl ca discard\`) or revoke a ready one first`,
    );
  }
}

/** True when a version record of `versions` holds the token key `label`. */
export function tokenKeyInUse(label: string, versions: readonly IntermediateVersionRecord[]): boolean {
  return versions.some((v) => v.tokenKeyLabel === label);
}

/** The name of a custody for messages, audit details and `kmi ctl`. */
export function custodyName(c: KeyCustody): "escrow" | "token" {
  return c === KeyCustody.TOKEN ? "token" : "escrow";
}

/** The KDC's token, or the error that says how to start the KDC with one. */
export function requireToken(ctx: VersionKeyContext, why: string): Pkcs11Token {
  const token = ctx.rootKeys?.token;
  if (token === undefined) {
    throw new FailedPrecondition(`${why} needs the KDC's PKCS#11 token, and this KDC runs without one; start it with --pkcs11-module, --pkcs11-token and --pkcs11-pin-file`);
  }
  return token;
}

/** Makes the key of version `version` of `tenantId` in the given custody. */
export async function makeVersionKey(ctx: VersionKeyContext, tenantId: string, version: number, algorithm: KeyAlgorithm, custody: KeyCustody): Promise<NewVersionKey> {
  if (custody !== KeyCustody.TOKEN) return escrowedKey(ctx, tenantId, algorithm);
  if (algorithm !== KeyAlgorithm.ECDSA_P256 && algorithm !== KeyAlgorithm.UNSPECIFIED) {
    throw new InvalidArgument("key_algorithm: a key held in the token (key_custody TOKEN) is ECDSA P-256; leave key_algorithm unset or choose ECDSA_P256");
  }
  const token = requireToken(ctx, "key_custody TOKEN");
  // A random part: a try that was not written (a conflict retried) never collides with the next.
  const label = `kmi/tenant/${tenantId}/v${version}-${randomBytes(4).toString("hex")}`;
  const signer = token.generateEcKey(label);
  return {
    algorithm: KeyAlgorithm.ECDSA_P256,
    keyId: keyId(signer.spkiDer),
    spki: signer.spkiDer,
    sealed: undefined,
    tokenKeyLabel: label,
    signer,
    wipe: () => undefined,
    discard: () => void token.destroyKey(label),
  };
}

async function escrowedKey(ctx: VersionKeyContext, tenantId: string, algorithm: KeyAlgorithm): Promise<NewVersionKey> {
  const key = await ctx.pki.generateKey(algorithm);
  return {
    algorithm: key.algorithm,
    keyId: key.keyId,
    spki: key.spki,
    sealed: ctx.sealer.seal(key.pkcs8, intermediateKeyAad(tenantId, key.keyId)),
    tokenKeyLabel: "",
    signer: keyObjectSigner(importPrivateKeyPkcs8Der(key.pkcs8, "version key")),
    wipe: () => key.pkcs8.fill(0),
    discard: () => undefined,
  };
}

/** Opens a stored version's key for signatures: unsealed (ESCROW) or found in the token (TOKEN). */
export function openVersionKey(ctx: VersionKeyContext, v: IntermediateVersionRecord): OpenVersionKey {
  if (v.tokenKeyLabel !== "") {
    const token = requireToken(ctx, `version ${v.version} of tenant "${v.tenantId}" (key held in the token)`);
    const signer = token.findKey(v.tokenKeyLabel);
    if (signer === undefined || keyId(signer.spkiDer) !== v.keyId) {
      throw new FailedPrecondition(`pkcs11 token "${token.label}" has no key ${v.tokenKeyLabel} for version ${v.version} of tenant "${v.tenantId}"; is it the token this KDC made the version with?`);
    }
    return { signer, wipe: () => undefined };
  }
  if (v.privateKey === undefined) throw new FailedPrecondition(`version ${v.version} has no key`);
  const pkcs8 = ctx.sealer.open(v.privateKey, intermediateKeyAad(v.tenantId, v.keyId));
  try {
    return { signer: keyObjectSigner(importPrivateKeyPkcs8Der(pkcs8, "version key")), wipe: () => pkcs8.fill(0) };
  } catch (err) {
    pkcs8.fill(0);
    throw err;
  }
}

/**
 * True when no version but `gone` still uses the token key `label` (renewals share a key): the
 * key can then be destroyed once `gone` is revoked or discarded.
 */
export function tokenKeyUnused(label: string, gone: IntermediateVersionRecord, all: readonly IntermediateVersionRecord[]): boolean {
  return !all.some((v) => v.version !== gone.version && v.tokenKeyLabel === label && v.state !== VersionState.REVOKED && v.state !== VersionState.DISCARDED);
}
