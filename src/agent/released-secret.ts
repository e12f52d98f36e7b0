/**
 * Turns a ReleasedSecret from the KDC into a held secret: checks every field, unwraps the
 * private key with the machine's encryption key (src/keywrap, the aad bound to this machine,
 * tenant, key and version; the machine key only for a legacy identity that has no encryption
 * key), and checks that the key is the one the secret says (key id, algorithm, and
 * for an intermediate, the certificate's key). A secret that fails is refused as a whole.
 */
import { createPublicKey, X509Certificate, type KeyObject } from "node:crypto";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { FailedPrecondition } from "../common/errors.js";
import { KeyAlgorithm, KeyPurpose } from "../gen/kmi/common/v1/common_pb.js";
import type { ReleasedSecret, WrappedKey } from "../gen/kmi/kdc/v1/distribution_pb.js";
import { formatWrapAad, keyIdOf, unwrapKey } from "../keywrap/index.js";
import type { SecretInput } from "./key-holder.js";

const TENANT_ID = /^[a-z][a-z0-9-]{0,62}$/;
const KEY_ID = /^[0-9a-f]{64}$/;
const SIGNING_NAME = /^[a-z0-9-]{1,63}$/;

/** What opening a secret needs. */
export interface OpenSecretContext {
  /** This machine's id (part of the wrap aad). */
  machineId: string;
  /** This machine's private key: unwraps only for a legacy identity (no encryption key). */
  machineKey: KeyObject;
  /**
   * This machine's encryption key: when set, every secret must be wrapped to it (why: the
   * machine key does mutual TLS and signs evidence, and is never used for ECDH).
   */
  encryptionKey?: KeyObject | undefined;
  /** Now, epoch ms. */
  now: number;
  /** KDC time minus local time, ms; leases are moved into local time by it. */
  clockSkewMs: number;
}

function refuse(secret: ReleasedSecret, what: string): never {
  throw new FailedPrecondition(`secret ${secret.tenantId || "?"}/${secret.keyId.slice(0, 16) || "?"}: ${what}`);
}

/** Checks and unwraps one released secret; throws FailedPrecondition naming the field. */
export function openReleasedSecret(secret: ReleasedSecret, ctx: OpenSecretContext): SecretInput {
  if (!TENANT_ID.test(secret.tenantId)) refuse(secret, "tenant_id is not a tenant id");
  if (!KEY_ID.test(secret.keyId)) refuse(secret, "key_id is not 64 lowercase hex characters");
  const intermediate = secret.purpose === KeyPurpose.INTERMEDIATE_CA;
  if (!intermediate && secret.purpose !== KeyPurpose.SIGNING) refuse(secret, `purpose ${secret.purpose} is not INTERMEDIATE_CA or SIGNING`);
  if (intermediate && secret.version < 1) refuse(secret, "version must be 1 or more for an intermediate");
  if (!intermediate && !SIGNING_NAME.test(secret.name)) refuse(secret, "name of a signing key must be 1 to 63 lowercase letters, digits or '-'");
  if (secret.leaseExpiresAt === undefined) refuse(secret, "lease_expires_at is required");
  if (secret.kdcSigns && !intermediate) refuse(secret, "kdc_signs is only for an intermediate");
  if (secret.kdcSigns && secret.wrappedKey !== undefined) refuse(secret, "wrapped_key must be absent when kdc_signs is set");
  if (!secret.kdcSigns && secret.wrappedKey === undefined) refuse(secret, "wrapped_key is required");
  const family = familyOf(secret.keyAlgorithm) ?? refuse(secret, `key_algorithm ${secret.keyAlgorithm} is not one kmi holds`);

  let publicKey: KeyObject;
  try {
    publicKey = createPublicKey(secret.publicKeyPem);
  } catch {
    refuse(secret, "public_key_pem does not parse");
  }
  if (keyIdOf(publicKey) !== secret.keyId) refuse(secret, "key_id is not the SHA-256 of public_key_pem's SubjectPublicKeyInfo");
  if (publicKey.asymmetricKeyType !== family.type || (family.curve !== undefined && publicKey.asymmetricKeyDetails?.namedCurve !== family.curve)) {
    refuse(secret, `public key is not ${KeyAlgorithm[secret.keyAlgorithm]}`);
  }
  if (family.bits !== undefined && publicKey.asymmetricKeyDetails?.modulusLength !== family.bits) refuse(secret, `public key is not ${KeyAlgorithm[secret.keyAlgorithm]}`);

  if (intermediate) {
    const match = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/.exec(secret.chainPem);
    if (match === null) refuse(secret, "chain_pem holds no certificate");
    let cert: X509Certificate;
    try {
      cert = new X509Certificate(match[0]);
    } catch {
      refuse(secret, "chain_pem's first certificate does not parse");
    }
    if (!cert.ca) refuse(secret, "chain_pem's first certificate is not a CA");
    if (keyIdOf(cert.publicKey) !== secret.keyId) refuse(secret, "chain_pem's first certificate is not for this key");
  } else if (secret.chainPem !== "") {
    refuse(secret, "chain_pem must be empty for a signing key");
  }

  const held = {
    tenantId: secret.tenantId,
    purpose: secret.purpose,
    keyId: secret.keyId,
    version: secret.version,
    name: intermediate ? "" : secret.name,
    keyAlgorithm: secret.keyAlgorithm,
    chainPem: secret.chainPem,
    publicKeyPem: secret.publicKeyPem,
    leaseExpiresAt: timestampMs(secret.leaseExpiresAt) - ctx.clockSkewMs,
    receivedAt: ctx.now,
  };
  if (secret.kdcSigns) return { ...held, privateKey: undefined, kdcSigns: true };
  return { ...held, privateKey: unwrapFor(secret, secret.wrappedKey!, ctx) };
}

/** Unwraps a released key with this machine's encryption key (or, legacy, its machine key); checks it is the announced key. */
function unwrapFor(secret: ReleasedSecret, wrapped: WrappedKey, ctx: OpenSecretContext): KeyObject {
  const aad = formatWrapAad({ machineId: ctx.machineId, tenantId: secret.tenantId, keyId: secret.keyId, version: secret.version });
  const recipient = ctx.encryptionKey ?? ctx.machineKey;
  const recipientId = keyIdOf(recipient);
  if (wrapped.recipientKeyId !== "" && wrapped.recipientKeyId !== recipientId) {
    const which = ctx.encryptionKey !== undefined ? "encryption key" : "machine key (this identity has no encryption key)";
    refuse(secret, `wrapped_key is wrapped to key ${wrapped.recipientKeyId.slice(0, 16)}, not to this machine's ${which} ${recipientId.slice(0, 16)}`);
  }
  let privateKey: KeyObject;
  try {
    privateKey = unwrapKey(wrapped, recipient, { expectedAad: aad });
  } catch (err) {
    refuse(secret, err instanceof Error ? err.message : "wrapped_key does not open");
  }
  // Why: a private key that is not the announced one would sign under another identity.
  if (keyIdOf(privateKey) !== secret.keyId) refuse(secret, "the unwrapped private key does not match key_id");
  return privateKey;
}

function familyOf(algorithm: KeyAlgorithm): { type: "ec" | "rsa"; curve?: string; bits?: number } | undefined {
  switch (algorithm) {
    case KeyAlgorithm.ECDSA_P256:
      return { type: "ec", curve: "prime256v1" };
    case KeyAlgorithm.RSA_2048:
      return { type: "rsa", bits: 2048 };
    case KeyAlgorithm.RSA_3072:
      return { type: "rsa", bits: 3072 };
    default:
      return undefined;
  }
}
