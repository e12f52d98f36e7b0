/**
 * Throw-away CAs for the bench, made fresh each run with src/pki: a KMI root, a tenant's
 * intermediate (as the KDC makes them), a plain signing key, the SecretInput shapes the
 * agent's key holder takes, and an origin CA with per-host server certificates.
 */
import { createPublicKey, generateKeyPairSync, type KeyObject } from "node:crypto";
import type { SecretInput } from "../../src/agent/key-holder.js";
import { KeyAlgorithm, KeyPurpose } from "../../src/gen/kmi/common/v1/common_pb.js";
import { keyIdOf } from "../../src/keywrap/index.js";
import { createLeafIssuer, createRootCa, exportPublicKeySpkiDer, issueIntermediateCa, type LeafIssuer } from "../../src/pki/index.js";
import { certificateToPem } from "../../src/pki/pem.js";

const DAY_MS = 86_400_000;

/** A CA: certificate and key. */
export interface Ca {
  readonly der: Uint8Array;
  readonly pem: string;
  readonly key: KeyObject;
}

/** A root CA valid from a day ago for `days`. */
export function makeRoot(commonName: string, days = 3650): Ca {
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const der = createRootCa({ subject: { commonName, organization: "kmi bench" }, privateKey, now: new Date(Date.now() - DAY_MS), validitySeconds: days * 86400 });
  return { der, pem: certificateToPem(der), key: privateKey };
}

/** A tenant intermediate under `root`. */
export interface Intermediate extends Ca {
  readonly tenantId: string;
  readonly version: number;
  readonly keyId: string;
}

/** A tenant's intermediate CA (ECDSA P-256) signed by `root`, valid for a year. */
export function makeIntermediate(root: Ca, tenantId: string, version: number): Intermediate {
  const { privateKey, publicKey } = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const der = issueIntermediateCa({
    issuer: { certificateDer: root.der, privateKey: root.key },
    subject: { commonName: `${tenantId} MITM CA v${version}`, organization: tenantId },
    publicKeySpkiDer: exportPublicKeySpkiDer(publicKey),
    now: new Date(Date.now() - DAY_MS),
    validitySeconds: 365 * 86400,
  });
  return { der, pem: certificateToPem(der), key: privateKey, tenantId, version, keyId: keyIdOf(publicKey) };
}

function publicPem(key: KeyObject): string {
  return (key.type === "private" ? createPublicKey(key) : key).export({ format: "pem", type: "spki" }).toString();
}

/** The key holder's input for an intermediate, leased for `leaseMs`. */
export function intermediateSecret(i: Intermediate, leaseMs = DAY_MS): SecretInput {
  const now = Date.now();
  return {
    tenantId: i.tenantId,
    purpose: KeyPurpose.INTERMEDIATE_CA,
    keyId: i.keyId,
    version: i.version,
    name: "",
    keyAlgorithm: KeyAlgorithm.ECDSA_P256,
    chainPem: i.pem,
    publicKeyPem: publicPem(i.key),
    privateKey: i.key,
    leaseExpiresAt: now + leaseMs,
    receivedAt: now,
  };
}

/** A plain signing key (ECDSA P-256) and its key holder input. */
export function signingSecret(tenantId: string, name: string, leaseMs = DAY_MS): { secret: SecretInput; key: KeyObject } {
  const { privateKey, publicKey } = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const now = Date.now();
  return {
    key: privateKey,
    secret: {
      tenantId,
      purpose: KeyPurpose.SIGNING,
      keyId: keyIdOf(publicKey),
      version: 0,
      name,
      keyAlgorithm: KeyAlgorithm.ECDSA_P256,
      chainPem: "",
      publicKeyPem: publicPem(publicKey),
      privateKey,
      leaseExpiresAt: now + leaseMs,
      receivedAt: now,
    },
  };
}

/** A server certificate and key, PEM. */
export interface ServerCert {
  readonly cert: string;
  readonly key: string;
}

/** An origin CA that makes server certificates (each a new key, so a new fingerprint). */
export class OriginCa {
  readonly root: Ca;
  private readonly issuer: LeafIssuer;

  constructor() {
    this.root = makeRoot("kmi bench origin CA");
    this.issuer = createLeafIssuer({ certificateDer: this.root.der, privateKey: this.root.key });
  }

  /** A server certificate for `dnsNames` and `ipAddresses`, valid 90 days. */
  serverCert(dnsNames: string[], ipAddresses: string[] = []): ServerCert {
    const k = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
    const now = Date.now();
    const der = this.issuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(k.publicKey),
      dnsNames,
      ipAddresses,
      notBefore: new Date(now - 60_000),
      notAfter: new Date(now + 90 * DAY_MS),
    });
    return { cert: certificateToPem(der), key: k.privateKey.export({ type: "pkcs8", format: "pem" }) as string };
  }
}
