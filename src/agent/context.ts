/**
 * What the agent's services need, as small interfaces declared where they are used. The real
 * server wires them to the key holder, the KDC link and the identity; in-process tests wire
 * them to fakes.
 */
import type { Logger } from "../common/logger.js";
import type { KeyHolder } from "./key-holder.js";

/** Wall-clock time in epoch milliseconds; injected so tests can move time. */
export interface Clock {
  /** Now, in epoch milliseconds. */
  now(): number;
}

/** The system clock. */
export const systemClock: Clock = { now: () => Date.now() };

/** The leaf policy's knobs (validated by config.ts). */
export interface LeafPolicy {
  /** Longest leaf validity, from notBefore (backdating included) to notAfter, in ms; default 47 days. */
  maxLifetimeMs: number;
  /** How far notBefore is set back from now, for clients with a slow clock, in ms; default 1 hour. */
  backdateMs: number;
}

/** Where the machine's attestation stands, for GetStatus. */
export type AttestationStateName = "attested" | "not_attested" | "refused" | "quarantined";

/** The agent's runtime status outside the key holder (identity, attestation, KDC link). */
export interface AgentRuntimeStatus {
  /** Machine id; empty before enrollment. */
  machineId: string;
  /** Machine group; empty before enrollment. */
  group: string;
  /** Attestation state. */
  attestation: AttestationStateName;
  /** Why attestation failed, when it did. */
  attestationProblem: string;
  /** When the attestation token expires (epoch ms). */
  attestationExpiresAt?: number;
  /** End of the machine certificate's validity (epoch ms). */
  certificateNotAfter?: number;
  /** True while the watch stream to the KDC is open. */
  kdcConnected: boolean;
  /** Last KDC error, when the link is down. */
  kdcError: string;
  /** The KDC replica attached to (or tried while down). */
  kdcUrl?: string;
  /** The store revision the held keys are up to date with; 0n before the first sync. */
  kdcRevision?: bigint;
  /** Moves to another KDC replica since start. */
  kdcFailovers?: number;
  /** When the agent last received its secrets from the KDC (epoch ms). */
  lastSync?: number;
  /** True while serving from the sealed cache (no sync since start). */
  servingFromCache: boolean;
}

/** Source of the runtime status. */
export interface StatusSource {
  /** The status now. */
  status(): AgentRuntimeStatus;
}

/** Everything the KeyAgentService handlers use. */
export interface AgentServiceContext {
  /** The keys held in memory. */
  holder: KeyHolder;
  /** Time. */
  clock: Clock;
  /** Logger (one line per issuance or signature, never key material). */
  logger: Logger;
  /** Leaf policy. */
  policy: LeafPolicy;
  /** Identity, attestation and KDC link, for GetStatus. */
  status: StatusSource;
  /** kmi version, for GetStatus. */
  version: string;
  /** Aborted when the agent stops: WatchKeys streams end on it. */
  stopping?: AbortSignal;
}
