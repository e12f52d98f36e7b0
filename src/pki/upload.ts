/**
 * The Certificate menu's upload check: is this file the intermediate CA certificate that the
 * customer's private CA issued for the pending CSR, and does it chain to the customer root?
 * Everything is checked before anything changes; the first failure is reported.
 */
import { FailedPrecondition, InvalidArgument } from "../common/errors.js";
import { certificateInfo, type CertificateInfo } from "./inspect.js";
import { parseOneCertificate } from "./pem.js";
import { checkDate } from "./validity.js";
import { verifyChain } from "./verify.js";

/** Input of {@link checkUploadedIntermediate}. */
export interface CheckUploadedIntermediateOptions {
  /** The uploaded certificate (proto field `certificate`): exactly one, PEM or DER, at most 64 KiB. */
  readonly certificate: Uint8Array | string;
  /** SPKI DER of the pending version's key (the key the CSR was made for). */
  readonly expectedSpkiDer: Uint8Array;
  /** Optional customer root (proto field `customer_root`); empty or absent means no chain check. */
  readonly customerRoot?: Uint8Array | string;
  /** The current time (from the injected clock). */
  readonly now: Date;
  /** The pending version number, named in the wrong-key message. */
  readonly pendingVersion?: number;
}

/** An accepted upload. */
export interface UploadedIntermediate {
  /** The intermediate. */
  readonly certificate: CertificateInfo;
  /** The customer root, when one was given. */
  readonly customerRoot: CertificateInfo | undefined;
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
 * Checks an uploaded intermediate before the KDC stores it. Refusals, in the order checked:
 *
 * | problem | error |
 * |---|---|
 * | empty, garbage, truncated or corrupt PEM, not a certificate, a key or CSR, a bundle, > 64 KiB | InvalidArgument (`certificate` or `customer_root`) |
 * | not a CA (basicConstraints), no keyCertSign, empty subject, weak signature algorithm | InvalidArgument (`certificate`) |
 * | its public key is not the pending CSR's | InvalidArgument (`certificate`) |
 * | not yet valid / expired at `now` | FailedPrecondition (`certificate`) |
 * | customer root not a CA, no keyCertSign, pathLenConstraint 0 | InvalidArgument (`customer_root`) |
 * | customer root not valid at `now` | FailedPrecondition (`customer_root`) |
 * | does not chain to the customer root (issuer name or signature) | InvalidArgument (`certificate`) |
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
  const cert = certificateInfo(der, "certificate");
  const root = rootDer ? certificateInfo(rootDer, "customer_root") : undefined;

  if (!cert.isCa) {
    throw new InvalidArgument("certificate: not a CA (basicConstraints cA is false); upload the intermediate, not a leaf");
  }
  if (cert.keyUsage && !cert.keyUsage.includes("keyCertSign")) {
    throw new InvalidArgument(
      "certificate: keyUsage lacks keyCertSign, so it cannot sign leaves; have the CA issue it with keyUsage keyCertSign",
    );
  }
  if (cert.subject === "") {
    throw new InvalidArgument("certificate: empty subject; have the CA issue it with the subject of the CSR");
  }
  if (!ACCEPTED_SIGNATURES.has(cert.signatureAlgorithm)) {
    throw new InvalidArgument(
      `certificate: signed with ${cert.signatureAlgorithm}, which TLS clients reject; have the CA sign it with SHA-256 or better`,
    );
  }
  if (!Buffer.from(cert.spkiDer).equals(Buffer.from(options.expectedSpkiDer))) {
    const which = options.pendingVersion === undefined ? "the pending CSR" : `the CSR of version ${options.pendingVersion}`;
    throw new InvalidArgument(`certificate: its public key is not the pending CSR's key; upload the certificate issued for ${which}`);
  }
  checkValidNow(cert, "certificate", options.now, "have the CA issue a new one for the pending CSR");

  if (root) {
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
    checkValidNow(root, "customer_root", options.now, "upload a current root");
    const result = verifyChain({ leafDer: der, rootsDer: [rootDer!], at: options.now });
    if (!result.ok) {
      throw new InvalidArgument(
        `certificate: does not chain to customer_root (${result.reason}); upload the root that signed this intermediate`,
      );
    }
  }
  return { certificate: cert, customerRoot: root };
}
