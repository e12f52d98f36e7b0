/**
 * The one place that relies on a private field of node:tls: a `TLSSocket` made with
 * `new TLSSocket(socket, { isServer: true })` (the proxy terminates a client's TLS on a socket it
 * already holds, not one a `tls.Server` accepted) keeps `secureConnecting` true after its
 * handshake, because only `tls.Server` clears it before 'secureConnection'. node:http2's server
 * waits for a 'secureConnect' that a server-side socket never emits while the field is true, so
 * an emitted connection would hang. test/unit/proxy/tls-server-socket.test.ts fails when Node
 * changes this (then this module can go).
 */
import type { TLSSocket } from "node:tls";

/** Marks a server-side TLSSocket's handshake done, as `tls.Server` does; call it on 'secure'. */
export function markHandshakeDone(tls: TLSSocket): void {
  (tls as TLSSocket & { secureConnecting: boolean }).secureConnecting = false;
}
