/**
 * What crosses the cluster's IPC channel between `kmi proxy --workers` and its workers, and the
 * worker's side of it. The channel is the anonymous socket pair node:cluster makes between the
 * primary and each worker it forks (nothing on the filesystem, no other process can reach it),
 * with the "advanced" (structured clone) serialization.
 *
 * | message | direction | carries |
 * |---|---|---|
 * | `kmi:leaf` | worker → primary | tenant, the host asked for, the origin certificate's names, end and fingerprint, the client's address and CONNECT target |
 * | `kmi:leaf` (answer) | primary → worker | the leaf material (**the leaf's own private key**, PKCS#8 PEM; leaf + chain) and the tenant's **session ticket keys**, or the error (`limited`: the client's new-host limit) |
 * | `kmi:issue-limited` | primary → worker | a client address whose new-host bucket is empty, and the tokens it holds (below 1) |
 * | `kmi:new-host` | worker → primary, and the answer | before a worker refuses a CONNECT on the limit: tenant, target, client address; refused or not |
 * | `kmi:watch` | worker → primary | "send me the key state" (at start) |
 * | `kmi:ticket-keys` | primary → worker | a tenant's new **session ticket keys** (periodic rotation) |
 * | `kmi:watch-state`, `kmi:key-event` | primary → worker | the agent's WatchKeys stream, as protobuf bytes (key ids and states, never key material) |
 * | `kmi:metrics` | both | the primary asks; the worker answers with its registry as prom-client JSON |
 * | `kmi:reload`, `kmi:shutdown` | primary → worker | SIGHUP and SIGTERM, relayed |
 *
 * Why a leaf key crosses IPC: TLS is terminated in the worker that accepted the connection, and
 * Node's TLS needs the key in that process; minting once per machine means the key is made once
 * and handed to the workers. It is the proxy's own ephemeral key (the agent never returns a
 * KMI-managed one), never written to disk, and the channel never leaves the machine's memory.
 */
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { AgentCallError, type KeyWatch } from "../clients/agent-client.js";
import { WatchKeysResponseSchema, type IssueLeafCertificateResponse, type WatchKeysResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { IssuanceRefused } from "./leaf-cache.js";
import type { LeafMaterial, LeafMinter } from "./leaf-minter.js";
import { LeafRejected, leafEntryOf } from "./leaf-minter.js";
import type { OriginCertificate } from "./origin-cert.js";
import type { ProxyAgent } from "./server.js";

/** A worker's request for a leaf. */
export interface LeafRequestMessage {
  readonly type: "kmi:leaf";
  readonly id: number;
  readonly tenant: string;
  readonly host: string;
  readonly origin: OriginCertificate;
  /** The client's address: the primary charges its new-host limit when it really mints. */
  readonly client: string;
  /** The CONNECT target (`host:port`): the primary remembers that the tenant got a leaf for it. */
  readonly target: string;
}

/**
 * A worker's question before it refuses a CONNECT on the new-host limit (its view of the
 * client's bucket is empty): does the primary refuse it too? Not when another worker served
 * the tenant a leaf for `target` lately (a cached host costs nothing), or the bucket refilled.
 */
export interface NewHostQuestionMessage {
  readonly type: "kmi:new-host";
  readonly id: number;
  readonly tenant: string;
  readonly target: string;
  readonly client: string;
}

/** The primary's answer to a {@link NewHostQuestionMessage}. */
export interface NewHostAnswerMessage {
  readonly type: "kmi:new-host";
  readonly id: number;
  readonly refused: boolean;
}

/** How a failed mint is told to the worker (so that it answers the same page as in one process). */
export type LeafFailure =
  | { readonly kind: "agent"; readonly code: string; readonly grpcCode: number; readonly message: string }
  | { readonly kind: "rejected"; readonly message: string }
  | { readonly kind: "limited"; readonly message: string }
  | { readonly kind: "error"; readonly message: string };

/** The primary's answer to a {@link LeafRequestMessage}. */
export type LeafAnswerMessage =
  | { readonly type: "kmi:leaf"; readonly id: number; readonly ok: true; readonly material: LeafMaterial; readonly ticketKeys: Uint8Array }
  | { readonly type: "kmi:leaf"; readonly id: number; readonly ok: false; readonly error: LeafFailure };

/**
 * The primary's word that `client`'s new-host bucket is empty (`tokens` below 1), sent to every
 * worker when a mint leaves it so or is refused: each worker then answers that client's next
 * CONNECT to a new host with the 429 itself, before the 200, as one process does.
 */
export interface IssueLimitedMessage {
  readonly type: "kmi:issue-limited";
  readonly client: string;
  readonly tokens: number;
}

/** Messages a worker sends. */
export type WorkerMessage = LeafRequestMessage | NewHostQuestionMessage | { readonly type: "kmi:watch" } | { readonly type: "kmi:metrics"; readonly id: number; readonly metrics: unknown[] };

/** Messages the primary sends. */
export type PrimaryMessage =
  | LeafAnswerMessage
  | { readonly type: "kmi:watch-state"; readonly connected: boolean }
  | { readonly type: "kmi:key-event"; readonly event: Uint8Array }
  | { readonly type: "kmi:metrics"; readonly id: number }
  | { readonly type: "kmi:ticket-keys"; readonly tenant: string; readonly keys: Uint8Array }
  | IssueLimitedMessage
  | NewHostAnswerMessage
  | { readonly type: "kmi:reload" }
  | { readonly type: "kmi:shutdown" };

/** True for a message of this protocol (cluster and prom-client use the same channel). */
export function isKmiMessage(m: unknown): m is { type: string } {
  return typeof m === "object" && m !== null && typeof (m as { type?: unknown }).type === "string" && (m as { type: string }).type.startsWith("kmi:");
}

/** A key event as bytes (its protobuf encoding). */
export function encodeKeyEvent(e: WatchKeysResponse): Uint8Array {
  return toBinary(WatchKeysResponseSchema, e);
}

/** The failure of a mint, as it crosses IPC. */
export function leafFailureOf(err: unknown): LeafFailure {
  if (err instanceof AgentCallError) return { kind: "agent", code: err.code, grpcCode: err.grpcCode, message: err.message };
  if (err instanceof LeafRejected) return { kind: "rejected", message: err.message };
  if (err instanceof IssuanceRefused) return { kind: "limited", message: err.message };
  return { kind: "error", message: err instanceof Error ? err.message : String(err) };
}

function errorOf(f: LeafFailure): Error {
  if (f.kind === "agent") return new AgentCallError(f.code, f.grpcCode, f.message);
  if (f.kind === "rejected") return new LeafRejected(f.message);
  if (f.kind === "limited") return new IssuanceRefused(f.message);
  return new Error(f.message);
}

/** The worker's end of the channel (`process.send` and its 'message' events). */
export interface PrimaryChannel {
  send(m: WorkerMessage): void;
  on(listener: (m: PrimaryMessage) => void): () => void;
}

/** The channel of this worker process. */
export function processChannel(): PrimaryChannel {
  return {
    send(m) {
      if (process.connected) process.send?.(m);
    },
    on(listener) {
      const l = (m: unknown): void => {
        if (isKmiMessage(m)) listener(m as PrimaryMessage);
      };
      process.on("message", l);
      return () => void process.off("message", l);
    },
  };
}

/** Longest a worker waits for the primary's leaf (the primary's agent call has its own deadline). */
const LEAF_ANSWER_TIMEOUT_MS = 30_000;
/** Longest a CONNECT waits for the primary's word on a new host (it answers from memory). */
const NEW_HOST_ANSWER_TIMEOUT_MS = 5_000;

type Answer = LeafAnswerMessage | NewHostAnswerMessage;

/**
 * A worker's minter: asks the primary, which mints once per machine (concurrent requests from
 * every worker share one issuance) and holds the per-client new-host limit (so the worker
 * takes no token of its own, and asks the primary before refusing a CONNECT: its
 * {@link LeafMinter.sharedLimit}), and builds the TLS context here with the tenant's ticket
 * keys from the primary. Ticket keys are rotated by the primary (on the same key events, and
 * periodically: `kmi:ticket-keys`).
 */
export function createWorkerLeafMinter(channel: PrimaryChannel): LeafMinter & { close(): void } {
  let next = 1;
  const pending = new Map<number, { resolve: (m: Answer) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  // The keys each tenant's leaves get, as the primary last said (with a leaf, or a rotation).
  const ticketKeys = new Map<string, Buffer>();
  const off = channel.on((m) => {
    if (m.type === "kmi:ticket-keys") ticketKeys.set(m.tenant, bufferOf(m.keys));
    if (m.type !== "kmi:leaf" && m.type !== "kmi:new-host") return;
    const p = pending.get(m.id);
    if (p === undefined) return;
    pending.delete(m.id);
    clearTimeout(p.timer);
    p.resolve(m);
  });
  const ask = <A extends Answer>(question: (id: number) => WorkerMessage, timeoutMs: number, silence: string): Promise<A> => {
    const id = next++;
    return new Promise<A>((resolve, reject) => {
      const timer = setTimeout(() => {
        pending.delete(id);
        reject(new Error(silence));
      }, timeoutMs);
      pending.set(id, { resolve: resolve as (m: Answer) => void, reject, timer });
      channel.send(question(id));
    });
  };
  return {
    sharedLimit: {
      // No answer (the primary is gone or stuck): refuse, as the worker's own view says.
      refusesNewHost: (tenant, target, client) =>
        ask<NewHostAnswerMessage>((id) => ({ type: "kmi:new-host", id, tenant, target, client }), NEW_HOST_ANSWER_TIMEOUT_MS, "no answer").then(
          (a) => a.refused,
          () => true,
        ),
    },
    rotateTicketKeys() {},
    ticketKeysOf(tenant) {
      const k = ticketKeys.get(tenant);
      if (k === undefined) throw new Error(`no session ticket keys from the primary for tenant "${tenant}" yet`);
      return k;
    },
    async mint(tenant, origin, host, requester = { client: "", target: "" }) {
      const question = (id: number): LeafRequestMessage => ({ type: "kmi:leaf", id, tenant, host, origin, ...requester });
      const answer = await ask<LeafAnswerMessage>(question, LEAF_ANSWER_TIMEOUT_MS, "the proxy's primary process did not answer with a leaf");
      if (!answer.ok) throw errorOf(answer.error);
      const keys = bufferOf(answer.ticketKeys);
      ticketKeys.set(tenant, keys);
      return leafEntryOf(answer.material, keys);
    },
    close() {
      off();
      for (const p of pending.values()) {
        clearTimeout(p.timer);
        p.reject(new Error("the proxy's primary process went away"));
      }
      pending.clear();
    },
  };
}

/** A Buffer over bytes that crossed IPC (structured clone gives a Uint8Array). */
export function bufferOf(b: Uint8Array): Buffer {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

/**
 * A worker's agent: the WatchKeys stream relayed by the primary (which holds the one agent
 * connection). Leaves are not issued through it: the worker's minter asks the primary.
 */
export function createWorkerAgent(channel: PrimaryChannel): ProxyAgent {
  return {
    issueLeafCertificate(): Promise<IssueLeafCertificateResponse> {
      return Promise.reject(new Error("a proxy worker issues leaves through its primary"));
    },
    watchKeys(onEvent, onState): KeyWatch {
      const off = channel.on((m) => {
        if (m.type === "kmi:watch-state") onState?.(m.connected);
        else if (m.type === "kmi:key-event") onEvent(fromBinary(WatchKeysResponseSchema, m.event));
      });
      channel.send({ type: "kmi:watch" });
      return { close: off };
    },
    close() {},
  };
}
