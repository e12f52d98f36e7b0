/**
 * What the agent needs to build a leaf: one ready issuer per held intermediate, made once
 * when the intermediate arrives (so the hot path does no key parsing or chain work), and the
 * adapter onto pki's fast leaf builder, which enforces the leaf policy itself.
 */
import { X509Certificate, type KeyObject } from "node:crypto";
import { certificateInfo } from "../pki/inspect.js";
import { checkNames } from "../pki/san.js";
import { createLeafIssuer } from "../pki/leaf.js";

/** One leaf to build; already validated against the agent's policy. */
export interface LeafSpec {
  /** The leaf's public key, DER SubjectPublicKeyInfo. */
  publicKeySpkiDer: Uint8Array;
  /** DNS subjectAltNames. */
  dnsNames: string[];
  /** IP subjectAltNames, text form. */
  ipAddresses: string[];
  /** Subject CN; undefined for none. */
  commonName: string | undefined;
  /** Start of validity. */
  notBefore: Date;
  /** End of validity (the builder also clamps it at the intermediate's notAfter). */
  notAfter: Date;
}

/** A built leaf. */
export interface IssuedLeaf {
  /** The certificate, DER. */
  certificateDer: Uint8Array;
  /** Its serial, lowercase hex. */
  serialHex: string;
  /** Its notAfter, as encoded. */
  notAfter: Date;
}

/** Builds and signs leaves with one intermediate. */
export interface LeafIssuer {
  /** Builds and signs one leaf: here (a released key), or at the KDC (a key held in its token). */
  issueLeaf(spec: LeafSpec): IssuedLeaf | Promise<IssuedLeaf>;
}

/**
 * Has the KDC sign a leaf with the tenant's intermediate `version`, whose key it holds in its
 * PKCS#11 token (DistributionService.SignLeaf); the agent's own policy was applied already.
 */
export type KdcLeafSigner = (tenantId: string, version: number, spec: LeafSpec) => Promise<Uint8Array>;

/**
 * A LeafIssuer for a token-held intermediate (`certificateDer`): every leaf goes to the KDC,
 * and what comes back is checked before it is handed out.
 */
export function kdcLeafIssuer(tenantId: string, version: number, certificateDer: Uint8Array, signAtKdc: KdcLeafSigner): LeafIssuer {
  const intermediate = new X509Certificate(certificateDer);
  return { issueLeaf: async (spec) => checkedLeaf(await signAtKdc(tenantId, version, spec), spec, intermediate) };
}

/**
 * The leaf the KDC signed, checked as if the agent had built it: signed by the intermediate the
 * agent holds, not a CA, for the key and exactly the names asked for. Why: the agent hands it
 * to its callers as its own; a KDC replica that answered wrongly must not be believed.
 */
export function checkedLeaf(certificateDer: Uint8Array, spec: LeafSpec, intermediate: X509Certificate): IssuedLeaf {
  // A plain Error: INTERNAL to the caller, the reason in the agent's log (error-mapping.ts).
  const wrong = (why: string) => new Error(`the KDC returned a leaf that ${why}; it was not handed out`);
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(certificateDer);
  } catch {
    throw wrong("does not parse");
  }
  if (!leaf.checkIssued(intermediate) || !leaf.verify(intermediate.publicKey)) throw wrong("the intermediate did not sign");
  const info = certificateInfo(certificateDer);
  if (info.isCa) throw wrong("is a CA");
  if (!Buffer.from(leaf.publicKey.export({ type: "spki", format: "der" })).equals(Buffer.from(spec.publicKeySpkiDer))) throw wrong("is for another key");
  const asked = checkNames(spec.dnsNames, spec.ipAddresses, { requireOne: true });
  if (!sameNames(info.dnsNames, asked.dnsNames) || !sameNames(info.ipAddresses, asked.ipAddresses)) throw wrong("names other hosts");
  return { certificateDer, serialHex: info.serialHex, notAfter: info.notAfter };
}

function sameNames(got: readonly string[], asked: readonly string[]): boolean {
  const a = new Set(got.map((n) => n.toLowerCase()));
  return a.size === new Set(asked.map((n) => n.toLowerCase())).size && asked.every((n) => a.has(n.toLowerCase()));
}

/** Makes a LeafIssuer for an intermediate certificate (DER) and its private key. */
export type LeafIssuerFactory = (certificateDer: Uint8Array, privateKey: KeyObject) => LeafIssuer;

/** The leaf issuer factory over pki's fast builder (pki/leaf.ts). */
export const pkiLeafIssuerFactory: LeafIssuerFactory = (certificateDer, privateKey) => {
  const issuer = createLeafIssuer({ certificateDer, privateKey });
  return {
    issueLeaf(spec) {
      // pki/leaf.ts already names the agent API's proto fields in its refusals.
      const leaf = issuer.issueLeafDetailed({
        publicKeySpkiDer: spec.publicKeySpkiDer,
        dnsNames: spec.dnsNames,
        ipAddresses: spec.ipAddresses,
        commonName: spec.commonName ?? null,
        notBefore: spec.notBefore,
        notAfter: spec.notAfter,
      });
      return { certificateDer: leaf.der, serialHex: leaf.serialHex, notAfter: leaf.notAfter };
    },
  };
};
