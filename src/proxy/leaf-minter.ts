/**
 * Minting a leaf for an origin: an ECDSA P-256 key made here, in memory only; the public
 * key and the origin's names sent to the agent's IssueLeafCertificate; the answer checked
 * against what was asked; and a TLS context built from leaf + chain + key.
 *
 * The private key is never written: it exists as a KeyObject and, briefly, as the PEM text
 * `tls.createSecureContext` needs, and then only inside the OpenSSL context. With workers
 * (`--workers`), the primary mints and the PEM crosses the cluster's IPC channel (an anonymous
 * socket pair between the primary and its own workers) to the workers that serve the host. No KMI-managed key ever reaches the proxy: the agent API has no call that
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
  /**
   * Mints a leaf for `tenant` that copies `origin`'s names; `host` is the name the client asked
   * for, `requester` who asked (a minter with a {@link sharedLimit} charges the client's
   * address; the others ignore it).
   */
  mint(tenant: string, origin: OriginCertificate, host: string, requester?: LeafRequester): Promise<LeafEntry>;
  /**
   * Present when the minter enforces the per-client new-host limit itself (a worker's: the
   * primary holds the one limit per machine) and throws `IssuanceRefused` past it; the caller
   * then takes no token of its own.
   */
  readonly sharedLimit?: SharedIssuanceLimit;
  /**
   * Replaces the session ticket keys of `tenant`'s leaves minted from now on (every tenant's
   * when absent). Why: after a revoke or a quarantine, a client must not resume a session that
   * a dropped leaf authenticated.
   */
  rotateTicketKeys(tenant?: string): void;
  /** The session ticket keys `tenant`'s leaves get now (48 bytes). */
  ticketKeysOf(tenant: string): Buffer;
}

/** Who a leaf is minted for. */
export interface LeafRequester {
  /** The client's address (the new-host limit is per address). */
  readonly client: string;
  /** The CONNECT target, `host:port`. */
  readonly target: string;
}

/** The new-host limit as another process holds it (with `--workers`, the primary). */
export interface SharedIssuanceLimit {
  /**
   * The holder's word on a CONNECT its caller would refuse (its view says `client`'s bucket is
   * empty): true when the bucket is empty and `tenant` got no leaf for `target` lately on any
   * worker, so the 429 goes out on the CONNECT, as in one process.
   */
  refusesNewHost(tenant: string, target: string, client: string): Promise<boolean>;
}

/** Default time between session ticket key rotations: an hour (tickets live 5 minutes, Node's default). */
export const TICKET_KEY_ROTATION_MS = 3_600_000;

/**
 * A minted leaf before it becomes a TLS context: what a proxy worker receives from the primary
 * (./worker-ipc.ts), so that a host's leaf is minted once per machine. `keyPem` is the leaf's
 * own in-memory key (PKCS#8), never a KMI-managed one.
 */
export interface LeafMaterial {
  /** Tenant whose intermediate signed it. */
  readonly tenant: string;
  /** The leaf's private key, PKCS#8 PEM. */
  readonly keyPem: string;
  /** The leaf then its chain, PEM. */
  readonly certPem: string;
  /** End of the leaf's validity (ms since epoch). */
  readonly notAfter: number;
  /** Start of the leaf's validity (ms since epoch). */
  readonly notBefore: number;
  /** Key id of the intermediate that signed it. */
  readonly issuerKeyId: string;
  /** Version of that intermediate. */
  readonly intermediateVersion: number;
  /** Leaf serial, hex (for logs). */
  readonly serialHex: string;
}

/** Mints leaf material (key, certificate, checks), without a TLS context. */
export interface LeafMaterialMinter {
  /** As {@link LeafMinter.mint}, returning the material. */
  mint(tenant: string, origin: OriginCertificate, host: string): Promise<LeafMaterial>;
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

/**
 * Session ticket keys per tenant (48 bytes each, made on first use), in memory only: a restart
 * invalidates every ticket. They are replaced on a revoke or quarantine, and every
 * {@link TICKET_KEY_ROTATION_MS} (`--ticket-key-rotation-seconds`): why, a ticket holds the
 * session's secrets encrypted under these keys, so keys that never change would let whoever
 * obtains them decrypt every recorded session that used a ticket. With workers, the primary
 * holds the ring and hands each tenant's keys to the workers, so a session resumes on any worker.
 */
export class TicketKeyRing {
  private readonly keys = new Map<string, Buffer>();

  /** The tenant's current keys. */
  of(tenant: string): Buffer {
    let k = this.keys.get(tenant);
    if (k === undefined) {
      k = randomBytes(48);
      this.keys.set(tenant, k);
    }
    return k;
  }

  /** Forgets `tenant`'s keys (every tenant's when absent or ""): new ones are made on next use. */
  rotate(tenant?: string): void {
    if (tenant === undefined || tenant === "") this.keys.clear();
    else this.keys.delete(tenant);
  }
}

/** The TLS context of minted material, with the tenant's ticket keys. */
export function leafEntryOf(m: LeafMaterial, ticketKeys: Buffer): LeafEntry {
  const context = createSecureContext({
    key: m.keyPem,
    cert: m.certPem,
    ticketKeys,
    sessionIdContext: sessionIdContextOf(m.tenant),
    minVersion: "TLSv1.2",
  });
  return {
    tenant: m.tenant,
    context,
    notAfter: m.notAfter,
    notBefore: m.notBefore,
    issuerKeyId: m.issuerKeyId,
    intermediateVersion: m.intermediateVersion,
    serialHex: m.serialHex,
  };
}

/** Builds a minter: {@link createLeafMaterialMinter} and {@link leafEntryOf} in one process. */
export function createLeafMinter(options: LeafMinterOptions): LeafMinter {
  const material = createLeafMaterialMinter(options);
  const tickets = new TicketKeyRing();
  return {
    rotateTicketKeys: (tenant) => tickets.rotate(tenant),
    ticketKeysOf: (tenant) => tickets.of(tenant),
    mint: async (tenant, origin, host) => leafEntryOf(await material.mint(tenant, origin, host), tickets.of(tenant)),
  };
}

/** Builds a minter of leaf material (the primary's, with workers). */
export function createLeafMaterialMinter(options: LeafMinterOptions): LeafMaterialMinter {
  const maxLifetime = Math.min(options.maxLifetimeMs ?? MAX_LEAF_LIFETIME_MS, MAX_LEAF_LIFETIME_MS);
  const now = options.now ?? Date.now;
  return {
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
      return {
        tenant,
        keyPem: privateKey.export({ type: "pkcs8", format: "pem" }) as string,
        certPem: res.certificatePem.trimEnd() + "\n" + res.chainPem,
        notAfter: leafNotAfter,
        notBefore: leafNotBefore,
        issuerKeyId: res.issuerKeyId,
        intermediateVersion: res.intermediateVersion,
        serialHex: res.serialHex,
      };
    },
  };
}
