/**
 * Relays one HTTP body (request or response) from its source to its receiver while scanning
 * it for the EICAR test file.
 *
 * The first `maxBodyBytes` of a body are scanned before they are released: nothing (not even
 * the headers) reaches the receiver until the body has ended clean, the scan cap is reached,
 * or `holdMs` has passed. So a body that carries EICAR within the cap is answered with a
 * block page and the receiver never sees a byte of it. Past the hold time, scanning goes on
 * as the body streams and a hit aborts the transfer (the headers are gone by then). Bodies
 * that are streams by nature (gRPC, server-sent events) are not held, only scanned as they
 * pass. Past the cap, bytes pass unscanned (the access log says so).
 *
 * A body with a Content-Encoding of gzip, deflate or br is scanned as it decodes (the
 * receiver still gets the bytes as sent): EICAR served compressed is found as well. The cap
 * then counts decoded bytes, so a decompression bomb costs at most `maxBodyBytes` of output; a
 * body that does not decode passes unscanned from there (logged as scan-limit).
 */
import { Transform, type Readable, type TransformCallback } from "node:stream";
import { createBrotliDecompress, createGunzip, createInflate, createInflateRaw } from "node:zlib";
import { EicarScanner } from "./eicar.js";
import type { ScanSettings } from "./policy.js";

/** The receiving side of a relay. */
export interface RelaySink {
  /** Sends what precedes the body (response headers, or the upstream request itself). Called at most once. `length` is the body length when the whole body was held. */
  open(length: number | undefined): void;
  /** Writes a chunk; false asks the relay to wait for {@link RelaySink.onDrain}. */
  write(chunk: Buffer): boolean;
  /** Ends the body, with its last chunk when given (one write for a held body instead of several). */
  end(last?: Buffer): void;
  /** Calls `cb` once the receiver can take more. */
  onDrain(cb: () => void): void;
  /**
   * The body has a known length (Content-Length): its last bytes complete it for the receiver,
   * so the relay keeps the latest chunk back and hands it to {@link RelaySink.end}, after what
   * the receiver's side does at the end (the access log line is written first).
   */
  readonly knownLength?: boolean;
}

/** What an outside inspection (an ICAP service) said, for the access log and metrics. */
export interface InspectionNote {
  /** The service's name. */
  readonly service: string;
  /** `clean`, `infection`, `violation`, `modified`, `ignored`, `fail-open`, `fail-closed`. */
  readonly result: string;
  /** The threat or violation the service named. */
  readonly threat?: string;
  /** The service's ISTag. */
  readonly istag?: string;
  /** Why the service could not answer (fail-open, fail-closed). */
  readonly error?: string;
}

/** The verdict of an outside inspection: pass the body, or block it with a rule. */
export type InspectionVerdict =
  | { readonly kind: "pass"; readonly note: InspectionNote }
  | { readonly kind: "block"; readonly rule: string; readonly reason: string; readonly note: InspectionNote };

/**
 * A scan by something outside the relay (an ICAP service): fed every raw chunk of the body
 * as it passes, it answers once, at the end or earlier. Until it answers, the receiver gets at
 * most the held bytes and never the end of the body.
 */
export interface BodyInspector {
  /** Feeds the next chunk; false asks the relay to wait for {@link BodyInspector.onDrain}. */
  write(chunk: Buffer): boolean;
  /** Calls `cb` once the inspector can take more. */
  onDrain(cb: () => void): void;
  /** The body has ended. */
  end(): void;
  /** Calls `cb` once with the verdict. */
  onVerdict(cb: (v: InspectionVerdict) => void): void;
  /** The relay has ended without needing the verdict (error, or a block by the built-in scan). */
  abort(): void;
}

