/**
 * The adapter from a grpc-js server call to Connect's `HandlerContext`, so that services
 * written once in Connect's handler style (`ServiceImpl`) run on the agent's grpc-js server
 * (./grpc-server.ts). The one place that builds a `HandlerContext` or a `Headers` by hand.
 *
 * Why not connect's public `createHandlerContext`: it makes everything eagerly (a deadline
 * timer, two linked AbortControllers, a `Headers` copy of the metadata) and a unary handler on
 * the agent's socket reads one header. Measured on the 2-core dev machine, per call with the
 * abort at the end: ~1 us here against ~60 us for `createHandlerContext`, on a hot path whose
 * whole server CPU is ~40 us per call (docs/architecture.md). What this relies on, checked by
 * test/unit/common/grpc-handler-context.contract.test.ts on every upgrade: the members and
 * reasons of connect's own context, and that Node's `Headers` can be subclassed and its
 * prototype methods called on the subclass.
 */
import { Code, ConnectError, createContextValues, type ContextValues, type HandlerContext } from "@connectrpc/connect";
import type { DescMethod, DescService } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { kDraining, kPeer, kPeerAddress } from "./rpc.js";
import type { PeerIdentity } from "./tls.js";

/** A grpc-js server call of any kind. */
export type AnyCall =
  | grpc.ServerUnaryCall<unknown, unknown>
  | grpc.ServerReadableStream<unknown, unknown>
  | grpc.ServerWritableStream<unknown, unknown>
  | grpc.ServerDuplexStream<unknown, unknown>;

/** The method a call is for, as the context reports it. */
export interface CallTarget {
  readonly service: DescService;
  readonly method: DescMethod;
  /** `http://localhost/pkg.Service/Method`. */
  readonly url: string;
}

function hasEntries(h: Headers): boolean {
  for (const _ of h.keys()) return true;
  return false;
}

export function toMetadata(h: Headers): grpc.Metadata {
  const md = new grpc.Metadata();
  h.forEach((value, key) => {
    if (key.endsWith("-bin")) md.add(key, Buffer.from(value, "base64"));
    else md.add(key, value);
  });
  return md;
}

export const CANCELED = new ConnectError("the client canceled the call", Code.Canceled);

/**
 * The abort reason of a context whose call is over (its signal aborts then, as Connect's does,
 * and its deadline timer is cleared). Preallocated: abort() without a reason builds a
 * DOMException with a stack trace, about 15 us on every call of the hot path.
 */
export const FINISHED = new ConnectError("the call is finished", Code.Canceled);

/** Characters of an HTTP header name (RFC 9110 token). */
const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** What `Headers` strips from both ends of a value. */
const HTTP_WHITESPACE = /^[\t\n\r ]+|[\t\n\r ]+$/g;

function metadataValueToString(v: grpc.MetadataValue): string {
  return typeof v === "string" ? v : v.toString("base64");
}

const HeadersBase = Headers as unknown as new () => object;
const headersProto = Headers.prototype;

/**
 * The request headers of a call: a real `Headers`, filled from the gRPC metadata only when a
 * method other than `get`/`has` needs it. `get` and `has` read the metadata directly and
 * answer what `new Headers(metadata.toHttp2Headers())` would (several values joined with ",",
 * binary values in base64, surrounding whitespace trimmed): building that Headers costs about
 * 4.5 us per call, and the hot path only reads a few names.
 */
class MetadataHeaders extends HeadersBase {
  private md: grpc.Metadata | undefined;

  constructor(md: grpc.Metadata) {
    super();
    this.md = md;
  }

  private fill(): void {
    const md = this.md;
    if (md === undefined) return;
    this.md = undefined;
    const record = md.toHttp2Headers() as Record<string, string | string[]>;
    for (const key of Object.keys(record)) {
      const v = record[key]!;
      headersProto.append.call(this, key, Array.isArray(v) ? v.join(",") : v);
    }
  }

  get(name: string): string | null {
    const md = this.md;
    if (md === undefined || !HEADER_NAME.test(name)) {
      this.fill();
      return headersProto.get.call(this, name);
    }
    const values = md.get(name);
    if (values.length === 0) return null;
    const v = values.length === 1 ? metadataValueToString(values[0]!) : values.map(metadataValueToString).join(",");
    return v.replace(HTTP_WHITESPACE, "");
  }

  has(name: string): boolean {
    const md = this.md;
    if (md === undefined || !HEADER_NAME.test(name)) {
      this.fill();
      return headersProto.has.call(this, name);
    }
    return md.get(name).length > 0;
  }

  append(name: string, value: string): void {
    this.fill();
    headersProto.append.call(this, name, value);
  }

  delete(name: string): void {
    this.fill();
    headersProto.delete.call(this, name);
  }

  set(name: string, value: string): void {
    this.fill();
    headersProto.set.call(this, name, value);
  }

  getSetCookie(): string[] {
    this.fill();
    return headersProto.getSetCookie.call(this);
  }

  forEach(callbackfn: (value: string, key: string, parent: Headers) => void, thisArg?: unknown): void {
    this.fill();
    headersProto.forEach.call(this, callbackfn, thisArg);
  }

