/**
 * The proxy's TLS connection to an origin: the client's SNI and ALPN offers, the origin's
 * chain verified against Node's root store plus the configured extra CAs, its name checked,
 * and the outcome classified so the interceptor can decide: intercept, refuse with a page
 * naming the verification error, or tunnel an origin that demands a client certificate.
 */
import { connect as tlsConnect, checkServerIdentity, createSecureContext, rootCertificates, type SecureContext, type TLSSocket } from "node:tls";
import type { X509Certificate } from "node:crypto";
import type { Socket } from "node:net";
import type { DestinationGuard } from "./destinations.js";

/** Where and how to connect. */
export interface OriginTarget {
  /** Host to connect to (CONNECT target). */
  readonly host: string;
  /** Port. */
  readonly port: number;
  /** SNI to send (the client's); undefined sends none. The name is verified against SNI, else host. */
  readonly servername: string | undefined;
  /** ALPN offers (the client's, filtered to what the proxy can inspect). */
  readonly alpn: readonly string[];
  /** An already connected TCP socket to use instead of a new connection. */
  readonly socket?: Socket;
}

/** Outcome of {@link OriginConnector.connect}. */
export type OriginResult =
  | { readonly kind: "ok"; readonly socket: TLSSocket; readonly cert: X509Certificate; readonly alpn: string | false; readonly resumed: boolean }
  /** The handshake completed but the certificate does not verify (socket already destroyed). */
  | { readonly kind: "unverified"; readonly code: string; readonly reason: string }
  /** The origin demands a client certificate. */
  | { readonly kind: "client-cert"; readonly reason: string }
  /** Connect, handshake or timeout failure. */
  | { readonly kind: "failed"; readonly code: string; readonly reason: string };

/** Options of {@link OriginConnector}. */
export interface OriginConnectorOptions {
  /** Extra trusted CAs (PEM), in addition to Node's root store. */
  readonly extraCaPem?: readonly string[];
  /** Whether Node's root store is trusted; default true (tests turn it off). */
  readonly systemRoots?: boolean;
  /** Handshake deadline; default 10 s. */
  readonly timeoutMs?: number;
  /** A throw-away client certificate for the client-certificate probe (see {@link OriginConnector.connect}). */
  readonly probeClientCert?: { readonly cert: string; readonly key: string };
  /** Most TLS sessions kept for resumption; default 5,000. */
  readonly maxSessions?: number;
  /** The destination check for connections the connector opens itself. */
  readonly destinations?: DestinationGuard;
}

const VERIFY_TEXT: Record<string, string> = {
  DEPTH_ZERO_SELF_SIGNED_CERT: "self-signed certificate",
  SELF_SIGNED_CERT_IN_CHAIN: "self-signed certificate in certificate chain (untrusted root)",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "unable to get local issuer certificate (untrusted or incomplete chain)",
  UNABLE_TO_GET_ISSUER_CERT: "unable to get issuer certificate",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "unable to verify the first certificate (incomplete chain)",
  CERT_HAS_EXPIRED: "certificate has expired",
  CERT_NOT_YET_VALID: "certificate is not yet valid",
  CERT_SIGNATURE_FAILURE: "certificate signature failure",
  CERT_REVOKED: "certificate revoked",
  CERT_UNTRUSTED: "certificate not trusted",
  CERT_REJECTED: "certificate rejected",
  INVALID_CA: "invalid ca certificate",
  INVALID_PURPOSE: "unsupported certificate purpose",
  PATH_LENGTH_EXCEEDED: "path length constraint exceeded",
  HOSTNAME_MISMATCH: "hostname mismatch",
};

/** Alerts an origin sends when it wants a (valid) client certificate. */
const CLIENT_CERT_ALERTS = new Set([
  "ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED",
  "ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE",
  "ERR_SSL_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
  "ERR_SSL_SSLV3_ALERT_CERTIFICATE_UNKNOWN",
  "ERR_SSL_TLSV1_ALERT_UNKNOWN_CA",
  "ERR_SSL_TLSV1_ALERT_ACCESS_DENIED",
]);

