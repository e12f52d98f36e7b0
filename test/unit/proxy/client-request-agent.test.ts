/**
 * Contract test of src/proxy/client-request-agent.ts: what the tunnel agent relies on in
 * node:http's private agent protocol, checked against a real node:http server and client. If a
 * Node upgrade changes any of it, this fails before the proxy misbehaves.
 */
import { createServer, request, type ClientRequest, type IncomingMessage, type Server } from "node:http";
import { connect, type AddressInfo, type Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { assignSocket, failRequest, offAgentEvents, onAgentEvents, releaseSocket } from "../../../src/proxy/client-request-agent.js";

let server: Server;
let port = 0;

beforeAll(async () => {
  server = createServer((req, res) => {
    res.end(`hello ${req.url}`);
  });
  server.on("upgrade", (_req, socket) => {
    socket.end("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n");
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  port = (server.address() as AddressInfo).port;
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise<void>((r) => server.close(() => r()));
});

/** An agent that hands every request to `give`. */
function agentOf(give: (req: ClientRequest) => void): object {
  return { keepAlive: true, maxSockets: 1, protocol: "http:", defaultPort: 80, options: {}, addRequest: give };
}

function body(res: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = "";
    res.setEncoding("utf8");
    res.on("data", (c: string) => (text += c));
    res.on("end", () => resolve(text));
    res.on("error", reject);
  });
}

function tcp(): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: "127.0.0.1", port });
    s.once("connect", () => resolve(s));
    s.once("error", reject);
  });
}

/** One GET over `socket` through `assignSocket`; resolves with the response body and the request. */
async function get(socket: Socket, path: string, headers: Record<string, string> = {}): Promise<{ text: string; req: ClientRequest }> {
  const req = request({ host: "127.0.0.1", port, path, headers, agent: agentOf((r) => assignSocket(r, socket)) as never });
  const res = await new Promise<IncomingMessage>((resolve, reject) => {
    req.once("response", resolve);
    req.once("error", reject);
    req.end();
  });
  return { text: await body(res), req };
}

describe("node:http's agent protocol, as the tunnel agent uses it", () => {
  it("assignSocket serves a request; 'free' follows its response; releaseSocket keeps a keep-alive connection for the next", async () => {
    const s = await tcp();
    let frees = 0;
    const events = { free: () => frees++, removed: () => {} };
    onAgentEvents(s, events);
    const freed = new Promise<void>((r) => s.once("free", () => r()));
    const first = await get(s, "/one");
    expect(first.text).toBe("hello /one");
    await freed;
    expect(frees).toBe(1);
    expect(releaseSocket(s)).toBe(true);
    // The released connection serves another request.
    const second = await get(s, "/two");
    expect(second.text).toBe("hello /two");
    offAgentEvents(s, events);
    s.destroy();
  });

  it("a request without keep-alive: no 'free', the connection closes; releaseSocket refuses a connection no request used", async () => {
    const s = await tcp();
    expect(releaseSocket(s)).toBe(false);
    let frees = 0;
    onAgentEvents(s, { free: () => frees++, removed: () => {} });
    const closed = new Promise<void>((r) => s.once("close", () => r()));
    await get(s, "/x", { connection: "close" });
    await closed;
    expect(frees).toBe(0);
  });

  it("an upgrade takes the connection over: 'agentRemove' is emitted", async () => {
    const s = await tcp();
    let removed = 0;
    onAgentEvents(s, { free: () => {}, removed: () => removed++ });
    const req = request({ host: "127.0.0.1", port, path: "/ws", headers: { connection: "Upgrade", upgrade: "test" }, agent: agentOf((r) => assignSocket(r, s)) as never });
    const upgraded = await new Promise<Socket>((resolve, reject) => {
      req.once("upgrade", (_res, socket: Socket) => resolve(socket));
      req.once("error", reject);
      req.end();
    });
    expect(upgraded).toBe(s);
    expect(removed).toBe(1);
    s.destroy();
  });

  it("failRequest fails a waiting request with that error, then closes it", async () => {
    const err = new Error("origin gone");
    const req = request({ host: "127.0.0.1", port, path: "/", agent: agentOf((r) => setImmediate(() => failRequest(r, err))) as never });
    const events: string[] = [];
    const got = await new Promise<Error>((resolve) => {
      req.once("error", (e) => {
        events.push("error");
        resolve(e);
      });
      req.once("close", () => events.push("close"));
      req.end();
    });
    expect(got).toBe(err);
    await new Promise<void>((r) => (req.closed ? r() : req.once("close", () => r())));
    expect(events).toEqual(["error", "close"]);
  });
});
