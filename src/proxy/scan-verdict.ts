/**
 * What a scanned body's relay result means for its exchange, in one place for HTTP/1.1 and
 * HTTP/2: the access log fields (bytes, the decision, rule and error of a block by the
 * built-in EICAR scan or an ICAP service, the ICAP verdict of a body that passed,
 * `scan-limit`) and whether to answer with a block page, abort the transfer (the headers
 * already went out), or let it be.
 */
import type { AccessRecord } from "./access-log.js";
import { renderBlockPage, type BlockPage } from "./block-page.js";
import type { InspectionNote, RelayResult } from "./body-relay.js";

/** Which body of the exchange was relayed. */
export type BodySide = "request" | "response";

/** What the exchange does next. */
export type ScanVerdict =
  /** Relayed (the record says `scan-limit` when part of a response passed unscanned). */
  | { readonly kind: "pass" }
  /**
   * Blocked (malware, or an ICAP service's verdict): answer with `page`; `released` says the
   * receiver already has the body's headers (HTTP/1.1 then aborts; HTTP/2 resets the stream
   * when its own response went out).
   */
  | { readonly kind: "block"; readonly page: BlockPage; readonly released: boolean }
  /** The body's source failed or left mid-body: abort both sides. */
  | { readonly kind: "abort" };

const NOUN: Record<BodySide, string> = { request: "upload", response: "response" };

function noteInspection(rec: AccessRecord, n: InspectionNote | undefined): void {
  if (n === undefined) return;
  rec.icap = n.service;
  rec.icap_result = n.result;
  if (n.threat !== undefined) rec.threat = n.threat;
  if (n.error !== undefined && rec.error === undefined) rec.error = `icap ${n.service}: ${n.error}`;
}

/** Records a block in `rec` (decision, rule, error); returns the block page's words. */
function recordBlock(rec: AccessRecord, r: Extract<RelayResult, { kind: "blocked" }>, side: BodySide): string {
  rec.decision = "block";
  rec.rule = r.rule;
  const noun = NOUN[side];
  if (r.rule === "eicar") {
    rec.error = `${side} body carries the eicar test file`;
    return `the ${noun} carries malware (eicar test file)`;
  }
  rec.error = `${side} body: ${r.reason}`;
  return r.inspection?.result === "fail-closed" ? `the ${noun} could not be scanned: ${r.reason}` : `the ${noun} carries ${r.reason}`;
}

/** Records `r` in `rec` (bytes, decision, rule, error, ICAP verdict) and says what to do. */
export function judgeRelay(rec: AccessRecord, r: RelayResult, side: BodySide): ScanVerdict {
  if (side === "request") rec.bytes_up = r.bytes;
  else rec.bytes_down = r.bytes;
  if (r.kind === "error") return { kind: "abort" };
  noteInspection(rec, r.inspection);
  if (r.kind === "blocked") {
    const reason = recordBlock(rec, r, side);
    return { kind: "block", page: renderBlockPage(403, rec.host, reason, r.rule), released: r.released };
  }
  if (r.partial && side === "response") rec.rule = "scan-limit";
  return { kind: "pass" };
}