/** True for the error an origin's "certificate required" alert surfaces as (TLS 1.3: after the handshake). */
export function isClientCertRequired(err: unknown): boolean {
  return (err as { code?: string } | undefined)?.code === "ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED";
}

/** Connects to origins; holds the trust store context and the TLS session cache. */
export class OriginConnector {
  private readonly context: SecureContext;
  private readonly probeContext: SecureContext | undefined;
  /** Sessions for resumption, with the certificate of the handshake that made them (a resumed handshake carries none). */
  private readonly sessions = new Map<string, { session: Buffer; cert: X509Certificate }>();
  private readonly timeoutMs: number;
  private readonly maxSessions: number;
  private readonly destinations: DestinationGuard | undefined;

  constructor(options: OriginConnectorOptions = {}) {
    // Why one shared context: `ca` on every tls.connect would parse ~150 roots per connection.
    const ca = [...(options.systemRoots === false ? [] : rootCertificates), ...(options.extraCaPem ?? [])];
    this.context = createSecureContext({ ca, minVersion: "TLSv1.2" });
    this.probeContext =
      options.probeClientCert === undefined
        ? undefined
        : createSecureContext({ ca, minVersion: "TLSv1.2", cert: options.probeClientCert.cert, key: options.probeClientCert.key });
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.maxSessions = options.maxSessions ?? 5000;
    this.destinations = options.destinations;
  }

  /**
   * Connects and verifies. When a TLS 1.2 origin answers with a bare handshake_failure alert
   * (what OpenSSL sends when a required client certificate is missing, but also for other
   * mismatches), it is probed once more, on a new connection, with a throw-away client
   * certificate: if the outcome changes (the handshake completes, or fails on the
   * certificate: an alert about it, or a reset as Node servers do), the origin demands
   * client certificates; if it fails the same way, the failure stands.
   */
  async connect(target: OriginTarget): Promise<OriginResult> {
    if (target.socket === undefined && this.destinations !== undefined) {
      try {
        this.destinations.checkLiteral(target.host);
      } catch (err) {
        return { kind: "failed", code: "EKMIDESTINATION", reason: (err as Error).message };
      }
    }
    const r = await this.attempt(target, this.context);
    if (r.kind === "failed" && r.code === "ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE" && this.probeContext !== undefined) {
      const probe = await this.attempt({ ...target, socket: undefined }, this.probeContext, true);
      if (probe.kind === "ok") probe.socket.destroy();
      if (probe.kind === "client-cert") return probe;
      if (probe.kind !== "failed" || probe.code !== r.code) {
        return { kind: "client-cert", reason: "origin demands a client certificate (the handshake fails without one and changes with one)" };
      }
    }
    return r;
  }

  private sessionKey(t: OriginTarget): string {
    return `${t.host}\u0000${t.port}\u0000${t.servername ?? ""}\u0000${t.alpn.join(",")}`;
  }

