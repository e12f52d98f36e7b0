/**
 * What the proxy's connection handlers share (one per server), and what one client
 * connection carries into its HTTP exchanges.
 */
import type { Logger } from "../common/logger.js";
import type { AccessLog } from "./access-log.js";
import type { BlockedCa } from "./blocked-ca.js";
import type { LeafCache } from "./leaf-cache.js";
import type { LeafMinter } from "./leaf-minter.js";
import type { LearnedBypass } from "./learned-bypass.js";
import type { DestinationGuard } from "./destinations.js";
import type { Inspection } from "./icap/inspection.js";
import type { KeyAvailability } from "./key-availability.js";
import type { OriginConnector } from "./origin.js";
import type { PolicyStore } from "./policy.js";
import type { ClientRateLimiter } from "../common/rate-limit.js";
import type { TenantResolver } from "./tenants.js";

/** Timeouts and size limits. */
export interface ProxyLimits {
  /** Time a client has to send its ClientHello after the CONNECT is answered. */
  readonly clientHelloTimeoutMs: number;
  /** Time a client has to finish its TLS handshake with the proxy. */
  readonly handshakeTimeoutMs: number;
  /** Time for the origin's TCP connect and TLS handshake, each. */
  readonly originTimeoutMs: number;
  /** A connection (tunnel, keep-alive, HTTP/2 session) idle this long is closed. */
  readonly idleTimeoutMs: number;
  /** Time a client has to send a request's headers. */
  readonly headersTimeoutMs: number;
  /** Time a client has to send a whole request (headers and body). */
  readonly requestTimeoutMs: number;
  /** Idle time before an HTTP/1.1 keep-alive connection is closed. */
  readonly keepAliveTimeoutMs: number;
  /**
   * Idle time before an intercepted connection's origin side is closed (the client side
   * stays open; the next request opens and verifies a new origin connection). Why: an idle
   * client connection then holds one TLS connection in the proxy, not two.
   */
  readonly originIdleTimeoutMs: number;
  /** Largest request header block, bytes. */
  readonly maxHeaderBytes: number;
}

/** Counters the proxy keeps (exported as Prometheus metrics by the server). */
export interface ProxyCounters {
  /** Requests and tunnels by decision and tenant ("" when none was resolved). */
  decision(decision: string, tenant: string): void;
  /** Leaf obtained: cache, issued, joined. */
  leaf(source: string): void;
  /** A CONNECT-level outcome (intercept, bypass, block, error). */
  connect(outcome: string): void;
}

/** The proxy's dependencies, built once by the server. */
export interface ProxyContext {
  readonly logger: Logger;
  readonly accessLog: AccessLog;
  readonly policy: PolicyStore;
  /** Where bodies go to be scanned besides the built-in check (ICAP services). */
  readonly inspection: Inspection;
  readonly tenants: TenantResolver;
  readonly leaves: LeafCache;
  readonly minter: LeafMinter;
  readonly origins: OriginConnector;
  /** Which addresses the proxy may connect to (private and special-use ones only when allowed). */
  readonly destinations: DestinationGuard;
  readonly blockedCa: BlockedCa;
  readonly rateLimiter: ClientRateLimiter;
  /** Which tenants the agent can issue for now (from WatchKeys). */
  readonly keys: KeyAvailability;
  readonly learned: LearnedBypass;
  readonly limits: ProxyLimits;
  readonly counters: ProxyCounters;
}

/** A client connection's identity, as its HTTP exchanges need it. */
export interface ClientInfo {
  /** Tenant id. */
  readonly tenant: string;
  /** `address:port` of the client. */
  readonly client: string;
  /** The client's address (rate limits are per address). */
  readonly address: string;
}
