/**
 * What a scanned body's relay result means for its exchange, in one place for HTTP/1.1 and
 * HTTP/2: the access log fields (bytes, `eicar`, `scan-limit`) and whether to answer with a
 * block page, abort the transfer (the headers already went out), or let it be.
 */
import type { AccessRecord } from "./access-log.js";
import { renderBlockPage, type BlockPage } from "./block-page.js";
import type { RelayResult } from "./body-relay.js";

/** Which body of the exchange was relayed. */
export type BodySide = "request" | "response";

/** What the exchange does next. */
export type ScanVerdict =
  /** Relayed (the record says `scan-limit` when part of a response passed unscanned). */
  | { readonly kind: "pass" }
  /**
   * Malware found: answer with `page`; `released` says the receiver already has the body's
   * headers (HTTP/1.1 then aborts; HTTP/2 resets the stream when its own response went out).
   */
  | { readonly kind: "block"; readonly page: BlockPage; readonly released: boolean }
  /** The body's source failed or left mid-body: abort both sides. */
  | { readonly kind: "abort" };

const PAGE_REASON: Record<BodySide, string> = {
  request: "the upload carries malware (eicar test file)",
  response: "the response carries malware (eicar test file)",
};

/** Records `r` in `rec` (bytes, decision, rule, error) and says what to do. */
export function judgeRelay(rec: AccessRecord, r: RelayResult, side: BodySide): ScanVerdict {
  if (side === "request") rec.bytes_up = r.bytes;
  else rec.bytes_down = r.bytes;
  if (r.kind === "blocked") {
    rec.decision = "block";
    rec.rule = "eicar";
    rec.error = `${side} body carries the eicar test file`;
    return { kind: "block", page: renderBlockPage(403, rec.host, PAGE_REASON[side], "eicar"), released: r.released };
  }
  if (r.kind === "error") return { kind: "abort" };
  if (r.partial && side === "response") rec.rule = "scan-limit";
  return { kind: "pass" };
}
