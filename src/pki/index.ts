/**
 * kmi's PKI: pure X.509 / CSR / chain logic (no store, no logger, no generated code).
 * Keys and signatures through node:crypto; ASN.1 through pkijs/asn1js, except the hot-path
 * leaf builder, which writes DER directly.
 */
export {
  certificatesToPem,
  certificateToPem,
  decodePemBlocks,
  encodePem,
  MAX_CERTIFICATE_BYTES,
  MAX_CHAIN_BYTES,
  parseOneCertificate,
  splitPemCertificates,
  type ParseOneCertificateOptions,
  type PemBlock,
  type SplitPemCertificatesOptions,
} from "./pem.js";
export {
  describePublicKey,
  exportPrivateKeyPkcs8Der,
  exportPublicKeySpkiDer,
  generateKeyPair,
  importPrivateKeyPkcs8Der,
  importPublicKeySpkiDer,
  isKeyAlgorithm,
  KEY_ALGORITHMS,
  keyAlgorithmOf,
  keyId,
  privateKeyMatchesSpki,
  subjectKeyIdentifier,
  type KeyAlgorithm,
  type KeyPair,
} from "./keys.js";
export { signatureAlgorithmFor, type SignatureAlgorithm } from "./signature.js";
export { ecdsaRawToDer, isSigner, keyObjectSigner, toSigner, type Signer } from "./signer.js";
export { commonNameOf, encodeName, formatName, type DistinguishedName } from "./name.js";
export {
  basicConstraintsExtension,
  extKeyUsageExtension,
  keyUsageExtension,
  KEY_USAGE_NAMES,
  type ExtensionSpec,
  type KeyUsageName,
} from "./extensions.js";
export { MAX_DNS_NAME_LENGTH, MAX_SAN_NAMES, normalizeDnsName } from "./san.js";
export {
  createCsr,
  csrToPem,
  intermediateCaRequestExtensions,
  parseCsr,
  type CreateCsrOptions,
  type CsrInfo,
} from "./csr.js";
export {
  createRootCa,
  issueIntermediateCa,
  issueMachineCertificate,
  issueServiceCertificate,
  MACHINE_URI_PREFIX,
  SERVICE_URI_PREFIX,
  type CaSigner,
  type CreateRootCaOptions,
  type IssueIntermediateCaOptions,
  type IssueMachineCertificateOptions,
  type IssueServiceCertificateOptions,
} from "./issue.js";
export {
  createLeafIssuer,
  MAX_COMMON_NAME_LENGTH,
  type IssuedLeaf,
  type IssueLeafRequest,
  type LeafIssuer,
  type LeafIssuerOptions,
} from "./leaf.js";
export { certificateInfo, sha256Fingerprint, type CertificateInfo } from "./inspect.js";
export { verifyChain, type ChainVerification, type VerifyChainOptions } from "./verify.js";
export {
  checkUploadedIntermediate,
  type CheckUploadedIntermediateOptions,
  type UploadedIntermediate,
} from "./upload.js";
export { BACKDATE_SECONDS } from "./validity.js";
