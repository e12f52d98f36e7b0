/**
 * One REQMOD or RESPMOD transaction, fed the body as it passes the proxy: the first
 * `preview` bytes go with the head, the rest after the service's `100 Continue`, each in a
 * chunk of its own (no body is assembled; the queue that waits for the socket is bounded by
 * backpressure on the caller). The answer is one of: clean (204), a finding (200), or an error.
 */
import { IcapTimeout, type IcapConnection, type IcapPool } from "./pool.js";
import { chunkHeader, CRLF, findingOf, formatIcapRequest, LAST_CHUNK, LAST_CHUNK_IEOF, type IcapFinding, type IcapResponse, type IcapUrl } from "./wire.js";

/** Bytes queued for the service before the caller is asked to wait. */
const HIGH_WATER = 64 * 1024;

/** How a transaction ended. */
export type IcapOutcome =
  | { readonly kind: "clean"; readonly istag?: string; readonly roundTrips: number }
  | { readonly kind: "finding"; readonly finding: IcapFinding; readonly istag?: string; readonly roundTrips: number };

/** What a transaction needs to run. */
export interface IcapTransactionSetup {
  readonly method: "REQMOD" | "RESPMOD";
  readonly url: IcapUrl;
  readonly pool: IcapPool;
  /** Encapsulated HTTP request head. */
  readonly reqHdr: Buffer;
  /** Encapsulated HTTP response head (RESPMOD). */
  readonly resHdr?: Buffer;
  /** Preview size, or undefined to send the whole body at once. */
  readonly preview: number | undefined;
  /** Longest wait for each answer of the service. */
  readonly readTimeoutMs: number;
}

/** Thrown inside a transaction the caller has abandoned. */
class Abandoned extends Error {}

/** A running transaction; {@link IcapTransaction.result} settles once. */
export class IcapTransaction {
  private queue: Buffer[] = [];
  private queued = 0;
  private ended = false;
  private abandoned = false;
  private wake: (() => void) | undefined;
  private drainCbs: (() => void)[] = [];
  private conn: IcapConnection | undefined;
  private roundTrips = 0;
  /** Settles with the outcome; rejects on any failure (connect, timeout, protocol, abort). */
  readonly result: Promise<IcapOutcome>;

  constructor(private readonly s: IcapTransactionSetup) {
    this.result = this.run();
    this.result.catch(() => {});
  }

  /** Queues the next body chunk; false asks the caller to wait for {@link onDrain}. */
  write(chunk: Buffer): boolean {
    if (this.abandoned || chunk.length === 0) return true;
    this.queue.push(chunk);
    this.queued += chunk.length;
    this.poke();
    return this.queued < HIGH_WATER;
  }

  /** Calls `cb` once the queue has room again. */
  onDrain(cb: () => void): void {
    if (this.queued < HIGH_WATER) queueMicrotask(cb);
    else this.drainCbs.push(cb);
  }

  /** The body has ended. */
  end(): void {
    this.ended = true;
    this.poke();
  }

  /** Abandons the transaction: the connection is closed, nothing more is sent. */
  abort(): void {
    if (this.abandoned) return;
    this.abandoned = true;
    this.queue = [];
    this.queued = 0;
    this.conn?.destroy();
    this.poke();
    this.fireDrain();
  }

