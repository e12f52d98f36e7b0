/**
 * Issuing kmi's CA, service and machine certificates (the slow path, built with pkijs):
 * self-signed roots (the KMI root CA and the infrastructure CA), tenants' intermediate CAs,
 * service certificates for mutual TLS between KDC, Auditserver and agents, and machine
 * certificates for enrolled agents.
 *
 * Every certificate gets a CSPRNG serial, notBefore backdated by a minute, notAfter clamped to
 * the issuer's notAfter, SKI and (below a root) AKI = the issuer's key identifier, and is signed
 * with node:crypto over the exact TBS bytes.
 */
import "./engine.js";
import type { KeyObject } from "node:crypto";
import * as asn1js from "asn1js";
import * as pkijs from "pkijs";
import { FailedPrecondition, InvalidArgument } from "../common/errors.js";
import {
  authorityKeyIdentifierExtension,
  basicConstraintsExtension,
  extKeyUsageExtension,
  keyUsageExtension,
  subjectAltNameExtension,
  subjectKeyIdentifierExtension,
  type ExtensionSpec,
  type KeyUsageName,
} from "./extensions.js";
import { loadIssuer, type CaSigner, type LoadedIssuer } from "./issuer.js";
import { keyAlgorithmOf, subjectKeyIdentifier } from "./keys.js";
import { encodeName, type DistinguishedName } from "./name.js";
import { Oid } from "./oids.js";
import { checkNames } from "./san.js";
import { randomSerial } from "./serial.js";
import { assembleSigned, type SignatureAlgorithm } from "./signature.js";
import { toSigner, type Signer } from "./signer.js";
import { validityFor, type Validity } from "./validity.js";

export type { CaSigner } from "./issuer.js";

/** URI SAN prefix of a service identity: `kmi://service/<name>`. */
export const SERVICE_URI_PREFIX = "kmi://service/";

/** URI SAN prefix of a machine identity: `kmi://machine/<id>`. */
export const MACHINE_URI_PREFIX = "kmi://machine/";

function toArrayBuffer(bytes: Uint8Array): ArrayBuffer {
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
}

function x509Time(date: Date): pkijs.Time {
  // RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
  return new pkijs.Time({ type: date.getUTCFullYear() < 2050 ? 0 : 1, value: date });
}

interface BuildParams {
  readonly issuerNameDer: Uint8Array;
  readonly subjectNameDer: Uint8Array;
  readonly spkiDer: Uint8Array;
  readonly validity: Validity;
  readonly extensions: readonly ExtensionSpec[];
  readonly signer: Signer;
  readonly signatureAlgorithm: SignatureAlgorithm;
}

/** Builds the TBSCertificate with pkijs and signs its exact bytes with node:crypto. */
function buildCertificate(p: BuildParams): Uint8Array {
  const cert = new pkijs.Certificate();
  cert.version = 2;
  cert.serialNumber = new asn1js.Integer({ valueHex: toArrayBuffer(randomSerial()) });
  cert.signature = pkijs.AlgorithmIdentifier.fromBER(toArrayBuffer(p.signatureAlgorithm.algorithmIdentifierDer));
  cert.signatureAlgorithm = cert.signature;
  cert.issuer = pkijs.RelativeDistinguishedNames.fromBER(toArrayBuffer(p.issuerNameDer));
  cert.subject = pkijs.RelativeDistinguishedNames.fromBER(toArrayBuffer(p.subjectNameDer));
  cert.notBefore = x509Time(p.validity.notBefore);
  cert.notAfter = x509Time(p.validity.notAfter);
  cert.subjectPublicKeyInfo = pkijs.PublicKeyInfo.fromBER(toArrayBuffer(p.spkiDer));
  cert.extensions = p.extensions.map(
    (e) => new pkijs.Extension({ extnID: e.oid, critical: e.critical, extnValue: toArrayBuffer(e.value) }),
  );
  const tbs = new Uint8Array(cert.encodeTBS().toBER());
  return assembleSigned(tbs, p.signatureAlgorithm.algorithmIdentifierDer, p.signer.sign(tbs));
}

function checkSubjectKey(spkiDer: Uint8Array, issuer: LoadedIssuer | undefined, field: string): void {
  keyAlgorithmOf(spkiDer, field);
  if (issuer && Buffer.from(spkiDer).equals(issuer.decoded.spkiDer)) {
    throw new InvalidArgument(`${field}: is the issuer's own key; generate a separate key for the new certificate`);
  }
}

function requireCommonName(subject: DistinguishedName, field: string): void {
  if (subject.commonName === undefined) throw new InvalidArgument(`${field}.common_name: required for a CA; name the CA`);
}

