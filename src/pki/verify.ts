/**
 * Chain verification: builds a path from a certificate through the given intermediates to one
 * of the given roots and checks it as RFC 5280 path validation would for kmi's purposes:
 * signatures (node:crypto over the exact TBS bytes), validity at a given time, names chaining,
 * basicConstraints cA and keyCertSign on every issuer, pathLenConstraint, no unknown critical
 * extension and, on request, extendedKeyUsage serverAuth. Revocation is not checked (kmi's own versions carry their state).
 */
import { InvalidArgument } from "../common/errors.js";
import { infoFromDecoded, type CertificateInfo } from "./inspect.js";
import { formatName } from "./name.js";
import { Oid } from "./oids.js";
import { decodeCertificate, type DecodedCertificate } from "./parse.js";
import { verifySignature } from "./signature.js";

/** Most certificates in a path, trust anchor included. */
export const MAX_CHAIN_LENGTH = 8;

/** What {@link verifyChain} checks. */
export interface VerifyChainOptions {
  /** The certificate to verify (a leaf, or an intermediate when checking an upload). */
  readonly leafDer: Uint8Array;
  /** Untrusted certificates that may complete the path. */
  readonly intermediatesDer?: readonly Uint8Array[];
  /** Trust anchors. */
  readonly rootsDer: readonly Uint8Array[];
  /** The time at which every certificate must be valid. */
  readonly at: Date;
  /**
   * "serverAuth": also require, as OpenSSL's `-purpose sslserver` does, that every certificate
   * of the path but the trust anchor either has no extendedKeyUsage or lists serverAuth.
   */
  readonly purpose?: "serverAuth";
}

/** The outcome: the path (leaf first, anchor last), or why there is none, as a sentence for a person. */
export type ChainVerification =
  | { readonly ok: true; readonly chain: readonly CertificateInfo[] }
  | { readonly ok: false; readonly reason: string };

interface Node {
  readonly decoded: DecodedCertificate;
  readonly info: CertificateInfo;
}

/** Critical extensions kmi processes (or, for certificatePolicies, may safely accept without a policy set). */
const UNDERSTOOD_CRITICAL = new Set<string>([
  Oid.basicConstraints,
  Oid.keyUsage,
  Oid.extKeyUsage,
  Oid.subjectAltName,
  Oid.subjectKeyIdentifier,
  Oid.authorityKeyIdentifier,
  Oid.certificatePolicies,
]);

function normalizedName(der: Uint8Array): string {
  try {
    return formatName(der).toLowerCase().replace(/\s+/g, " ");
  } catch {
    return Buffer.from(der).toString("hex");
  }
}

/** RFC 5280 7.1 name matching, simplified: identical bytes, or equal RFC 4514 forms ignoring case and repeated spaces. */
export function namesMatch(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a).equals(b) || normalizedName(a) === normalizedName(b);
}

function label(node: Node, index: number): string {
  const who = node.info.subject || node.info.dnsNames[0] || `serial ${node.info.serialHex}`;
  return index === 0 ? `certificate (${who})` : `issuer ${index} (${who})`;
}

function decode(der: Uint8Array, field: string): Node {
  const decoded = decodeCertificate(der, field);
  return { decoded, info: infoFromDecoded(decoded, field) };
}

/** Could `issuer` have issued `child`: names chain and, when both are present, AKI matches SKI. */
function mayHaveIssued(issuer: Node, child: Node): boolean {
  if (!namesMatch(issuer.decoded.subjectNameDer, child.decoded.issuerNameDer)) return false;
  const aki = child.info.authorityKeyIdHex;
  const ski = issuer.info.subjectKeyIdHex;
  return !aki || !ski || aki === ski;
}

/**
 * Verifies `leafDer` up to one of `rootsDer` at time `at`. Never throws for bad input: a
 * certificate that does not parse is a reason like any other.
 */
