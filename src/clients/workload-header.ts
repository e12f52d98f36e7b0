/**
 * The metadata header every call to the key agent's socket carries, as SPIFFE's Workload API
 * does: the agent refuses a call without it, so a request forged through some other channel
 * (a browser, an SSRF) that cannot set gRPC metadata is refused. The one definition, for the
 * agent's server and every client.
 */

/** Header name, lowercase. */
export const WORKLOAD_HEADER = "kmi-agent-workload";

/** The header's required value. */
export const WORKLOAD_HEADER_VALUE = "true";
