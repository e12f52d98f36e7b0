/**
 * The attestation library shared by the Auditserver (signs tokens, checks evidence), the KDC
 * (verifies tokens before it releases a secret) and the key agent (measures, signs evidence).
 * It depends on node:crypto, the generated kmi.audit.v1 messages and the domain errors only.
 */
export {
  ALL_TENANTS,
  ATTESTATION_TOKEN_ISSUER,
  ATTESTATION_TOKEN_TYPE,
  DEFAULT_CLOCK_SKEW_SECONDS,
  MAX_ATTESTATION_TOKEN_LENGTH,
  decodeAttestationTokenUnverified,
  signAttestationToken,
  tenClaimServes,
  verifyAttestationToken,
  type AttestationClaims,
  type AttestationSigningKey,
  type AttestationTokenInput,
  type SignedAttestationToken,
  type VerifyAttestationTokenOptions,
} from "./token.js";
export { AttestationTokenError, type AttestationTokenProblem } from "./errors.js";
export {
  MACHINE_ID_PATTERN,
  MAX_EVIDENCE_BYTES,
  NONCE_BYTES,
  checkEvidence,
  createAttestRequest,
  decodeEvidence,
  encodeEvidence,
  signEvidence,
  verifyEvidenceSignature,
  type EvidenceSignerInput,
  type EvidenceValue,
} from "./evidence.js";
export {
  MAX_MEASUREMENTS,
  MEASUREMENT_NAME_PATTERN,
  checkMeasurementList,
  checkMeasurementName,
  checkSha256Hex,
  type MeasurementValue,
} from "./measurement.js";
export { dependenciesDirOf, dependencyClosure, type DependencyDir } from "./dependencies.js";
export { FileDigestCache, measureFiles, measureValue, type MeasureOptions, type MeasurementSources } from "./measure.js";
export { attestationKeyId, generateP256KeyPair, publicKeyPem, toP256PublicKey, type PublicKeyInput } from "./keys.js";
export {
  bindEncryptionKey,
  generateEncryptionKey,
  parseEncryptionPublicKey,
  spkiDer,
  verifyEncryptionKeyBinding,
  type EncryptionKeyBinding,
} from "./encryption-key.js";
export { base64url, fromBase64url, parseSha256Fingerprint, sha256Hex } from "./encoding.js";
