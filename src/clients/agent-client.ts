/**
 * The client of the key agent's Unix-socket gRPC API (`kmi.agent.v1.KeyAgentService`), on the
 * shared grpc-js client (./grpc-client.ts; the agent socket is the proxy's hot path, and
 * grpc-js costs far less per call than connect-node's gRPC stack). Every call carries the
 * workload header the agent requires (./workload-header.ts). `WatchKeys` is kept open and
 * reopened with backoff. Used by the proxy, `kmi up`, `kmi ctl status` and the bench.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { status, type ClientReadableStream } from "@grpc/grpc-js";
import {
  IssueLeafCertificateRequestSchema,
  KeyAgentService,
  type GetCertificateChainResponse,
  type GetStatusResponse,
  type IssueLeafCertificateResponse,
  type WatchKeysResponse,
} from "../gen/kmi/agent/v1/agent_pb.js";
import type { Logger } from "../common/logger.js";
import { CallError, LeanClient } from "./grpc-client.js";
import { WORKLOAD_HEADER, WORKLOAD_HEADER_VALUE } from "./workload-header.js";

/** A failed agent call: the gRPC status name and the agent's message. */
export class AgentCallError extends Error {
  override name = "AgentCallError";
  constructor(
    /** The gRPC status code name, lowercase (`unavailable`, `not_found`, ...). */
    readonly code: string,
    /** The numeric gRPC status. */
    readonly grpcCode: number,
    message: string,
  ) {
    super(message);
  }
}

/** What the proxy asks the agent to certify. */
export interface LeafRequest {
  /** Tenant id. */
  readonly tenantId: string;
  /** The leaf's public key, DER SubjectPublicKeyInfo. */
  readonly publicKeyDer: Uint8Array;
  /** DNS names for the subjectAltName. */
  readonly dnsNames: readonly string[];
  /** IP addresses for the subjectAltName. */
  readonly ipAddresses: readonly string[];
  /** Subject CN (one of the names), or empty. */
  readonly commonName: string;
  /** Requested end of validity, or undefined for the agent's maximum. */
  readonly notAfter: Date | undefined;
}

/** The part of the agent the proxy's leaf minting uses. */
export interface LeafIssuer {
  /** Calls IssueLeafCertificate. */
  issueLeafCertificate(req: LeafRequest): Promise<IssueLeafCertificateResponse>;
}

/** A WatchKeys subscription. */
export interface KeyWatch {
  /** Stops watching (no reconnect). */
  close(): void;
}

/** Options of {@link AgentClient}. */
export interface AgentClientOptions {
  /** Path of the agent's Unix socket. */
  readonly socketPath: string;
  /** Deadline of a unary call; default 5000 ms. */
  readonly callTimeoutMs?: number;
  /** Logger for watch reconnects (WatchKeys only). */
  readonly logger?: Logger;
  /** Metadata sent on every call besides the workload header (e.g. `kmi-caller-pid`). */
  readonly metadata?: Readonly<Record<string, string>>;
}

const CODE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(status)
    .filter(([, v]) => typeof v === "number")
    .map(([k, v]) => [v as number, k.toLowerCase()]),
);

function toAgentError(err: unknown): unknown {
  if (!(err instanceof CallError)) return err;
  return new AgentCallError(CODE_NAMES[err.code] ?? "unknown", err.code, err.details || err.message);
}

/**
 * A typed grpc-js client of the agent's socket that sends the workload header: for a caller
 * that needs the raw methods (the bench); others use {@link AgentClient}.
 */
export function createAgentGrpcClient(socketPath: string, options: { metadata?: Readonly<Record<string, string>>; ownConnection?: boolean } = {}): LeanClient {
  return new LeanClient({
    // grpc-js reads "unix:<absolute path>" as a Unix-socket target.
    target: `unix:${socketPath}`,
    metadata: { ...options.metadata, [WORKLOAD_HEADER]: WORKLOAD_HEADER_VALUE },
    ...(options.ownConnection === true ? { ownConnection: true } : {}),
    channelOptions: {
      "grpc.max_receive_message_length": 4 * 1024 * 1024,
      // The agent is local: fail fast instead of queueing calls while it is down.
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": 2000,
    },
  });
}

