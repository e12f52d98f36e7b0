/**
 * Contract test of src/proxy/tls-server-socket.ts: a server-side TLSSocket made with
 * `new TLSSocket(socket, { isServer: true })` still reports `secureConnecting` after its
 * handshake (so node:http2 would wait for it), and once marked done, an http2 server it is
 * emitted into serves a real h2 client.
 */
import { connect as h2connect, createServer as createH2Server } from "node:http2";
import { createServer as createNetServer, type AddressInfo, type Socket } from "node:net";
import { createSecureContext, TLSSocket } from "node:tls";
import { describe, expect, it } from "vitest";
import { markHandshakeDone } from "../../../src/proxy/tls-server-socket.js";
import { makeOriginPki } from "../../fixtures/proxy/origins.js";

describe("a server-side TLSSocket handed to node:http2", () => {
  it("keeps secureConnecting after 'secure' until marked; then http2 serves it", async () => {
    const pki = makeOriginPki();
    const h2 = createH2Server();
    h2.on("stream", (stream) => {
      stream.respond({ ":status": 200 });
      stream.end("hello over h2");
    });
    let before: boolean | undefined;
    const tcp = createNetServer((socket: Socket) => {
      const tls = new TLSSocket(socket, { isServer: true, secureContext: createSecureContext({ cert: pki.good.cert, key: pki.good.key }), ALPNProtocols: ["h2"] });
      tls.once("secure", () => {
        before = (tls as TLSSocket & { secureConnecting?: boolean }).secureConnecting;
        markHandshakeDone(tls);
        h2.emit("connection", tls);
      });
    });
    await new Promise<void>((r) => tcp.listen(0, "127.0.0.1", r));
    const port = (tcp.address() as AddressInfo).port;
    const client = h2connect(`https://localhost:${port}`, { ca: pki.caPem });
    try {
      const body = await new Promise<string>((resolve, reject) => {
        const req = client.request({ ":path": "/" });
        let text = "";
        req.setEncoding("utf8");
        req.on("data", (c: string) => (text += c));
        req.on("end", () => resolve(text));
        req.on("error", reject);
        client.on("error", reject);
      });
      expect(body).toBe("hello over h2");
      // What the adapter exists for: Node leaves it set on a socket no tls.Server accepted.
      expect(before).toBe(true);
    } finally {
      client.destroy();
      tcp.close();
      h2.close();
    }
  });
});