  private attempt(target: OriginTarget, context: SecureContext, probe = false): Promise<OriginResult> {
    return new Promise((resolve) => {
      const key = this.sessionKey(target);
      const stored = probe ? undefined : this.sessions.get(key);
      let identityError: Error | undefined;
      const socket = tlsConnect({
        socket: target.socket,
        host: target.host,
        port: target.port,
        ...(target.socket === undefined && this.destinations !== undefined ? { lookup: this.destinations.lookup } : {}),
        servername: target.servername,
        ALPNProtocols: target.alpn.length > 0 ? [...target.alpn] : undefined,
        secureContext: context,
        rejectUnauthorized: false,
        session: probe ? undefined : stored?.session,
        checkServerIdentity: (host, cert) => {
          const err = checkServerIdentity(host, cert);
          identityError = err;
          return err;
        },
      });
      let settled = false;
      const done = (r: OriginResult): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.off("error", onError);
        resolve(r);
      };
      const timer = setTimeout(() => {
        socket.destroy();
        done({ kind: "failed", code: "ETIMEDOUT", reason: `origin tls handshake timed out after ${this.timeoutMs} ms` });
      }, this.timeoutMs);
      const onError = (err: NodeJS.ErrnoException): void => {
        socket.destroy();
        const code = err.code ?? "ERR";
        if (CLIENT_CERT_ALERTS.has(code) && (probe || code === "ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED")) {
          done({ kind: "client-cert", reason: `origin demands a client certificate (${code})` });
        } else {
          done({ kind: "failed", code, reason: `origin ${describeError(err)}` });
        }
      };
      socket.on("error", onError);
      // A listener for the socket's whole life: an error between this promise resolving and
      // the caller attaching its own handlers must not become an uncaught exception.
      socket.on("error", () => {});
      let pendingSession: Buffer | undefined;
      let peer: X509Certificate | undefined;
      if (!probe) {
        // TLS 1.2 may deliver the session before the handshake (and its verification) ends.
        socket.on("session", (s: Buffer) => {
          if (socket.authorized && peer !== undefined) this.storeSession(key, s, peer);
          else pendingSession = s;
        });
      }
      socket.once("secureConnect", () => {
        const resumed = socket.isSessionReused();
        // A resumed handshake sends no certificate: the session's own (verified when it was made) stands.
        peer = socket.getPeerX509Certificate() ?? (resumed ? stored?.cert : undefined);
        if (socket.authorized && pendingSession !== undefined && peer !== undefined) this.storeSession(key, pendingSession, peer);
        if (!socket.authorized) {
          const code = identityError !== undefined ? "HOSTNAME_MISMATCH" : String(socket.authorizationError ?? "UNVERIFIED");
          const reason = identityError?.message ?? VERIFY_TEXT[code] ?? code.toLowerCase().replace(/_/g, " ");
          socket.destroy();
          this.sessions.delete(key);
          done({ kind: "unverified", code, reason: `origin certificate did not verify: ${reason} (${code})` });
          return;
        }
        const cert = peer;
        if (cert === undefined) {
          socket.destroy();
          done({ kind: "failed", code: "NO_CERT", reason: "origin sent no certificate" });
          return;
        }
        done({ kind: "ok", socket, cert, alpn: socket.alpnProtocol ?? false, resumed });
      });
    });
  }

  private storeSession(key: string, session: Buffer, cert: X509Certificate): void {
    this.sessions.delete(key);
    if (this.sessions.size >= this.maxSessions) this.sessions.delete(this.sessions.keys().next().value as string);
    this.sessions.set(key, { session, cert });
  }
}

/** A short description of a socket error: `connection refused (ECONNREFUSED)`. */
export function describeError(err: NodeJS.ErrnoException): string {
  const code = err.code ?? "";
  const words: Record<string, string> = {
    ECONNREFUSED: "refused the connection",
    ECONNRESET: "reset the connection",
    ETIMEDOUT: "timed out",
    ENOTFOUND: "host name not found",
    EAI_AGAIN: "host name lookup failed",
    EHOSTUNREACH: "host unreachable",
    ENETUNREACH: "network unreachable",
    EPIPE: "closed the connection",
    // The HTTP/1.1 origin client's (undici's) own.
    UND_ERR_SOCKET: "closed the connection",
    UND_ERR_HEADERS_TIMEOUT: "did not answer in time",
    UND_ERR_BODY_TIMEOUT: "stalled in the middle of its body",
    UND_ERR_RES_CONTENT_LENGTH_MISMATCH: "sent a body whose length is not its Content-Length",
  };
  // The destination check's message already says what was refused and how to allow it.
  if (code === "EKMIDESTINATION") return err.message;
  const w = words[code];
  if (w !== undefined) return `${w} (${code})`;
  const first = (err.message || "").split("\n")[0]!;
  // OpenSSL's "<hex>:error:<hex>:SSL routines:<function>:<reason>:<file>:<line>:..." → "<reason>".
  const ssl = /SSL routines:[^:]*:([^:]+)/.exec(first);
  const msg = (ssl !== null ? ssl[1]! : first).slice(0, 200);
  return code !== "" ? `${msg} (${code})` : msg;
}
