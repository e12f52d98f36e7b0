/**
 * A connect Transport over several replicas of one service (./endpoints.ts): each call goes to
 * the replica in use and, when it fails before the server acted, to the next. Used by `kmi ctl`,
 * the KDC's Auditserver client and the Auditserver's KDC client, so that every one of them
 * retries the same calls in the same way.
 *
 * Which failures move on (`failedBeforeActing`):
 * - the connection could not be made (refused, unreachable, name not found): nothing was sent;
 * - UNAVAILABLE with a `retry-after-ms` hint: the replica shed the call before any work;
 * - for a read (a method named Get…, List…, Verify…, Tail…, Watch…), any UNAVAILABLE: sending a
 *   read again changes nothing.
 * A change that got any other UNAVAILABLE (a reset mid-call, the replica's store unreachable) is
 * not sent again: it may have been applied; the caller sees the error and decides.
 * Server-streaming calls move on only while the stream has not started (their one request is
 * kept to send again); client and bidi streams never do.
 */
import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import { urlList } from "../common/urls.js";
import { callWithFailover, Endpoints, retryAfterMs } from "./endpoints.js";

/** Node error codes of a connection that could not be made (nothing reached the server). */
const NOT_CONNECTED = new Set(["ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN", "EADDRNOTAVAIL"]);

/** Methods that only read: any UNAVAILABLE may go to another replica. */
const READ = /^(Get|List|Verify|Tail|Watch)([A-Z]|$)/;

/** True when the error says the connection was never made. */
export function notConnected(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++) {
    const code = (e as NodeJS.ErrnoException).code;
    if (typeof code === "string" && NOT_CONNECTED.has(code)) return true;
  }
  return false;
}

/** True when a call of `methodName` that failed with `err` may be sent to another replica (see above). */
export function failedBeforeActing(err: unknown, methodName: string): boolean {
  if (!(err instanceof ConnectError) || err.code !== Code.Unavailable) return false;
  return notConnected(err) || retryAfterMs(err) !== undefined || READ.test(methodName);
}

/** Options of {@link createFailoverTransport}. */
export interface FailoverTransportOptions {
  /** Called when a call leaves a replica for the next. */
  onFailover?: (url: string, err: unknown, next: string) => void;
}

/** A transport over the replicas of `endpoints` plus `close()`, which closes every replica's session. */
export interface FailoverTransport {
  readonly transport: Transport;
  readonly endpoints: Endpoints;
  close(): void;
}

/**
 * Builds the transport. `transportFor(url)` makes one replica's transport (made on first use,
 * kept); its `close` is called by `close()`.
 */
export function createFailoverTransport(
  endpoints: Endpoints,
  transportFor: (url: string) => { transport: Transport; close?: () => void },
  options: FailoverTransportOptions = {},
): FailoverTransport {
  const made = new Map<string, { transport: Transport; close?: () => void }>();
  const at = (url: string): Transport => {
    let t = made.get(url);
    if (t === undefined) {
      t = transportFor(url);
      made.set(url, t);
    }
    return t.transport;
  };
  const onFailover = options.onFailover;
  const transport: Transport = {
    unary(method, signal, timeoutMs, header, input, contextValues) {
      return callWithFailover(endpoints, (url) => at(url).unary(method, signal, timeoutMs, header, input, contextValues), {
        retryIf: (err) => failedBeforeActing(err, method.name),
        ...(onFailover !== undefined ? { onFailover } : {}),
      });
    },
    async stream(method, signal, timeoutMs, header, input, contextValues) {
      if (method.methodKind !== "server_streaming") return at(endpoints.current).stream(method, signal, timeoutMs, header, input, contextValues);
      // The one request of a server stream, kept so that it can be sent to another replica.
      const requests: (typeof input extends AsyncIterable<infer M> ? M : never)[] = [];
      for await (const m of input) requests.push(m);
      return callWithFailover(endpoints, (url) => at(url).stream(method, signal, timeoutMs, header, replay(requests), contextValues), {
        retryIf: (err) => failedBeforeActing(err, method.name),
        ...(onFailover !== undefined ? { onFailover } : {}),
      });
    },
  };
  return {
    transport,
    endpoints,
    close() {
      for (const t of made.values()) t.close?.();
      made.clear();
    },
  };
}

async function* replay<T>(items: readonly T[]): AsyncIterable<T> {
  yield* items;
}

/**
 * The transport of a URL flag's value: one URL, or a comma-separated list of replicas (then a
 * failover transport, from the first URL on). `close()` closes every session made.
 */
export function transportForUrls(urls: string, transportFor: (url: string) => { transport: Transport; close?: () => void }, options: FailoverTransportOptions = {}): { transport: Transport; close: () => void } {
  const list = urlList(urls);
  if (list.length === 1) {
    const one = transportFor(list[0]!);
    return { transport: one.transport, close: () => one.close?.() };
  }
  const f = createFailoverTransport(new Endpoints(list), transportFor, options);
  return { transport: f.transport, close: () => f.close() };
}
