/**
 * The one place that speaks node:http's private protocol between a `ClientRequest` and its
 * agent, for {@link ./tunnel-agent.ts}'s one-connection agent. None of this is documented by
 * Node; it is what `http.Agent` itself does (lib/_http_agent.js, lib/_http_client.js, Node 20),
 * and test/unit/proxy/client-request-agent.test.ts fails when an upgrade changes any of it:
 *
 * - `req.onSocket(socket)` hands a request its connection; `req.onSocket(undefined, err)`
 *   fails a request that is waiting for one (a request's public `destroy(err)` emits nothing
 *   until it has a socket);
 * - the socket's `free` event says the response ended and the connection can serve the next
 *   request, and its `_httpMessage` is the request it served (whose `shouldKeepAlive` says
 *   whether it may); the agent clears it when it keeps the connection;
 * - the socket's `agentRemove` event says a request took the connection over (an HTTP
 *   upgrade) and it no longer belongs to the agent.
 *
 * Why not `http.Agent` with its documented hooks (`createConnection`, `keepSocketAlive`):
 * its pool bookkeeping per request (option copies, names, free lists, TCP keep-alive and
 * ref/unref system calls) costs about a tenth of the proxy's CPU under keep-alive load and
 * buys nothing for a connection pinned to one client's tunnel.
 */
import type { ClientRequest } from "node:http";
import type { Socket } from "node:net";
import type { Duplex } from "node:stream";

type AgentSocket = Duplex & { _httpMessage?: ClientRequest | null };
type FailableRequest = ClientRequest & { onSocket(socket: undefined, err: Error): void };

/** Gives `req` its connection (what an agent's `addRequest` does once it has one). */
export function assignSocket(req: ClientRequest, socket: Duplex): void {
  req.onSocket(socket as Socket);
}

/** Fails a request that waits for a connection: it emits `error` with `err`, then `close`. */
export function failRequest(req: ClientRequest, err: Error): void {
  (req as FailableRequest).onSocket(undefined, err);
}

/**
 * Called when `socket` finished serving a request: `keep` is true when that request allows the
 * connection to serve another (the socket is then released from it), false when it must close.
 */
export function releaseSocket(socket: Duplex): boolean {
  const s = socket as AgentSocket;
  const req = s._httpMessage;
  if (req === undefined || req === null || !req.shouldKeepAlive) return false;
  s._httpMessage = null;
  return true;
}

/** Listeners of a connection's agent-side events; `off` removes them. */
export interface SocketAgentEvents {
  /** The response ended; the connection is free for the next request. */
  readonly free: () => void;
  /** A request took the connection over (an upgrade); it leaves the agent. */
  readonly removed: () => void;
}

/** Listens for the connection's `free` and `agentRemove` events. */
export function onAgentEvents(socket: Duplex, on: SocketAgentEvents): void {
  socket.on("free", on.free);
  socket.on("agentRemove", on.removed);
}

/** Stops listening (the listeners given to {@link onAgentEvents}). */
export function offAgentEvents(socket: Duplex, on: SocketAgentEvents): void {
  socket.off("free", on.free);
  socket.off("agentRemove", on.removed);
}
