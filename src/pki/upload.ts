/**
 * The Certificate menu's upload check: is this file the intermediate CA certificate that the
 * customer's private CA issued for the pending CSR, and does it chain to the customer root?
 * Everything is checked before anything changes; the first failure is reported.
 */
import { generateKeyPairSync, type KeyObject } from "node:crypto";
import { FailedPrecondition, InvalidArgument, isKmiError } from "../common/errors.js";
import { certificateInfo, infoFromDecoded, type CertificateInfo } from "./inspect.js";
import {
  checkBasicConstraints,
  checkExtendedKeyUsage,
  checkLifetime,
  checkNoNameConstraints,
  MIN_REMAINING_DAYS,
} from "./intermediate-policy.js";
import { exportPublicKeySpkiDer } from "./keys.js";
import type { Signer } from "./signer.js";
import { createLeafIssuer } from "./leaf.js";
import { formatName } from "./name.js";
import { decodeCertificate, type DecodedCertificate } from "./parse.js";
import { parseOneCertificate } from "./pem.js";
import { checkDate } from "./validity.js";
import { namesMatch, verifyChain } from "./verify.js";

/** Input of {@link checkUploadedIntermediate}. */
export interface CheckUploadedIntermediateOptions {
  /** The uploaded certificate (proto field `certificate`): exactly one, PEM or DER, at most 64 KiB. */
  readonly certificate: Uint8Array | string;
  /** SPKI DER of the pending version's key (the key the CSR was made for). */
  readonly expectedSpkiDer: Uint8Array;
  /**
   * The customer root (proto field `customer_root`, or the one kept with the tenant): the
   * certificate that signed the intermediate. Required: empty or absent is refused, because
   * without it the intermediate's signature cannot be checked.
   */
  readonly customerRoot?: Uint8Array | string;
  /** Subject Name DER of the pending CSR: the intermediate must carry the same subject. */
  readonly expectedSubjectDer?: Uint8Array;
  /**
   * The pending version's private key. When given, a leaf is issued under the intermediate as
   * the agent would (throw-away key, never stored) and must verify for serverAuth against the
   * root: the last check before anything changes.
   */
  readonly issuerKey?: KeyObject | Signer;
  /** The current time (from the injected clock). */
  readonly now: Date;
  /** The pending version number, named in the wrong-key message. */
  readonly pendingVersion?: number;
}

/** An accepted upload. */
export interface UploadedIntermediate {
  /** The intermediate. */
  readonly certificate: CertificateInfo;
  /** The customer root. */
  readonly customerRoot: CertificateInfo;
}

/** Signature algorithms that today's TLS clients accept in a chain. */
const ACCEPTED_SIGNATURES = new Set([
  "ecdsa-with-SHA256",
  "ecdsa-with-SHA384",
  "ecdsa-with-SHA512",
  "sha256WithRSAEncryption",
  "sha384WithRSAEncryption",
  "sha512WithRSAEncryption",
  "rsassaPss",
  "ED25519",
  "ED448",
]);

function checkValidNow(info: CertificateInfo, field: string, now: Date, fix: string): void {
  if (now.getTime() < info.notBefore.getTime()) {
    throw new FailedPrecondition(
      `${field}: not valid until ${info.notBefore.toISOString()} (valid ${info.notBefore.toISOString()} to ${info.notAfter.toISOString()}); upload it once it is valid, or ${fix}`,
    );
  }
  if (now.getTime() > info.notAfter.getTime()) {
    throw new FailedPrecondition(
      `${field}: expired at ${info.notAfter.toISOString()} (valid ${info.notBefore.toISOString()} to ${info.notAfter.toISOString()}); ${fix}`,
    );
  }
}

