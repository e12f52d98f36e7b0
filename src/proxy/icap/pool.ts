/**
 * Keep-alive connections to one ICAP server (`host:port`), shared by every transaction and
 * service on it: at most `maxConnections` open (the smaller of the policy's and the service's
 * `Max-Connections`), idle ones reused first and closed after `idleTimeoutMs`, a connect
 * bounded by `connectTimeoutMs` (waiting for a free slot included).
 */
import { connect, type Socket } from "node:net";
import { HeadReader, type IcapResponse } from "./wire.js";

/** No answer from the server in time (a slow service, not a closed connection: never retried). */
export class IcapTimeout extends Error {}

/** One connection to the server, with the response heads read off it. */
export class IcapConnection {
  private readonly reader = new HeadReader();
  private readonly heads: IcapResponse[] = [];
  private waiter: { resolve: (r: IcapResponse) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | undefined;
  private failure: Error | undefined;
  /** Transactions served on this connection (the first is 1). */
  uses = 0;
  /** Set once the pool has stopped counting it. */
  dropped = false;

  constructor(readonly socket: Socket) {
    socket.on("data", (d: Buffer) => this.onData(d));
    socket.on("error", (err) => this.fail(err));
    socket.on("close", () => this.fail(new Error("the icap server closed the connection")));
  }

  private onData(d: Buffer): void {
    try {
      for (let h = this.reader.push(d); h !== undefined; h = this.reader.push()) {
        const w = this.waiter;
        if (w !== undefined) {
          this.waiter = undefined;
          clearTimeout(w.timer);
          w.resolve(h);
        } else {
          this.heads.push(h);
        }
      }
    } catch (err) {
      this.fail(err as Error);
      this.socket.destroy();
    }
  }

  private fail(err: Error): void {
    this.failure ??= err;
    const w = this.waiter;
    if (w === undefined) return;
    this.waiter = undefined;
    clearTimeout(w.timer);
    w.reject(this.failure);
  }

  /** True when the connection can carry another transaction. */
  get usable(): boolean {
    return this.failure === undefined && !this.socket.destroyed && this.heads.length === 0 && this.reader.pending === 0;
  }

  /** True when a response head has arrived that nobody has taken yet (an early answer). */
  get answered(): boolean {
    return this.heads.length > 0 || this.failure !== undefined;
  }

  /** Writes bytes; false when the socket's buffer is full (wait for {@link drained}). */
  write(data: Buffer): boolean {
    return this.socket.write(data);
  }

  /**
   * Resolves once the socket can take more (at once when it can); rejects with an
   * {@link IcapTimeout} when the server takes nothing for `timeoutMs` (a service that stopped
   * reading the body would otherwise hold the transaction, and the body, forever).
   */
  drained(timeoutMs: number): Promise<void> {
    if (!this.socket.writableNeedDrain || this.socket.destroyed) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = (err?: Error): void => {
        clearTimeout(timer);
        this.socket.off("drain", onDrain);
        this.socket.off("close", onDrain);
        if (err === undefined) resolve();
        else reject(err);
      };
      const onDrain = (): void => done();
      const timer = setTimeout(() => done(new IcapTimeout(`the icap server took none of the body for ${timeoutMs} ms`)), timeoutMs);
      this.socket.once("drain", onDrain);
      this.socket.once("close", onDrain);
    });
  }

  /** The next response head; rejects when none arrives within `timeoutMs` or the connection fails. */
  next(timeoutMs: number): Promise<IcapResponse> {
    const h = this.heads.shift();
    if (h !== undefined) return Promise.resolve(h);
    if (this.failure !== undefined) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new IcapTimeout(`no answer from the icap server within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiter = { resolve, reject, timer };
    });
  }

  /** Closes the connection at once. */
  destroy(): void {
    this.socket.destroy();
  }
}

/** Settings of one pool. */
export interface IcapPoolOptions {
  readonly host: string;
  readonly port: number;
  /** Most connections open at once. */
  readonly maxConnections: number;
  /** Time for a TCP connect, and for waiting for a free slot. */
  readonly connectTimeoutMs: number;
  /** An idle connection is closed after this long (below the server's keep-alive timeout, so that a reused one is rarely stale). */
  readonly idleTimeoutMs: number;
}

/** Keep-alive connections to one ICAP server. */
export class IcapPool {
  private readonly idle: { conn: IcapConnection; timer: NodeJS.Timeout }[] = [];
  private readonly waiting: { resolve: (c: IcapConnection) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }[] = [];
  private open = 0;
  private closed = false;
  private max: number;

  constructor(private readonly o: IcapPoolOptions) {
    this.max = o.maxConnections;
  }

  /** Lowers (or restores) the connection ceiling, e.g. to the service's `Max-Connections`. */
  limit(max: number): void {
    this.max = Math.max(1, Math.min(max, this.o.maxConnections));
  }

  /** Connections open now (idle and busy). */
  get size(): number {
    return this.open;
  }

  /** Idle connections now. */
  get idleCount(): number {
    return this.idle.length;
  }

  /** A connection: an idle one (unless `fresh`), a new one, or the next one released. */
  acquire(fresh = false): Promise<IcapConnection> {
    if (this.closed) return Promise.reject(new Error("icap pool closed"));
    for (let e = fresh ? undefined : this.idle.pop(); e !== undefined; e = this.idle.pop()) {
      clearTimeout(e.timer);
      if (e.conn.usable) return Promise.resolve(e.conn);
      this.drop(e.conn);
    }
    if (this.open < this.max) return this.dial();
    return new Promise((resolve, reject) => {
      const w = {
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiting.splice(this.waiting.indexOf(w), 1);
          reject(new Error(`no free icap connection within ${this.o.connectTimeoutMs} ms (${this.max} busy)`));
        }, this.o.connectTimeoutMs),
      };
      this.waiting.push(w);
    });
  }

  /** Gives a connection back; `reusable` false (or an unusable connection) closes it. */
  release(conn: IcapConnection, reusable: boolean): void {
    if (!reusable || !conn.usable || this.closed) {
      this.drop(conn);
      this.serveWaiter();
      return;
    }
    const w = this.waiting.shift();
    if (w !== undefined) {
      clearTimeout(w.timer);
      w.resolve(conn);
      return;
    }
    const timer = setTimeout(() => {
      const i = this.idle.findIndex((e) => e.conn === conn);
      if (i >= 0) this.idle.splice(i, 1);
      this.drop(conn);
    }, this.o.idleTimeoutMs);
    timer.unref();
    this.idle.push({ conn, timer });
  }

  /** Closes idle connections and refuses new work; busy ones close when released. */
  close(): void {
    this.closed = true;
    for (const e of this.idle.splice(0)) {
      clearTimeout(e.timer);
      this.drop(e.conn);
    }
    for (const w of this.waiting.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new Error("icap pool closed"));
    }
  }

  private drop(conn: IcapConnection): void {
    if (conn.dropped) return;
    conn.dropped = true;
    this.open--;
    conn.destroy();
  }

  private serveWaiter(): void {
    if (this.waiting.length === 0 || this.open >= this.max) return;
    const w = this.waiting.shift()!;
    clearTimeout(w.timer);
    this.dial().then(w.resolve, w.reject);
  }

  private dial(): Promise<IcapConnection> {
    this.open++;
    return new Promise((resolve, reject) => {
      const socket = connect({ host: this.o.host, port: this.o.port, noDelay: true });
      const conn = new IcapConnection(socket);
      const timer = setTimeout(() => {
        socket.destroy();
        finish(new Error(`icap connect to ${this.o.host}:${this.o.port} timed out after ${this.o.connectTimeoutMs} ms`));
      }, this.o.connectTimeoutMs);
      const finish = (err?: Error): void => {
        clearTimeout(timer);
        socket.off("connect", onConnect);
        socket.off("error", onError);
        if (err === undefined) return resolve(conn);
        this.drop(conn);
        this.serveWaiter();
        reject(err);
      };
      const onConnect = (): void => finish();
      const onError = (err: NodeJS.ErrnoException): void => finish(new Error(`icap connect to ${this.o.host}:${this.o.port}: ${err.code ?? err.message}`));
      socket.once("connect", onConnect);
      socket.once("error", onError);
    });
  }
}
