/**
 * What the agent needs to build a leaf: one ready issuer per held intermediate, made once
 * when the intermediate arrives (so the hot path does no key parsing or chain work), and the
 * adapter onto pki's fast leaf builder, which enforces the leaf policy itself.
 */
import type { KeyObject } from "node:crypto";
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
export type KdcLeafSigner = (tenantId: string, version: number, spec: LeafSpec) => Promise<IssuedLeaf>;

/** A LeafIssuer for a token-held intermediate: every leaf goes to the KDC. */
export function kdcLeafIssuer(tenantId: string, version: number, signAtKdc: KdcLeafSigner): LeafIssuer {
  return { issueLeaf: (spec) => signAtKdc(tenantId, version, spec) };
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