/** How a relay ended. */
export type RelayResult =
  /**
   * Relayed whole; `scanned` bytes were scanned (decoded bytes for an encoded body); `partial`
   * when part of the body passed unscanned (the cap, or a body that did not decode).
   * `inspection` is the outside inspection's note, when there was one.
   */
  | { readonly kind: "done"; readonly bytes: number; readonly scanned: number; readonly partial: boolean; readonly inspection?: InspectionNote }
  /**
   * Blocked by the built-in EICAR scan (`rule` "eicar") or an outside inspection; `released`
   * says whether the receiver had already got headers (the transfer must then be aborted).
   */
  | { readonly kind: "blocked"; readonly bytes: number; readonly released: boolean; readonly rule: string; readonly reason: string; readonly inspection?: InspectionNote }
  /** The source failed or went away mid-body. */
  | { readonly kind: "error"; readonly bytes: number; readonly error: Error };

/**
 * True for a body that is a stream by nature (gRPC, server-sent events, a multipart replace
 * stream), which may never end: it is scanned as it passes, never held, and sent to no ICAP
 * service. The origin names the type, so a body it also offers as a download
 * (`Content-Disposition: attachment`) is a file whatever its type: held and scanned like any.
 */
export function isLiveStream(contentType: string | undefined, contentDisposition?: string | string[]): boolean {
  if (contentType === undefined) return false;
  const ct = contentType.toLowerCase();
  const streaming = ct.startsWith("application/grpc") || ct.startsWith("text/event-stream") || ct.startsWith("multipart/x-mixed-replace");
  const disposition = Array.isArray(contentDisposition) ? contentDisposition.join(",") : contentDisposition;
  return streaming && !(disposition !== undefined && /(^|,)\s*attachment\b/i.test(disposition));
}

/** The codings of a Content-Encoding value (or of its header lines, joined), lowercase, `identity` left out. */
export function contentCodings(encoding: string | undefined): string[] {
  if (encoding === undefined) return [];
  return encoding
    .split(",")
    .map((c) => c.trim().toLowerCase())
    .filter((c) => c !== "" && c !== "identity");
}

/**
 * Decodes `deflate` as clients do: zlib-wrapped (RFC 9110) when the first two bytes are a zlib
 * header, else raw deflate, which servers send as well and browsers and curl decode.
 */
class DeflateDecoder extends Transform {
  private inner: Transform | undefined;
  private head: Buffer = Buffer.alloc(0);

  private open(): Transform {
    const h = this.head;
    const zlib = h.length >= 2 && (h[0]! & 0x0f) === 8 && ((h[0]! << 8) | h[1]!) % 31 === 0;
    const inner = zlib ? createInflate() : createInflateRaw();
    inner.on("data", (d: Buffer) => this.push(d));
    inner.on("error", (err) => this.destroy(err));
    this.inner = inner;
    return inner;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    if (this.inner === undefined) {
      this.head = this.head.length === 0 ? chunk : Buffer.concat([this.head, chunk]);
      if (this.head.length < 2) return cb();
      chunk = this.head;
      this.open();
      this.head = Buffer.alloc(0);
    }
    this.inner!.write(chunk, () => cb());
  }

  override _flush(cb: TransformCallback): void {
    const inner = this.inner ?? this.open();
    if (this.head.length > 0) inner.write(this.head);
    inner.once("end", () => cb());
    inner.end();
  }

  override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
    this.inner?.destroy();
    cb(err);
  }
}

/** A decoder for a Content-Encoding the scan can see through (one coding besides identity: gzip, deflate, br); undefined otherwise. */
function decoderFor(codings: readonly string[]): Transform | undefined {
  if (codings.length !== 1) return undefined;
  switch (codings[0]) {
    case "gzip":
    case "x-gzip":
      return createGunzip();
    case "deflate":
      return new DeflateDecoder();
    case "br":
      return createBrotliDecompress();
    default:
      return undefined;
  }
}

/**
 * Starts relaying `source` to `sink`; `onResult` is called exactly once. With `hold` false
 * the sink is opened at once (streaming bodies). `encoding` is the body's Content-Encoding.
 *
 * With an `inspector`, the raw body is fed to it as well: the first `maxBodyBytes` are held
 * (as for the built-in scan) and the end of the body (its latest chunk) is withheld until
 * it answers, so a body it blocks past the hold is cut off, never completed.
 */
