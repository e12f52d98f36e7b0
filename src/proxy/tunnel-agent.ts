/**
 * The HTTP/1.1 agent of one intercepted tunnel: an Agent-like object (node:http accepts any
 * object with `addRequest`) holding the tunnel's ONE origin connection (TLS, or TCP for
 * cleartext HTTP inside a CONNECT). Its first request uses the connection made for the
 * handshake; later ones (after the origin closed it) open (and verify) a new one. What it needs of node:http's private agent protocol is in
 * ./client-request-agent.ts (and why it is not an `http.Agent`).
 */
import type { ClientRequest } from "node:http";
import type { Duplex } from "node:stream";
import { assignSocket, failRequest, offAgentEvents, onAgentEvents, releaseSocket, type SocketAgentEvents } from "./client-request-agent.js";

/** One tunnel's origin connection, lent to one request at a time. */
export class TunnelAgent {
  // What ClientRequest reads from its agent.
  readonly keepAlive = true;
  readonly maxSockets = 1;
  readonly protocol = "http:";
  readonly defaultPort = 80;
  readonly options: Record<string, never> = {};

  private socket: Duplex | undefined;
  /** The socket serves a request now. */
  private busy = false;
  /** The socket has served a request (the next one reuses it). */
  private used = false;
  private connecting = false;
  private destroyed = false;
  /** Requests waiting for the connection (a client that pipelines). */
  private readonly queue: ClientRequest[] = [];

  private readonly events: SocketAgentEvents = {
    free: () => this.onFree(),
    // An upgrade (WebSocket) took the socket over: it leaves the agent.
    removed: () => this.detach(),
  };

  private readonly onClose = (): void => {
    this.detach();
  };

  constructor(
    first: Duplex,
    private readonly reconnect: () => Promise<Duplex>,
  ) {
    this.attach(first);
  }

  private onFree(): void {
    const s = this.socket;
    if (s === undefined) return;
    if (!s.writable) {
      s.destroy();
      return;
    }
    const next = this.queue.shift();
    if (next !== undefined) {
      this.assign(next, s);
      return;
    }
    if (!releaseSocket(s)) {
      s.destroy();
      return;
    }
    this.busy = false;
  }

  private attach(s: Duplex): void {
    this.socket = s;
    this.busy = false;
    this.used = false;
    onAgentEvents(s, this.events);
    s.on("close", this.onClose);
  }

  private detach(): void {
    const s = this.socket;
    if (s === undefined) return;
    offAgentEvents(s, this.events);
    s.off("close", this.onClose);
    this.socket = undefined;
    this.busy = false;
    if (this.queue.length > 0) this.open();
  }

  private assign(req: ClientRequest, s: Duplex): void {
    this.busy = true;
    if (this.used) req.reusedSocket = true;
    this.used = true;
    assignSocket(req, s);
  }

  /** Called by ClientRequest for each request. */
  addRequest(req: ClientRequest): void {
    const s = this.socket;
    if (s !== undefined && !this.busy && !s.destroyed) {
      this.assign(req, s);
      return;
    }
    this.queue.push(req);
    if (s === undefined || s.destroyed) this.open();
  }

  private open(): void {
    if (this.connecting || this.destroyed || this.socket !== undefined) return;
    this.connecting = true;
    this.reconnect().then(
      (sock) => {
        this.connecting = false;
        if (this.destroyed) {
          sock.destroy();
          return;
        }
        this.attach(sock);
        const req = this.queue.shift();
        if (req !== undefined) this.assign(req, sock);
      },
      (err: Error) => {
        this.connecting = false;
        const req = this.queue.shift();
        if (req !== undefined) failRequest(req, err);
        if (this.queue.length > 0) this.open();
      },
    );
  }

  /** Closes the origin connection (the client's went away). */
  destroy(): void {
    this.destroyed = true;
    const s = this.socket;
    this.socket = undefined;
    s?.destroy();
  }
}
