/**
 * A CA that signs: its certificate and private key, checked once before it is used.
 */
import type { KeyObject } from "node:crypto";
import { FailedPrecondition } from "../common/errors.js";
import { fromHex } from "./der.js";
import { certificateInfo, type CertificateInfo } from "./inspect.js";
import { subjectKeyIdentifier } from "./keys.js";
import { decodeCertificate, type DecodedCertificate } from "./parse.js";
import type { SignatureAlgorithm } from "./signature.js";
import { toSigner, type Signer } from "./signer.js";

/** A CA certificate with its private key: what issues certificates. */
export interface CaSigner {
  /** The CA certificate, DER. */
  readonly certificateDer: Uint8Array;
  /** The CA's private key (ECDSA P-256 or RSA >= 2048), in this process or behind a {@link Signer} (e.g. in a token). */
  readonly privateKey: KeyObject | Signer;
}

/** A {@link CaSigner} after its checks, with what issuance needs precomputed. */
export interface LoadedIssuer {
  /** The decoded CA certificate (exact bytes of its subject Name etc.). */
  readonly decoded: DecodedCertificate;
  /** Its plain view. */
  readonly info: CertificateInfo;
  /** What signs. */
  readonly signer: Signer;
  /** How it signs. */
  readonly signatureAlgorithm: SignatureAlgorithm;
  /** The issuer's key identifier, for the authorityKeyIdentifier of what it issues: its SKI, or one computed from its key. */
  readonly keyIdentifier: Uint8Array;
}

/**
 * Checks a CA signer before use: the certificate parses, is a CA (basicConstraints cA) with
 * keyCertSign when keyUsage is present, and the private key is the certificate's. Refusals are
 * FailedPrecondition naming `field`: the state of a stored CA, not the caller's input, is wrong.
 */
export function loadIssuer(signer: CaSigner, field = "issuer"): LoadedIssuer {
  const decoded = decodeCertificate(signer.certificateDer, `${field}.certificate`);
  const info = certificateInfo(decoded.der, `${field}.certificate`);
  if (!info.isCa) throw new FailedPrecondition(`${field}: not a CA certificate (basicConstraints cA is false)`);
  if (info.keyUsage && !info.keyUsage.includes("keyCertSign")) {
    throw new FailedPrecondition(`${field}: keyUsage lacks keyCertSign; it may not issue certificates`);
  }
  const key = toSigner(signer.privateKey, `${field}.private_key`);
  const signatureAlgorithm = key.signatureAlgorithm;
  if (!Buffer.from(key.spkiDer).equals(Buffer.from(decoded.spkiDer))) {
    throw new FailedPrecondition(`${field}: the private key does not belong to the CA certificate`);
  }
  const keyIdentifier = info.subjectKeyIdHex ? fromHex(info.subjectKeyIdHex) : subjectKeyIdentifier(decoded.spkiDer);
  return { decoded, info, signer: key, signatureAlgorithm, keyIdentifier };
}
