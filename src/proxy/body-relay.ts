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
  const scanning = settings.eicar && settings.maxBodyBytes > 0;
  const max = settings.maxBodyBytes;
  const scanner = scanning ? new EicarScanner() : undefined;
  /** The inspector's answer, once it came. */
  let verdict: InspectionVerdict | undefined;
  /** True once the body has ended and only the inspector's answer is awaited. */
  let awaiting = false;
  /** Reasons the source is paused now (the sink's or the inspector's backpressure). */
  let pauses = 0;
  /**
   * The latest chunk, kept back from a released body until the inspector answers: with a
   * Content-Length the end of the body is its last bytes, so withholding only the end would
   * let a client complete an infected file.
   */
  let tail: Buffer | undefined;
  const pending = (): boolean => inspector !== undefined && verdict === undefined;
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
    if (inspector !== undefined && verdict === undefined) inspector.abort();
    stopDecoding();
    clearTimeout(timer);
    if (arm !== undefined) clearImmediate(arm);
    source.off("data", onData);
    source.off("end", onEnd);
    source.off("error", onError);
    source.off("close", onClose);
    held = [];
    tail = undefined;
    onResult(r);
  };

  /** Pauses the source until `register`'s callback runs (and no other wait is pending). */
  const waitFor = (register: (cb: () => void) => void): void => {
    pauses++;
    source.pause();
    register(() => {
      if (--pauses === 0 && !finished) source.resume();
    });
  };

  /** True while the built-in scan wants the body held. */
  const eicarHolding = (): boolean => scanner !== undefined && !capped && !(decoder === undefined && scanned >= max);
  /** True while the inspector wants the body held (it has not answered and the hold bound is not reached). */
  const inspectorHolding = (): boolean => inspector !== undefined && verdict === undefined && bytes < max;

  const release = (length: number | undefined): void => {
    if (released) return;
    released = true;
    clearTimeout(timer);
    if (arm !== undefined) clearImmediate(arm);
    sink.open(length);
    const chunks = held;
    held = [];
    if (pending() && chunks.length > 0) tail = chunks.pop();
    let ok = true;
    for (const c of chunks) ok = sink.write(c) && ok;
    if (!ok && !finished) waitFor((cb) => sink.onDrain(cb));
  };

  /** Scans the next piece of the (decoded) body; true when EICAR was found and the relay has finished. */
  const scan = (chunk: Buffer): boolean => {
    if (scanner === undefined || capped || finished) return false;
    const part = scanned + chunk.length > max ? chunk.subarray(0, max - scanned) : chunk;
    scanned += part.length;
    if (scanner.push(part)) {
      // Stop reading; the caller answers or aborts, and tears the source down.
      source.pause();
      finish({ kind: "blocked", bytes, released, rule: "eicar", reason: "the eicar test file" });
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
    if (inspector !== undefined && verdict === undefined && !inspector.write(chunk)) waitFor((cb) => inspector.onDrain(cb));
    if (!released) {
      held.push(chunk);
      if (!eicarHolding() && !inspectorHolding()) release(undefined);
      return;
    }
    let out: Buffer | undefined = chunk;
    if (pending()) [out, tail] = [tail, chunk];
    if (out !== undefined && !sink.write(out)) waitFor((cb) => sink.onDrain(cb));
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
    if (inspector !== undefined && verdict === undefined) {
      // The end goes out only after the inspector's answer (onVerdict calls back here).
      if (!awaiting) {
        awaiting = true;
        inspector.end();
      }
      return;
    }
    if (!released) {
      // The whole body was held and is clean: headers and body go out in one write.
      released = true;
      clearTimeout(timer);
      const body = held.length === 1 ? held[0]! : Buffer.concat(held);
      held = [];
      sink.open(body.length);
      sink.end(body.length > 0 ? body : undefined);
    } else {
      const last = tail;
      tail = undefined;
      sink.end(last);
    }
    const partial = scanner !== undefined && (capped || opaque || (!decoding && scanned < bytes));
    finish(verdict === undefined ? { kind: "done", bytes, scanned, partial } : { kind: "done", bytes, scanned, partial, inspection: verdict.note });
  };

  inspector?.onVerdict((v) => {
    verdict = v;
    if (finished) return;
    if (v.kind === "block") {
      source.pause();
      finish({ kind: "blocked", bytes, released, rule: v.rule, reason: v.reason, inspection: v.note });
    } else if (awaiting) {
      complete();
    } else if (!released && !eicarHolding()) {
      release(undefined);
    } else if (tail !== undefined) {
      const t = tail;
      tail = undefined;
      if (!sink.write(t)) waitFor((cb) => sink.onDrain(cb));
    }
  });

  const onError = (err: Error): void => finish({ kind: "error", bytes, error: err });
  const onClose = (): void => {
    // A source that closes without 'end' went away mid-body.
    if (!source.readableEnded) finish({ kind: "error", bytes, error: new Error("source closed mid-body") });
  };

  if ((!scanning && inspector === undefined) || !hold) {
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
