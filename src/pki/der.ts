/**
 * A tiny DER encoder and reader: just the universal types that X.509 certificates use.
 *
 * Why hand-written: the agent's leaf builder runs once per new origin on the proxy's hot path,
 * and building pkijs/asn1js object trees costs ~0.9 ms per certificate, while the ECDSA
 * signature costs ~25 us. Encoding bytes directly removes that overhead. Everything here is
 * strict DER (definite, minimal lengths; single-byte tags), which is all X.509 needs. Kept
 * hand-written on that measurement (#12); the leaves it builds are checked against pkijs and
 * `openssl x509` in the tests.
 */

/** Universal and context tag bytes used by X.509. */
export const Tag = {
  boolean: 0x01,
  integer: 0x02,
  bitString: 0x03,
  octetString: 0x04,
  null: 0x05,
  oid: 0x06,
  utf8String: 0x0c,
  printableString: 0x13,
  teletexString: 0x14,
  ia5String: 0x16,
  utcTime: 0x17,
  generalizedTime: 0x18,
  universalString: 0x1c,
  bmpString: 0x1e,
  sequence: 0x30,
  set: 0x31,
} as const;

/** Concatenates byte arrays into one new array. */
export function concatBytes(parts: readonly Uint8Array[]): Uint8Array {
  let total = 0;
  for (const p of parts) total += p.length;
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The DER length octets for a content of `length` bytes (short form below 128, else long form). */
export function encodeLength(length: number): Uint8Array {
  if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`der: bad length ${length}`);
  if (length < 0x80) return Uint8Array.of(length);
  const bytes: number[] = [];
  for (let n = length; n > 0; n = Math.floor(n / 256)) bytes.unshift(n & 0xff);
  return Uint8Array.of(0x80 | bytes.length, ...bytes);
}

/** A complete TLV: `tag`, the DER length, then the concatenated `contents`. */
export function tlv(tag: number, ...contents: Uint8Array[]): Uint8Array {
  let length = 0;
  for (const c of contents) length += c.length;
  const len = encodeLength(length);
  const out = new Uint8Array(1 + len.length + length);
  out[0] = tag;
  out.set(len, 1);
  let at = 1 + len.length;
  for (const c of contents) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** SEQUENCE of already-encoded elements. */
export function sequence(...elements: Uint8Array[]): Uint8Array {
  return tlv(Tag.sequence, ...elements);
}

/** SET of already-encoded elements (callers pass one element, or elements already in DER order). */
export function set(...elements: Uint8Array[]): Uint8Array {
  return tlv(Tag.set, ...elements);
}

/** INTEGER holding the unsigned big-endian magnitude `bytes` (leading zeros stripped, a 0x00 added when the top bit is set). */
export function unsignedInteger(bytes: Uint8Array): Uint8Array {
  let start = 0;
  while (start < bytes.length - 1 && bytes[start] === 0) start++;
  const body = bytes.subarray(start);
  if (body.length === 0) return Uint8Array.of(Tag.integer, 1, 0);
  return (body[0]! & 0x80) !== 0 ? tlv(Tag.integer, Uint8Array.of(0), body) : tlv(Tag.integer, body);
}

/** INTEGER for a small non-negative JS number. */
export function smallInteger(value: number): Uint8Array {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`der: bad integer ${value}`);
  const bytes: number[] = [];
  for (let n = value; n > 0; n = Math.floor(n / 256)) bytes.unshift(n & 0xff);
  return unsignedInteger(Uint8Array.from(bytes.length ? bytes : [0]));
}

/** BOOLEAN (DER: TRUE is 0xff). */
export function boolean(value: boolean): Uint8Array {
  return Uint8Array.of(Tag.boolean, 1, value ? 0xff : 0x00);
}

/** NULL. */
export const NULL: Uint8Array = Uint8Array.of(Tag.null, 0);

/** The content octets of an OBJECT IDENTIFIER in dotted form (base-128 arcs). */
export function oidContent(dotted: string): Uint8Array {
  const arcs = dotted.split(".").map((a) => {
    if (!/^\d+$/.test(a)) throw new RangeError(`der: bad oid ${dotted}`);
    return BigInt(a);
  });
  if (arcs.length < 2 || arcs[0]! > 2n || (arcs[0]! < 2n && arcs[1]! > 39n)) throw new RangeError(`der: bad oid ${dotted}`);
  const out: number[] = [];
  const push = (arc: bigint): void => {
    const chunk: number[] = [Number(arc & 0x7fn)];
    for (let n = arc >> 7n; n > 0n; n >>= 7n) chunk.unshift(Number(n & 0x7fn) | 0x80);
    out.push(...chunk);
  };
  push(arcs[0]! * 40n + arcs[1]!);
  for (const arc of arcs.slice(2)) push(arc);
  return Uint8Array.from(out);
}

/** OBJECT IDENTIFIER TLV in dotted form. */
export function oid(dotted: string): Uint8Array {
  return tlv(Tag.oid, oidContent(dotted));
}

/** Decodes OBJECT IDENTIFIER content octets to dotted form; throws DerError when malformed. */
export function decodeOid(content: Uint8Array): string {
  if (content.length === 0) throw new DerError("empty oid");
  const arcs: bigint[] = [];
  let value = 0n;
  let fresh = true;
  for (const byte of content) {
    if (fresh && byte === 0x80) throw new DerError("non-minimal oid arc");
    value = (value << 7n) | BigInt(byte & 0x7f);
    fresh = (byte & 0x80) === 0;
    if (fresh) {
      arcs.push(value);
      value = 0n;
    }
  }
  if (!fresh) throw new DerError("truncated oid");
  const first = arcs[0]!;
  const head = first < 40n ? [0n, first] : first < 80n ? [1n, first - 40n] : [2n, first - 80n];
  return [...head, ...arcs.slice(1)].join(".");
}