const M = KeyAgentService.method;

/** The client. One per proxy process; it keeps one HTTP/2 connection to the socket. */
export class AgentClient implements LeafIssuer {
  private readonly client: LeanClient;
  private readonly timeoutMs: number;
  private readonly logger: Logger | undefined;

  constructor(options: AgentClientOptions) {
    this.client = createAgentGrpcClient(options.socketPath, { ...(options.metadata !== undefined ? { metadata: options.metadata } : {}) });
    this.timeoutMs = options.callTimeoutMs ?? 5000;
    this.logger = options.logger;
  }

  /** IssueLeafCertificate for the proxy's in-memory public key. */
  issueLeafCertificate(req: LeafRequest): Promise<IssueLeafCertificateResponse> {
    const msg = create(IssueLeafCertificateRequestSchema, {
      tenantId: req.tenantId,
      publicKey: req.publicKeyDer,
      dnsNames: [...req.dnsNames],
      ipAddresses: [...req.ipAddresses],
      commonName: req.commonName,
      ca: false,
    });
    if (req.notAfter !== undefined) msg.notAfter = timestampFromDate(req.notAfter);
    return this.client.unaryMessage(M.issueLeafCertificate, msg, this.timeoutMs).catch((err: unknown) => Promise.reject(toAgentError(err)));
  }

  /** GetCertificateChain of a tenant (its active intermediate and issuers). */
  getCertificateChain(tenantId: string): Promise<GetCertificateChainResponse> {
    return this.client.unary(M.getCertificateChain, { tenantId }, this.timeoutMs).catch((err: unknown) => Promise.reject(toAgentError(err)));
  }

  /** GetStatus of the agent; `timeoutMs` defaults to the client's call timeout. */
  getStatus(timeoutMs = this.timeoutMs): Promise<GetStatusResponse> {
    return this.client.unary(M.getStatus, {}, timeoutMs).catch((err: unknown) => Promise.reject(toAgentError(err)));
  }

  /**
   * Opens WatchKeys for all tenants and keeps it open: when the stream ends or fails it is
   * reopened with exponential backoff (100 ms to 5 s). Each (re)open starts with a SNAPSHOT,
   * which lets the caller notice what it missed while disconnected.
   */
  watchKeys(onEvent: (event: WatchKeysResponse) => void, onState?: (connected: boolean) => void): KeyWatch {
    let closed = false;
    let call: ClientReadableStream<WatchKeysResponse> | undefined;
    let timer: NodeJS.Timeout | undefined;
    let backoff = 100;
    const open = (): void => {
      if (closed) return;
      const retry = (why: string): void => {
        call = undefined;
        onState?.(false);
        if (closed) return;
        this.logger?.warn("agent watch stream ended; reopening", { reason: why, retryInMs: backoff });
        timer = setTimeout(open, backoff);
        timer.unref();
        backoff = Math.min(backoff * 2, 5000);
      };
      const onMessage = (ev: WatchKeysResponse): void => {
        backoff = 100;
        try {
          onEvent(ev);
        } catch (err) {
          this.logger?.error("agent watch event handler failed", { error: err as Error });
        }
      };
      const onEnd = (err: CallError | undefined): void => retry(err === undefined ? "stream closed by the agent" : (toAgentError(err) as Error).message);
      const c = this.client.serverStream(M.watchKeys, {}, onMessage, onEnd);
      call = c;
      c.on("metadata", () => onState?.(true));
    };
    open();
    return {
      close: () => {
        closed = true;
        clearTimeout(timer);
        call?.cancel();
      },
    };
  }

  /** Closes the channel. */
  close(): void {
    this.client.close();
  }
}
