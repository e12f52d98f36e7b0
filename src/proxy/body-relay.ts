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
  const scanning = settings.eicar && settings.maxBodyBytes > 0;
  const max = settings.maxBodyBytes;
  const scanner = scanning ? new EicarScanner() : undefined;
  // With an encoding: raw chunks go to the decoder, its output to the scanner.
  let decoder = scanning ? decoderFor(encoding) : undefined;
  const decoding = decoder !== undefined;
  // An encoding the scan cannot see through ("compress", several codings): scanned as sent, which finds nothing.
  const opaque = decoder === undefined && encoding !== undefined && encoding.trim() !== "" && encoding.trim().toLowerCase() !== "identity";
  /** True once scanning has stopped before the end of the body (the cap, or a body that did not decode). */
  let capped = false;
  let bytes = 0;
  let scanned = 0;
  let released = false;
  let finished = false;
  let held: Buffer[] = [];
  let timer: NodeJS.Timeout | undefined;
  let arm: NodeJS.Immediate | undefined;

  const finish = (r: RelayResult): void => {
    if (finished) return;
    finished = true;
    stopDecoding();
    clearTimeout(timer);
    if (arm !== undefined) clearImmediate(arm);
    source.off("data", onData);
    source.off("end", onEnd);
    source.off("error", onError);
    source.off("close", onClose);
    held = [];
    onResult(r);
  };

  const release = (length: number | undefined): void => {
    if (released) return;
    released = true;
    clearTimeout(timer);
    if (arm !== undefined) clearImmediate(arm);
    sink.open(length);
    const chunks = held;
    held = [];
    let ok = true;
    for (const c of chunks) ok = sink.write(c) && ok;
    if (!ok && !finished) {
      source.pause();
      sink.onDrain(() => source.resume());
    }
  };

  /** Scans the next piece of the (decoded) body; true when EICAR was found and the relay has finished. */
  const scan = (chunk: Buffer): boolean => {
    if (scanner === undefined || capped || finished) return false;
    const part = scanned + chunk.length > max ? chunk.subarray(0, max - scanned) : chunk;
    scanned += part.length;
    if (scanner.push(part)) {
      // Stop reading; the caller answers or aborts, and tears the source down.
      source.pause();
      finish({ kind: "blocked", bytes, released });
      return true;
    }
    if (scanned >= max && decoding) {
      // Decoded output is bounded by the cap (a decompression bomb stops here).
      capped = true;
      stopDecoding();
    }
    return false;
  };

  function stopDecoding(): void {
    const d = decoder;
    decoder = undefined;
    if (d === undefined) return;
    d.removeAllListeners("data");
    d.on("error", () => {});
    d.destroy();
  }

  if (decoder !== undefined) {
    decoder.on("data", (out: Buffer) => void scan(out));
    decoder.on("error", () => {
      // Not decodable: what was scanned stands; the rest passes unscanned.
      capped = true;
      stopDecoding();
      if (!released && !finished) release(undefined);
    });
  }

  const onData = (chunk: Buffer): void => {
    bytes += chunk.length;
    if (decoder !== undefined) decoder.write(chunk);
    else if (scan(chunk)) return;
    if (finished) return;
    if (!released) {
      held.push(chunk);
      if (scanner === undefined || capped || (decoder === undefined && scanned >= max)) release(undefined);
      return;
    }
    if (!sink.write(chunk)) {
      source.pause();
      sink.onDrain(() => source.resume());
    }
  };

  const onEnd = (): void => {
    const d = decoder;
    if (d !== undefined) {
      // The last decoded bytes come after the decoder's end: decide once they are scanned.
      const done = (): void => {
        if (decoder === d) decoder = undefined;
        if (!finished) complete();
      };
      d.once("end", done);
      d.once("close", done);
      d.end();
      return;
    }
    complete();
  };

  const complete = (): void => {
    if (finished) return;
    if (!released) {
      // The whole body was held and is clean: headers and body go out in one write.
      released = true;
      clearTimeout(timer);
      const body = held.length === 1 ? held[0]! : Buffer.concat(held);
      held = [];
      sink.open(body.length);
      sink.end(body.length > 0 ? body : undefined);
    } else {
      sink.end();
    }
    finish({ kind: "done", bytes, scanned, partial: scanner !== undefined && (capped || opaque || (!decoding && scanned < bytes)) });
  };

  const onError = (err: Error): void => finish({ kind: "error", bytes, error: err });
  const onClose = (): void => {
    // A source that closes without 'end' went away mid-body.
    if (!source.readableEnded) finish({ kind: "error", bytes, error: new Error("source closed mid-body") });
  };

  if (!scanning || !hold) {
    release(undefined);
  } else if (settings.holdMs > 0) {
    // The hold timer is armed after this turn of the event loop: a body that arrived with its
    // head (most small ones) has ended by then, and needs no timer.
    arm = setImmediate(() => {
      arm = undefined;
      if (!released && !finished) timer = setTimeout(() => release(undefined), settings.holdMs);
    });
  }
  source.on("data", onData);
  source.on("end", onEnd);
  source.on("error", onError);
  source.on("close", onClose);
  source.resume();
}
