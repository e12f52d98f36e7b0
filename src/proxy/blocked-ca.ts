/**
 * The "kmi-blocked" CA: a self-signed CA made at startup, in memory, that nothing trusts.
 *
 * Why it exists: after the proxy has answered a CONNECT with 200 and read the ClientHello,
 * the only way left to tell the client why its connection is refused (the origin's
 * certificate does not verify, the host is blocked by name, the agent is down) is an HTTP
 * page inside TLS. Serving that page under a leaf of the tenant's trusted intermediate would
 * present an unverified origin as trusted; under this CA the client first sees a certificate
 * warning (or a TLS failure), and only a person who clicks through sees the page saying why.
 * Its key is the proxy's own, not a KMI-managed key, and it signs nothing but these pages.
 *
 * The same CA's leaf is the throw-away client certificate of the probe that tells an origin
 * that demands client certificates apart from other TLS 1.2 handshake failures.
 */
import { generateKeyPairSync, type KeyObject } from "node:crypto";
import { createSecureContext, type SecureContext } from "node:tls";
import { isIP } from "node:net";
import { createRootCa } from "../pki/issue.js";
import { createLeafIssuer, type LeafIssuer as PkiLeafIssuer } from "../pki/leaf.js";
import { certificateToPem } from "../pki/pem.js";
import { exportPublicKeySpkiDer } from "../pki/keys.js";
import { isLeafDnsName } from "./origin-cert.js";

/** Subject CN of the untrusted CA: what a browser's warning shows. */
export const BLOCKED_CA_NAME = "kmi-blocked (untrusted): this connection was refused by the kmi proxy";

const DAY = 24 * 3600;

/** The untrusted CA and the leaves it signs for block pages. */
export class BlockedCa {
  private readonly contexts = new Map<string, { ctx: SecureContext; until: number }>();
  private readonly issuer: PkiLeafIssuer;
  private readonly leafKey: KeyObject;
  private readonly leafKeyPem: string;
  /** The CA certificate, PEM (tests trust it to read block pages). */
  readonly certificatePem: string;
  /** A client certificate and key for the client-certificate probe. */
  readonly probeClientCert: { readonly cert: string; readonly key: string };

  private constructor(private readonly now: () => number) {
    const ca = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
    const caDer = createRootCa({
      subject: { commonName: BLOCKED_CA_NAME.slice(0, 64), organization: "kmi proxy" },
      privateKey: ca.privateKey,
      now: new Date(now()),
      validitySeconds: 365 * DAY,
      pathLenConstraint: 0,
    });
    this.certificatePem = certificateToPem(caDer);
    this.issuer = createLeafIssuer({ certificateDer: caDer, privateKey: ca.privateKey });
    // One key for every block-page leaf: these leaves protect nothing.
    this.leafKey = generateKeyPairSync("ec", { namedCurve: "prime256v1" }).privateKey;
    this.leafKeyPem = this.leafKey.export({ type: "pkcs8", format: "pem" }) as string;
    this.probeClientCert = { cert: this.leafPem(["kmi-proxy-probe.invalid"], []), key: this.leafKeyPem };
  }

  /** Makes the CA (one ECDSA P-256 key, ~1 ms). */
  static create(now: () => number = Date.now): BlockedCa {
    return new BlockedCa(now);
  }

  private leafPem(dnsNames: string[], ipAddresses: string[]): string {
    const t = this.now();
    const der = this.issuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(this.leafKey),
      dnsNames,
      ipAddresses,
      notBefore: new Date(t - 60_000),
      notAfter: new Date(t + DAY * 1000),
    });
    return certificateToPem(der) + this.certificatePem;
  }

  /** A TLS context for a block page about `host` (a small cache; these leaves live a day). */
  contextFor(host: string): SecureContext {
    const h = host.toLowerCase();
    const t = this.now();
    const hit = this.contexts.get(h);
    if (hit !== undefined && hit.until > t) return hit.ctx;
    const ip = isIP(h) !== 0;
    const name = ip || isLeafDnsName(h) ? h : "blocked.invalid";
    const ctx = createSecureContext({
      key: this.leafKeyPem,
      cert: this.leafPem(ip ? [] : [name], ip ? [name] : []),
      minVersion: "TLSv1.2",
    });
    if (this.contexts.size >= 1000) this.contexts.clear();
    this.contexts.set(h, { ctx, until: t + (DAY * 1000) / 2 });
    return ctx;
  }
}
