/**
 * Reading a TLS ClientHello from the bytes a client sent, without consuming them: the proxy
 * peeks the server name (SNI) and the ALPN offers, connects to the origin with the same
 * offers, and only then hands the untouched bytes to its own TLS layer.
 *
 * The ClientHello may span several TLS records (post-quantum key shares make it ~1.8 KiB, a
 * client may fragment it anyway); {@link parseClientHello} reassembles the handshake message
 * across records and says when it needs more bytes.
 *
 * Why hand-written (a missing API, #12): node:tls reads the ClientHello only inside a TLS
 * handshake it is already serving, and its hooks there (`SNICallback`, `ALPNCallback`) must
 * answer before the proxy could ask the origin, which it has to do first (to copy the origin's
 * protocol choice and refuse or bypass before any leaf is shown); no well-kept npm package
 * parses a ClientHello from bytes. This reads only the record and handshake framing, SNI and
 * ALPN, bounded by MAX_CLIENT_HELLO_BYTES.
 */

/** Largest ClientHello the proxy waits for (records plus headers); real ones are < 8 KiB. */
export const MAX_CLIENT_HELLO_BYTES = 64 * 1024;

/** What a ClientHello offers. */
export interface ClientHello {
  /** The server name (SNI host_name), lowercase; undefined when the client sent none. */
  readonly serverName: string | undefined;
  /** ALPN protocol names in the client's order; empty when the extension is absent. */
  readonly alpn: readonly string[];
  /** The legacy record/hello version (0x0303 for TLS 1.2 and 1.3). */
  readonly legacyVersion: number;
}

/** Result of {@link parseClientHello}. */
export type ClientHelloResult =
  | { readonly kind: "ok"; readonly hello: ClientHello }
  /** More bytes are needed; call again with the longer buffer. */
  | { readonly kind: "incomplete" }
  /** The bytes are not a TLS handshake at all (plain HTTP, SSH, garbage). */
  | { readonly kind: "not-tls" }
  /** It starts like TLS but is malformed or too large. */
  | { readonly kind: "invalid"; readonly reason: string };

const RECORD_HANDSHAKE = 0x16;
const HANDSHAKE_CLIENT_HELLO = 0x01;
const EXT_SERVER_NAME = 0x0000;
const EXT_ALPN = 0x0010;

const INCOMPLETE: ClientHelloResult = { kind: "incomplete" };
const NOT_TLS: ClientHelloResult = { kind: "not-tls" };

function invalid(reason: string): ClientHelloResult {
  return { kind: "invalid", reason };
}

/**
 * Parses the ClientHello at the start of `buf` (the first bytes a client sent). Never throws.
 * Does not modify `buf`.
 */
export function parseClientHello(buf: Uint8Array): ClientHelloResult {
  if (buf.length === 0) return INCOMPLETE;
  if (buf[0] !== RECORD_HANDSHAKE) return NOT_TLS;
  if (buf.length >= 2 && buf[1] !== 0x03) return NOT_TLS; // record major version is always 3
  // Judge the handshake header as soon as it arrives, before the record is complete: a
  // client that claims a huge or non-ClientHello message is refused without waiting for it.
  if (buf.length >= 9 && ((buf[3]! << 8) | buf[4]!) >= 4) {
    if (buf[5] !== HANDSHAKE_CLIENT_HELLO) return invalid(`first handshake message is type ${buf[5]}, not clienthello`);
    if (4 + ((buf[6]! << 16) | (buf[7]! << 8) | buf[8]!) > MAX_CLIENT_HELLO_BYTES) return invalid("clienthello too large");
  }
  // Reassemble the handshake fragment from consecutive handshake records.
  let offset = 0;
  let fragments: Uint8Array[] = [];
  let have = 0;
  let needed = -1; // total handshake message length incl. its 4-byte header, once known
  while (needed < 0 || have < needed) {
    if (offset + 5 > buf.length) return buf.length > MAX_CLIENT_HELLO_BYTES ? invalid("clienthello too large") : INCOMPLETE;
    if (buf[offset] !== RECORD_HANDSHAKE) return invalid("clienthello interrupted by a non-handshake record");
    const recLen = (buf[offset + 3]! << 8) | buf[offset + 4]!;
    if (recLen === 0 || recLen > 16384 + 2048) return invalid(`bad tls record length ${recLen}`);
    if (offset + 5 + recLen > buf.length) {
      return offset + 5 + recLen > MAX_CLIENT_HELLO_BYTES ? invalid("clienthello too large") : INCOMPLETE;
    }
    fragments.push(buf.subarray(offset + 5, offset + 5 + recLen));
    have += recLen;
    offset += 5 + recLen;
    if (needed < 0 && have >= 4) {
      const head = fragments.length === 1 ? fragments[0]! : concat(fragments, have);
      if (head[0] !== HANDSHAKE_CLIENT_HELLO) return invalid(`first handshake message is type ${head[0]}, not clienthello`);
      needed = 4 + ((head[1]! << 16) | (head[2]! << 8) | head[3]!);
      if (needed > MAX_CLIENT_HELLO_BYTES) return invalid("clienthello too large");
    }
  }
  const msg = fragments.length === 1 ? fragments[0]! : concat(fragments, have);
  fragments = [];
  return parseHelloBody(msg.subarray(4, needed));
}