export function relayBody(
  source: Readable,
  settings: ScanSettings,
  hold: boolean,
  sink: RelaySink,
  onResult: (r: RelayResult) => void,
  encoding?: string,
  inspector?: BodyInspector,
): void {
  new BodyRelay(source, settings, sink, onResult, encoding, inspector).start(hold);
}

/**
 * One body's relay, in its stages: chunks arrive ({@link BodyRelay.onData}) and are scanned
 * (through the decoder when the body is encoded), held until released, then streamed; the end
 * of the body completes it (after the inspector's verdict, when there is an inspector); the
 * first of end, hit, block verdict, or failure finishes it.
 */
class BodyRelay {
  private readonly scanner: EicarScanner | undefined;
  private readonly max: number;
  /** Decodes an encoded body for the scanner (raw chunks in, decoded bytes to the scanner). */
  private decoder: Transform | undefined;
  private readonly decoding: boolean;
  /** An encoding the scan cannot see through ("compress", several codings): scanned as sent, which finds nothing. */
  private readonly opaque: boolean;
  /** True once scanning has stopped before the end of the body (the cap, or a body that did not decode). */
  private capped = false;
  private bytes = 0;
  private scanned = 0;
  /** Raw bytes the decoder has taken in and decoded (what it still queues is not counted). */
  private decodedIn = 0;
  private released = false;
  private finished = false;
  private held: Buffer[] = [];
  private timer: NodeJS.Timeout | undefined;
  private arm: NodeJS.Immediate | undefined;
  /** The inspector's answer, once it came. */
  private verdict: InspectionVerdict | undefined;
  /** True once the body has ended and only the inspector's answer is awaited. */
  private awaiting = false;
  /** Reasons the source is paused now (the sink's or the inspector's backpressure). */
  private pauses = 0;
  /**
   * The latest chunk, kept back from a released body until the inspector answers: with a
   * Content-Length the end of the body is its last bytes, so withholding only the end would
   * let a client complete an infected file.
   */
  private tail: Buffer | undefined;
  /** Keep the latest chunk back until the end of the body even without an inspector ({@link RelaySink.knownLength}, not a stream by nature). */
  private keepLast = false;

  private readonly onData = (chunk: Buffer): void => this.data(chunk);
  private readonly onEnd = (): void => this.end();
  private readonly onError = (err: Error): void => this.finish({ kind: "error", bytes: this.bytes, error: err });
  private readonly onClose = (): void => {
    // A source that closes without 'end' went away mid-body.
    if (!this.source.readableEnded) this.finish({ kind: "error", bytes: this.bytes, error: new Error("source closed mid-body") });
  };

  constructor(
    private readonly source: Readable,
    private readonly settings: ScanSettings,
    private readonly sink: RelaySink,
    private readonly onResult: (r: RelayResult) => void,
    encoding: string | undefined,
    private readonly inspector: BodyInspector | undefined,
  ) {
    const scanning = settings.eicar && settings.maxBodyBytes > 0;
    this.max = settings.maxBodyBytes;
    this.scanner = scanning ? new EicarScanner() : undefined;
    const codings = contentCodings(encoding);
    this.decoder = scanning ? decoderFor(codings) : undefined;
    this.decoding = this.decoder !== undefined;
    this.opaque = this.decoder === undefined && codings.length > 0;
    this.decoder?.on("data", (out: Buffer) => void this.scan(out));
    this.decoder?.on("error", () => {
      // Not decodable: what was scanned stands; the rest passes unscanned.
      this.capped = true;
      this.stopDecoding();
      if (!this.released && !this.finished && !this.inspectorHolding()) this.release();
    });
    inspector?.onVerdict((v) => this.onVerdict(v));
  }