/** Options for {@link createRootCa}. */
export interface CreateRootCaOptions {
  /** The root's subject (and issuer); commonName required, e.g. `{ commonName: "KMI Root CA", organization: "Example" }`. */
  readonly subject: DistinguishedName;
  /** The root's private key (ECDSA P-256, RSA 2048 or 3072), in this process or behind a {@link Signer}. */
  readonly privateKey: KeyObject | Signer;
  /** The current time (from the injected clock). */
  readonly now: Date;
  /** Lifetime from `now`, in seconds (e.g. 10 years for the KMI root). */
  readonly validitySeconds: number;
  /** basicConstraints pathLenConstraint; default none (the KMI root signs intermediates that sign leaves). */
  readonly pathLenConstraint?: number;
}

/**
 * Creates a self-signed root CA certificate (the KMI root CA or the infrastructure CA):
 * basicConstraints cA critical, keyUsage keyCertSign+cRLSign critical, SKI. Returns DER.
 */
export function createRootCa(options: CreateRootCaOptions): Uint8Array {
  requireCommonName(options.subject, "subject");
  const signer = toSigner(options.privateKey);
  const signatureAlgorithm = signer.signatureAlgorithm;
  const spkiDer = signer.spkiDer;
  keyAlgorithmOf(spkiDer, "private_key");
  const nameDer = encodeName(options.subject, "subject");
  return buildCertificate({
    issuerNameDer: nameDer,
    subjectNameDer: nameDer,
    spkiDer,
    validity: validityFor(options.now, options.validitySeconds),
    extensions: [
      basicConstraintsExtension(true, options.pathLenConstraint),
      keyUsageExtension(["keyCertSign", "cRLSign"]),
      subjectKeyIdentifierExtension(subjectKeyIdentifier(spkiDer)),
    ],
    signer,
    signatureAlgorithm,
  });
}

function issuedBy(issuer: LoadedIssuer, p: Omit<BuildParams, "issuerNameDer" | "signer" | "signatureAlgorithm">): Uint8Array {
  return buildCertificate({
    ...p,
    issuerNameDer: issuer.decoded.subjectNameDer,
    signer: issuer.signer,
    signatureAlgorithm: issuer.signatureAlgorithm,
    extensions: [...p.extensions, authorityKeyIdentifierExtension(issuer.keyIdentifier)],
  });
}

function checkIssuerValidAt(issuer: LoadedIssuer, now: Date): void {
  if (issuer.info.notBefore.getTime() > now.getTime()) {
    throw new FailedPrecondition(`issuer: not valid until ${issuer.info.notBefore.toISOString()}; check the clock or the CA`);
  }
}

/** Options for {@link issueIntermediateCa}. */
export interface IssueIntermediateCaOptions {
  /** The root that signs (the KMI root CA). */
  readonly issuer: CaSigner;
  /** The intermediate's subject; commonName required, e.g. `{ commonName: "acme MITM CA v3", organization: "acme" }`. */
  readonly subject: DistinguishedName;
  /** The intermediate's public key, SPKI DER (ECDSA P-256, RSA 2048 or 3072). */
  readonly publicKeySpkiDer: Uint8Array;
  /** The current time. */
  readonly now: Date;
  /** Lifetime in seconds (clamped to the issuer's notAfter). */
  readonly validitySeconds: number;
}

/**
 * Issues a tenant's intermediate CA: basicConstraints cA with pathLenConstraint 0 (it signs
 * leaves only), keyUsage keyCertSign+cRLSign+digitalSignature critical, SKI, AKI. Returns DER.
 * FailedPrecondition when the issuer cannot issue CA certificates (expired, pathLen 0, not a CA).
 */
export function issueIntermediateCa(options: IssueIntermediateCaOptions): Uint8Array {
  const issuer = loadIssuer(options.issuer);
  checkIssuerValidAt(issuer, options.now);
  if (issuer.info.pathLenConstraint === 0) {
    throw new FailedPrecondition("issuer: its pathLenConstraint is 0, so it may not issue CA certificates; sign with the KMI root");
  }
  requireCommonName(options.subject, "subject");
  checkSubjectKey(options.publicKeySpkiDer, issuer, "public_key");
  const spkiDer = options.publicKeySpkiDer;
  return issuedBy(issuer, {
    subjectNameDer: encodeName(options.subject, "subject"),
    spkiDer,
    validity: validityFor(options.now, options.validitySeconds, issuer.info.notAfter),
    extensions: [
      basicConstraintsExtension(true, 0),
      keyUsageExtension(["digitalSignature", "keyCertSign", "cRLSign"]),
      subjectKeyIdentifierExtension(subjectKeyIdentifier(spkiDer)),
    ],
  });
}

const IDENTITY = /^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$/;

function checkIdentity(value: string, field: string, example: string): void {
  if (typeof value !== "string" || !IDENTITY.test(value)) {
    throw new InvalidArgument(
      `${field}: must be 1-64 letters, digits, '.', '_' or '-', starting and ending with a letter or digit, e.g. ${example}`,
    );
  }
}

