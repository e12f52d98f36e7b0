/**
 * The code and message of a call connect-node refused before any interceptor ran (a message
 * over the size limit, a bad envelope, a wrong content type): connect offers no hook for those,
 * so the only place that says how such a call ended is the response it wrote. The one place
 * that reads a response connect-node wrote, for ./connect-server.ts's call log and metrics.
 *
 * It reads only what the protocols publish (the gRPC status headers, the gRPC-Web trailer
 * frame, the Connect error JSON and the Connect protocol's HTTP-status table), with tables of
 * its own rather than connect's `codeFromString`/`codeFromHttpStatus`, which connect marks
 * private. What it relies on from connect-node itself, and what
 * test/unit/common/connect-refusal.contract.test.ts checks on every upgrade: a gRPC-Web
 * response's last body chunk is its trailer frame, a Connect unary refusal's body is one
 * chunk of error JSON, and the code tables agree with connect's own.
 */
import { Code } from "@connectrpc/connect";
import type { UniversalServerResponse } from "@connectrpc/connect/protocol";

/** How a call ended: its code (0 for OK) and message, if any. */
export interface CallStatus {
  code: number;
  message: string | undefined;
}

/** The gRPC-Web envelope flag of a trailer frame (gRPC-Web protocol). */
const TRAILER_FLAG = 0x80;

/** Connect's snake_case code names (`resource_exhausted`), from the public `Code` enum. */
const CODE_BY_NAME: ReadonlyMap<string, Code> = new Map(
  Object.values(Code)
    .filter((v): v is Code => typeof v === "number")
    .map((c) => [Code[c].replace(/^[A-Z]/, (m) => m.toLowerCase()).replace(/[A-Z]/g, (m) => "_" + m.toLowerCase()), c]),
);

/** The Connect protocol's HTTP status → code table (https://connectrpc.com/docs/protocol/#http-to-error-code). */
const CODE_BY_HTTP_STATUS: ReadonlyMap<number, Code> = new Map([
  [400, Code.Internal],
  [401, Code.Unauthenticated],
  [403, Code.PermissionDenied],
  [404, Code.Unimplemented],
  [429, Code.Unavailable],
  [502, Code.Unavailable],
  [503, Code.Unavailable],
  [504, Code.Unavailable],
]);

/** The code a Connect error names (`"resource_exhausted"`), or undefined. */
export function codeFromConnectName(name: string): Code | undefined {
  return CODE_BY_NAME.get(name);
}

/** The code the Connect protocol gives an HTTP status without an error body. */
export function codeFromHttpStatus(status: number): Code {
  return CODE_BY_HTTP_STATUS.get(status) ?? Code.Unknown;
}

/** `r` with a body that reports each chunk it yields to `onChunk` (the bytes are not copied). */
export function tapBodyChunks(r: UniversalServerResponse, onChunk: (chunk: Uint8Array) => void): UniversalServerResponse {
  const body = r.body;
  if (body === undefined || body instanceof Uint8Array || !(Symbol.asyncIterator in body)) return r;
  async function* tap(): AsyncIterable<Uint8Array> {
    for await (const chunk of body as AsyncIterable<Uint8Array>) {
      onChunk(chunk);
      yield chunk;
    }
  }
  return { ...r, body: tap() };
}

function decodeGrpcMessage(m: string | null | undefined): string | undefined {
  if (m === null || m === undefined) return undefined;
  try {
    return decodeURIComponent(m);
  } catch {
    return m;
  }
}

/**
 * How a response connect-node wrote ended: its gRPC status (headers or trailers), else the
 * code in its body (`lastChunk`, the last body chunk: a gRPC-Web trailer frame or a Connect
 * error JSON), else its HTTP status.
 */
export function responseStatus(uRes: UniversalServerResponse, lastChunk: Uint8Array | undefined): CallStatus {
  const status = uRes.header?.get("grpc-status") ?? uRes.trailer?.get("grpc-status");
  if (status !== null && status !== undefined) {
    return { code: Number(status), message: decodeGrpcMessage(uRes.header?.get("grpc-message") ?? uRes.trailer?.get("grpc-message")) };
  }
  return statusInBody(uRes, lastChunk) ?? { code: uRes.status === 200 ? 0 : codeFromHttpStatus(uRes.status), message: undefined };
}

/**
 * The status a refusal carries in its body rather than its headers: gRPC-Web puts it in a
 * trailer frame (behind HTTP 200), and a Connect unary error is a JSON body whose HTTP status
 * maps to a code only loosely (429 is both resource_exhausted and unavailable).
 */
function statusInBody(uRes: UniversalServerResponse, body: Uint8Array | undefined): CallStatus | undefined {
  if (body === undefined) return undefined;
  const type = uRes.header?.get("content-type") ?? "";
  const bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  if (type.startsWith("application/grpc-web")) return statusInTrailerFrame(bytes);
  if (type.startsWith("application/json") && uRes.status !== 200) return statusInErrorJson(bytes);
  return undefined;
}

/** The grpc-status of the first trailer frame among the envelopes in `bytes`. */
function statusInTrailerFrame(bytes: Buffer): CallStatus | undefined {
  for (let i = 0; i + 5 <= bytes.length; ) {
    const flags = bytes[i]!;
    const len = bytes.readUInt32BE(i + 1);
    if ((flags & TRAILER_FLAG) !== 0) {
      const fields = new Map<string, string>();
      for (const line of bytes.subarray(i + 5, i + 5 + len).toString("utf8").split("\r\n")) {
        const colon = line.indexOf(":");
        if (colon > 0) fields.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
      }
      const status = fields.get("grpc-status");
      if (status === undefined || !/^\d+$/.test(status)) return undefined;
      return { code: Number(status), message: decodeGrpcMessage(fields.get("grpc-message")) };
    }
    i += 5 + len;
  }
  return undefined;
}

/** The code and message of a Connect error JSON (`{"code":"resource_exhausted","message":…}`). */
function statusInErrorJson(bytes: Buffer): CallStatus | undefined {
  try {
    const doc = JSON.parse(bytes.toString("utf8")) as { code?: unknown; message?: unknown };
    const code = typeof doc.code === "string" ? codeFromConnectName(doc.code) : undefined;
    if (code === undefined) return undefined;
    return { code, message: typeof doc.message === "string" ? doc.message : undefined };
  } catch {
    return undefined;
  }
}
