/**
 * The ICAP wire format (RFC 3507): service URLs, request heads with their encapsulated HTTP
 * headers, chunked body framing (with the preview's `ieof`), and an incremental reader of
 * response heads (folded header lines included: c-icap folds `X-Violations-Found`).
 *
 * Nothing here touches a socket; ./connection.ts and ./transaction.ts do.
 */
import { InvalidArgument } from "../../common/errors.js";

/** The default ICAP port (RFC 3507 4.2). */
export const ICAP_DEFAULT_PORT = 1344;

/** Largest response head accepted from a service; a longer one is a broken or hostile peer. */
export const MAX_HEAD_BYTES = 64 * 1024;

/** A parsed `icap://host[:port]/service[?query]`. */
export interface IcapUrl {
  /** Host name or address (IPv6 without brackets). */
  readonly host: string;
  /** Port; 1344 when the URL names none. */
  readonly port: number;
  /** The URL as sent on the request line. */
  readonly href: string;
  /** `host:port`, as the Host header carries it. */
  readonly authority: string;
}

/** Parses an ICAP service URL; throws InvalidArgument naming `field`. */
export function parseIcapUrl(text: unknown, field: string): IcapUrl {
  if (typeof text !== "string" || !text.startsWith("icap://")) {
    throw new InvalidArgument(`${field}: must be an icap:// url, e.g. "icap://127.0.0.1:1344/virus_scan"`);
  }
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new InvalidArgument(`${field}: "${text}" does not parse as a url`);
  }
  if (u.hostname === "" || u.pathname === "" || u.pathname === "/") {
    throw new InvalidArgument(`${field}: "${text}" names no service; add its path, e.g. icap://host:1344/virus_scan`);
  }
  if (u.username !== "" || u.password !== "" || u.hash !== "") throw new InvalidArgument(`${field}: "${text}" must not carry credentials or a fragment`);
  const host = u.hostname.replace(/^\[|\]$/g, "");
  const port = u.port === "" ? ICAP_DEFAULT_PORT : Number(u.port);
  const authority = `${u.hostname}:${port}`;
  return { host, port, authority, href: `icap://${authority}${u.pathname}${u.search}` };
}

/** Header pairs of an encapsulated HTTP message. */
export type HeaderPairs = readonly (readonly [string, string])[];

/**
 * Headers that are not sent to the service: credentials and session cookies are no business
 * of a scanner, and an ICAP server's log is one more place they would end up in.
 */
const WITHHELD = new Set(["authorization", "proxy-authorization", "cookie", "set-cookie"]);

function headerLines(headers: HeaderPairs): string {
  let out = "";
  for (const [name, value] of headers) {
    if (name.startsWith(":") || WITHHELD.has(name.toLowerCase())) continue;
    // Node refuses CR and LF in header values already; a stray one here must not split the head.
    out += `${name}: ${value.replace(/[\r\n]/g, " ")}\r\n`;
  }
  return out;
}

/** The encapsulated HTTP request head: `METHOD path HTTP/1.1`, headers, blank line. */
export function formatHttpRequestHead(method: string, path: string, headers: HeaderPairs): Buffer {
  return Buffer.from(`${method} ${path} HTTP/1.1\r\n${headerLines(headers)}\r\n`, "latin1");
}

/** The encapsulated HTTP response head: `HTTP/1.1 status reason`, headers, blank line. */
export function formatHttpResponseHead(status: number, reason: string, headers: HeaderPairs): Buffer {
  return Buffer.from(`HTTP/1.1 ${status} ${reason.replace(/[\r\n]/g, " ")}\r\n${headerLines(headers)}\r\n`, "latin1");
}

/** What an ICAP request carries besides its body. */
export interface IcapRequestHead {
  readonly method: "REQMOD" | "RESPMOD" | "OPTIONS";
  readonly url: IcapUrl;
  /** The encapsulated HTTP request head (REQMOD, RESPMOD). */
  readonly reqHdr?: Buffer;
  /** The encapsulated HTTP response head (RESPMOD). */
  readonly resHdr?: Buffer;
  /** Whether a body follows (`req-body`/`res-body`), else `null-body`. */
  readonly body: boolean;
  /** Preview size announced, when a preview is sent. */
  readonly preview?: number;
}

/** Formats an ICAP request head and its encapsulated HTTP heads (the body chunks follow). */
export function formatIcapRequest(r: IcapRequestHead): Buffer {
  const lines = [`${r.method} ${r.url.href} ICAP/1.0`, `Host: ${r.url.authority}`];
  if (r.method === "OPTIONS") {
    lines.push("Encapsulated: null-body=0", "", "");
    return Buffer.from(lines.join("\r\n"), "latin1");
  }
  lines.push("Allow: 204");
  if (r.preview !== undefined) lines.push(`Preview: ${r.preview}`);
  const parts: string[] = [];
  let offset = 0;
  if (r.reqHdr !== undefined) {
    parts.push(`req-hdr=${offset}`);
    offset += r.reqHdr.length;
  }
  if (r.resHdr !== undefined) {
    parts.push(`res-hdr=${offset}`);
    offset += r.resHdr.length;
  }
  const bodyName = r.method === "REQMOD" ? "req-body" : "res-body";
  parts.push(r.body ? `${bodyName}=${offset}` : `null-body=${offset}`);
  lines.push(`Encapsulated: ${parts.join(", ")}`, "", "");
  const head = Buffer.from(lines.join("\r\n"), "latin1");
  return Buffer.concat([head, ...(r.reqHdr !== undefined ? [r.reqHdr] : []), ...(r.resHdr !== undefined ? [r.resHdr] : [])]);
}

