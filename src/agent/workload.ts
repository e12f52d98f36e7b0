/**
 * The fixed metadata header every KeyAgentService call must carry, as SPIFFE's Workload API
 * requires `workload.spiffe.io: true`.
 */
import type { HandlerContext } from "@connectrpc/connect";
import { WORKLOAD_HEADER, WORKLOAD_HEADER_VALUE } from "../clients/workload-header.js";
import { InvalidArgument } from "../common/errors.js";

/**
 * Refuses a call without `kmi-agent-workload: true`. Why: a browser or another program
 * tricked into a cross-protocol request cannot set it, so such a request never reaches a
 * key; and the check is a header read, cheap enough for the hot path.
 */
export function requireWorkloadHeader(ctx: HandlerContext): void {
  if (ctx.requestHeader.get(WORKLOAD_HEADER) !== WORKLOAD_HEADER_VALUE) {
    throw new InvalidArgument(`metadata: every call needs the header "${WORKLOAD_HEADER}: ${WORKLOAD_HEADER_VALUE}"; add it to the call's metadata`);
  }
}

/**
 * What the caller says about itself, for the log line: Node cannot read a Unix socket's peer
 * credentials, so the pid is only what the client claims in `kmi-caller-pid` (for
 * correlation, never for a decision).
 */
export function callerOf(ctx: HandlerContext): string {
  const pid = ctx.requestHeader.get("kmi-caller-pid");
  const agent = ctx.requestHeader.get("user-agent") ?? "";
  const claimed = pid !== null && /^[0-9]{1,10}$/.test(pid) ? `pid ${pid} (claimed)` : "pid unknown";
  return agent === "" ? claimed : `${claimed}; ${agent.slice(0, 80)}`;
}
