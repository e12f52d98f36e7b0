/**
 * The typed `@grpc/grpc-js` client for any generated service: one channel (one HTTP/2
 * connection), protobuf-es binary (de)serialization from the service's descriptors, fixed
 * metadata on every call. The agent's client (./agent-client.ts) is built on it; the bench uses
 * it for the KDC and the Auditserver over TLS too.
 */
import { create, fromBinary, toBinary, type DescMessage, type DescMethod, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";

/** A unary method of a generated service. */
export type UnaryMethod<I extends DescMessage, O extends DescMessage> = DescMethod & { methodKind: "unary"; input: I; output: O };

/** Options of {@link LeanClient}. */
export interface LeanClientOptions {
  /** `unix:/path` or `host:port`. */
  readonly target: string;
  /** TLS: the CA to trust (PEM); plaintext when undefined. */
  readonly caPem?: string;
  /** Client certificate and key for mutual TLS (PEM). */
  readonly cert?: { readonly cert: string; readonly key: string };
  /** Metadata sent on every call. */
  readonly metadata?: Readonly<Record<string, string>>;
  /** TLS server name override. */
  readonly serverName?: string;
  /** A connection of its own (grpc-js otherwise shares one between clients of the same target). */
  readonly ownConnection?: boolean;
  /** More grpc-js channel options (they win over the defaults). */
  readonly channelOptions?: grpc.ChannelOptions;
}

const serializers = new WeakMap<DescMessage, (v: unknown) => Buffer>();
const deserializers = new WeakMap<DescMessage, (b: Buffer) => unknown>();

function serializer(schema: DescMessage): (v: unknown) => Buffer {
  let s = serializers.get(schema);
  if (s === undefined) {
    s = (v) => {
      const u8 = toBinary(schema, v as never);
      return Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
    };
    serializers.set(schema, s);
  }
  return s;
}

function deserializer(schema: DescMessage): (b: Buffer) => unknown {
  let d = deserializers.get(schema);
  if (d === undefined) {
    d = (b) => fromBinary(schema, b);
    deserializers.set(schema, d);
  }
  return d;
}

/** A failed call: the gRPC status code and details. */
export class CallError extends Error {
  override name = "CallError";
  constructor(
    readonly code: number,
    readonly details: string,
  ) {
    super(`${grpc.status[code] ?? code}: ${details}`);
  }
}

/** The client. */
export class LeanClient {
  private readonly client: grpc.Client;
  private readonly metadata: grpc.Metadata;

  constructor(options: LeanClientOptions) {
    const creds =
      options.caPem === undefined
        ? grpc.credentials.createInsecure()
        : grpc.credentials.createSsl(Buffer.from(options.caPem), options.cert ? Buffer.from(options.cert.key) : null, options.cert ? Buffer.from(options.cert.cert) : null);
    const channelOptions: grpc.ChannelOptions = {
      "grpc.max_receive_message_length": 16 * 1024 * 1024,
      "grpc.enable_channelz": 0,
    };
    if (options.serverName !== undefined) channelOptions["grpc.ssl_target_name_override"] = options.serverName;
    if (options.ownConnection === true) channelOptions["grpc.use_local_subchannel_pool"] = 1;
    this.client = new grpc.Client(options.target, creds, { ...channelOptions, ...options.channelOptions });
    this.metadata = new grpc.Metadata();
    for (const [k, v] of Object.entries(options.metadata ?? {})) this.metadata.set(k, v);
  }

  /** Waits until the channel is connected (or `timeoutMs` passed). */
  ready(timeoutMs = 10_000): Promise<void> {
    return new Promise((resolve, reject) => this.client.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve())));
  }

  /** Calls a unary method with a message already built (the hot path). */
  unaryMessage<I extends DescMessage, O extends DescMessage>(method: DescMethod & { input: I; output: O }, request: MessageShape<I>, timeoutMs = 30_000): Promise<MessageShape<O>> {
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        `/${method.parent.typeName}/${method.name}`,
        serializer(method.input) as (v: MessageShape<I>) => Buffer,
        deserializer(method.output) as (b: Buffer) => MessageShape<O>,
        request,
        this.metadata,
        { deadline: Date.now() + timeoutMs },
        (err, res) => {
          if (err) reject(new CallError(err.code, err.details));
          else if (res === undefined) reject(new CallError(grpc.status.INTERNAL, "the server sent no response"));
          else resolve(res);
        },
      );
    });
  }

  /** Calls a unary method with an init object. */
  unary<I extends DescMessage, O extends DescMessage>(method: DescMethod & { input: I; output: O }, init: MessageInitShape<I>, timeoutMs = 30_000): Promise<MessageShape<O>> {
    return this.unaryMessage(method, create(method.input, init), timeoutMs);
  }

  /** Opens a server stream; `onMessage` gets each message. Returns the call (cancel it to end). */
  serverStream<I extends DescMessage, O extends DescMessage>(
    method: DescMethod & { input: I; output: O },
    init: MessageInitShape<I>,
    onMessage: (m: MessageShape<O>) => void,
    onEnd: (err: CallError | undefined) => void,
  ): grpc.ClientReadableStream<MessageShape<O>> {
    const call = this.client.makeServerStreamRequest(
      `/${method.parent.typeName}/${method.name}`,
      serializer(method.input) as (v: MessageShape<I>) => Buffer,
      deserializer(method.output) as (b: Buffer) => MessageShape<O>,
      create(method.input, init),
      this.metadata,
      {},
    );
    let ended = false;
    call.on("data", onMessage);
    call.on("error", (err: grpc.ServiceError) => {
      if (ended) return;
      ended = true;
      onEnd(new CallError(err.code, err.details));
    });
    call.on("end", () => {
      if (ended) return;
      ended = true;
      onEnd(undefined);
    });
    return call;
  }

  /** Closes the channel. */
  close(): void {
    this.client.close();
  }
}