function concat(parts: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function parseHelloBody(b: Uint8Array): ClientHelloResult {
  let p = 0;
  const need = (n: number): boolean => p + n <= b.length;
  if (!need(2 + 32 + 1)) return invalid("clienthello truncated");
  const legacyVersion = (b[0]! << 8) | b[1]!;
  p = 2 + 32;
  const sidLen = b[p]!;
  p += 1;
  if (sidLen > 32 || !need(sidLen + 2)) return invalid("clienthello: bad session id");
  p += sidLen;
  const csLen = (b[p]! << 8) | b[p + 1]!;
  p += 2;
  if (csLen < 2 || csLen % 2 !== 0 || !need(csLen + 1)) return invalid("clienthello: bad cipher suites");
  p += csLen;
  const cmLen = b[p]!;
  p += 1;
  if (cmLen < 1 || !need(cmLen)) return invalid("clienthello: bad compression methods");
  p += cmLen;
  let serverName: string | undefined;
  let alpn: string[] = [];
  if (p === b.length) return { kind: "ok", hello: { serverName, alpn, legacyVersion } }; // no extensions (SSL 3 style)
  if (!need(2)) return invalid("clienthello: bad extensions length");
  const extEnd = p + 2 + ((b[p]! << 8) | b[p + 1]!);
  p += 2;
  if (extEnd > b.length) return invalid("clienthello: extensions overrun the message");
  while (p < extEnd) {
    if (p + 4 > extEnd) return invalid("clienthello: truncated extension header");
    const type = (b[p]! << 8) | b[p + 1]!;
    const len = (b[p + 2]! << 8) | b[p + 3]!;
    p += 4;
    if (p + len > extEnd) return invalid("clienthello: extension overruns the list");
    if (type === EXT_SERVER_NAME) {
      const r = parseServerName(b.subarray(p, p + len));
      if (typeof r !== "string" && r !== undefined) return r;
      serverName = r;
    } else if (type === EXT_ALPN) {
      const r = parseAlpn(b.subarray(p, p + len));
      if (!Array.isArray(r)) return r as ClientHelloResult;
      alpn = r;
    }
    p += len;
  }
  return { kind: "ok", hello: { serverName, alpn, legacyVersion } };
}

function parseServerName(e: Uint8Array): string | undefined | ClientHelloResult {
  if (e.length < 2) return invalid("clienthello: bad server_name extension");
  const listEnd = 2 + ((e[0]! << 8) | e[1]!);
  if (listEnd > e.length) return invalid("clienthello: bad server_name list");
  let p = 2;
  while (p + 3 <= listEnd) {
    const nameType = e[p]!;
    const len = (e[p + 1]! << 8) | e[p + 2]!;
    p += 3;
    if (p + len > listEnd) return invalid("clienthello: bad server_name entry");
    if (nameType === 0) {
      const name = Buffer.from(e.buffer, e.byteOffset + p, len).toString("latin1");
      // RFC 6066: host_name is an ASCII DNS name without a trailing dot; anything else is refused.
      if (len === 0 || len > 253 || !/^[A-Za-z0-9._-]+$/.test(name)) return invalid("clienthello: server name is not a dns name");
      return name.toLowerCase();
    }
    p += len;
  }
  return undefined;
}

function parseAlpn(e: Uint8Array): string[] | ClientHelloResult {
  if (e.length < 2) return invalid("clienthello: bad alpn extension");
  const listEnd = 2 + ((e[0]! << 8) | e[1]!);
  if (listEnd > e.length) return invalid("clienthello: bad alpn list");
  const out: string[] = [];
  let p = 2;
  while (p < listEnd) {
    const len = e[p]!;
    p += 1;
    if (len === 0 || p + len > listEnd) return invalid("clienthello: bad alpn entry");
    out.push(Buffer.from(e.buffer, e.byteOffset + p, len).toString("latin1"));
    p += len;
  }
  return out;
}