  /** Opens the sink at once (nothing to hold) or arms the hold timer, and starts reading. */
  start(hold: boolean): void {
    this.keepLast = hold && this.sink.knownLength === true;
    if ((this.scanner === undefined && this.inspector === undefined) || !hold) {
      this.release();
    } else if (this.settings.holdMs > 0) {
      // The hold timer is armed after this turn of the event loop: a body that arrived with its
      // head (most small ones) has ended by then, and needs no timer.
      this.arm = setImmediate(() => {
        this.arm = undefined;
        if (!this.released && !this.finished) this.timer = setTimeout(() => this.release(), this.settings.holdMs);
      });
    }
    const s = this.source;
    s.on("data", this.onData);
    s.on("end", this.onEnd);
    s.on("error", this.onError);
    s.on("close", this.onClose);
    s.resume();
  }

  private finish(r: RelayResult): void {
    if (this.finished) return;
    this.finished = true;
    if (this.pending()) this.inspector?.abort();
    this.stopDecoding();
    clearTimeout(this.timer);
    if (this.arm !== undefined) clearImmediate(this.arm);
    const s = this.source;
    s.off("data", this.onData);
    s.off("end", this.onEnd);
    s.off("error", this.onError);
    s.off("close", this.onClose);
    this.held = [];
    this.tail = undefined;
    this.onResult(r);
  }

  /** Opens the sink and writes what was held; from now on chunks stream. */
  private release(): void {
    if (this.released) return;
    this.released = true;
    clearTimeout(this.timer);
    if (this.arm !== undefined) clearImmediate(this.arm);
    this.sink.open(undefined);
    const chunks = this.held;
    this.held = [];
    if (this.withholding() && chunks.length > 0) this.tail = chunks.pop();
    let ok = true;
    for (const c of chunks) ok = this.sink.write(c) && ok;
    if (!ok && !this.finished) this.waitForDrain();
  }

  private waitForDrain(): void {
    this.waitFor((cb) => this.sink.onDrain(cb));
  }

  /** Pauses the source until `register`'s callback runs (and no other wait is pending). */
  private waitFor(register: (cb: () => void) => void): void {
    this.pauses++;
    this.source.pause();
    register(() => {
      if (--this.pauses === 0 && !this.finished) this.source.resume();
    });
  }

  /** True while the latest chunk is kept back (until the end, or until the inspector answers). */
  private withholding(): boolean {
    return this.keepLast || this.pending();
  }

  /** True while the inspector has not answered. */
  private pending(): boolean {
    return this.inspector !== undefined && this.verdict === undefined;
  }

  /** True while the built-in scan wants the body held. */
  private eicarHolding(): boolean {
    if (this.scanner === undefined || this.capped) return false;
    // An encoded body is held until `max` decoded bytes were scanned, or `max` raw bytes were
    // decoded: a body that decodes to little or nothing (a gzip header that never ends, empty
    // deflate blocks, brotli metadata) must not be held without bound.
    return this.decoder === undefined ? this.scanned < this.max : this.decodedIn < this.max;
  }

  /** True while the inspector wants the body held (it has not answered and the hold bound is not reached). */
  private inspectorHolding(): boolean {
    return this.pending() && this.bytes < this.max;
  }

  /** The inspector answered: a block finishes the relay, a pass lets the held bytes or the end go out. */
  private onVerdict(v: InspectionVerdict): void {
    this.verdict = v;
    if (this.finished) return;
    if (v.kind === "block") {
      this.source.pause();
      this.finish({ kind: "blocked", bytes: this.bytes, released: this.released, rule: v.rule, reason: v.reason, inspection: v.note });
    } else if (this.awaiting) {
      this.complete();
    } else if (!this.released && !this.eicarHolding()) {
      this.release();
    } else if (this.tail !== undefined && !this.keepLast) {
      const t = this.tail;
      this.tail = undefined;
      if (!this.sink.write(t)) this.waitForDrain();
    }
  }

