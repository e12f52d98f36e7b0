/**
 * What a body relay's outcome puts in the access log: the decision, rule and error of a
 * block (by the built-in EICAR scan or an ICAP service), the ICAP verdict of a body that
 * passed, and the words of the block page.
 */
import type { AccessRecord } from "./access-log.js";
import type { InspectionNote, RelayResult } from "./body-relay.js";

function noteInspection(rec: AccessRecord, n: InspectionNote | undefined): void {
  if (n === undefined) return;
  rec.icap = n.service;
  rec.icap_result = n.result;
  if (n.threat !== undefined) rec.threat = n.threat;
  if (n.error !== undefined && rec.error === undefined) rec.error = `icap ${n.service}: ${n.error}`;
}

/**
 * Records a relay's outcome in `rec` (`side`: the upload or the response). Returns the block
 * page's message when the body was blocked, else undefined.
 */
export function recordScan(rec: AccessRecord, r: RelayResult, side: "request" | "response"): string | undefined {
  if (r.kind === "error") return undefined;
  noteInspection(rec, r.inspection);
  if (r.kind === "done") {
    if (r.partial && side === "response") rec.rule = "scan-limit";
    return undefined;
  }
  rec.decision = "block";
  rec.rule = r.rule;
  const noun = side === "request" ? "upload" : "response";
  if (r.rule === "eicar") {
    rec.error = `${side} body carries the eicar test file`;
    return `the ${noun} carries malware (eicar test file)`;
  }
  rec.error = `${side} body: ${r.reason}`;
  return r.inspection?.result === "fail-closed" ? `the ${noun} could not be scanned: ${r.reason}` : `the ${noun} carries ${r.reason}`;
}