/** The chunk-size line of one body chunk. */
export function chunkHeader(length: number): Buffer {
  return Buffer.from(`${length.toString(16)}\r\n`, "latin1");
}

/** What ends each chunk's data. */
export const CRLF = Buffer.from("\r\n", "latin1");
/** The last chunk of a body. */
export const LAST_CHUNK = Buffer.from("0\r\n\r\n", "latin1");
/** The last chunk of a preview that holds the whole body (RFC 3507 4.5). */
export const LAST_CHUNK_IEOF = Buffer.from("0; ieof\r\n\r\n", "latin1");

/** A parsed ICAP response head. */
export interface IcapResponse {
  /** ICAP status (100, 200, 204, 4xx, 5xx). */
  readonly status: number;
  /** Reason phrase. */
  readonly reason: string;
  /** Headers by lowercase name; repeated ones joined with ", ". */
  readonly headers: ReadonlyMap<string, string>;
}

/** Parses an ICAP response head (without the blank line); throws on a malformed one. */
export function parseIcapResponse(text: string): IcapResponse {
  const lines = text.split("\r\n");
  const m = /^ICAP\/1\.0 (\d{3})(?: (.*))?$/.exec(lines[0] ?? "");
  if (m === null) throw new Error(`not an ICAP response: ${JSON.stringify((lines[0] ?? "").slice(0, 80))}`);
  const headers = new Map<string, string>();
  let last: string | undefined;
  for (const line of lines.slice(1)) {
    if (line === "") continue;
    if ((line.startsWith(" ") || line.startsWith("\t")) && last !== undefined) {
      // A folded continuation line (obs-fold): part of the previous header's value.
      headers.set(last, `${headers.get(last)!} ${line.trim()}`);
      continue;
    }
    const colon = line.indexOf(":");
    if (colon <= 0) throw new Error(`malformed ICAP header line: ${JSON.stringify(line.slice(0, 80))}`);
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim();
    const prev = headers.get(name);
    headers.set(name, prev === undefined ? value : `${prev}, ${value}`);
    last = name;
  }
  return { status: Number(m[1]), reason: m[2] ?? "", headers };
}

/**
 * Reads response heads off a byte stream: {@link HeadReader.push} the bytes as they come;
 * it returns a head once one is complete (the bytes after it stay buffered).
 */
export class HeadReader {
  private buf: Buffer = Buffer.alloc(0);

  /** Adds bytes; returns a complete head, or undefined when more bytes are needed. Throws on a malformed or oversized head. */
  push(data?: Buffer): IcapResponse | undefined {
    if (data !== undefined && data.length > 0) this.buf = this.buf.length === 0 ? data : Buffer.concat([this.buf, data]);
    const end = this.buf.indexOf("\r\n\r\n");
    // A head that came whole in one read is held to the same bound as one still arriving.
    if (end > MAX_HEAD_BYTES || (end < 0 && this.buf.length > MAX_HEAD_BYTES)) throw new Error(`ICAP response head larger than ${MAX_HEAD_BYTES} bytes`);
    if (end < 0) return undefined;
    const text = this.buf.subarray(0, end).toString("latin1");
    this.buf = this.buf.subarray(end + 4);
    return parseIcapResponse(text);
  }

  /** Bytes received after the last head (an encapsulated message of a 200). */
  get pending(): number {
    return this.buf.length;
  }

  /** Drops buffered bytes. */
  reset(): void {
    this.buf = Buffer.alloc(0);
  }
}

/** What a service said about a message it did not pass unchanged. */
export interface IcapFinding {
  /** The threat or violation name, when the service named one. */
  readonly threat?: string;
  /** `infection`, `violation`, or `modified` (a 200 naming neither). */
  readonly kind: "infection" | "violation" | "modified";
}

/**
 * The finding of a 200 answer, from `X-Infection-Found` (`Type=0; Resolution=2; Threat=NAME;`)
 * or `X-Violations-Found` (a count, then per violation: filename, threat, resolution, id).
 */
export function findingOf(r: IcapResponse): IcapFinding {
  const infection = r.headers.get("x-infection-found");
  if (infection !== undefined) {
    const threat = /Threat=([^;]*)/i.exec(infection)?.[1]?.trim();
    return threat !== undefined && threat !== "" ? { kind: "infection", threat } : { kind: "infection" };
  }
  const violations = r.headers.get("x-violations-found");
  if (violations !== undefined) {
    // Folded into "1 - NAME 0 0": count, then filename, threat name, resolution, threat id.
    const words = violations.split(/\s+/);
    const threat = words.length >= 3 ? words[2] : undefined;
    return threat !== undefined && threat !== "" ? { kind: "violation", threat } : { kind: "violation" };
  }
  return { kind: "modified" };
}