  /** Scans the next piece of the (decoded) body; true when EICAR was found and the relay has finished. */
  private scan(chunk: Buffer): boolean {
    const scanner = this.scanner;
    if (scanner === undefined || this.capped || this.finished) return false;
    const part = this.scanned + chunk.length > this.max ? chunk.subarray(0, this.max - this.scanned) : chunk;
    this.scanned += part.length;
    if (scanner.push(part)) {
      // Stop reading; the caller answers or aborts, and tears the source down.
      this.source.pause();
      this.finish({ kind: "blocked", bytes: this.bytes, released: this.released, rule: "eicar", reason: "the eicar test file" });
      return true;
    }
    if (this.scanned >= this.max && this.decoding) {
      // Decoded output is bounded by the cap (a decompression bomb stops here).
      this.capped = true;
      this.stopDecoding();
    }
    return false;
  }

  private stopDecoding(): void {
    const d = this.decoder;
    this.decoder = undefined;
    if (d === undefined) return;
    d.removeAllListeners("data");
    d.on("error", () => {});
    d.destroy();
  }

  private data(chunk: Buffer): void {
    this.bytes += chunk.length;
    const d = this.decoder;
    if (d !== undefined) d.write(chunk, () => this.decoded(d, chunk.length));
    else if (this.scan(chunk)) return;
    if (this.finished) return;
    const inspector = this.inspector;
    if (inspector !== undefined && this.verdict === undefined && !inspector.write(chunk)) this.waitFor((cb) => inspector.onDrain(cb));
    if (!this.released) {
      this.held.push(chunk);
      if (!this.eicarHolding() && !this.inspectorHolding()) this.release();
      return;
    }
    let out: Buffer | undefined = chunk;
    if (this.withholding()) [out, this.tail] = [this.tail, chunk];
    if (out !== undefined && !this.sink.write(out)) this.waitForDrain();
  }

  /** The decoder has decoded `n` more raw bytes (and its output was scanned): the hold bound may be reached. */
  private decoded(d: Transform, n: number): void {
    if (this.decoder !== d) return;
    this.decodedIn += n;
    if (!this.released && !this.finished && !this.eicarHolding() && !this.inspectorHolding()) this.release();
  }

  private end(): void {
    const d = this.decoder;
    if (d === undefined) return this.complete();
    // The last decoded bytes come after the decoder's end: decide once they are scanned.
    const done = (): void => {
      if (this.decoder === d) this.decoder = undefined;
      if (!this.finished) this.complete();
    };
    d.once("end", done);
    d.once("close", done);
    d.end();
  }

  /**
   * The body ended clean: what was held goes out in one write (with its length), or the stream
   * ends. The result is reported first, so that the receiver's side knows the final figures
   * (bytes, scan-limit) when it ends (the access log line is written before the last bytes go out).
   * With an inspector that has not answered yet, the end waits for its verdict ({@link BodyRelay.onVerdict} calls back here).
   */
  private complete(): void {
    if (this.finished) return;
    if (this.pending()) {
      if (!this.awaiting) {
        this.awaiting = true;
        this.inspector?.end();
      }
      return;
    }
    let body: Buffer | undefined;
    if (!this.released) {
      this.released = true;
      clearTimeout(this.timer);
      body = this.held.length === 1 ? this.held[0]! : Buffer.concat(this.held);
      this.held = [];
    }
    const last = this.tail;
    this.tail = undefined;
    const partial = this.scanner !== undefined && (this.capped || this.opaque || (!this.decoding && this.scanned < this.bytes));
    const inspection = this.verdict?.note;
    this.finish(inspection === undefined ? { kind: "done", bytes: this.bytes, scanned: this.scanned, partial } : { kind: "done", bytes: this.bytes, scanned: this.scanned, partial, inspection });
    if (body === undefined) {
      this.sink.end(last);
      return;
    }
    this.sink.open(body.length);
    this.sink.end(body.length > 0 ? body : undefined);
  }
}