export function verifyChain(options: VerifyChainOptions): ChainVerification {
  let leaf: Node;
  let intermediates: Node[];
  let roots: Node[];
  try {
    leaf = decode(options.leafDer, "leaf");
    intermediates = (options.intermediatesDer ?? []).map((d, i) => decode(d, `intermediates[${i}]`));
    roots = options.rootsDer.map((d, i) => decode(d, `roots[${i}]`));
  } catch (err) {
    return { ok: false, reason: err instanceof InvalidArgument ? err.message : "a certificate does not parse" };
  }
  if (roots.length === 0) return { ok: false, reason: "no trust anchor given" };
  const at = options.at.getTime();
  if (!Number.isFinite(at)) return { ok: false, reason: "no valid time given" };

  // Build the path greedily: trust anchors first, then intermediates, first signature that verifies wins.
  const path: Node[] = [leaf];
  const isRoot = (n: Node): boolean => roots.some((r) => Buffer.from(r.decoded.der).equals(n.decoded.der));
  let anchored = isRoot(leaf);
  while (!anchored) {
    const child = path[path.length - 1]!;
    if (path.length >= MAX_CHAIN_LENGTH) return { ok: false, reason: `no path within ${MAX_CHAIN_LENGTH} certificates` };
    const candidates = [...roots, ...intermediates].filter((c) => !path.includes(c) && mayHaveIssued(c, child));
    if (candidates.length === 0) {
      const sameName = [...roots, ...intermediates].find(
        (c) => !path.includes(c) && namesMatch(c.decoded.subjectNameDer, child.decoded.issuerNameDer),
      );
      if (sameName) {
        return {
          ok: false,
          reason: `${label(child, path.length - 1)}: its issuer ${sameName.info.subject} is given, but with another key (authorityKeyIdentifier differs); it does not chain to the given root`,
        };
      }
      return {
        ok: false,
        reason: `${label(child, path.length - 1)}: no given certificate is its issuer (${child.info.issuer || "empty issuer name"}); it does not chain to the given root`,
      };
    }
    let found: Node | undefined;
    let lastReason = "";
    for (const c of candidates) {
      const check = verifySignature(
        child.decoded.signatureAlgorithmDer,
        child.decoded.tbsDer,
        child.decoded.signatureValue,
        c.decoded.spkiDer,
      );
      if (check.ok) {
        found = c;
        break;
      }
      lastReason = check.reason;
    }
    if (!found) {
      return { ok: false, reason: `${label(child, path.length - 1)}: ${lastReason} (${candidates[0]!.info.subject}); it was not signed by the given root` };
    }
    path.push(found);
    anchored = roots.includes(found);
  }

  for (const [i, node] of path.entries()) {
    const { notBefore, notAfter } = node.info;
    if (at < notBefore.getTime()) return { ok: false, reason: `${label(node, i)}: not valid before ${notBefore.toISOString()}` };
    if (at > notAfter.getTime()) return { ok: false, reason: `${label(node, i)}: expired at ${notAfter.toISOString()}` };
    const isAnchor = i === path.length - 1 && i > 0;
    if (!isAnchor) {
      // nameConstraints bind the certificates below the one that carries them, so on the target itself they are moot.
      const unknown = node.info.criticalExtensions.find(
        (o) => !UNDERSTOOD_CRITICAL.has(o) && !(i === 0 && o === Oid.nameConstraints),
      );
      if (unknown) return { ok: false, reason: `${label(node, i)}: unsupported critical extension ${unknown}` };
    }
    const eku = node.info.extKeyUsage;
    if (options.purpose === "serverAuth" && !isAnchor && eku !== null && !eku.includes(Oid.serverAuth)) {
      return { ok: false, reason: `${label(node, i)}: extendedKeyUsage lacks serverAuth` };
    }
    if (i === 0) continue;
    if (!node.info.isCa) return { ok: false, reason: `${label(node, i)}: not a CA (basicConstraints cA is false)` };
    if (node.info.keyUsage && !node.info.keyUsage.includes("keyCertSign")) {
      return { ok: false, reason: `${label(node, i)}: keyUsage lacks keyCertSign` };
    }
    // pathLenConstraint counts the non-self-issued CA certificates between this issuer and the target.
    const below = path.slice(1, i).filter((n) => !n.info.selfIssued).length;
    if (node.info.pathLenConstraint >= 0 && below > node.info.pathLenConstraint) {
      return {
        ok: false,
        reason: `${label(node, i)}: pathLenConstraint ${node.info.pathLenConstraint} allows fewer intermediates than the ${below} below it`,
      };
    }
  }
  return { ok: true, chain: path.map((n) => n.info) };
}
