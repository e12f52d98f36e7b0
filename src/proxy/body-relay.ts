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
import type { Readable, Transform } from "node:stream";
import { createBrotliDecompress, createGunzip, createInflate } from "node:zlib";
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
}

/** How a relay ended. */
export type RelayResult =
  /**
   * Relayed whole; `scanned` bytes were scanned (decoded bytes for an encoded body); `partial`
   * when part of the body passed unscanned (the cap, or a body that did not decode).
   */
  | { readonly kind: "done"; readonly bytes: number; readonly scanned: number; readonly partial: boolean }
  /** EICAR found; `released` says whether the receiver had already got headers (the transfer must then be aborted). */
  | { readonly kind: "blocked"; readonly bytes: number; readonly released: boolean }
  /** The source failed or went away mid-body. */
  | { readonly kind: "error"; readonly bytes: number; readonly error: Error };

/** Content types that are streams by nature: scanned as they pass, never held. */
export function isStreamingContentType(contentType: string | undefined): boolean {
  if (contentType === undefined) return false;
  const ct = contentType.toLowerCase();
  return ct.startsWith("application/grpc") || ct.startsWith("text/event-stream") || ct.startsWith("multipart/x-mixed-replace");
}

/** A decoder for a Content-Encoding the scan can see through (one coding: gzip, deflate, br); undefined otherwise. */
function decoderFor(encoding: string | undefined): Transform | undefined {
  switch (encoding?.trim().toLowerCase()) {
    case "gzip":
    case "x-gzip":
      return createGunzip();
    case "deflate":
      return createInflate();
    case "br":
      return createBrotliDecompress();
    default:
      return undefined;
  }
}

/**
 * Starts relaying `source` to `sink`; `onResult` is called exactly once. With `hold` false
 * the sink is opened at once (streaming bodies). `encoding` is the body's Content-Encoding.
 */
export function relayBody(
  source: Readable,
  settings: ScanSettings,
  hold: boolean,
  sink: RelaySink,
  onResult: (r: RelayResult) => void,
  encoding?: string,
): void {
  new BodyRelay(source, settings, sink, onResult, encoding).start(hold);
}

/**
 * One body's relay, in its stages: chunks arrive ({@link BodyRelay.onData}) and are scanned
 * (through the decoder when the body is encoded), held until released, then streamed; the end
 * of the body completes it; the first of end, hit, or failure finishes it.
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
  private released = false;
  private finished = false;
  private held: Buffer[] = [];
  private timer: NodeJS.Timeout | undefined;
  private arm: NodeJS.Immediate | undefined;

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
  ) {
    const scanning = settings.eicar && settings.maxBodyBytes > 0;
    this.max = settings.maxBodyBytes;
    this.scanner = scanning ? new EicarScanner() : undefined;
    this.decoder = scanning ? decoderFor(encoding) : undefined;
    this.decoding = this.decoder !== undefined;
    this.opaque = this.decoder === undefined && encoding !== undefined && encoding.trim() !== "" && encoding.trim().toLowerCase() !== "identity";
    this.decoder?.on("data", (out: Buffer) => void this.scan(out));
    this.decoder?.on("error", () => {
      // Not decodable: what was scanned stands; the rest passes unscanned.
      this.capped = true;
      this.stopDecoding();
      if (!this.released && !this.finished) this.release();
    });
  }

  /** Opens the sink at once (nothing to hold) or arms the hold timer, and starts reading. */
  start(hold: boolean): void {
    if (this.scanner === undefined || !hold) {
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
    this.stopDecoding();
    clearTimeout(this.timer);
    if (this.arm !== undefined) clearImmediate(this.arm);
    const s = this.source;
    s.off("data", this.onData);
    s.off("end", this.onEnd);
    s.off("error", this.onError);
    s.off("close", this.onClose);
    this.held = [];
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
    let ok = true;
    for (const c of chunks) ok = this.sink.write(c) && ok;
    if (!ok && !this.finished) this.waitForDrain();
  }

  private waitForDrain(): void {
    this.source.pause();
    this.sink.onDrain(() => this.source.resume());
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
      this.finish({ kind: "blocked", bytes: this.bytes, released: this.released });
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
    if (this.decoder !== undefined) this.decoder.write(chunk);
    else if (this.scan(chunk)) return;
    if (this.finished) return;
    if (!this.released) {
      this.held.push(chunk);
      if (this.scanner === undefined || this.capped || (this.decoder === undefined && this.scanned >= this.max)) this.release();
      return;
    }
    if (!this.sink.write(chunk)) this.waitForDrain();
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
   */
  private complete(): void {
    if (this.finished) return;
    let body: Buffer | undefined;
    if (!this.released) {
      this.released = true;
      clearTimeout(this.timer);
      body = this.held.length === 1 ? this.held[0]! : Buffer.concat(this.held);
      this.held = [];
    }
    const partial = this.scanner !== undefined && (this.capped || this.opaque || (!this.decoding && this.scanned < this.bytes));
    this.finish({ kind: "done", bytes: this.bytes, scanned: this.scanned, partial });
    if (body === undefined) {
      this.sink.end();
      return;
    }
    this.sink.open(body.length);
    this.sink.end(body.length > 0 ? body : undefined);
  }
}
