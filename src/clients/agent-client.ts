/**
 * A lean client of the key agent's Unix-socket gRPC API (`kmi.agent.v1.KeyAgentService`),
 * on `@grpc/grpc-js` (the agent socket is the proxy's hot path; grpc-js costs far less per
 * call than connect-node's gRPC stack). Every call carries the `kmi-agent-workload: true`
 * header the agent requires. `WatchKeys` is kept open and reopened with backoff.
 */
import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Client, Metadata, credentials, status, type ClientReadableStream, type ServiceError } from "@grpc/grpc-js";
import {
  GetCertificateChainRequestSchema,
  GetCertificateChainResponseSchema,
  GetStatusRequestSchema,
  GetStatusResponseSchema,
  IssueLeafCertificateRequestSchema,
  IssueLeafCertificateResponseSchema,
  KeyAgentService,
  WatchKeysRequestSchema,
  WatchKeysResponseSchema,
  type GetCertificateChainResponse,
  type GetStatusResponse,
  type IssueLeafCertificateResponse,
  type WatchKeysRequest,
  type WatchKeysResponse,
} from "../gen/kmi/agent/v1/agent_pb.js";
import type { Logger } from "../common/logger.js";

/** The metadata header every agent call carries (the agent refuses calls without it). */
export const AGENT_WORKLOAD_HEADER = "kmi-agent-workload";

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
  /** Logger for watch reconnects. */
  readonly logger: Logger;
}

const SERVICE = `/${KeyAgentService.typeName}/`;
const CODE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(status)
    .filter(([, v]) => typeof v === "number")
    .map(([k, v]) => [v as number, k.toLowerCase()]),
);

function serializer<D extends DescMessage>(schema: D): (m: MessageShape<D>) => Buffer {
  return (m) => {
    const b = toBinary(schema, m);
    return Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  };
}

function deserializer<D extends DescMessage>(schema: D): (b: Buffer) => MessageShape<D> {
  return (b) => fromBinary(schema, b);
}

function toCallError(err: ServiceError): AgentCallError {
  return new AgentCallError(CODE_NAMES[err.code] ?? "unknown", err.code, err.details || err.message);
}

/** The client. One per proxy process; it keeps one HTTP/2 connection to the socket. */
export class AgentClient implements LeafIssuer {
  private readonly client: Client;
  private readonly timeoutMs: number;
  private readonly logger: Logger;

  constructor(options: AgentClientOptions) {
    // grpc-js reads "unix:<absolute path>" as a Unix-socket target.
    this.client = new Client(`unix:${options.socketPath}`, credentials.createInsecure(), {
      "grpc.max_receive_message_length": 4 * 1024 * 1024,
      // The agent is local: fail fast instead of queueing calls while it is down.
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": 2000,
    });
    this.timeoutMs = options.callTimeoutMs ?? 5000;
    this.logger = options.logger;
  }

  private metadata(): Metadata {
    const md = new Metadata();
    md.set(AGENT_WORKLOAD_HEADER, "true");
    return md;
  }

  private unary<I extends DescMessage, O extends DescMessage>(
    method: string,
    inSchema: I,
    outSchema: O,
    req: MessageShape<I>,
  ): Promise<MessageShape<O>> {
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        SERVICE + method,
        serializer(inSchema),
        deserializer(outSchema),
        req,
        this.metadata(),
        { deadline: Date.now() + this.timeoutMs },
        (err, res) => {
          if (err) reject(toCallError(err));
          else if (res === undefined) reject(new AgentCallError("internal", status.INTERNAL, "agent sent no response"));
          else resolve(res);
        },
      );
    });
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
    return this.unary("IssueLeafCertificate", IssueLeafCertificateRequestSchema, IssueLeafCertificateResponseSchema, msg);
  }

  /** GetCertificateChain of a tenant (its active intermediate and issuers). */
  getCertificateChain(tenantId: string): Promise<GetCertificateChainResponse> {
    return this.unary("GetCertificateChain", GetCertificateChainRequestSchema, GetCertificateChainResponseSchema, create(GetCertificateChainRequestSchema, { tenantId }));
  }

  /** GetStatus of the agent. */
  getStatus(): Promise<GetStatusResponse> {
    return this.unary("GetStatus", GetStatusRequestSchema, GetStatusResponseSchema, create(GetStatusRequestSchema, {}));
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
      const c = this.client.makeServerStreamRequest<WatchKeysRequest, WatchKeysResponse>(
        SERVICE + "WatchKeys",
        serializer(WatchKeysRequestSchema),
        deserializer(WatchKeysResponseSchema),
        create(WatchKeysRequestSchema, {}),
        this.metadata(),
      );
      call = c;
      let ended = false;
      const retry = (why: string): void => {
        if (ended) return;
        ended = true;
        call = undefined;
        onState?.(false);
        if (closed) return;
        this.logger.warn("agent watch stream ended; reopening", { reason: why, retryInMs: backoff });
        timer = setTimeout(open, backoff);
        timer.unref();
        backoff = Math.min(backoff * 2, 5000);
      };
      c.on("data", (ev: WatchKeysResponse) => {
        backoff = 100;
        try {
          onEvent(ev);
        } catch (err) {
          this.logger.error("agent watch event handler failed", { error: err as Error });
        }
      });
      c.on("metadata", () => onState?.(true));
      c.on("error", (err: ServiceError) => retry(toCallError(err).message));
      c.on("end", () => retry("stream closed by the agent"));
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
