/**
 * A minimal HTTPS client for the load: a TCP connection (directly or as a CONNECT tunnel
 * through a proxy), TLS with a chosen SNI, ALPN and trust anchor, and then either a lean
 * HTTP/1.1 keep-alive exchange (content-length and chunked bodies counted, not kept) or a
 * node:http2 session. Lean on purpose: the load generator shares the CPU with what it measures.
 */
import { connect as h2connect, constants as h2c, type ClientHttp2Session } from "node:http2";
import { connect as netConnect, type Socket } from "node:net";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { nowMs } from "./loop.js";

/** host:port. */
export interface HostPort {
  readonly host: string;
  readonly port: number;
}

/** Where to connect and how. */
export interface Destination {
  /** The proxy to tunnel through; undefined connects directly. */
  readonly proxy?: HostPort;
  /** The origin (the CONNECT target, or the direct address). */
  readonly origin: HostPort;
  /** SNI and Host header. */
  readonly servername: string;
  /** Trust anchor(s), PEM. */
  readonly ca: string | string[];
}

/** Timestamps of one connection, CLOCK_MONOTONIC ms. */
export interface ConnectTimes {
  /** Before the TCP connect. */
  t0: number;
  /** The proxy answered the CONNECT (= t0 + TCP when direct). */
  tTunnel: number;
  /** TLS handshake done. */
  tSecure: number;
}

function connectTcp(hp: HostPort): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = netConnect({ host: hp.host, port: hp.port });
    s.setNoDelay(true);
    s.once("connect", () => {
      s.off("error", reject);
      resolve(s);
    });
    s.once("error", reject);
  });
}

/** Sends CONNECT and waits for the 2xx; resolves with the socket, positioned after the response head. */
function connectTunnel(proxy: HostPort, target: HostPort): Promise<Socket> {
  return connectTcp(proxy).then(
    (s) =>
      new Promise<Socket>((resolve, reject) => {
        let buf: Buffer = Buffer.alloc(0);
        const onData = (d: Buffer) => {
          buf = buf.length === 0 ? d : Buffer.concat([buf, d]);
          const end = buf.indexOf("\r\n\r\n");
          if (end < 0) {
            if (buf.length > 16384) fail(new Error("CONNECT response head too large"));
            return;
          }
          s.off("data", onData);
          s.off("error", fail);
          s.off("close", onClose);
          const head = buf.subarray(0, end).toString("latin1");
          const status = Number(head.split(" ")[1]);
          if (status < 200 || status > 299) {
            s.destroy();
            reject(new Error(`CONNECT ${target.host}:${target.port} answered ${head.split("\r\n")[0]}`));
            return;
          }
          s.pause();
          const rest = buf.subarray(end + 4);
          if (rest.length > 0) s.unshift(rest);
          resolve(s);
        };
        const fail = (err: Error) => {
          s.destroy();
          reject(err);
        };
        const onClose = () => reject(new Error("proxy closed the connection during CONNECT"));
        s.on("data", onData);
        s.once("error", fail);
        s.once("close", onClose);
        s.write(`CONNECT ${target.host}:${target.port} HTTP/1.1\r\nHost: ${target.host}:${target.port}\r\n\r\n`);
      }),
  );
}

/**
 * Opens a TLS connection to `d` (through the proxy when set), offering `alpn`; with `session`
 * (a ticket from an earlier connection's 'session' event) it asks to resume that session.
 */
export async function openTls(d: Destination, alpn: string[], times?: ConnectTimes, session?: Buffer): Promise<TLSSocket> {
  if (times) times.t0 = nowMs();
  const raw = d.proxy ? await connectTunnel(d.proxy, d.origin) : await connectTcp(d.origin);
  if (times) times.tTunnel = nowMs();
  return new Promise<TLSSocket>((resolve, reject) => {
    const t = tlsConnect({ socket: raw, servername: d.servername, ca: d.ca, ALPNProtocols: alpn, ...(session !== undefined ? { session } : {}) });
    t.once("secureConnect", () => {
      if (times) times.tSecure = nowMs();
      t.off("error", reject);
      resolve(t);
    });
    t.once("error", (err) => {
      raw.destroy();
      reject(err);
    });
  });
}

const CRLF2 = Buffer.from("\r\n\r\n");

/**
 * One HTTP/1.1 keep-alive connection, one request at a time. Bodies are counted, not kept;
 * content-length and chunked responses are understood.
 */
export class H1Conn {
  private buf: Buffer = Buffer.alloc(0);
  private waiter: { resolve: (n: number) => void; reject: (e: Error) => void } | undefined;
  private state: "head" | "body" | "chunk-size" | "chunk-data" | "chunk-crlf" | "trailer" = "head";
  private remaining = 0;
  private bodyBytes = 0;
  private closeAfter = false;
  private failed: Error | undefined;