/** BIT STRING holding whole bytes (`unusedBits` in the last byte, default 0). */
export function bitString(bytes: Uint8Array, unusedBits = 0): Uint8Array {
  return tlv(Tag.bitString, Uint8Array.of(unusedBits), bytes);
}

/** OCTET STRING. */
export function octetString(bytes: Uint8Array): Uint8Array {
  return tlv(Tag.octetString, bytes);
}

const textEncoder = new TextEncoder();

/** UTF8String. */
export function utf8String(text: string): Uint8Array {
  return tlv(Tag.utf8String, textEncoder.encode(text));
}

/** PrintableString (the caller checks the character set). */
export function printableString(text: string): Uint8Array {
  return tlv(Tag.printableString, textEncoder.encode(text));
}

/** IA5String (the caller checks that `text` is ASCII). */
export function ia5String(text: string): Uint8Array {
  return tlv(Tag.ia5String, textEncoder.encode(text));
}

/** Context-specific constructed tag `[n]` (EXPLICIT tagging, or IMPLICIT of a constructed type). */
export function contextConstructed(n: number, ...contents: Uint8Array[]): Uint8Array {
  return tlv(0xa0 | n, ...contents);
}

/** Context-specific primitive tag `[n] IMPLICIT` around raw content octets. */
export function contextPrimitive(n: number, content: Uint8Array): Uint8Array {
  return tlv(0x80 | n, content);
}

const two = (n: number): string => (n < 10 ? `0${n}` : `${n}`);

/**
 * An X.509 Time for `date`, truncated to whole seconds: UTCTime for years 1950..2049 and
 * GeneralizedTime otherwise, as RFC 5280 4.1.2.5 requires.
 */
export function x509Time(date: Date): Uint8Array {
  const y = date.getUTCFullYear();
  if (!Number.isFinite(date.getTime()) || y < 0 || y > 9999) throw new RangeError("der: bad date");
  const rest = `${two(date.getUTCMonth() + 1)}${two(date.getUTCDate())}${two(date.getUTCHours())}${two(date.getUTCMinutes())}${two(date.getUTCSeconds())}Z`;
  if (y >= 1950 && y < 2050) return tlv(Tag.utcTime, textEncoder.encode(`${two(y % 100)}${rest}`));
  return tlv(Tag.generalizedTime, textEncoder.encode(`${String(y).padStart(4, "0")}${rest}`));
}

/** A reader failure: the bytes are not the DER the caller expected. Callers turn it into a domain error. */
export class DerError extends Error {
  constructor(message: string) {
    super(`der: ${message}`);
    this.name = "DerError";
  }
}

/** One decoded TLV header: where its content starts and ends inside the buffer. */
export interface Tlv {
  /** The tag byte (single-byte tags only). */
  readonly tag: number;
  /** Offset of the tag byte. */
  readonly start: number;
  /** Offset of the first content byte. */
  readonly contentStart: number;
  /** Offset just past the last content byte. */
  readonly end: number;
}

/** Reads the TLV at `offset`, checking that it fits before `limit`; strict DER lengths. */
export function readTlv(buf: Uint8Array, offset = 0, limit = buf.length): Tlv {
  if (offset + 2 > limit) throw new DerError("truncated header");
  const tag = buf[offset]!;
  if ((tag & 0x1f) === 0x1f) throw new DerError("multi-byte tags are not supported");
  let length = buf[offset + 1]!;
  let contentStart = offset + 2;
  if (length & 0x80) {
    const n = length & 0x7f;
    if (n === 0) throw new DerError("indefinite length");
    if (n > 4) throw new DerError("length too large");
    if (contentStart + n > limit) throw new DerError("truncated length");
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + buf[contentStart + i]!;
    if (length < 0x80 || buf[contentStart] === 0) throw new DerError("non-minimal length");
    contentStart += n;
  }
  const end = contentStart + length;
  if (end > limit) throw new DerError("truncated content");
  return { tag, start: offset, contentStart, end };
}

/** Reads a TLV at `offset` and checks its tag. */
export function expectTlv(buf: Uint8Array, offset: number, tag: number, limit = buf.length): Tlv {
  const t = readTlv(buf, offset, limit);
  if (t.tag !== tag) throw new DerError(`expected tag 0x${tag.toString(16)}, got 0x${t.tag.toString(16)}`);
  return t;
}

/** The child TLVs of a constructed TLV, in order; fails when they do not fill it exactly. */
export function children(buf: Uint8Array, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  for (let at = parent.contentStart; at < parent.end; ) {
    const child = readTlv(buf, at, parent.end);
    out.push(child);
    at = child.end;
  }
  return out;
}

/** The whole TLV's bytes (a view, not a copy). */
export function tlvBytes(buf: Uint8Array, t: Tlv): Uint8Array {
  return buf.subarray(t.start, t.end);
}

/** The TLV's content bytes (a view, not a copy). */
export function contentBytes(buf: Uint8Array, t: Tlv): Uint8Array {
  return buf.subarray(t.contentStart, t.end);
}

/** Lowercase hex of `bytes`. */
export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("hex");
}

/** Bytes of a hex string (callers pass well-formed hex). */
export function fromHex(hex: string): Uint8Array {
  return new Uint8Array(Buffer.from(hex, "hex"));
}

/** True when two byte arrays hold the same bytes. */
export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(b);
}