/**
 * Checks an uploaded intermediate before the KDC stores it. Refusals, in the order checked (the
 * first one is reported; the written rule with the reasons is in docs/security.md):
 *
 * | problem | error |
 * |---|---|
 * | empty, garbage, truncated or corrupt PEM, not a certificate, a key or CSR, a bundle, > 64 KiB | InvalidArgument (`certificate` or `customer_root`) |
 * | no basicConstraints (signed without extensions), cA false, not critical, pathlen absent or > 0 | InvalidArgument (`certificate`), saying to sign with basicConstraints=critical,CA:TRUE,pathlen:0 |
 * | no keyCertSign; extendedKeyUsage without serverAuth; any nameConstraints | InvalidArgument (`certificate`) |
 * | not yet valid / expired / fewer than 7 days left at `now` | FailedPrecondition (`certificate`) |
 * | empty subject, or not the CSR's subject; weak signature algorithm; not the pending CSR's key | InvalidArgument (`certificate`) |
 * | no customer root | InvalidArgument (`customer_root`) |
 * | customer root not a CA, no keyCertSign, pathLenConstraint 0, nameConstraints | InvalidArgument (`customer_root`) |
 * | customer root not valid at `now` | FailedPrecondition (`customer_root`) |
 * | valid for more than 10 years, or ending after the root | InvalidArgument (`certificate`) |
 * | does not chain to the customer root (issuer name or signature) | InvalidArgument (`certificate`) |
 * | a leaf issued under it does not verify for serverAuth | InvalidArgument (`certificate`) |
 */
export function checkUploadedIntermediate(options: CheckUploadedIntermediateOptions): UploadedIntermediate {
  checkDate(options.now, "now");
  const der = parseOneCertificate(options.certificate, "certificate", {
    expected: "the intermediate certificate",
  });
  const rootGiven = options.customerRoot !== undefined && options.customerRoot.length > 0;
  const rootDer = rootGiven
    ? parseOneCertificate(options.customerRoot!, "customer_root", { expected: "the customer's root certificate" })
    : undefined;
  const decoded = decodeCertificate(der, "certificate");
  const cert = infoFromDecoded(decoded, "certificate");
  const root = rootDer ? certificateInfo(rootDer, "customer_root") : undefined;

  checkCaExtensions(decoded, cert);
  checkValidNow(cert, "certificate", options.now, "have the CA issue a new one for the pending CSR");
  const left = cert.notAfter.getTime() - options.now.getTime();
  if (left < MIN_REMAINING_DAYS * 86_400_000) {
    throw new FailedPrecondition(
      `certificate: ends at ${cert.notAfter.toISOString()}, fewer than ${MIN_REMAINING_DAYS} days from now, too soon to roll it out and renew it; have the CA issue it for longer`,
    );
  }
  checkIdentity(options, decoded, cert);
  if (root === undefined) {
    throw new InvalidArgument(
      "customer_root: required on the tenant's first private-CA upload, so that the signature can be checked (kmi keeps it for later uploads); pass --root with the root of your private CA",
    );
  }
  checkRoot(root, rootDer!, options.now);
  checkLifetime(cert, root, "certificate", "customer_root");
  const result = verifyChain({ leafDer: der, rootsDer: [rootDer!], at: options.now });
  if (!result.ok) {
    throw new InvalidArgument(
      `certificate: does not chain to customer_root (${result.reason}); upload the root that signed this intermediate`,
    );
  }
  if (options.issuerKey !== undefined) checkLeafVerifies(der, rootDer!, options.issuerKey, options.now);
  return { certificate: cert, customerRoot: root };
}

/** What the intermediate may do: a CA for TLS server leaves of any host, nothing more. */
function checkCaExtensions(decoded: DecodedCertificate, cert: CertificateInfo): void {
  checkBasicConstraints(decoded, cert, "certificate");
  if (cert.keyUsage && !cert.keyUsage.includes("keyCertSign")) {
    throw new InvalidArgument(
      "certificate: keyUsage lacks keyCertSign, so it cannot sign leaves; have the CA issue it with keyUsage keyCertSign",
    );
  }
  checkExtendedKeyUsage(cert, "certificate");
  checkNoNameConstraints(decoded, "certificate");
}