  constructor(
    readonly socket: TLSSocket,
    private readonly host: string,
  ) {
    socket.on("data", (d: Buffer) => this.onData(d));
    const fail = (err: Error) => {
      this.failed ??= err;
      const w = this.waiter;
      this.waiter = undefined;
      w?.reject(err);
    };
    socket.on("error", fail);
    socket.on("close", () => fail(new Error("connection closed")));
  }

  /** GET `path`; resolves with the body size once the whole response arrived. */
  get(path: string, close = false): Promise<number> {
    if (this.failed) return Promise.reject(this.failed);
    this.closeAfter = false;
    this.state = "head";
    this.bodyBytes = 0;
    return new Promise<number>((resolve, reject) => {
      this.waiter = { resolve, reject };
      this.socket.write(`GET ${path} HTTP/1.1\r\nHost: ${this.host}\r\n${close ? "Connection: close\r\n" : ""}\r\n`);
    });
  }

  /** True when the server said it closes after this response. */
  get closing(): boolean {
    return this.closeAfter;
  }

  private done(): void {
    const w = this.waiter;
    this.waiter = undefined;
    this.state = "head";
    w?.resolve(this.bodyBytes);
  }

  private onData(d: Buffer): void {
    this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
    for (;;) {
      switch (this.state) {
        case "head": {
          const end = this.buf.indexOf(CRLF2);
          if (end < 0) return;
          const head = this.buf.subarray(0, end).toString("latin1").toLowerCase();
          this.buf = this.buf.subarray(end + 4);
          const status = Number(head.slice(9, 12));
          if (status !== 200) {
            this.failed = new Error(`status ${head.split("\r\n")[0]}`);
            this.waiter?.reject(this.failed);
            this.waiter = undefined;
            return;
          }
          this.closeAfter = /\r\nconnection:\s*close/.test(head);
          const cl = /\r\ncontent-length:\s*(\d+)/.exec(head);
          if (cl) {
            this.remaining = Number(cl[1]);
            this.state = "body";
          } else if (/\r\ntransfer-encoding:[^\r]*chunked/.test(head)) {
            this.state = "chunk-size";
          } else {
            this.failed = new Error("response without content-length or chunked encoding");
            this.waiter?.reject(this.failed);
            return;
          }
          break;
        }
        case "body": {
          const n = Math.min(this.remaining, this.buf.length);
          this.remaining -= n;
          this.bodyBytes += n;
          this.buf = this.buf.subarray(n);
          if (this.remaining > 0) return;
          this.done();
          if (this.buf.length === 0) return;
          break;
        }
        case "chunk-size": {
          const eol = this.buf.indexOf("\r\n");
          if (eol < 0) return;
          const size = parseInt(this.buf.subarray(0, eol).toString("latin1"), 16);
          this.buf = this.buf.subarray(eol + 2);
          if (size === 0) this.state = "trailer";
          else {
            this.remaining = size;
            this.state = "chunk-data";
          }
          break;
        }
        case "chunk-data": {
          const n = Math.min(this.remaining, this.buf.length);
          this.remaining -= n;
          this.bodyBytes += n;
          this.buf = this.buf.subarray(n);
          if (this.remaining > 0) return;
          this.state = "chunk-crlf";
          break;
        }
        case "chunk-crlf": {
          if (this.buf.length < 2) return;
          this.buf = this.buf.subarray(2);
          this.state = "chunk-size";
          break;
        }
        case "trailer": {
          const eol = this.buf.indexOf("\r\n");
          if (eol < 0) return;
          const empty = eol === 0;
          this.buf = this.buf.subarray(eol + 2);
          if (empty) {
            this.done();
            if (this.buf.length === 0) return;
          }
          break;
        }
      }
    }
  }

  /** Closes the connection. */
  close(): void {
    this.socket.destroy();
  }
}

/** An HTTP/2 session over an established TLS socket (ALPN h2). */
export function h2Session(socket: TLSSocket, authority: string): ClientHttp2Session {
  const session = h2connect(`https://${authority}`, {
    createConnection: () => socket,
    settings: { initialWindowSize: 8 << 20 },
  });
  session.on("error", () => {});
  session.on("connect", () => session.setLocalWindowSize(16 << 20));
  return session;
}

/** One GET on an HTTP/2 session; resolves with the body size. */
export function h2Get(session: ClientHttp2Session, path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = session.request({ [h2c.HTTP2_HEADER_PATH]: path, [h2c.HTTP2_HEADER_METHOD]: "GET" }, { endStream: true });
    let bytes = 0;
    let status = 0;
    req.on("response", (h) => {
      status = Number(h[h2c.HTTP2_HEADER_STATUS]);
    });
    req.on("data", (d: Buffer) => {
      bytes += d.length;
    });
    req.on("end", () => (status === 200 ? resolve(bytes) : reject(new Error(`h2 status ${status}`))));
    req.on("error", reject);
  });
}
