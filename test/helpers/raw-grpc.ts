/**
 * Raw gRPC over HTTP/2, for sending what no well-behaved client sends (bad length prefixes,
 * truncated frames, garbage protobuf) and reading the status the server answers with.
 */
import http2 from "node:http2";
import { connect as netConnect } from "node:net";

/** What the server answered. */
export interface RawGrpcResult {
  /** HTTP status. */
  httpStatus: number;
  /** grpc-status (from headers or trailers), as a number; undefined if absent. */
  grpcStatus: number | undefined;
  /** grpc-message, decoded. */
  grpcMessage: string | undefined;
  /** Response body bytes. */
  body: Buffer;
}

/** An h2c session to a Unix socket. */
export function connectUnixH2(path: string): http2.ClientHttp2Session {
  return http2.connect("http://localhost", { createConnection: () => netConnect(path) });
}

/** Sends one gRPC request whose body is exactly `body`, on `session`. */
export function rawGrpcCall(session: http2.ClientHttp2Session, path: string, body: Uint8Array, headers: Record<string, string> = {}): Promise<RawGrpcResult> {
  return new Promise((resolve, reject) => {
    const req = session.request({
      ":method": "POST",
      ":path": path,
      "content-type": "application/grpc",
      te: "trailers",
      ...headers,
    });
    let httpStatus = 0;
    let grpcStatus: number | undefined;
    let grpcMessage: string | undefined;
    const chunks: Buffer[] = [];
    const take = (h: http2.IncomingHttpHeaders) => {
      if (h["grpc-status"] !== undefined) grpcStatus = Number(h["grpc-status"]);
      if (h["grpc-message"] !== undefined) grpcMessage = decodeURIComponent(String(h["grpc-message"]));
    };
    req.on("response", (h) => {
      httpStatus = Number(h[":status"]);
      take(h);
    });
    req.on("trailers", take);
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => resolve({ httpStatus, grpcStatus, grpcMessage, body: Buffer.concat(chunks) }));
    req.on("error", reject);
    req.end(Buffer.from(body));
  });
}

/** A gRPC frame: flag byte, 4-byte big-endian length (`declaredLength`, default the real one), payload. */
export function grpcFrame(payload: Uint8Array, declaredLength = payload.length): Buffer {
  const b = Buffer.alloc(5 + payload.length);
  b.writeUInt8(0, 0);
  b.writeUInt32BE(declaredLength, 1);
  Buffer.from(payload).copy(b, 5);
  return b;
}