/** Whose it is: the pending CSR's key and subject, signed with an algorithm clients accept. */
function checkIdentity(options: CheckUploadedIntermediateOptions, decoded: DecodedCertificate, cert: CertificateInfo): void {
  if (!Buffer.from(cert.spkiDer).equals(Buffer.from(options.expectedSpkiDer))) {
    const which = options.pendingVersion === undefined ? "the pending CSR" : `the CSR of version ${options.pendingVersion}`;
    throw new InvalidArgument(`certificate: its public key is not the pending CSR's key; upload the certificate issued for ${which}`);
  }
  if (cert.subject === "") {
    throw new InvalidArgument("certificate: empty subject; have the CA issue it with the subject of the CSR");
  }
  if (options.expectedSubjectDer !== undefined && !namesMatch(decoded.subjectNameDer, options.expectedSubjectDer)) {
    throw new InvalidArgument(
      `certificate: subject "${cert.subject}" is not the CSR's "${formatName(options.expectedSubjectDer)}"; have the CA keep the CSR's subject (openssl x509 -req copies it; do not override it)`,
    );
  }
  if (!ACCEPTED_SIGNATURES.has(cert.signatureAlgorithm)) {
    throw new InvalidArgument(
      `certificate: signed with ${cert.signatureAlgorithm}, which TLS clients reject; have the CA sign it with SHA-256 or better`,
    );
  }
}

/** The customer root: a CA that may have an intermediate CA below it, valid now, unconstrained. */
function checkRoot(root: CertificateInfo, rootDer: Uint8Array, now: Date): void {
  if (!root.isCa) {
    throw new InvalidArgument(
      "customer_root: not a CA (basicConstraints cA is false); upload the customer's root CA certificate",
    );
  }
  if (root.keyUsage && !root.keyUsage.includes("keyCertSign")) {
    throw new InvalidArgument("customer_root: keyUsage lacks keyCertSign, so it cannot have signed the intermediate");
  }
  // pathLen 0 would allow our intermediate itself (the target) but none of the leaves it signs.
  if (root.pathLenConstraint === 0) {
    throw new InvalidArgument(
      "customer_root: pathLenConstraint 0 forbids an intermediate CA below it, so clients would reject every leaf; sign with a root that allows one",
    );
  }
  checkNoNameConstraints(decodeCertificate(rootDer, "customer_root"), "customer_root");
  checkValidNow(root, "customer_root", now, "upload a current root");
}

/** Host and address of the throw-away leaf (RFC 2606 / RFC 5737 names: never a real host). */
const PROBE = { dnsNames: ["upload-check.kmi.invalid"], ipAddresses: ["192.0.2.1"] } as const;

/**
 * Issues a leaf under the intermediate as the agent does (pki/leaf.ts, a throw-away P-256
 * key, never stored) and verifies it for serverAuth up to the root: whatever the checks above
 * missed that would make clients reject the tenant's leaves stops the upload here.
 */
function checkLeafVerifies(intermediateDer: Uint8Array, rootDer: Uint8Array, issuerKey: KeyObject | Signer, now: Date): void {
  let leafDer: Uint8Array;
  try {
    const issuer = createLeafIssuer({ certificateDer: intermediateDer, privateKey: issuerKey });
    const leafKey = generateKeyPairSync("ec", { namedCurve: "P-256" });
    leafDer = issuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(leafKey.publicKey),
      ...PROBE,
      notBefore: new Date(now.getTime() - 60_000),
      notAfter: new Date(now.getTime() + 86_400_000),
    });
  } catch (err) {
    if (!isKmiError(err)) throw err;
    throw new InvalidArgument(`certificate: the agent could not issue a leaf under it (${err.message}); have the CA issue it for the pending CSR as a CA`);
  }
  const r = verifyChain({ leafDer, intermediatesDer: [intermediateDer], rootsDer: [rootDer], at: now, purpose: "serverAuth" });
  if (!r.ok) {
    throw new InvalidArgument(
      `certificate: a leaf the agent would issue under it does not verify for serverAuth against customer_root (${r.reason}); sign it with basicConstraints=critical,CA:TRUE,pathlen:0, keyUsage=critical,keyCertSign,cRLSign and no other constraints`,
    );
  }
}
