/**
 * PKCS#10 certificate signing requests: making one for a key that never leaves kmi (the
 * tenant's intermediate CA key, an agent's machine key), and reading one that someone sends.
 */
import "./engine.js";
import type { KeyObject } from "node:crypto";
import * as asn1js from "asn1js";
import * as pkijs from "pkijs";
import { InvalidArgument } from "../common/errors.js";
import { children, contentBytes, decodeOid, DerError, expectTlv, Tag, tlvBytes, type Tlv } from "./der.js";
import {
  basicConstraintsExtension,
  keyUsageExtension,
  subjectKeyIdentifierExtension,
  type ExtensionSpec,
} from "./extensions.js";
import { describePublicKey, exportPublicKeySpkiDer, keyAlgorithmOf, subjectKeyIdentifier } from "./keys.js";
import { encodeName, formatName, type DistinguishedName } from "./name.js";
import { Oid } from "./oids.js";
import type { RawExtension } from "./parse.js";
import { decodePemBlocks, encodePem, MAX_CERTIFICATE_BYTES } from "./pem.js";
import { assembleSigned, verifySignature } from "./signature.js";
import { isSigner, toSigner, type Signer } from "./signer.js";

function toArrayBuffer(bytes: Uint8Array): ArrayBuffer {
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
}

/** Options for {@link createCsr}. */
export interface CreateCsrOptions {
  /** The requested subject; at least a commonName. */
  readonly subject: DistinguishedName;
  /** The key to certify; the CSR is signed with it (proof of possession). ECDSA P-256 or RSA 2048/3072, here or in a token. */
  readonly privateKey: KeyObject | Signer;
  /** Extensions to request (PKCS#9 extensionRequest); the CA decides whether to copy them. */
  readonly requestedExtensions?: readonly ExtensionSpec[];
}

/**
 * The extensions an intermediate-CA CSR should request: basicConstraints cA pathLen 0,
 * keyUsage digitalSignature+keyCertSign+cRLSign, SKI. Customer CAs that copy requested
 * extensions (openssl `copy_extensions`) then issue what kmi needs.
 */
export function intermediateCaRequestExtensions(publicKeySpkiDer: Uint8Array): ExtensionSpec[] {
  return [
    basicConstraintsExtension(true, 0),
    keyUsageExtension(["digitalSignature", "keyCertSign", "cRLSign"]),
    subjectKeyIdentifierExtension(subjectKeyIdentifier(publicKeySpkiDer)),
  ];
}

/** Creates a PKCS#10 CSR signed with `privateKey` (ecdsa-with-SHA256 or sha256WithRSAEncryption). Returns DER. */
export function createCsr(options: CreateCsrOptions): Uint8Array {
  if (options.subject.commonName === undefined) {
    throw new InvalidArgument("subject.common_name: required in a CSR; name what is being certified");
  }
  if (!isSigner(options.privateKey)) keyAlgorithmOf(options.privateKey, "private_key");
  const signer = toSigner(options.privateKey);
  const signatureAlgorithm = signer.signatureAlgorithm;
  const spkiDer = signer.spkiDer;
  const req = new pkijs.CertificationRequest();
  req.version = 0;
  req.subject = pkijs.RelativeDistinguishedNames.fromBER(toArrayBuffer(encodeName(options.subject, "subject")));
  req.subjectPublicKeyInfo = pkijs.PublicKeyInfo.fromBER(toArrayBuffer(spkiDer));
  req.attributes = [];
  const requested = options.requestedExtensions ?? [];
  if (requested.length > 0) {
    const extensions = new pkijs.Extensions({
      extensions: requested.map(
        (e) => new pkijs.Extension({ extnID: e.oid, critical: e.critical, extnValue: toArrayBuffer(e.value) }),
      ),
    });
    req.attributes.push(new pkijs.Attribute({ type: Oid.extensionRequest, values: [extensions.toSchema()] }));
  }
  // pkijs declares encodeTBS protected on CertificationRequest (public on Certificate); it is the TBS encoder we need.
  const tbs = new Uint8Array((req as unknown as { encodeTBS(): asn1js.Sequence }).encodeTBS().toBER());
  return assembleSigned(tbs, signatureAlgorithm.algorithmIdentifierDer, signer.sign(tbs));
}

/** PEM `CERTIFICATE REQUEST` block for a DER CSR. */
export function csrToPem(der: Uint8Array): string {
  return encodePem("CERTIFICATE REQUEST", der);
}

/** What a CSR asks for. */
export interface CsrInfo {
  /** The requested subject, RFC 4514. */
  readonly subject: string;
  /** The requested subject's Name DER. */
  readonly subjectNameDer: Uint8Array;
  /** The public key to certify, SPKI DER as in the request. */
  readonly spkiDer: Uint8Array;
  /** The key's algorithm label (e.g. `ecdsa-p256`; see describePublicKey). */
  readonly keyAlgorithm: string;
  /** The requested extensions (extensionRequest), empty when none. */
  readonly requestedExtensions: readonly RawExtension[];
  /** The CSR DER. */
  readonly der: Uint8Array;
}

