/**
 * The KDC's CertificateFactory on src/pki: key generation, the roots, intermediates, CSRs,
 * service and machine certificates, summaries, and the checks of an uploaded intermediate.
 */
import { InvalidArgument } from "../common/errors.js";
import { KeyAlgorithm } from "../gen/kmi/common/v1/common_pb.js";
import { createCsr, csrToPem, intermediateCaRequestExtensions, parseCsr } from "../pki/csr.js";
import { certificateInfo, type CertificateInfo } from "../pki/inspect.js";
import { createRootCa, issueIntermediateCa, issueMachineCertificate, issueServiceCertificate } from "../pki/issue.js";
import {
  exportPrivateKeyPkcs8Der,
  exportPublicKeySpkiDer,
  generateKeyPair,
  importPrivateKeyPkcs8Der,
  keyId,
  type KeyAlgorithm as PkiKeyAlgorithm,
} from "../pki/keys.js";
import type { DistinguishedName } from "../pki/name.js";
import { certificateToPem } from "../pki/pem.js";
import { checkUploadedIntermediate } from "../pki/upload.js";
import type { CertificateFactory, CertSummary, Issuer } from "./context.js";
import type { SubjectInput } from "./validate.js";

/** The pki layer's name of a key algorithm. */
export function pkiAlgorithm(a: KeyAlgorithm): PkiKeyAlgorithm {
  switch (a) {
    case KeyAlgorithm.RSA_2048:
      return "rsa-2048";
    case KeyAlgorithm.RSA_3072:
      return "rsa-3072";
    default:
      return "ecdsa-p256";
  }
}

/** The API's KeyAlgorithm of a pki label; UNSPECIFIED for keys kmi does not make (e.g. rsa-4096). */
export function apiAlgorithm(label: string): KeyAlgorithm {
  switch (label) {
    case "ecdsa-p256":
      return KeyAlgorithm.ECDSA_P256;
    case "rsa-2048":
      return KeyAlgorithm.RSA_2048;
    case "rsa-3072":
      return KeyAlgorithm.RSA_3072;
    default:
      return KeyAlgorithm.UNSPECIFIED;
  }
}

function dn(s: SubjectInput): DistinguishedName {
  const out: { commonName?: string; organization?: string; organizationalUnit?: string; country?: string } = {};
  if (s.commonName !== "") out.commonName = s.commonName;
  if (s.organization !== "") out.organization = s.organization;
  if (s.organizationalUnit !== "") out.organizationalUnit = s.organizationalUnit;
  if (s.country !== "") out.country = s.country;
  return out;
}

function signer(issuer: Issuer) {
  return { certificateDer: issuer.certificateDer, privateKey: issuer.signer ?? importPrivateKeyPkcs8Der(issuer.pkcs8, "issuer key") };
}

/** A summary of a parsed certificate. */
export function summaryOf(info: CertificateInfo): CertSummary {
  return {
    subject: info.subject,
    issuer: info.issuer,
    serialHex: info.serialHex,
    notBefore: info.notBefore,
    notAfter: info.notAfter,
    sha256Fingerprint: info.sha256Fingerprint,
    isCa: info.isCa,
    dnsNames: [...info.dnsNames],
    ipAddresses: [...info.ipAddresses],
    uris: [...info.uris],
    algorithm: apiAlgorithm(info.keyAlgorithm),
    subjectKeyIdHex: info.subjectKeyIdHex ?? "",
    authorityKeyIdHex: info.authorityKeyIdHex ?? "",
    pathLenConstraint: info.isCa ? info.pathLenConstraint : -1,
    spki: info.spkiDer,
  };
}

/** The CertificateFactory on src/pki. Summaries are cached by certificate (they are immutable). */
export function createPkiAdapter(): CertificateFactory {
  const cache = new Map<string, CertSummary>();
  return {
    async generateKey(algorithm) {
      const pair = await generateKeyPair(pkiAlgorithm(algorithm));
      const spki = exportPublicKeySpkiDer(pair.publicKey);
      return { algorithm: apiAlgorithm(pair.algorithm), pkcs8: exportPrivateKeyPkcs8Der(pair.privateKey), spki, keyId: keyId(spki) };
    },
    selfSignedCa(p) {
      return createRootCa({ subject: dn(p.subject), privateKey: p.signer ?? importPrivateKeyPkcs8Der(p.pkcs8), now: p.now, validitySeconds: p.validitySeconds });
    },
    issueIntermediate(p) {
      return issueIntermediateCa({ issuer: signer(p.issuer), subject: dn(p.subject), publicKeySpkiDer: p.spki, now: p.now, validitySeconds: p.validitySeconds });
    },
    createCsr(p) {
      return createCsr({ subject: dn(p.subject), privateKey: p.signer, requestedExtensions: intermediateCaRequestExtensions(p.signer.spkiDer) });
    },
    issueServiceCertificate(p) {
      return issueServiceCertificate({
        issuer: signer(p.issuer),
        serviceName: p.serviceName,
        publicKeySpkiDer: p.spki,
        dnsNames: p.dnsNames,
        ipAddresses: p.ipAddresses,
        now: p.now,
        validitySeconds: p.validitySeconds,
      });
    },
    issueMachineCertificate(p) {
      return issueMachineCertificate({ issuer: signer(p.issuer), machineId: p.machineId, group: p.group, publicKeySpkiDer: p.spki, now: p.now, validitySeconds: p.validitySeconds });
    },
    checkCsr(pem, field) {
      const info = parseCsr(pem, field);
      const algorithm = apiAlgorithm(info.keyAlgorithm);
      const rsaBits = /^rsa-(\d+)$/.exec(info.keyAlgorithm);
      if (algorithm === KeyAlgorithm.UNSPECIFIED && !(rsaBits !== null && Number(rsaBits[1]) >= 2048)) {
        throw new InvalidArgument(`${field}: the key is ${info.keyAlgorithm}; use ECDSA P-256 or RSA of 2048 bits or more`);
      }
      return { spki: info.spkiDer, algorithm };
    },
    summarize(der) {
      const k = Buffer.from(der).toString("base64");
      let s = cache.get(k);
      if (s === undefined) {
        s = summaryOf(certificateInfo(der));
        if (cache.size > 1000) cache.clear();
        cache.set(k, s);
      }
      return s;
    },
    checkUpload(p) {
      const r = checkUploadedIntermediate({
        certificate: p.certificate,
        expectedSpkiDer: p.expectedSpki,
        ...(p.csr.length > 0 ? { expectedSubjectDer: parseCsr(p.csr, "csr").subjectNameDer } : {}),
        issuerKey: p.signer,
        now: p.now,
        ...(p.customerRoot !== undefined ? { customerRoot: p.customerRoot } : {}),
        ...(p.pendingVersion !== undefined ? { pendingVersion: p.pendingVersion } : {}),
      });
      return { certificateDer: r.certificate.der, customerRootDer: r.customerRoot.der };
    },
    certificatePem: (der) => certificateToPem(der),
    csrPem: (der) => csrToPem(der),
  };
}
