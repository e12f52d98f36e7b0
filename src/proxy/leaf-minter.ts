/**
 * Minting a leaf for an origin: an ECDSA P-256 key made here, in memory only; the public
 * key and the origin's names sent to the agent's IssueLeafCertificate; the answer checked
 * against what was asked; and a TLS context built from leaf + chain + key.
 *
 * The private key never leaves this process and is never written: it exists as a KeyObject
 * and, briefly, as the PEM text `tls.createSecureContext` needs, and then only inside the
 * OpenSSL context. No KMI-managed key ever reaches the proxy: the agent API has no call that
 * returns one.
 */
import { X509Certificate, createHash, generateKeyPairSync, randomBytes } from "node:crypto";
import { createSecureContext } from "node:tls";
import type { IssueLeafCertificateResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { AgentCallError, type LeafIssuer } from "../clients/agent-client.js";
import type { LeafEntry } from "./leaf-cache.js";
import { leafNames, type OriginCertificate } from "./origin-cert.js";

/** Leaf lifetime ceiling (CA/Browser Forum's 47 days), including backdating. */
export const MAX_LEAF_LIFETIME_MS = 47 * 24 * 3600 * 1000;

/** Kept between a requested end of validity and the lifetime ceiling (the agent's backdating counts against it). */
const LIFETIME_MARGIN_MS = 24 * 3600 * 1000;

/** A leaf the agent returned that breaks the leaf policy (never served). */
export class LeafRejected extends Error {
  override name = "LeafRejected";
}

/** Options of {@link createLeafMinter}. */
export interface LeafMinterOptions {
  /** The agent. */
  readonly agent: LeafIssuer;
  /** Longest leaf lifetime the proxy asks for; at most {@link MAX_LEAF_LIFETIME_MS}. */
  readonly maxLifetimeMs?: number;
  /** Clock (ms). */
  readonly now?: () => number;
}

/** Mints leaves. */
export interface LeafMinter {
  /** Mints a leaf for `tenant` that copies `origin`'s names; `host` is the name the client asked for. */
  mint(tenant: string, origin: OriginCertificate, host: string): Promise<LeafEntry>;
  /**
   * Replaces the session ticket keys of `tenant`'s leaves minted from now on (every tenant's
   * when absent). Why: after a revoke or a quarantine, a client must not resume a session that
   * a dropped leaf authenticated.
   */
  rotateTicketKeys(tenant?: string): void;
}

/**
 * The session id context of a tenant's leaves (at most 32 bytes, OpenSSL's limit). Why per
 * tenant, with per-tenant ticket keys: a session resumes across the leaves of the tenant that
 * authenticated it, never under another tenant's leaf (whose clients trust another chain), and
 * a tenant's revoke invalidates its sessions alone.
 */
export function sessionIdContextOf(tenant: string): string {
  return createHash("sha256").update(`kmi-proxy\0${tenant}`).digest("hex").slice(0, 32);
}

/** Builds a minter. */
export function createLeafMinter(options: LeafMinterOptions): LeafMinter {
  const maxLifetime = Math.min(options.maxLifetimeMs ?? MAX_LEAF_LIFETIME_MS, MAX_LEAF_LIFETIME_MS);
  const now = options.now ?? Date.now;
  // Session ticket keys per tenant (48 bytes, made on first use), in memory only: a restart invalidates every ticket.
  const ticketKeys = new Map<string, Buffer>();
  const ticketKeysOf = (tenant: string): Buffer => {
    let k = ticketKeys.get(tenant);
    if (k === undefined) {
      k = randomBytes(48);
      ticketKeys.set(tenant, k);
    }
    return k;
  };
  return {
    rotateTicketKeys(tenant) {
      if (tenant === undefined || tenant === "") ticketKeys.clear();
      else ticketKeys.delete(tenant);
    },
    async mint(tenant, origin, host) {
      const names = leafNames(origin, host);
      const first = names.dnsNames[0] ?? names.ipAddresses[0];
      if (first === undefined) throw new LeafRejected("origin certificate names no dns name or ip address to copy");
      const { publicKey, privateKey } = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
      const t = now();
      const originEnd = origin.notAfter.getTime();
      const spki = publicKey.export({ type: "spki", format: "der" });
      const ask = (notAfter: Date | undefined) =>
        options.agent.issueLeafCertificate({
          tenantId: tenant,
          publicKeyDer: spki,
          dnsNames: names.dnsNames,
          ipAddresses: names.ipAddresses,
          commonName: first.length < 64 ? first : "",
          notAfter,
        });
      // Ask for the origin's end when it comes before the ceiling; else the agent's maximum.
      // The agent refuses (rather than caps) an end beyond its own maximum, which counts its
      // backdating: a day of margin keeps the request inside it, and an agent configured for
      // less than the ceiling is asked again for its maximum (which then ends before the origin).
      const notAfter = originEnd < t + maxLifetime ? new Date(Math.min(originEnd, t + maxLifetime - LIFETIME_MARGIN_MS)) : undefined;
      let res: IssueLeafCertificateResponse;
      try {
        res = await ask(notAfter);
      } catch (err) {
        if (notAfter === undefined || !(err instanceof AgentCallError) || err.code !== "invalid_argument" || !err.message.startsWith("not_after")) throw err;
        res = await ask(undefined);
      }
      // Why check what the agent sent: the proxy serves this to every client of the tenant; a
      // leaf for another key, a CA, or one that outlives the origin or the 47-day ceiling is
      // never served, whatever the agent's configuration.
      let leaf: X509Certificate;
      try {
        leaf = new X509Certificate(res.certificatePem);
      } catch {
        throw new LeafRejected("agent returned a certificate that does not parse");
      }
      if (!leaf.publicKey.equals(publicKey)) throw new LeafRejected("agent returned a certificate for another public key");
      if (leaf.ca) throw new LeafRejected("agent returned a ca certificate as a leaf");
      const leafNotBefore = Date.parse(leaf.validFrom);
      const leafNotAfter = Date.parse(leaf.validTo);
      if (leafNotAfter > originEnd) throw new LeafRejected("agent returned a leaf that outlives the origin certificate");
      if (leafNotAfter - leafNotBefore > MAX_LEAF_LIFETIME_MS) throw new LeafRejected("agent returned a leaf valid for more than 47 days");
      if (leafNotAfter <= t) throw new LeafRejected("agent returned an expired leaf");
      const context = createSecureContext({
        key: privateKey.export({ type: "pkcs8", format: "pem" }),
        cert: res.certificatePem.trimEnd() + "\n" + res.chainPem,
        ticketKeys: ticketKeysOf(tenant),
        sessionIdContext: sessionIdContextOf(tenant),
        minVersion: "TLSv1.2",
      });
      return {
        tenant,
        context,
        notAfter: leafNotAfter,
        notBefore: leafNotBefore,
        issuerKeyId: res.issuerKeyId,
        intermediateVersion: res.intermediateVersion,
        serialHex: res.serialHex,
      };
    },
  };
}