  entries(): ReturnType<Headers["entries"]> {
    this.fill();
    return headersProto.entries.call(this);
  }

  keys(): ReturnType<Headers["keys"]> {
    this.fill();
    return headersProto.keys.call(this);
  }

  values(): ReturnType<Headers["values"]> {
    this.fill();
    return headersProto.values.call(this);
  }

  [Symbol.iterator](): ReturnType<Headers["entries"]> {
    this.fill();
    return headersProto[Symbol.iterator].call(this);
  }
}

/**
 * The `HandlerContext` of one call, built for the hot path: what a unary handler usually never
 * reads is made only when read. The abort signal (with the deadline timer and the cancel
 * listener that feed it) exists only once a handler reads `signal`: two linked
 * AbortControllers, their listeners and the abort at the end of the call cost about 30 us per
 * call, and a unary handler that never looks at the signal cannot tell the difference. Read
 * late, the signal is already aborted if the call was canceled, its deadline passed, or the
 * call is over, with the reason it would have had. The response headers and trailers and the
 * context values are made on first read too.
 */
export class GrpcCallContext implements HandlerContext {
  readonly protocolName = "grpc";
  readonly requestMethod = "POST";
  readonly service: DescService;
  readonly method: DescMethod;
  readonly url: string;
  readonly requestHeader: Headers;
  /** Remaining time before the deadline, in ms; undefined without one (as Connect's). */
  readonly timeoutMs: () => number | undefined;

  private readonly call: AnyCall;
  /** Epoch ms of the deadline, or undefined. */
  private readonly deadlineAt: number | undefined;
  private controller: AbortController | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** Why the call ended, once it did (before the signal was made). */
  private finishedReason: unknown;
  private finished = false;
  private resHeader: Headers | undefined;
  private resTrailer: Headers | undefined;
  private ctxValues: ContextValues | undefined;

  constructor(
    rt: CallTarget,
    call: AnyCall,
    readonly peerAddress: string,
    readonly peer: PeerIdentity | undefined,
    private readonly draining: AbortSignal,
  ) {
    this.service = rt.service;
    this.method = rt.method;
    this.url = rt.url;
    this.call = call;
    this.requestHeader = new MetadataHeaders(call.metadata) as unknown as Headers;
    const deadline = call.getDeadline();
    const deadlineMs = typeof deadline === "number" ? deadline : deadline.getTime();
    if (Number.isFinite(deadlineMs)) {
      const now = Date.now();
      const at = now + Math.max(0, deadlineMs - now);
      this.deadlineAt = at;
      this.timeoutMs = () => at - Date.now();
    } else {
      this.deadlineAt = undefined;
      this.timeoutMs = noTimeout;
    }
  }

  get signal(): AbortSignal {
    let c = this.controller;
    if (c !== undefined) return c.signal;
    c = this.controller = new AbortController();
    if (this.finished) {
      c.abort(this.finishedReason);
    } else if (this.call.cancelled) {
      c.abort(CANCELED);
    } else if (this.deadlineAt !== undefined && this.deadlineAt - Date.now() <= 0) {
      c.abort(new ConnectError("the operation timed out", Code.DeadlineExceeded));
    } else {
      const controller = c;
      if (this.deadlineAt !== undefined) {
        this.timer = setTimeout(() => {
          if (!controller.signal.aborted) controller.abort(new ConnectError("the operation timed out", Code.DeadlineExceeded));
        }, this.deadlineAt - Date.now());
      }
      (this.call as NodeJS.EventEmitter).once("cancelled", () => this.abort(CANCELED));
    }
    return c.signal;
  }

  get responseHeader(): Headers {
    return (this.resHeader ??= new Headers());
  }

  get responseTrailer(): Headers {
    return (this.resTrailer ??= new Headers());
  }

  get values(): ContextValues {
    return (this.ctxValues ??= createContextValues().set(kPeer, this.peer).set(kPeerAddress, this.peerAddress).set(kDraining, this.draining));
  }

  /** Response headers set by the handler, or undefined. */
  setResponseHeader(): Headers | undefined {
    return this.resHeader !== undefined && hasEntries(this.resHeader) ? this.resHeader : undefined;
  }

  /** Response trailers set by the handler, or undefined. */
  setResponseTrailer(): Headers | undefined {
    return this.resTrailer !== undefined && hasEntries(this.resTrailer) ? this.resTrailer : undefined;
  }

  /** Aborts the signal (when there is one) with `reason`; the first reason wins. */
  abort(reason: unknown): void {
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    const c = this.controller;
    if (c !== undefined) {
      if (!c.signal.aborted) c.abort(reason);
    } else if (!this.finished) {
      // The reason an eager signal would have had: a cancel or the deadline may have come first.
      this.finished = true;
      this.finishedReason = this.call.cancelled
        ? CANCELED
        : this.deadlineAt !== undefined && this.deadlineAt - Date.now() <= 0
          ? new ConnectError("the operation timed out", Code.DeadlineExceeded)
          : reason;
    }
  }
}

function noTimeout(): undefined {
  return undefined;
}