function extensionRequest(buf: Uint8Array, attrs: Tlv): RawExtension[] {
  for (const attr of children(buf, attrs)) {
    const [type, values] = children(buf, attr);
    if (!type || !values || type.tag !== Tag.oid || values.tag !== Tag.set) throw new DerError("bad attribute");
    if (decodeOid(contentBytes(buf, type)) !== Oid.extensionRequest) continue;
    const [exts] = children(buf, values);
    if (!exts || exts.tag !== Tag.sequence) throw new DerError("bad extensionRequest");
    return children(buf, exts).map((ext) => {
      const parts = children(buf, ext);
      const critical = parts.length === 3 && parts[1]!.tag === Tag.boolean && buf[parts[1]!.contentStart] !== 0;
      const value = parts[parts.length - 1]!;
      if (parts[0]?.tag !== Tag.oid || value.tag !== Tag.octetString) throw new DerError("bad extension");
      return { oid: decodeOid(contentBytes(buf, parts[0])), critical, value: contentBytes(buf, value) };
    });
  }
  return [];
}

function csrDer(input: Uint8Array | string, field: string): Uint8Array {
  const bytes = typeof input === "string" ? new Uint8Array(Buffer.from(input, "utf8")) : input;
  if (bytes.length === 0) throw new InvalidArgument(`${field}: empty; paste the PEM CSR`);
  if (bytes.length > MAX_CERTIFICATE_BYTES) throw new InvalidArgument(`${field}: larger than 64 KiB; send one CSR`);
  const text = Buffer.from(bytes).toString("latin1");
  if (text.includes("-----BEGIN ")) {
    const blocks = decodePemBlocks(text, field);
    const reqs = blocks.filter((b) => b.label === "CERTIFICATE REQUEST" || b.label === "NEW CERTIFICATE REQUEST");
    if (blocks.some((b) => /PRIVATE KEY/.test(b.label))) {
      throw new InvalidArgument(`${field}: the file holds a private key; never send keys, send the CSR only`);
    }
    if (reqs.length !== 1) {
      throw new InvalidArgument(`${field}: expected one "CERTIFICATE REQUEST" PEM block, found ${reqs.length}; send one CSR`);
    }
    return reqs[0]!.der;
  }
  if (bytes[0] === Tag.sequence) return new Uint8Array(bytes);
  throw new InvalidArgument(`${field}: neither PEM nor DER; send the CSR as PEM ("-----BEGIN CERTIFICATE REQUEST-----")`);
}

/**
 * Reads a CSR (PEM or DER), checks its structure and verifies its self-signature (proof that
 * the sender holds the private key). InvalidArgument naming `field` for anything else.
 */
export function parseCsr(input: Uint8Array | string, field = "csr"): CsrInfo {
  const der = csrDer(input, field);
  let tbs: Tlv, alg: Tlv, sig: Tlv, subject: Tlv, spki: Tlv;
  let requestedExtensions: RawExtension[];
  try {
    const outer = expectTlv(der, 0, Tag.sequence);
    if (outer.end !== der.length) throw new DerError("trailing bytes");
    const top = children(der, outer);
    if (top.length !== 3) throw new DerError("not a CSR");
    [tbs, alg, sig] = top as [Tlv, Tlv, Tlv];
    if (tbs.tag !== Tag.sequence || alg.tag !== Tag.sequence || sig.tag !== Tag.bitString) throw new DerError("not a CSR");
    const f = children(der, tbs);
    const [version, s, k, attrs, ...rest] = f;
    if (version?.tag !== Tag.integer || s?.tag !== Tag.sequence || k?.tag !== Tag.sequence || rest.length) {
      throw new DerError("bad certificationRequestInfo");
    }
    if (contentBytes(der, version).length !== 1 || der[version.contentStart] !== 0) throw new DerError("unknown CSR version");
    subject = s;
    spki = k;
    requestedExtensions = attrs && attrs.tag === 0xa0 ? extensionRequest(der, attrs) : [];
    const asn1 = asn1js.fromBER(der);
    if (asn1.offset === -1) throw new DerError("asn.1 does not parse");
    new pkijs.CertificationRequest({ schema: asn1.result });
  } catch (err) {
    const reason = err instanceof DerError ? err.message : "does not match the PKCS#10 schema";
    throw new InvalidArgument(`${field}: not a valid PKCS#10 CSR (${reason}); send the CSR file as generated`, { cause: err });
  }
  const sigBytes = contentBytes(der, sig);
  const check = verifySignature(tlvBytes(der, alg), tlvBytes(der, tbs), sigBytes.subarray(1), tlvBytes(der, spki));
  if (!check.ok) {
    throw new InvalidArgument(`${field}: self-signature does not verify (${check.reason}); regenerate the CSR with its key`);
  }
  const subjectNameDer = tlvBytes(der, subject);
  const spkiDer = tlvBytes(der, spki);
  return {
    subject: formatName(subjectNameDer),
    subjectNameDer,
    spkiDer,
    keyAlgorithm: describePublicKey(spkiDer),
    requestedExtensions,
    der,
  };
}