  private poke(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** Resolves at the next write, end or abort. */
  private changed(): Promise<void> {
    return new Promise((resolve) => (this.wake = resolve));
  }

  private check(): void {
    if (this.abandoned) throw new Abandoned("icap transaction abandoned");
  }

  private fireDrain(): void {
    const cbs = this.drainCbs;
    this.drainCbs = [];
    for (const cb of cbs) cb();
  }

  /** Takes up to `max` queued bytes, as the chunks they came in. */
  private take(max: number): Buffer[] {
    const out: Buffer[] = [];
    let n = 0;
    while (this.queue.length > 0 && n < max) {
      const c = this.queue[0]!;
      if (n + c.length <= max) {
        out.push(c);
        n += c.length;
        this.queue.shift();
      } else {
        out.push(c.subarray(0, max - n));
        this.queue[0] = c.subarray(max - n);
        n = max;
      }
    }
    this.queued -= n;
    if (this.queued < HIGH_WATER / 2) this.fireDrain();
    return out;
  }

  private frame(chunks: Buffer[]): Buffer[] {
    const out: Buffer[] = [];
    for (const c of chunks) if (c.length > 0) out.push(chunkHeader(c.length), c, CRLF);
    return out;
  }

  private async run(): Promise<IcapOutcome> {
    const { preview } = this.s;
    const head = formatIcapRequest({ method: this.s.method, url: this.s.url, reqHdr: this.s.reqHdr, resHdr: this.s.resHdr, body: true, preview });
    if (preview === undefined) {
      const conn = await this.connect(false);
      return this.guarded(conn, () => {
        conn.write(head);
        return this.streamRest(conn);
      });
    }
    while (this.queued < preview && !this.ended) {
      await this.changed();
      this.check();
    }
    const ieof = this.ended && this.queued <= preview;
    const message = Buffer.concat([head, ...this.frame(this.take(preview)), ieof ? LAST_CHUNK_IEOF : LAST_CHUNK]);
    const { conn, answer } = await this.sendPreview(message);
    return this.guarded(conn, async () => {
      // A final answer to the preview ends the transaction; the rest of the body is not sent.
      if (ieof || answer.status !== 100) return this.finish(conn, answer, true);
      return this.streamRest(conn);
    });
  }

  /** A connection from the pool (`fresh`: a new one, not an idle one), owned by this transaction. */
  private async connect(fresh: boolean): Promise<IcapConnection> {
    const conn = await this.s.pool.acquire(fresh);
    if (this.abandoned) {
      this.s.pool.release(conn, false);
      throw new Abandoned("icap transaction abandoned");
    }
    this.conn = conn;
    conn.uses++;
    return conn;
  }

  /** Runs `fn` on `conn`; on any failure the connection is closed, never reused. */
  private async guarded(conn: IcapConnection, fn: () => Promise<IcapOutcome> | IcapOutcome): Promise<IcapOutcome> {
    try {
      return await fn();
    } catch (err) {
      this.conn = undefined;
      this.s.pool.release(conn, false);
      throw err;
    }
  }

  /**
   * Sends the head and preview and reads the first answer. A reused connection that fails
   * before answering was most likely closed by the server while idle (its keep-alive timeout
   * or request limit): the same bytes go once more, on a new connection. Nothing of the body
   * past the preview has been taken yet, so nothing is lost.
   */
  private async sendPreview(message: Buffer): Promise<{ conn: IcapConnection; answer: IcapResponse }> {
    for (let fresh = false; ; fresh = true) {
      const conn = await this.connect(fresh);
      const reused = conn.uses > 1;
      try {
        conn.write(message);
        return { conn, answer: await this.answer(conn) };
      } catch (err) {
        this.conn = undefined;
        this.s.pool.release(conn, false);
        if (fresh || !reused || this.abandoned || err instanceof IcapTimeout) throw err;
      }
    }
  }

  /** Sends the rest of the body as it comes (stopping at an early answer), then reads the final answer. */
  private async streamRest(conn: IcapConnection): Promise<IcapOutcome> {
    let sentAll = false;
    for (;;) {
      this.check();
      if (conn.answered) break; // an early final answer: stop sending
      if (this.queue.length > 0) {
        if (!conn.write(Buffer.concat(this.frame(this.take(Number.MAX_SAFE_INTEGER))))) await conn.drained(this.s.readTimeoutMs);
        continue;
      }
      if (this.ended) {
        conn.write(LAST_CHUNK);
        sentAll = true;
        break;
      }
      await this.changed();
    }
    return this.finish(conn, await this.answer(conn), sentAll);
  }

  private async answer(conn: IcapConnection): Promise<IcapResponse> {
    const r = await conn.next(this.s.readTimeoutMs);
    this.roundTrips++;
    this.check();
    return r;
  }

  private finish(conn: IcapConnection, r: IcapResponse, complete: boolean): IcapOutcome {
    const istag = r.headers.get("istag");
    const keepAlive = (r.headers.get("connection") ?? "").toLowerCase() !== "close";
    // The connection goes back to the pool (or closes) here: an abort after this must not touch it.
    this.conn = undefined;
    if (r.status === 204) {
      this.s.pool.release(conn, complete && keepAlive);
      return { kind: "clean", istag, roundTrips: this.roundTrips };
    }
    // A 200 carries a replacement message that is not read: the connection is not reused.
    this.s.pool.release(conn, false);
    if (r.status === 200) return { kind: "finding", finding: findingOf(r), istag, roundTrips: this.roundTrips };
    throw new Error(`the icap service answered ${r.status} ${r.reason}`.trim());
  }
}