function leafKeyUsage(spkiDer: Uint8Array, forServer: boolean): KeyUsageName[] {
  // keyEncipherment only matters for TLS 1.2 RSA key exchange, so only RSA server keys get it.
  return forServer && keyAlgorithmOf(spkiDer).startsWith("rsa-") ? ["digitalSignature", "keyEncipherment"] : ["digitalSignature"];
}

/** Options for {@link issueServiceCertificate}. */
export interface IssueServiceCertificateOptions {
  /** The infrastructure CA. */
  readonly issuer: CaSigner;
  /** The service's name, e.g. `kdc` or `audit`: becomes CN and the URI SAN `kmi://service/<name>`. */
  readonly serviceName: string;
  /** The service's public key, SPKI DER. */
  readonly publicKeySpkiDer: Uint8Array;
  /** Hostnames the service is reached at (policy as for leaves). */
  readonly dnsNames?: readonly string[];
  /** IP addresses the service is reached at. */
  readonly ipAddresses?: readonly string[];
  /** Subject O; default `kmi`. */
  readonly organization?: string;
  /** The current time. */
  readonly now: Date;
  /** Lifetime in seconds (clamped to the issuer's notAfter). */
  readonly validitySeconds: number;
}

/**
 * Issues a service certificate for mutual TLS (server and client): DNS/IP SANs plus the URI SAN
 * `kmi://service/<name>`, extKeyUsage serverAuth+clientAuth, keyUsage digitalSignature
 * (+keyEncipherment for RSA) critical, basicConstraints cA false critical, SKI, AKI. Returns DER.
 */
export function issueServiceCertificate(options: IssueServiceCertificateOptions): Uint8Array {
  const issuer = loadIssuer(options.issuer);
  checkIssuerValidAt(issuer, options.now);
  checkIdentity(options.serviceName, "service_name", "kdc");
  checkSubjectKey(options.publicKeySpkiDer, issuer, "public_key");
  const names = checkNames(options.dnsNames, options.ipAddresses, { requireOne: false });
  const spkiDer = options.publicKeySpkiDer;
  return issuedBy(issuer, {
    subjectNameDer: encodeName({ organization: options.organization ?? "kmi", commonName: options.serviceName }, "subject"),
    spkiDer,
    validity: validityFor(options.now, options.validitySeconds, issuer.info.notAfter),
    extensions: [
      basicConstraintsExtension(false),
      keyUsageExtension(leafKeyUsage(spkiDer, true)),
      extKeyUsageExtension([Oid.serverAuth, Oid.clientAuth]),
      subjectAltNameExtension(
        { dnsNames: names.dnsNames, uris: [`${SERVICE_URI_PREFIX}${options.serviceName}`], ipBytes: names.ipBytes },
        false,
      ),
      subjectKeyIdentifierExtension(subjectKeyIdentifier(spkiDer)),
    ],
  });
}

/** Options for {@link issueMachineCertificate}. */
export interface IssueMachineCertificateOptions {
  /** The infrastructure CA. */
  readonly issuer: CaSigner;
  /** The machine's id: becomes CN and the URI SAN `kmi://machine/<id>`. */
  readonly machineId: string;
  /** The machine's group: becomes the subject OU. */
  readonly group: string;
  /** The machine key's public half, SPKI DER (from the agent's CSR). */
  readonly publicKeySpkiDer: Uint8Array;
  /** The current time. */
  readonly now: Date;
  /** Lifetime in seconds; machine certificates are short-lived and renewed over mutual TLS. */
  readonly validitySeconds: number;
}

/**
 * Issues a machine (agent) certificate: subject `CN=<id>,OU=<group>,O=kmi`, URI SAN
 * `kmi://machine/<id>`, extKeyUsage clientAuth, keyUsage digitalSignature critical,
 * basicConstraints cA false critical, SKI, AKI. Returns DER.
 */
export function issueMachineCertificate(options: IssueMachineCertificateOptions): Uint8Array {
  const issuer = loadIssuer(options.issuer);
  checkIssuerValidAt(issuer, options.now);
  checkIdentity(options.machineId, "machine_id", "m-0042");
  checkIdentity(options.group, "group", "edge-eu");
  checkSubjectKey(options.publicKeySpkiDer, issuer, "public_key");
  const spkiDer = options.publicKeySpkiDer;
  return issuedBy(issuer, {
    subjectNameDer: encodeName(
      { organization: "kmi", organizationalUnit: options.group, commonName: options.machineId },
      "subject",
    ),
    spkiDer,
    validity: validityFor(options.now, options.validitySeconds, issuer.info.notAfter),
    extensions: [
      basicConstraintsExtension(false),
      keyUsageExtension(leafKeyUsage(spkiDer, false)),
      extKeyUsageExtension([Oid.clientAuth]),
      subjectAltNameExtension({ uris: [`${MACHINE_URI_PREFIX}${options.machineId}`] }, false),
      subjectKeyIdentifierExtension(subjectKeyIdentifier(spkiDer)),
    ],
  });
}
