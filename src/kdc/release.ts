/**
 * Releasing secrets to machines: which secrets a machine gets (the active intermediate of every
 * tenant its attestation token names, every tenant only when the token says `ten: ["*"]`, none
 * when it says `[]`, plus the tenants' non-revoked signing keys), unsealing each key in memory
 * only for the wrap, wrapping it to the machine's encryption key (the token's `enc`; src/keywrap:
 * ECIES, aad "<machine>|<tenant>|<key>|<version>"; for a machine enrolled before encryption keys
 * existed, no `enc`: to its machine certificate's key, the legacy path), the lease, and the
 * fail-closed audit entry ("secret.release") written BEFORE a wrapped key leaves the KDC.
 */
import { X509Certificate, type KeyObject } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { ALL_TENANTS, tenClaimServes } from "../attest/index.js";
import { KeyAlgorithm, KeyPurpose } from "../gen/kmi/common/v1/common_pb.js";
import { ReleasedSecretSchema, type ReleasedSecret, type WrappedKey } from "../gen/kmi/kdc/v1/distribution_pb.js";
import { VersionState } from "../gen/kmi/kdc/v1/kdc_pb.js";
import type { IntermediateVersionRecord, SigningKeyRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { parseEncryptionPublicKey } from "../attest/index.js";
import { formatWrapAad, keyIdOf, machinePublicKeyFromCertificate, wrapKeyForMachine } from "../keywrap/index.js";
import type { MachineAttestation } from "./authz.js";
import { encodePem } from "../pki/pem.js";
import type { KdcContext } from "./context.js";
import { intermediateKeyAad, signingKeyAad } from "./kdc-store.js";

/** One secret with its private key unsealed (PKCS#8 DER): wrap it, then `wipe` it. */
export interface SecretMaterial {
  tenantId: string;
  purpose: KeyPurpose;
  keyId: string;
  /** Intermediate version; 0 for a signing key. */
  version: number;
  /** Signing key name; empty for an intermediate. */
  name: string;
  keyAlgorithm: KeyAlgorithm;
  /** The intermediate certificate, PEM (no root: it is signed by one directly); empty for a signing key. */
  chainPem: string;
  publicKeyPem: string;
  /** The private key, PKCS#8 DER, in memory only; empty when `kdcSigns`. */
  pkcs8: Uint8Array;
  /** The key stays in the KDC's token (custody TOKEN): nothing is wrapped; the agent has leaves signed through SignLeaf. */
  kdcSigns: boolean;
  /** End of the intermediate certificate's validity: the lease never outlasts it. */
  notAfter: Date | undefined;
}

/** The machine a release is wrapped for. */
export interface Recipient {
  machineId: string;
  /** The P-256 public key secrets are wrapped to: the machine's encryption key (or, legacy, its certificate's key). */
  publicKey: KeyObject;
  /** Its key id, sent as wrapped_key.recipient_key_id. */
  keyId: string;
}

/**
 * Whom a verified machine's secrets are wrapped to: its encryption key when the token names one
 * (`enc`); else its machine certificate's key. Why the legacy path stays: a machine enrolled
 * before encryption keys existed has no other key, and refusing it would cut a running fleet
 * off at the upgrade; it ends when the machine enrolls again (docs/security.md).
 */
export function recipientOf(machineId: string, a: Pick<MachineAttestation, "certificateDer" | "encryptionKeyDer">): Recipient {
  const publicKey =
    a.encryptionKeyDer !== undefined ? parseEncryptionPublicKey(a.encryptionKeyDer, "attestation token enc") : machinePublicKeyFromCertificate(new X509Certificate(a.certificateDer));
  return { machineId, publicKey, keyId: keyIdOf(publicKey) };
}

function wrapTo(to: Recipient, m: SecretMaterial): WrappedKey {
  const wrapped = wrapKeyForMachine({
    machinePublicKey: to.publicKey,
    privateKey: m.pkcs8,
    aad: formatWrapAad({ machineId: to.machineId, tenantId: m.tenantId, keyId: m.keyId, version: m.version }),
  });
  wrapped.recipientKeyId = to.keyId;
  return wrapped;
}

/** A reference to a released key for audit details: "<tenant>/v<version>/<key id>" or "<tenant>/<name>/<key id>". */
export function keyRef(m: Pick<SecretMaterial, "tenantId" | "version" | "name" | "keyId">): string {
  return m.version > 0 ? `${m.tenantId}/v${m.version}/${m.keyId}` : `${m.tenantId}/${m.name}/${m.keyId}`;
}

/** Overwrites every unsealed key (best effort: JavaScript promises no more). */
export function wipe(items: readonly SecretMaterial[]): void {
  for (const m of items) m.pkcs8.fill(0);
}

/** Audit detail values stay under the log's 4096-byte limit. */
const MAX_DETAIL_CHARS = 3800;
/** Detail keys per entry for lists (the log allows 64 keys; a few are taken by the others). */
const MAX_LIST_KEYS = 48;

/**
 * Splits a list into audit details: `<name>`, `<name>.2`, … each under the value limit, and
 * into as many entries as needed (a release to thousands of machines is several entries).
 */
export function listDetails(name: string, items: readonly string[]): Record<string, string>[] {
  const entries: Record<string, string>[] = [];
  let current: Record<string, string> = {};
  let keys = 0;
  let value = "";
  const flush = () => {
    if (value === "") return;
    keys++;
    current[keys === 1 ? name : `${name}.${keys}`] = value;
    value = "";
    if (keys >= MAX_LIST_KEYS) {
      entries.push(current);
      current = {};
      keys = 0;
    }
  };
  for (const item of items) {
    if (value !== "" && value.length + 1 + item.length > MAX_DETAIL_CHARS) flush();
    value = value === "" ? item : `${value},${item}`;
  }
  flush();
  if (keys > 0 || entries.length === 0) entries.push(current);
  return entries;
}

/** Reads, unseals, wraps and audits releases over the KDC's context. */
export class SecretRelease {
  constructor(private readonly ctx: Pick<KdcContext, "store" | "sealer" | "audit" | "pki" | "clock" | "leaseMs">) {}

  /**
   * The tenants a token serves that exist: those named in `ten`, every tenant when it is
   * `["*"]`, none when it is `[]`. A named tenant that does not exist is left out.
   */
  async servedTenants(tenantIds: readonly string[]): Promise<string[]> {
    // Why no shortcut for []: serving every tenant must be explicit ("*"), so a token of a group
    // made without tenants (or stored before all_tenants existed) releases nothing.
    if (tenantIds.length === 0) return [];
    const all = (await this.ctx.store.listTenants()).map((t) => t.tenantId);
    if (tenantIds.includes(ALL_TENANTS)) return all;
    const wanted = new Set(tenantIds);
    return all.filter((t) => wanted.has(t));
  }

  /** True when a token's `ten` claim covers the tenant: it names it, or it is `["*"]`. `[]` covers none. */
  static serves(tenantIds: readonly string[], tenantId: string): boolean {
    return tenClaimServes(tenantIds, tenantId);
  }

  /**
   * A tenant's current secret set, unsealed: the active intermediate (if any) and every
   * non-revoked signing key. The caller wipes it.
   */
  async tenantSecrets(tenantId: string): Promise<SecretMaterial[]> {
    const tenant = await this.ctx.store.getTenant(tenantId);
    if (tenant === undefined) return [];
    const out: SecretMaterial[] = [];
    try {
      if (tenant.activeVersion !== 0) {
        const v = await this.ctx.store.getVersion(tenantId, tenant.activeVersion);
        if (v !== undefined) out.push(await this.intermediate(v));
      }
      for (const k of await this.ctx.store.listSigningKeys(tenantId)) {
        if (k.revokedAt === undefined) out.push(this.signingKey(k));
      }
      return out;
    } catch (err) {
      wipe(out);
      throw err;
    }
  }

  /** The secrets of several tenants, in tenant order. The caller wipes them. */
  async secretsOf(tenantIds: readonly string[]): Promise<SecretMaterial[]> {
    const out: SecretMaterial[] = [];
    try {
      for (const t of tenantIds) out.push(...(await this.tenantSecrets(t)));
      return out;
    } catch (err) {
      wipe(out);
      throw err;
    }
  }

  /**
   * The versions the rotation scheduler staged for these tenants (READY, not yet active),
   * unsealed. The caller wipes them.
   */
  async stagedOf(tenantIds: readonly string[]): Promise<SecretMaterial[]> {
    if (tenantIds.length === 0) return [];
    const wanted = new Set(tenantIds);
    const out: SecretMaterial[] = [];
    try {
      for (const p of await this.ctx.store.listRotationPolicies()) {
        if (p.stagedVersion === 0 || !wanted.has(p.tenantId)) continue;
        const m = await this.stagedSecret(p.tenantId, p.stagedVersion);
        if (m !== undefined) out.push(m);
      }
      return out;
    } catch (err) {
      wipe(out);
      throw err;
    }
  }

  /** A staged version, unsealed (undefined unless it is READY with a certificate). The caller wipes it. */
  async stagedSecret(tenantId: string, version: number): Promise<SecretMaterial | undefined> {
    const v = await this.ctx.store.getVersion(tenantId, version);
    return v === undefined || v.state !== VersionState.READY || v.certificateDer.length === 0 ? undefined : this.intermediate(v);
  }

  /** One signing key, unsealed (undefined when missing or revoked). The caller wipes it. */
  async signingKeySecret(tenantId: string, name: string): Promise<SecretMaterial | undefined> {
    const k = await this.ctx.store.getSigningKey(tenantId, name);
    return k === undefined || k.revokedAt !== undefined ? undefined : this.signingKey(k);
  }

  private async intermediate(v: IntermediateVersionRecord): Promise<SecretMaterial> {
    const kdcSigns = v.tokenKeyLabel !== "";
    if (v.privateKey === undefined && !kdcSigns) throw new Error(`version ${v.tenantId}/${v.version} has no sealed key`);
    const summary = this.ctx.pki.summarize(v.certificateDer);
    // Only the intermediate: kmi's intermediates are signed by a root directly (the KMI root or
    // the customer's), and a root is not sent in a TLS chain (devices have it already).
    const chainPem = this.ctx.pki.certificatePem(v.certificateDer);
    return {
      tenantId: v.tenantId,
      purpose: KeyPurpose.INTERMEDIATE_CA,
      keyId: v.keyId,
      version: v.version,
      name: "",
      keyAlgorithm: v.keyAlgorithm,
      chainPem,
      publicKeyPem: encodePem("PUBLIC KEY", v.publicKeyDer),
      pkcs8: v.privateKey === undefined ? new Uint8Array(0) : this.ctx.sealer.open(v.privateKey, intermediateKeyAad(v.tenantId, v.keyId)),
      kdcSigns,
      notAfter: summary.notAfter,
    };
  }

  private signingKey(k: SigningKeyRecord): SecretMaterial {
    if (k.privateKey === undefined) throw new Error(`signing key ${k.tenantId}/${k.name} has no sealed key`);
    return {
      tenantId: k.tenantId,
      purpose: KeyPurpose.SIGNING,
      keyId: k.keyId,
      version: 0,
      name: k.name,
      keyAlgorithm: k.keyAlgorithm,
      chainPem: "",
      publicKeyPem: encodePem("PUBLIC KEY", k.publicKeyDer),
      pkcs8: this.ctx.sealer.open(k.privateKey, signingKeyAad(k.tenantId, k.name)),
      kdcSigns: false,
      notAfter: undefined,
    };
  }

  /** When a lease given now ends: now + the configured lease, never after the certificate's end. */
  leaseEnd(m: SecretMaterial, now: Date): Date {
    const end = now.getTime() + this.ctx.leaseMs;
    return new Date(m.notAfter === undefined ? end : Math.min(end, m.notAfter.getTime()));
  }

  /** The secrets wrapped to one machine, each with its lease. */
  wrap(items: readonly SecretMaterial[], to: Recipient, now: Date): ReleasedSecret[] {
    return items.map((m) =>
      create(ReleasedSecretSchema, {
        tenantId: m.tenantId,
        purpose: m.purpose,
        keyId: m.keyId,
        version: m.version,
        name: m.name,
        keyAlgorithm: m.keyAlgorithm,
        chainPem: m.chainPem,
        publicKeyPem: m.publicKeyPem,
        ...(m.kdcSigns ? { kdcSigns: true } : { wrappedKey: wrapTo(to, m) }),
        leaseExpiresAt: timestampFromDate(this.leaseEnd(m, now)),
      }),
    );
  }

  /**
   * Audits a release to one machine ("secret.release", target machine/<id>), before anything is
   * sent: a failure throws, and the caller sends nothing.
   */
  async auditToMachine(machineId: string, event: string, items: readonly SecretMaterial[], extra: Record<string, string>): Promise<void> {
    for (const keys of listDetails("keys", items.map(keyRef))) {
      await this.ctx.audit.append({
        actor: `machine:${machineId}`,
        action: "secret.release",
        target: `machine/${machineId}`,
        outcome: "ok",
        details: { event, count: String(items.length), lease_seconds: String(Math.round(this.ctx.leaseMs / 1000)), ...extra, ...keys },
      });
    }
  }

  /**
   * Audits one tenant's change released to many machines ("secret.release", target
   * tenant/<t>/version/<v> or tenant/<t>/signing-key/<name>), before anything is sent.
   */
  async auditToMachines(target: string, event: string, items: readonly SecretMaterial[], machineIds: readonly string[]): Promise<void> {
    const keys = items.map(keyRef).join(",");
    for (const machines of listDetails("machines", machineIds)) {
      await this.ctx.audit.append({
        actor: "system",
        action: "secret.release",
        target,
        outcome: "ok",
        details: { event, keys: keys.length > MAX_DETAIL_CHARS ? `${keys.slice(0, MAX_DETAIL_CHARS)}...` : keys, lease_seconds: String(Math.round(this.ctx.leaseMs / 1000)), ...machines },
      });
    }
  }
}
